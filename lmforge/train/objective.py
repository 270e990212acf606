"""What the one training loop (:mod:`lmforge.train.trainer`) asks of a kind of training.

An :class:`Objective` is everything that differs between pre-training a language model, masked-LM
pre-training, translation, summarization, sentiment and SRL: where its examples and tokenizer come
from, which model it trains (and from which checkpoint it starts), how a micro-batch is drawn,
its loss, its validation metrics and its final report. The trainer owns everything else: resume,
seeding, optimizer and schedule, accumulation, precision, clipping, data parallelism, logging,
checkpoints and plots. A new task is a new objective, never a new loop.

The loss of an optimizer step is the sum of the per-item losses (target tokens, or examples) of
all its micro-batches on all ranks, divided by their number. :meth:`Objective.count` says how
many items a micro-batch holds *before* its forward pass, so each micro-batch's share can be
back-propagated and its graph freed at once: gradient accumulation bounds memory.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.train.distributed import World

#: model settings that may change on resume or init_from without changing any weight's shape
FREE_MODEL_KEYS = ("preset", "dropout", "init_std")


def say_stderr(message: str) -> None:
    """Logs go to stderr (through tqdm, so the progress bar stays intact); stdout keeps the summary."""
    tqdm.write(message, file=sys.stderr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Run:
    """What an objective may know of the run it serves."""

    cfg: Config
    world: World
    device: torch.device
    #: the autocast dtype of forward passes (float32: none)
    dtype: torch.dtype
    out_dir: Path
    #: the checkpoint a resumed run continues from (None for a new run)
    resume_from: Path | None = None
    say: Callable[[str], None] = say_stderr
    #: filled by the objective: names of parameters a warm start did not fill (train.fresh_lr_scale)
    fresh: list[str] = field(default_factory=list)


def check_same_model(ckpt: Path, cfg: Config, what: str) -> None:
    """Refuse a checkpoint of another task, or whose weights cannot be ``cfg.model``'s."""
    from dataclasses import fields

    from lmforge.train import checkpoint as ckpt_io

    saved = ckpt_io.read_config(ckpt)
    diffs = [f"{f.name}: {getattr(saved.model, f.name)!r} in the checkpoint, {getattr(cfg.model, f.name)!r} in the config"
             for f in fields(ModelConfig)
             if f.name not in FREE_MODEL_KEYS and getattr(saved.model, f.name) != getattr(cfg.model, f.name)]
    if saved.task.name != cfg.task.name:
        diffs.insert(0, f"task {saved.task.name!r} in the checkpoint, {cfg.task.name!r} in the config")
    if diffs:
        raise LMForgeError(f"cannot {what} {ckpt}: the model or task differs ({'; '.join(diffs)}); "
                           f"use the recipe and model settings of {ckpt / ckpt_io.CONFIG}, or a new train.out_dir")


def rank_share(rows: list, world: World) -> list:
    """This rank's contiguous part of a global micro-batch's rows (may be empty with few rows)."""
    n, w, r = len(rows), world.world_size, world.rank
    return rows[r * n // w:(r + 1) * n // w]


class Objective:
    """Base class: the defaults suit objectives whose micro-batches are drawn by a resumable sampler."""

    #: the task name recorded in checkpoints (task.name)
    name = "lm"
    #: what ``<unit>_per_second`` counts: the items of :meth:`throughput`
    unit = "tokens"
    #: DDP must look for parameters a step did not use (heads that only some batches reach)
    find_unused_parameters = False
    #: every rank takes part in :meth:`evaluate` with its share (False: the main rank evaluates the
    #: whole model alone, gathered from its shards under FSDP, and tells the others the result)
    evaluates_sharded = False

    run: Run

    # ---- set-up, in this order
    def setup(self, run: Run) -> None:
        """Read the data and the tokenizer, fill ``run.cfg.model`` and check ``run.resume_from``
        against them; nothing may be written yet."""
        self.run = run

    def build_model(self) -> nn.Module:
        """The model (seeded by the trainer); with ``train.init_from`` its weights loaded. Weights of
        ``run.resume_from`` are loaded by the trainer."""
        raise NotImplementedError

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file each checkpoint gets a copy of."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        """One line for the start of the run."""
        return f"{self.name}: {sum(p.numel() for p in model.parameters()):,} parameters"

    # ---- data: ``self.sampler`` (set in setup) draws the batches and knows its position
    sampler: Any = None

    def state_dict(self) -> dict:
        """The sampler's position (JSON), for an exact resume."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def next_batch(self, step: int, micro: int) -> Any:
        """This rank's part of micro-batch ``micro`` of optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def epoch(self) -> int | None:
        """Passes over the training examples so far (None for an endless stream of windows)."""
        return getattr(self.sampler, "epoch", None)

    # ---- the loss
    def count(self, batch: Any) -> int:
        """Items (target tokens, examples) the loss of ``batch`` sums over; no device work."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The summed loss of ``batch`` (a float32 scalar on the model's device)."""
        raise NotImplementedError

    def throughput(self, batch: Any) -> int:
        """Items ``<unit>_per_second`` counts for ``batch`` (default: its count)."""
        return self.count(batch)

    def flops_per_item(self, model: nn.Module) -> float | None:
        """Training FLOPs per unit (for MFU); None: no MFU."""
        return None

    # ---- evaluation and the end of the run
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, keys ``val_*`` (``val_loss`` drawn in loss.png); {} without validation data."""
        return {}

    def finish(self, model: nn.Module, summary: dict[str, Any]) -> None:
        """After the last step, on the main rank with the whole model: add the final scores to
        ``summary`` and write the objective's own files (report, plots of its metric)."""
