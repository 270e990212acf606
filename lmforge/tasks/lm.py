"""Language modelling: the next-token objective on fixed-size windows of token shards (``lmforge train``).

The data path: ``lmforge prepare`` (tokenizer, train/val shards, ``meta.json``), then random
windows of ``model.block_size + 1`` tokens from :class:`~lmforge.data.sampler.BlockSampler`; the
loss is the cross-entropy of every next token. ``train.batch_size`` is the global number of
windows per micro-batch: each of W processes draws its own ``batch_size / W`` of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import hardware
from lmforge.config import Config
from lmforge.data.padding import IGNORE_INDEX
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train import distributed as dist_io
from lmforge.train.distributed import World, all_reduce_sum
from lmforge.train.objective import Objective, Run, check_same_model

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


def prepare_data(cfg: Config, progress: bool, world: World | None = None) -> dict:
    """``lmforge prepare`` on the main rank unless ``data.data_dir`` holds prepared data; the
    vocabulary size it implies goes into ``cfg.model``."""
    from lmforge.data.shards import load_meta, prepare

    world = world or World()
    meta_path = Path(cfg.data.data_dir) / "meta.json"
    if world.is_main and not meta_path.exists():
        prepare(cfg.data, progress=progress)
    dist_io.barrier(world)
    if not meta_path.exists():
        raise LMForgeError(
            f"{meta_path} is missing on this node (rank {world.rank}); put data.data_dir on a shared file system "
            "or run `lmforge prepare` with the same recipe on every node first"
        )
    meta = load_meta(cfg.data.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise LMForgeError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {cfg.data.data_dir} has "
            f"{meta['vocab_size']} tokens; set --model.vocab_size=0 to take it from the data"
        )
    return meta


def check_compatible(ckpt: Path, cfg: Config, what: str) -> None:
    """Refuse a checkpoint whose weights cannot be this config's model, or whose tokenizer differs."""
    check_same_model(ckpt, cfg, what)
    ckpt_tok = ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    data_tok = Path(cfg.data.data_dir) / ckpt_io.TOKENIZER
    if not data_tok.is_file():
        raise LMForgeError(f"{data_tok} is missing; rerun `lmforge prepare` for data.data_dir")
    if ckpt_io.read_json(ckpt_tok) != ckpt_io.read_json(data_tok):
        raise LMForgeError(
            f"cannot {what} {ckpt}: its tokenizer differs from {data_tok}; "
            "use the data directory the checkpoint was trained on (data.data_dir)"
        )


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


class WindowObjective(Objective):
    """Random windows of the prepared token shards: the data path of the language model and of the
    masked language model. Subclasses give the model and the loss."""

    def setup(self, run: Run) -> None:
        from lmforge.data.shards import TokenDataset

        super().setup(run)
        cfg, world = run.cfg, run.world
        prepare_data(cfg, progress=cfg.train.progress and world.is_main, world=world)
        self.train_data = TokenDataset(cfg.data.data_dir, "train")
        self.val_data = TokenDataset(cfg.data.data_dir, "val")
        for split, ds in (("train", self.train_data), ("val", self.val_data)):
            if len(ds) < cfg.model.block_size + 1:
                raise LMForgeError(
                    f"the {split} split of {cfg.data.data_dir} has {len(ds)} tokens, fewer than model.block_size+1 "
                    f"({cfg.model.block_size + 1}); use a larger corpus or a smaller model.block_size")
        self.rank_batch = dist_io.per_rank_batch(cfg.train.batch_size, world)
        self.init_from = None
        if run.resume_from is not None:
            check_compatible(run.resume_from, cfg, "resume from")
        elif cfg.train.init_from:
            self.init_from = ckpt_io.latest_checkpoint(cfg.train.init_from)
            check_compatible(self.init_from, cfg, "initialise from")
        from lmforge.data.sampler import BlockSampler

        self.sampler = BlockSampler(self.train_data, cfg.model.block_size, self.rank_batch, seed=cfg.train.seed,
                                    rank=world.rank, world_size=world.world_size)

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.run.cfg.data.data_dir) / ckpt_io.TOKENIZER

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def describe(self, model: nn.Module) -> str:
        cfg = self.run.cfg
        tcfg = cfg.train
        per_step = tcfg.batch_size * cfg.model.block_size * tcfg.grad_accum
        return (f"{self.name} model: {model.num_params():,} parameters "
                f"({model.num_params(exclude_embeddings=True):,} without embeddings); {tcfg.batch_size} x "
                f"{cfg.model.block_size} tokens per micro-batch ({self.rank_batch} windows per rank), "
                f"{per_step:,} tokens per step")

    def throughput(self, batch) -> int:
        return batch[0].numel()


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
