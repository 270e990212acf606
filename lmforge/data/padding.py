"""Padding of token rows into batches, and the label that marks a position without a target.

Imports torch and nothing of lmforge, so any model, task or decoding module can use it.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: label of positions that the loss skips (non-first subwords, special tokens, prompts, padding)
IGNORE_INDEX = -100


def pad_batch(rows: Sequence[Sequence[int]], pad: int, *, width: int | None = None,
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one width: (ids [B, T] long, mask [B, T] bool, True = real token).

    ``width`` defaults to the longest row. Rows are right-padded (training batches); ``left=True``
    puts the padding first, so that every row's last token sits in the last column (decoding).
    """
    if width is None:
        width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        real = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, real] = torch.tensor(r, dtype=torch.long)
        mask[i, real] = True
    return ids, mask


def pad_labels(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Right-pad label lists to ``width`` with IGNORE_INDEX: [B, width] long."""
    return pad_batch(rows, IGNORE_INDEX, width=width)[0]
