"""AdamW with decoupled weight decay on matrix weights only, and the learning-rate schedule.

Weight decay pulls weights towards zero. That is a useful prior for the
matrices of Linear layers, but not for norm gains (which should stay near 1),
biases, or embeddings (rows of rare tokens would shrink just for being rare),
so those get none. The head tied to the token embedding is the embedding and
is treated as one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: decay on ``nn.Linear`` weights, none on everything else.

    Parameters are sorted by the type of module that owns them, not by name or
    shape, so a new layer type cannot slip into the decayed group by accident.
    A parameter shared with an ``nn.Embedding`` (the tied output head) is an
    embedding, wherever else it appears. Each parameter appears exactly once.
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay_ids = {
        id(m.weight) for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in embedding_params
    }
    decay, no_decay = [], []
    for p in model.parameters():  # unique parameters, in registration order (deterministic)
        if not p.requires_grad:
            continue
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when training on a GPU."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay),
        lr=lr_at(0, tcfg),
        betas=(tcfg.beta1, tcfg.beta2),
        fused=fused,
    )


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup: ``lr * (step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``
    (never exactly zero, so the first step already moves the weights); then
    cosine decay from ``lr`` at ``warmup_steps`` to ``min_lr`` at ``decay_steps``
    (default ``max_steps``); then ``min_lr``.
    """
    decay_steps = tcfg.max_steps if tcfg.decay_steps is None else tcfg.decay_steps
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / (tcfg.warmup_steps + 1)
    if step >= decay_steps:
        return tcfg.min_lr
    progress = (step - tcfg.warmup_steps) / (decay_steps - tcfg.warmup_steps)
    return tcfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tcfg.lr - tcfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
