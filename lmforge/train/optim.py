"""AdamW (or Muon for the blocks' matrices) with decoupled weight decay, and the learning-rate schedule.

Weight decay pulls weights towards zero. That is a useful prior for the
matrices of Linear layers, but not for norm gains (which should stay near 1),
biases, or embeddings (rows of rare tokens would shrink just for being rare),
so those get none. The head tied to the token embedding is the embedding and
is treated as one.

Muon (``train.optimizer: muon``) updates each weight matrix of the Transformer
blocks by its momentum made orthogonal: the momentum matrix M = U S V^T is
replaced by (about) U V^T, computed with a few Newton-Schulz iterations, so
every direction of the update moves by the same amount instead of a few
dominant ones taking the whole step. Embeddings, the output head, norms and
biases keep AdamW. On small models it reaches a given loss in noticeably fewer
steps (benchmarks/train_shakespeare.py).
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import torch
from torch import nn
from torch.optim.adamw import adamw

from lmforge import hardware
from lmforge.config import TrainConfig
from lmforge.errors import LMForgeError


def param_groups(model: nn.Module, weight_decay: float, fresh: set[str] | None = None,
                 fresh_lr_scale: float = 1.0, layer_lr_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: decay on ``nn.Linear`` weights, none on everything else, each pair
    of groups at one ``lr_scale`` (times the schedule's rate). The first pair runs at scale 1; the
    others follow in the order their parameters are registered. A parameter's scale is
    ``fresh_lr_scale`` if ``fresh`` names it (a warm start did not fill it), times
    :func:`layer_scales` (``layer_lr_decay`` per block below the top; 1 turns it off).

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
    fresh_ids = {id(p) for n, p in model.named_parameters() if n in fresh} if fresh and fresh_lr_scale != 1.0 else set()
    layer = layer_scales(model, layer_lr_decay)
    # scale -> (decay, no decay); the scale-1 pair first, present even when empty
    groups = {1.0: ({"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0})}
    for p in model.parameters():  # unique parameters, in registration order (deterministic)
        if not p.requires_grad:
            continue
        scale = (fresh_lr_scale if id(p) in fresh_ids else 1.0) * layer[id(p)]
        if scale not in groups:
            groups[scale] = ({"params": [], "weight_decay": weight_decay, "lr_scale": scale},
                             {"params": [], "weight_decay": 0.0, "lr_scale": scale})
        groups[scale][0 if id(p) in decay_ids else 1]["params"].append(p)
    return [group for pair in groups.values() for group in pair]


def layer_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """Layer-wise learning-rate decay (``train.layer_lr_decay``): the scale of each parameter's rate,
    by id. With L Transformer blocks (an encoder-decoder's encoder blocks first), block k (0-based)
    learns at ``decay ** (L - k)``; what is registered before the first block (the embeddings) at
    ``decay ** (L + 1)``; what comes after the blocks (final norm, task head) at 1. A pretrained
    trunk's lower layers, which hold its most general features, then move least."""
    from lmforge.model.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    block_of = {id(p): k for k, block in enumerate(blocks) for p in block.parameters()}
    n, seen_block, scales = len(blocks), False, {}
    for p in model.parameters():
        if id(p) in block_of:
            depth, seen_block = block_of[id(p)] + 1, True
        else:
            depth = n + 1 if seen_block else 0
        scales[id(p)] = decay ** (n + 1 - depth)
    return scales


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device | str,
                    fresh: set[str] | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (the fused CUDA kernel on a GPU), or :class:`Muon` when
    ``tcfg.optimizer`` is ``muon``. ``fresh``: names of parameters that learn at
    ``tcfg.fresh_lr_scale`` times the rate (those a warm start did not fill); ``tcfg.layer_lr_decay``
    scales the rate per block (:func:`layer_scales`)."""
    if tcfg.optimizer == "muon":
        if fresh and tcfg.fresh_lr_scale != 1.0:
            raise LMForgeError("train.fresh_lr_scale works with train.optimizer=adamw only; "
                               "set the optimizer to adamw or leave fresh_lr_scale at 1")
        if tcfg.layer_lr_decay != 1.0:
            raise LMForgeError("train.layer_lr_decay works with train.optimizer=adamw only; "
                               "set the optimizer to adamw or leave layer_lr_decay at 1")
        return build_muon(model, tcfg)
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay, fresh, tcfg.fresh_lr_scale, tcfg.layer_lr_decay),
        lr=lr_at(0, tcfg),
        betas=(tcfg.beta1, tcfg.beta2),
        fused=fused,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, with a moment saved for a one-element parameter as a
    0-d tensor (the copy head's ``follow`` was a scalar before FSDP2 needed a vector) given the
    parameter's shape, as ``load_weights`` does for the weight itself."""
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        for key, value in s.items():
            if key != "step" and torch.is_tensor(value) and value.shape != p.shape and value.numel() == p.numel() == 1:
                s[key] = value.reshape(p.shape)


def lr_at(step: int, tcfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based), ``elapsed`` seconds into the run.

    Linear warmup: ``lr * (step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``
    (never exactly zero, so the first step already moves the weights); then
    cosine decay from ``lr`` at ``warmup_steps`` to ``min_lr`` at ``decay_steps``
    (default ``max_steps``); then ``min_lr``. With ``train.cooldown`` f > 0 the decay's shape is
    warmup-stable-decay instead: ``lr`` until the last f of the decay's progress, then a straight
    line to ``min_lr``.

    With ``train.schedule: minutes`` the cosine's progress is the larger of that step fraction and
    the fraction of ``max_minutes`` spent, and the warmup ramp caps it: the run reaches ``min_lr``
    when its time budget is spent, or at ``decay_steps`` if a fast machine gets there first (then
    the rate is the step schedule's exactly).
    """
    decay_steps = tcfg.max_steps if tcfg.decay_steps is None else tcfg.decay_steps
    by_time = elapsed / (tcfg.max_minutes * 60) if tcfg.schedule == "minutes" else 0.0
    if step < tcfg.warmup_steps:
        ramp = tcfg.lr * (step + 1) / (tcfg.warmup_steps + 1)
        return min(ramp, _decay(by_time, tcfg))
    by_steps = 1.0 if step >= decay_steps else (step - tcfg.warmup_steps) / (decay_steps - tcfg.warmup_steps)
    return _decay(max(by_steps, by_time), tcfg)


def _decay(progress: float, tcfg: TrainConfig) -> float:
    """From ``lr`` (progress 0) to ``min_lr`` (progress 1 and beyond): half a cosine, or with
    ``train.cooldown`` f flat until ``1 - f`` and linear from there."""
    progress = min(max(progress, 0.0), 1.0)
    if tcfg.cooldown > 0:
        falling = max(progress - (1.0 - tcfg.cooldown), 0.0) / tcfg.cooldown
        return tcfg.lr + falling * (tcfg.min_lr - tcfg.lr)
    return tcfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tcfg.lr - tcfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times the group's ``lr_scale`` (1 unless set:
    Muon's matrices run at ``train.muon_lr / train.lr`` times the schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


#: coefficients of the quintic Newton-Schulz iteration that pushes singular values towards 1
#: quickly (they end in about [0.7, 1.2], which is as good as exactly 1 for an update direction)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About ``U @ V.T`` for ``g = U S V^T``: ``steps`` quintic Newton-Schulz iterations.

    ``X <- a X + (b X X^T + c (X X^T)^2) X`` maps each singular value ``s`` of ``X`` to
    ``a s + b s^3 + c s^5`` and leaves the singular vectors alone. Scaling ``g`` to unit
    Frobenius norm first puts every singular value in (0, 1], where repeating the map
    drives them towards 1. Works on the wide orientation (fewer rows), so ``X X^T`` is small.
    ``g`` may be a stack of matrices (..., rows, cols): each is orthogonalized on its own.
    The iteration runs in ``dtype``; by default bf16 on GPUs, float32 (or wider) elsewhere.
    """
    a, b, c = NS_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if g.device.type == "cuda" else torch.promote_types(g.dtype, torch.float32)
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    batched = x.dim() == 3
    x = x if batched else x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):  # a X + (b G + c G G) X, G = X X^T, as two fused multiply-adds
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x if batched else x.reshape(g.shape if wide else g.mT.shape)
    return (x if wide else x.mT).to(g.dtype)


def newton_schulz_dtype(optimizer: torch.optim.Optimizer, tcfg: TrainConfig, device: torch.device) -> str | None:
    """The dtype Muon's Newton-Schulz iterations run in (``train.muon_ns_dtype``), for a run that starts now.

    auto: bf16 on GPUs (orthogonalize's default); on a CPU whose bf16 matmuls beat float32
    (AVX512-BF16, AMX) the iterations are timed on this run's own matrix shapes in both dtypes and
    bf16 is taken only when it is clearly faster (on small matrices the casts can cost more than
    the matmuls save); float32 elsewhere. bf16 is what Muon uses on GPUs; its rounding is far below
    the iteration's own spread of singular values (about [0.7, 1.2]). This is independent of
    ``train.dtype``: a float32 model can take bf16 orthogonalized steps. None without a Muon group.
    """
    groups = [g for g in optimizer.param_groups if g.get("muon")]
    if not groups:
        return None
    if tcfg.muon_ns_dtype != "auto":
        return tcfg.muon_ns_dtype
    if device.type == "cuda":
        return "bfloat16"
    if hardware.resolve_dtype("auto", device) != torch.bfloat16:
        return "float32"  # no bf16 units: bf16 matmuls are emulated and slower
    shapes = Counter(tuple(p.shape) for group in groups for p in group["params"])
    generator = torch.Generator().manual_seed(0)  # the run's own random streams are not touched
    stacks = [torch.randn(n, *shape, generator=generator) for shape, n in shapes.items()]
    steps = groups[0]["ns_steps"]

    def run(dtype: torch.dtype) -> None:
        for stack in stacks:
            orthogonalize(stack, steps, dtype)

    return hardware.dtype_name(hardware.faster_dtype(run, (torch.float32, torch.bfloat16)))


def _unwrapped(method):
    """``method`` without torch's dynamo-disabling wrapper (itself, where a torch version has none)."""
    return getattr(method, "__wrapped__", method)


class Muon(torch.optim.Optimizer):
    """Muon for groups marked ``muon=True`` (2-D weights), AdamW for the other groups.

    Muon, per matrix ``W`` (out x in) with gradient ``G``, momentum ``mu``, learning rate ``lr``:
    ``B <- mu B + (1 - mu) G``; ``N = (1 - mu) G + mu B`` (Nesterov);
    ``W <- W (1 - lr wd) - lr sqrt(max(1, out / in)) orthogonalize(N)``.
    The AdamW groups take torch's AdamW step (tests/test_optim.py compares them with ``torch.optim.AdamW``).
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, ns_steps=ns_steps,
                        muon=False)
        super().__init__(groups, defaults)

    # torch's own add_param_group and zero_grad, without the wrapper that imports torch's compiler
    # stack on their first call (about 1 s of a run's start-up): this optimizer is never compiled.
    def add_param_group(self, param_group: dict) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        """Decoupled decay, Nesterov momentum, then one batched Newton-Schulz per shape (same numbers
        as one by one)."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            state["momentum_buffer"].lerp_(p.grad, 1 - mu)
            if wd:
                p.mul_(1 - lr * wd)
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for (rows, cols), same in by_shape.items():
            nesterov = torch.stack([p.grad.lerp(self.state[p]["momentum_buffer"], mu) for p in same])
            updates = orthogonalize(nesterov, group["ns_steps"], hardware.DTYPES.get(group.get("ns_dtype")))
            for p, update in zip(same, updates):
                p.add_(update, alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's own AdamW step (its functional form) on this group's parameters."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def muon_params(model: nn.Module) -> set[int]:
    """Ids of the weights Muon updates: the ``nn.Linear`` weights inside Transformer blocks
    (never embeddings, the output head or a task head, which keep AdamW)."""
    from lmforge.model.layers import Block

    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        id(m.weight) for block in model.modules() if isinstance(block, Block)
        for m in block.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embedding_params
    }


def build_muon(model: nn.Module, tcfg: TrainConfig) -> Muon:
    """:class:`Muon` over three groups, in this order: AdamW with decay, AdamW without, Muon."""
    # FSDP's parameters are DTensors; without FSDP their module (which pulls in sympy, ~0.8 s) is never imported
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters()):
        raise LMForgeError("train.optimizer=muon needs whole weight matrices, but FSDP shards them; "
                           "use train.strategy=ddp or train.optimizer=adamw")
    matrices = muon_params(model)
    adam_decay, adam_no_decay = param_groups(model, tcfg.weight_decay)
    muon = [p for p in adam_decay["params"] if id(p) in matrices]
    adam_decay["params"] = [p for p in adam_decay["params"] if id(p) not in matrices]
    lr = lr_at(0, tcfg)
    return Muon(
        [adam_decay, adam_no_decay,
         {"params": muon, "weight_decay": tcfg.weight_decay, "muon": True, "lr_scale": tcfg.muon_lr / tcfg.lr,
          "lr": lr * tcfg.muon_lr / tcfg.lr}],
        lr=lr, betas=(tcfg.beta1, tcfg.beta2), momentum=tcfg.muon_momentum, ns_steps=tcfg.muon_ns_steps,
    )
