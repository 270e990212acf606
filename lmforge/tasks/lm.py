"""Language modelling: the next-token objective on fixed-size windows of token shards (``lmforge train``).

The data path: ``lmforge prepare`` (tokenizer, train/val shards, ``meta.json``), then random
windows of ``model.block_size + 1`` tokens from :class:`~lmforge.data.sampler.BlockSampler`; the
loss is the cross-entropy of every next token. ``train.batch_size`` is the global number of
windows per micro-batch: each of W processes draws its own ``batch_size / W`` of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import hardware
from lmforge.config import Config
from lmforge.data.padding import IGNORE_INDEX
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.distributed import World, all_reduce_sum
from lmforge.tasks.windows import WindowObjective

NAME = "lm"


def token_loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the targets ``y`` (IGNORE_INDEX: none) under ``logits`` [B, T, V]."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def window_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss of a batch of windows ``(x, y)`` (moved to the model's device)."""
    device = next(model.parameters()).device
    x, y = (t.to(device, non_blocking=True) for t in batch)
    return token_loss_sum(model(x), y)


def window_count(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Target tokens of a batch of windows."""
    return int((batch[1] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, block_size: int, batch_size: int, n_batches: int | None = None,
    seed: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats per token) and perplexity on ``dataset``.

    With ``seed``: ``n_batches`` random windows, the same ones every call (so
    evaluations during training are comparable); without: sequential windows
    covering the split (or its first ``n_batches`` batches).

    With several processes (``world``) every rank calls this with the same arguments: each
    evaluates its share of the rows of every batch and the sums are added up, so the result is
    the single-process one (up to the order of the additions).
    """
    from lmforge.data.sampler import eval_batches

    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = hardware.resolve_dtype(dtype, device)
    dtype = dtype or torch.float32
    ranks = world.world_size if world is not None else 1
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for x, y in eval_batches(dataset, block_size, batch_size, n_batches=n_batches, seed=seed):
            if ranks > 1:
                x, y = x.tensor_split(ranks)[world.rank], y.tensor_split(ranks)[world.rank]
                if len(x) == 0:  # fewer rows than ranks: still run a forward (FSDP gathers weights in it)
                    x, y = x.new_zeros((1, block_size)), y.new_full((1, block_size), IGNORE_INDEX)
            x, y = x.to(device), y.to(device)
            with hardware.autocast(device, dtype):
                logits = model(x)
            loss_sum += token_loss_sum(logits, y).item()
            tokens += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if ranks > 1:
        sums = all_reduce_sum(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device), world)
        loss_sum, tokens = float(sums[0]), int(sums[1])
    if tokens == 0:
        raise LMForgeError("evaluation found no tokens; the split is smaller than one block, lower model.block_size")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


class LanguageModel(WindowObjective):
    """Next-token prediction with a decoder-only Transformer."""

    name = NAME
    evaluates_sharded = True

    def build_model(self) -> nn.Module:
        from lmforge.model import build_model

        model = build_model(self.run.cfg.model)
        if self.init_from is not None:
            ckpt_io.load_weights(model, self.init_from)
        return model

    def next_batch(self, step: int, micro: int):
        return self.sampler.next_batch()

    def count(self, batch) -> int:
        return window_count(batch)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return window_loss(model, batch)

    def flops_per_item(self, model: nn.Module) -> float | None:
        return model.flops_per_token(self.run.cfg.model.block_size)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        cfg, run = self.run.cfg, self.run
        out = evaluate(model, self.val_data, cfg.model.block_size, cfg.train.eval_batch_size or cfg.train.batch_size,
                       n_batches=cfg.train.eval_batches, seed=cfg.train.seed, device=run.device,
                       dtype=run.dtype, world=run.world if run.world.distributed else None)
        return {"val_loss": out["loss"], "val_perplexity": out["perplexity"]}


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Pre-train ``cfg``'s decoder-only language model on its data (see :func:`lmforge.train.trainer.fit`)."""
    from lmforge.train.trainer import fit

    if cfg.model.arch == "encoder":  # a BERT-style encoder learns by masked-language modelling
        from lmforge.tasks.mlm import MaskedLanguageModel

        return fit(cfg, MaskedLanguageModel(), resume)
    return fit(cfg, LanguageModel(), resume)
