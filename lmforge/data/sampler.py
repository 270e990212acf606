"""Fixed-size blocks of tokens: random windows for training, sequential ones for evaluation.

A training batch is ``batch_size`` windows of ``block_size + 1`` tokens at random positions;
``x`` is the first ``block_size`` tokens of each window and ``y`` the same window shifted by one,
so ``y[:, t]`` is the token that follows ``x[:, t]``.

The positions of step ``k`` come from a fresh PCG64 generator seeded with ``(seed, k)``, so the
whole sampler state is two integers: saving ``{"seed", "step"}`` and loading it later continues
the exact same stream, and no generator internals end up in a checkpoint. With several ranks
every rank draws the same ``batch_size * world_size`` positions and keeps its own slice, so the
ranks never see the same window in a step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data.padding import IGNORE_INDEX
from lmforge.data.shards import TokenDataset
from lmforge.errors import LMForgeError


def _entropy(seed: int) -> int:
    """numpy seeds must be non-negative; map any Python int onto 64 bits."""
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def _check_length(dataset: TokenDataset, block_size: int) -> None:
    if block_size < 1:
        raise LMForgeError(f"block_size must be at least 1, got {block_size}")
    if len(dataset) < block_size + 1:
        raise LMForgeError(
            f"the {getattr(dataset, 'split', 'evaluation')} data has {len(dataset)} tokens, "
            f"fewer than block_size + 1 = {block_size + 1}; "
            "use more text, a larger data.val_fraction or a smaller model.block_size"
        )


def _to_xy(dataset: TokenDataset, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([dataset.window(int(s), block_size + 1) for s in starts])
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class BlockSampler:
    """Random training windows with a resumable, JSON-serialisable position."""

    def __init__(self, dataset: TokenDataset, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        _check_length(dataset, block_size)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise LMForgeError(f"invalid sampler setup: batch_size={batch_size}, rank={rank}, "
                               f"world_size={world_size}; need batch_size >= 1 and 0 <= rank < world_size")
        self.dataset, self.block_size, self.batch_size = dataset, block_size, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size  # any int, negative too
        self.step = 0  # batches drawn so far

    def starts(self, step: int) -> np.ndarray:
        """Start positions of this rank's windows at ``step``."""
        rng = np.random.Generator(np.random.PCG64([_entropy(self.seed), step]))
        n_starts = len(self.dataset) - self.block_size  # a window needs block_size + 1 tokens
        every_rank = rng.integers(0, n_starts, size=self.batch_size * self.world_size)
        return every_rank[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both ``torch.long`` of shape ``[batch_size, block_size]``."""
        x, y = _to_xy(self.dataset, self.starts(self.step), self.block_size)
        self.step += 1
        return x, y

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "block_size": self.block_size,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off (its seed wins over the one given to the constructor)."""
        try:
            self.seed, self.step = int(state["seed"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise LMForgeError(f"invalid sampler state {state!r}; resume from an intact checkpoint") from None


def eval_batches(dataset: TokenDataset, block_size: int, batch_size: int, n_batches: int | None = None,
                 seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for evaluation.

    Without ``seed``: sequential, non-overlapping windows from the start of the split (the targets
    of consecutive windows tile the split; the last batch may be smaller), then for a tail shorter
    than ``block_size`` one more window ending at the last token whose earlier targets are
    IGNORE_INDEX: every token after the first is predicted exactly once. With ``seed``: random windows from a fresh generator, the same
    on every call; ``n_batches`` defaults to as many as a sequential pass would give.
    """
    _check_length(dataset, block_size)
    if batch_size < 1:
        raise LMForgeError(f"batch_size must be at least 1, got {batch_size}")
    sequential = np.arange(0, len(dataset) - block_size, block_size)
    if seed is None:
        batches = [sequential[i:i + batch_size] for i in range(0, len(sequential), batch_size)]
        for starts in batches[:n_batches]:
            yield _to_xy(dataset, starts, block_size)
        covered = len(sequential) * block_size  # targets 1..covered are scored
        if (n_batches is None or n_batches >= len(batches)) and covered < len(dataset) - 1:
            start = len(dataset) - block_size - 1  # the tail: one last window, only its new targets count
            x, y = _to_xy(dataset, np.array([start]), block_size)
            y = y.clone()  # x and y can share one window's memory
            y[:, :covered - start] = IGNORE_INDEX
            yield x, y
        return
    rng = np.random.Generator(np.random.PCG64(_entropy(seed)))
    n_batches = n_batches if n_batches is not None else max(1, -(-len(sequential) // batch_size))
    for _ in range(n_batches):
        yield _to_xy(dataset, rng.integers(0, len(dataset) - block_size, size=batch_size), block_size)
