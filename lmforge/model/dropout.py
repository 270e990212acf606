"""Dropout, with a random mask that is cheap to draw on the CPU.

Inverted dropout (the form every Transformer uses): while training, each element is zeroed with
probability p and the survivors are multiplied by 1 / (1 - p), so the expected output equals the
input and evaluation needs no rescaling.

On the CPU, torch's own dropout draws its mask with ``bernoulli_``, one 32-bit random number per
element through a slow path: in an encoder-decoder's training step on 2 cores its 26 masks took
about 15% of the step. Here each element's keep-or-drop comes from 15 random bits of a 64-bit
draw (``random_`` over int64 is several times faster; it gives 63 random bits, 15 or more in each
quarter): the element is kept when its 15 bits, read as an integer, are at least
``cut = round(p * 32768)``. The probability actually applied is therefore ``cut / 32768`` (within
1 / 65536 of p) and the scale is that probability's, so the expected output is still exactly the
input. The bits come from torch's default generator, so ``torch.manual_seed`` and the trainer's
saved random state reproduce a run, and its resume, exactly. Other devices keep ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 15


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(keep, scale): a bool mask of ``shape``, True with probability 1 - cut / 32768, and
    32768 / (32768 - cut), with cut = round(p * 32768)."""
    cut = round(p * _LEVELS)
    n = 1
    for size in shape:
        n *= size
    # one int64 in [0, 2^63) per 4 elements; the low 15 bits of each 16 are uniform
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    keep = bits.view(torch.int16)[:n].view(shape).bitwise_and_(_LEVELS - 1) >= cut
    return keep, _LEVELS / (_LEVELS - cut)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of ``x`` with probability ``p`` while ``training`` (else ``x`` itself)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or round(p * _LEVELS) in (0, _LEVELS):
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    # where's backward keeps only the bool mask; the scale is applied in the output's compute type
    return torch.where(keep, x, 0.0).mul_(scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same argument, no state) computed by :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
