"""``lmforge plan``: parameters, FLOPs, memory per GPU and time per step of a recipe on a cluster, before renting it.

Everything here is arithmetic on the :class:`~lmforge.config.ModelConfig`; no model is built.
The figures are checked against measurements on small models in ``tests/test_plan.py``:
the parameter count equals ``DecoderLM.num_params`` exactly, and the activation estimate
equals the bytes a CPU forward pass keeps alive for the backward pass (float32, within 2%).

Memory per GPU (bytes; P parameters, W GPUs, AdamW in float32):

=============  ==============================  ==========================================
               ddp (replica on every GPU)      fsdp (FSDP2, sharded per block)
=============  ==============================  ==========================================
weights        4P (+2P of bf16 copies that     4P/W + the gathered weights of the blocks
               autocast keeps for the          in flight (two blocks, the root) in their
               forward pass, unless            compute dtype
               checkpointing)
gradients      4P (they live in DDP's          4P/W + one gathered block's gradients
               all-reduce buckets)
optimizer      8P (exp_avg, exp_avg_sq)        8P/W
activations    per micro-batch, see below      the same
=============  ==============================  ==========================================

Activations, per token of a micro-batch (d = d_model, f = d_ff, H = heads, V = vocabulary;
r = 4 bytes for the residual stream and norm statistics, c = bytes of the compute dtype),
counted from what each operation saves for its backward pass with a fused attention kernel
(flash / memory-efficient SDPA: no T x T matrix) and no dropout:

* each block: its two norm inputs (2rd, RMSNorm also its normalised output, 2*4d) and
  statistics, the matmul inputs after the norms (2cd; under autocast every matmul casts and
  keeps its own copy: 4cd with GELU, 5cd with SwiGLU), queries, keys and values after
  rotary and head repetition (3cd), the attention output (cd) and log-sum-exp (4H), and the
  feed-forward hidden states (2cf for GELU, 4cf for SwiGLU);
* around the blocks: the token ids (8), the final norm and head input, the float32 logits
  and their log-softmax (4 * padded V + 4V);
* with activation checkpointing only each block's input (rd) is kept, and one block's
  activations are rebuilt at a time during the backward pass.

The backward pass adds the float32 gradients of the logits (8V per token) on top, and with
checkpointing the rebuilt block (with the gradients of its input and output, 8d, and autocast's
copies of its weights). Autocast also keeps bf16 copies of all weights through the forward pass
without checkpointing: they are booked under weights (2P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError

GB = 1e9
#: memory a CUDA process needs besides tensors (context, kernels, allocator slack): kept free
RESERVED_BYTES = 3e9


# ---------------------------------------------------------------------------------------------- counts

def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(mcfg: ModelConfig) -> int:
    return mcfg.d_model * (2 if mcfg.norm == "layernorm" and mcfg.bias else 1)


def block_params(mcfg: ModelConfig) -> int:
    """Parameters of one Transformer block."""
    d, kv, f, b = mcfg.d_model, mcfg.kv_heads * mcfg.head_dim, mcfg.ff_dim, mcfg.bias
    attn = _linear(d, d, b) + 2 * _linear(d, kv, b) + _linear(d, d, b)
    ffn = _linear(d, f, b) + _linear(f, d, b) + (_linear(d, f, b) if mcfg.ffn == "swiglu" else 0)
    return 2 * _norm(mcfg) + attn + ffn


def param_counts(mcfg: ModelConfig) -> dict[str, int]:
    """``total`` (a tied head counted once, as DecoderLM.num_params), ``embedding`` (token and learned
    position tables), ``non_embedding``, ``per_block`` and ``root`` (everything outside the blocks)."""
    d, vocab = mcfg.d_model, mcfg.padded_vocab_size
    embedding = vocab * d + (mcfg.block_size * d if mcfg.pos_encoding == "learned" else 0)
    head = 0 if mcfg.tie_embeddings else vocab * d
    root = embedding + _norm(mcfg) + head
    total = root + mcfg.n_layer * block_params(mcfg)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "per_block": block_params(mcfg), "root": root}


def flops_per_token(mcfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * seq_len, N the
    weights used in matmuls (non-embedding parameters and the output head). As DecoderLM.flops_per_token."""
    seq_len = seq_len or mcfg.block_size
    counts = param_counts(mcfg)
    n_matmul = counts["non_embedding"] + (mcfg.padded_vocab_size * mcfg.d_model if mcfg.tie_embeddings else 0)
    return 6 * n_matmul + 12 * mcfg.n_layer * mcfg.d_model * seq_len


# ----------------------------------------------------------------------------------------- activations

def _norm_saved(mcfg: ModelConfig) -> float:
    """Bytes per token a norm keeps: its float32 input and statistics (RMSNorm also its normalised output)."""
    d = mcfg.d_model
    if mcfg.norm == "rmsnorm":
        return 4 * d + 4 + 4 * d
    return 4 * d + 8


def activation_bytes(mcfg: ModelConfig, micro_batch: int, compute_bytes: int = 4,
                     activation_checkpointing: bool = False, autocast: bool | None = None) -> dict[str, float]:
    """Bytes kept for the backward pass by one micro-batch of ``micro_batch`` sequences of block_size tokens.

    ``per_block`` (one block, without checkpointing), ``blocks`` (all blocks as kept),
    ``outside`` (embeddings, final norm, logits), ``total`` (what is alive after the forward
    pass) and ``backward_extra`` (what the backward pass adds at its start: the logits'
    gradients, and with checkpointing one block rebuilt).
    """
    tokens = micro_batch * mcfg.block_size
    d, f, c = mcfg.d_model, mcfg.ff_dim, compute_bytes
    autocast = compute_bytes < 4 if autocast is None else autocast
    # autocast casts a norm's output once for each matmul that reads it (q, k, v; gate, up), and each keeps its copy
    ffn_inputs = 2 if mcfg.ffn == "swiglu" else 1
    matmul_inputs = (3 + ffn_inputs) if autocast else 2
    per_block = (2 * _norm_saved(mcfg) + matmul_inputs * c * d  # norms, and the matmul inputs after them
                 + 3 * c * d + c * d + 4 * mcfg.n_head  # q, k, v; attention output; log-sum-exp
                 + (4 if mcfg.ffn == "swiglu" else 2) * c * f)
    outside = 8 + _norm_saved(mcfg) + c * d + 4 * mcfg.padded_vocab_size + 4 * mcfg.vocab_size
    kept_per_block = 4 * d if activation_checkpointing else per_block
    backward_extra = 8 * mcfg.vocab_size * tokens
    if activation_checkpointing:  # one block rebuilt, the gradients of its input and output, its bf16 weights
        backward_extra += (per_block + 8 * d) * tokens
        if autocast:
            backward_extra += 2 * (block_params(mcfg) - 2 * _norm(mcfg))
    return {
        "per_block": per_block * tokens,
        "blocks": mcfg.n_layer * kept_per_block * tokens,
        "outside": outside * tokens,
        "total": (mcfg.n_layer * kept_per_block + outside) * tokens,
        "backward_extra": backward_extra,
    }


def estimate_memory(mcfg: ModelConfig, strategy: str, world_size: int, micro_batch: int,
                    activation_checkpointing: bool = False, compute_bytes: int = 2,
                    fsdp_mixed_precision: bool = False) -> dict[str, float]:
    """Bytes per GPU: ``weights``, ``gradients``, ``optimizer``, ``activations`` (alive after the
    forward pass plus the backward pass's extra) and ``total``. ``strategy``: ddp (or none) or fsdp."""
    counts = param_counts(mcfg)
    p, w = counts["total"], max(1, world_size)
    # autocast's bf16 weight copies live through the forward pass (with checkpointing, one block's at a time)
    autocast_copies = 2 * p if compute_bytes == 2 and not fsdp_mixed_precision and not activation_checkpointing else 0
    if strategy == "fsdp":
        gathered_bytes = compute_bytes if fsdp_mixed_precision else 4
        in_flight = 2 * counts["per_block"] + counts["root"]
        weights = 4 * p / w + gathered_bytes * in_flight + autocast_copies
        gradients = 4 * p / w + 4 * counts["per_block"]
        optimizer = 8 * p / w
    elif strategy in ("ddp", "none"):
        weights, gradients, optimizer = 4 * p + autocast_copies, 4 * p, 8 * p
    else:
        raise LMForgeError(f"unknown strategy {strategy!r}; use ddp or fsdp")
    act = activation_bytes(mcfg, micro_batch, compute_bytes, activation_checkpointing,
                           autocast=compute_bytes < 4 and not fsdp_mixed_precision)
    activations = act["total"] + act["backward_extra"]
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
            "total": weights + gradients + optimizer + activations}


def max_micro_batch(mcfg: ModelConfig, strategy: str, world_size: int, memory: float,
                    activation_checkpointing: bool, compute_bytes: int, fsdp_mixed_precision: bool = False) -> int:
    """The largest micro-batch (sequences per GPU) whose estimate fits in ``memory`` bytes; 0 if none."""
    def fits(b: int) -> bool:
        return estimate_memory(mcfg, strategy, world_size, b, activation_checkpointing, compute_bytes,
                               fsdp_mixed_precision)["total"] <= memory

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------------ plan

@dataclass
class Cluster:
    """The GPUs a plan is for."""

    gpu: str = "H100"
    count: int = 8
    #: bytes per GPU (None: the table's figure for ``gpu``)
    memory: float | None = None


def _gpu_facts(cluster: Cluster, dtype: str) -> tuple[float | None, float]:
    from lmforge.hardware import GPU_MEMORY, table_peak

    memory = cluster.memory
    if memory is None:
        memory = next((m for name, m in GPU_MEMORY.items() if name.lower() in cluster.gpu.lower()), None)
        if memory is None:
            raise LMForgeError(f"GPU {cluster.gpu!r} is not in the table; give its memory with --gpu-memory (GB)")
    return table_peak(cluster.gpu, dtype), memory


def make_plan(cfg: Config, cluster: Cluster, mfu: float = 0.4) -> dict[str, Any]:
    """Figures for ``cfg`` on ``cluster`` at model FLOPs utilisation ``mfu``; see the module docstring."""
    mcfg, tcfg = cfg.model, cfg.train
    if mcfg.vocab_size < 1:
        raise LMForgeError("model.vocab_size is 0 (it comes from the tokenizer); set --model.vocab_size=N to plan")
    if cluster.count < 1:
        raise LMForgeError(f"the cluster needs at least one GPU, got {cluster.count}; pass --gpus N")
    if not 0 < mfu <= 1:
        raise LMForgeError(f"--mfu must be in (0, 1], got {mfu}; e.g. 0.4 for 40%")
    dtype = "float32" if tcfg.dtype == "float32" else "bfloat16"
    compute_bytes = 4 if dtype == "float32" else 2
    peak, memory = _gpu_facts(cluster, dtype)
    usable = memory - RESERVED_BYTES
    counts = param_counts(mcfg)
    fpt = flops_per_token(mcfg)
    micro = max(1, math.ceil(tcfg.batch_size / cluster.count))
    fsdp_mp = tcfg.mixed_precision == "fsdp"
    strategies = {}
    for strategy in ("ddp", "fsdp"):
        row = {}
        for ac in (False, True):
            mem = estimate_memory(mcfg, strategy, cluster.count, micro, ac, compute_bytes,
                                  fsdp_mp and strategy == "fsdp")
            key = "with_checkpointing" if ac else "without_checkpointing"
            row[key] = {**mem, "fits": mem["total"] <= usable,
                        "max_micro_batch": max_micro_batch(mcfg, strategy, cluster.count, usable, ac, compute_bytes,
                                                           fsdp_mp and strategy == "fsdp")}
        strategies[strategy] = row
    tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum
    step_time = tokens_per_step * fpt / (cluster.count * peak * mfu) if peak else None
    return {
        "gpu": cluster.gpu, "gpus": cluster.count, "gpu_memory": memory, "usable_memory": usable,
        "dtype": dtype, "peak_flops_per_gpu": peak, "mfu": mfu,
        "params": counts, "flops_per_token": fpt, "block_size": mcfg.block_size,
        "global_batch": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "micro_batch_per_gpu": micro,
        "tokens_per_step": tokens_per_step, "strategies": strategies,
        "step_time_s": step_time,
        "tokens_per_second": tokens_per_step / step_time if step_time else None,
    }


def _unit(plan: dict[str, Any]) -> tuple[str, float]:
    """GB for real models, MB for the small ones (so their figures are not all 0.00)."""
    largest = max(m["total"] for by_ac in plan["strategies"].values() for m in by_ac.values())
    return ("GB", GB) if largest >= GB else ("MB", 1e6)


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text tables."""
    p = plan["params"]
    unit, scale = _unit(plan)

    def size(x: float) -> str:
        return f"{x / scale:,.2f}"

    lines = [
        f"model: {p['total']:,} parameters ({p['non_embedding']:,} without embeddings), "
        f"{plan['flops_per_token'] / 1e9:,.3g} GFLOPs per token (training, context {plan['block_size']})",
        f"cluster: {plan['gpus']} x {plan['gpu']}, {plan['gpu_memory'] / GB:,.2f} GB each "
        f"({plan['usable_memory'] / GB:,.2f} GB usable), {plan['dtype']}",
        f"batch: {plan['global_batch']} sequences per micro-batch in all = {plan['micro_batch_per_gpu']} per GPU, "
        f"x {plan['grad_accum']} accumulation = {plan['tokens_per_step']:,} tokens per step",
        "",
        f"memory per GPU ({unit})",
    ]
    header = ["strategy", "checkpointing", "weights", "grads", "optimizer", "activations", "total", "fits",
              "max micro-batch"]
    rows = []
    for strategy, by_ac in plan["strategies"].items():
        for key, m in by_ac.items():
            rows.append([strategy, "yes" if key == "with_checkpointing" else "no", size(m["weights"]),
                         size(m["gradients"]), size(m["optimizer"]), size(m["activations"]), size(m["total"]),
                         "yes" if m["fits"] else "NO", str(m["max_micro_batch"])])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    lines.append("")
    if plan["step_time_s"] is None:
        lines.append(f"time per step: unknown ({plan['gpu']} has no {plan['dtype']} peak in the table)")
    else:
        lines.append(
            f"time per step at {100 * plan['mfu']:.0f}% MFU of {plan['peak_flops_per_gpu'] / 1e12:,.0f} TFLOP/s per GPU: "
            f"{plan['step_time_s']:,.3g} s ({plan['tokens_per_second']:,.0f} tokens/s)"
        )
    return "\n".join(lines)
