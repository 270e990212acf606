"""Low-rank adapters (LoRA, Hu et al. 2021): W x + (alpha / r) * B A x with the base W frozen.

A [r, in] starts random and B [out, r] at zero, so a fresh adapter leaves the model's outputs
exactly as they were. Only A and B train; :func:`merge_lora` folds B A into W afterwards,
giving a plain model of the original shape with the adapted outputs and no extra cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.model.dropout import Dropout

#: the Linear layers that get adapters: attention projections and feed-forward weights
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init
        self.drop = Dropout(dropout)
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.drop(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with B A * scale added to its weight."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            out.weight.copy_((self.base.weight.float() + delta).to(out.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Wrap every target Linear inside ``model`` in a :class:`LoRALinear`; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                count += 1
    return count


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``; returns how many."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                count += 1
    return count


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def set_trainable(model: nn.Module, tuning: str, trunk: nn.Module) -> None:
    """full: every weight trains; frozen: the trunk is fixed and only the head trains; lora: the
    trunk is fixed except its adapters (and the head trains)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if tuning in ("frozen", "lora"):
        for p in trunk.parameters():
            p.requires_grad_(False)
    if tuning == "lora":
        for m in trunk.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.requires_grad_(True)
                m.lora_B.requires_grad_(True)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each shared tensor counted once."""
    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return train, total
