"""Masked-language-model pre-training of a BERT-style encoder (``lmforge train`` with ``model.arch=encoder``).

The data path is the language model's (``lmforge prepare``: tokenizer, token shards, random
fixed-size windows). What differs is the objective: 15% of the positions of each window are
chosen; of those 80% become the mask token, 10% a random token and 10% stay as they are; the loss
is the cross-entropy of the original tokens at the chosen positions only (Devlin et al. 2019).

The output layer is the token embedding itself (logits = h E^T), so a checkpoint holds nothing
but :class:`~lmforge.model.encoder.EncoderModel` weights: ``load_model`` reads it, and
``lmforge finetune sentiment|srl --init-from`` starts from it. The mask token is a special
token of the recipe's tokenizer (``data.special_tokens``, e.g. ``<mask>``).

The masks of a micro-batch are drawn from a generator seeded by (seed, step, micro-batch) for the
whole global batch, every draw of a fixed shape, and each process keeps its rows: the same
windows get the same masks at any world size and after a resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.padding import IGNORE_INDEX
from lmforge.errors import LMForgeError
from lmforge.tasks.windows import WindowObjective
from lmforge.train.objective import Run

MASK_TOKENS = ("<mask>", "[MASK]")


def mask_tokens(x: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15, never: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): ``rate`` of the positions chosen (never those holding ``never`` ids), 80% of
    them masked, 10% replaced by a random token, 10% kept; labels are IGNORE_INDEX elsewhere.
    The draws depend on the shape of ``x`` only, never on its tokens."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    v = torch.rand(x.shape, generator=generator, device=x.device)
    random_tokens = torch.randint(0, vocab_size, x.shape, generator=generator, device=x.device)
    chosen = u < rate
    for t in never:
        chosen &= x != t
    labels = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    inputs = torch.where(chosen & (v < 0.8), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (v >= 0.8) & (v < 0.9), random_tokens, inputs)
    return inputs, labels


def mlm_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the original tokens at the chosen positions."""
    logits = model(inputs, token_logits=True)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def find_mask_id(tokenizer) -> int:
    for name in MASK_TOKENS:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    raise LMForgeError("the tokenizer has no mask token; add <mask> to data.special_tokens "
                       "(e.g. --data.special_tokens='[\"<|endoftext|>\", \"<mask>\"]') and a new data.data_dir")


class MaskedLanguageModel(WindowObjective):
    """BERT's masked-token objective on an :class:`~lmforge.model.encoder.EncoderModel`."""

    name = "lm"  # an encoder checkpoint is a pre-trained trunk, like a language model's
    find_unused_parameters = True  # the pooler (BERT-style recipes) takes no part

    def setup(self, run: Run) -> None:
        from lmforge.tokenizer import Tokenizer

        if run.cfg.model.arch != "encoder":
            raise LMForgeError(f"masked-LM pre-training trains model.arch=encoder, the recipe has "
                               f"{run.cfg.model.arch}; use an encoder recipe (e.g. -c encoder-tiny) or --model.arch=encoder")
        super().setup(run)
        tokenizer = Tokenizer.load(self.tokenizer_path)
        self.mask_id = find_mask_id(tokenizer)
        self.never = tuple(tokenizer.token_to_id(t) for t in tokenizer.special_tokens)

    def build_model(self) -> nn.Module:
        from lmforge.model import build_model
        from lmforge.train import checkpoint as ckpt_io

        model = build_model(self.run.cfg.model)
        if self.init_from is not None:
            ckpt_io.load_weights(model, self.init_from)
        return model

    def _masks(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks drawn for the global batch this rank's rows ``x`` belong to; this rank's rows of them."""
        world = self.run.world
        full = x.new_zeros((x.size(0) * world.world_size, x.size(1)))
        rows = slice(world.rank * x.size(0), (world.rank + 1) * x.size(0))
        full[rows] = x
        inputs, labels = mask_tokens(full, self.mask_id, self.run.cfg.model.vocab_size, generator, never=self.never)
        return inputs[rows], labels[rows]

    def next_batch(self, step: int, micro: int):
        x, _ = self.sampler.next_batch()
        seed = self.run.cfg.train.seed
        return self._masks(x, torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro))

    def count(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        inputs, labels = (t.to(self.run.device, non_blocking=True) for t in batch)
        return mlm_loss(model, inputs, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from lmforge import hardware
        from lmforge.data import eval_batches

        cfg, device = self.run.cfg, self.run.device
        g = torch.Generator().manual_seed(0)  # the same masks at every evaluation
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            for x, _ in eval_batches(self.val_data, cfg.model.block_size,
                                     cfg.train.eval_batch_size or cfg.train.batch_size, cfg.train.eval_batches, seed=0):
                inputs, labels = mask_tokens(x, self.mask_id, cfg.model.vocab_size, g, never=self.never)
                with hardware.autocast(device, self.run.dtype):
                    total += mlm_loss(model, inputs.to(device), labels.to(device)).item()
                count += int((labels != IGNORE_INDEX).sum())
        finally:
            model.train(was_training)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}
