"""Many processes, one recipe: the torchrun environment, DDP / FSDP2 applied from outside the model, MFU.

``torchrun`` starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` reads
it and joins the process group (NCCL on GPUs, Gloo on CPUs). Without those variables it is one
process and nothing here communicates.

:func:`parallelize` turns the plain :class:`~lmforge.model.DecoderLM` into what the loop steps,
in torchtitan's order: activation checkpointing per block, ``torch.compile`` per block, then
data parallelism (``DistributedDataParallel``, or FSDP2 ``fully_shard`` on each block and on the
root). The model files know nothing of this; parameter names never change, so checkpoints stay
interchangeable between strategies and world sizes.

The global batch does not depend on the number of processes: ``train.batch_size`` windows per
micro-batch in all, ``batch_size / world_size`` on each rank. The loss of a step is the sum of
the token losses of every rank divided by the target tokens of every rank (one all-reduce of the
count), so it equals the single-process mean.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LMForgeError

STRATEGIES = ("auto", "ddp", "fsdp")
MIXED_PRECISION = ("autocast", "fsdp")
#: share of a GPU's memory a DDP replica (weights, gradients, AdamW, activations) may use before
#: ``strategy: auto`` shards with FSDP instead
AUTO_FSDP_THRESHOLD = 0.8


@dataclass
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: True when this module joined the process group (and so leaves it in :func:`shutdown`)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise LMForgeError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def world_from_env() -> World:
    """Rank, world size and local rank as torchrun sets them (one process when unset)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise LMForgeError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit together; launch with torchrun")
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun restarted after a failure (``--max-restarts``)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when torchrun started several processes; returns the world and this rank's device.

    On CUDA every rank takes the GPU of its ``LOCAL_RANK`` (``train.device=cuda`` or ``auto``).
    """
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "mps":
        raise LMForgeError("several processes cannot share an MPS device; use --train.device=cpu or CUDA GPUs")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise LMForgeError(
                f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "set torchrun --nproc_per_node to the number of GPUs per node"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        # torchrun's store outlives a failed attempt: keys of this attempt get their own prefix, so a
        # restarted group never reads the addresses of the processes it replaces
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        except (ValueError, RuntimeError) as e:
            raise LMForgeError(
                f"cannot join the other {world.world_size - 1} processes ({str(e).strip().splitlines()[0][:200]}); "
                "launch with torchrun, or set MASTER_ADDR and MASTER_PORT"
            ) from None
        store = dist.PrefixStore(f"lmforge/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        world.owns_group = True
    elif dist.get_world_size() != world.world_size:
        raise LMForgeError("the process group's size differs from WORLD_SIZE; launch with torchrun")
    return world, device


def shutdown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        world.owns_group = False


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks, in place (and returned); a no-op for one process."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one: decisions that must be taken together."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main_rank_value(value: float, world: World, device: torch.device) -> float:
    """The main rank's ``value`` on every rank (its clock, say: one learning rate and one stop for all)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def per_rank_batch(batch_size: int, world: World, what: str = "train.batch_size") -> int:
    """Windows each rank takes from a global batch; the global batch must split evenly."""
    if batch_size % world.world_size:
        raise LMForgeError(
            f"{what}={batch_size} (the global batch) does not split over {world.world_size} processes; "
            f"use a multiple of {world.world_size}"
        )
    return batch_size // world.world_size


# ------------------------------------------------------------------------------------------- strategy

def resolve_strategy(tcfg: TrainConfig, mcfg: ModelConfig, world: World, device: torch.device) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp``.

    auto: DDP unless a full replica (weights, gradients, AdamW state and the activations of one
    micro-batch, as :mod:`lmforge.plan` estimates them) would take more than
    ``AUTO_FSDP_THRESHOLD`` of a GPU's memory; then FSDP. On CPU, auto is DDP.
    """
    if tcfg.strategy not in STRATEGIES:
        raise LMForgeError(f"train.strategy must be one of {', '.join(STRATEGIES)}; got {tcfg.strategy!r}")
    if tcfg.mixed_precision not in MIXED_PRECISION:
        raise LMForgeError(
            f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {tcfg.mixed_precision!r}"
        )
    if tcfg.reduce_dtype not in ("float32", "bfloat16"):
        raise LMForgeError(f"train.reduce_dtype must be float32 or bfloat16; got {tcfg.reduce_dtype!r}")
    if not world.distributed:
        return "none"
    if tcfg.strategy != "auto":
        return tcfg.strategy
    if device.type != "cuda":
        return "ddp"
    from lmforge.plan import estimate_memory

    micro = max(1, tcfg.batch_size // world.world_size)
    need = estimate_memory(mcfg, "ddp", world.world_size, micro, activation_checkpointing=tcfg.activation_checkpointing,
                           compute_bytes=2 if tcfg.dtype != "float32" else 4)["total"]
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if need > AUTO_FSDP_THRESHOLD * total else "ddp"


# ---------------------------------------------------------------------------------------- parallelize

def _checkpointed(forward):
    """``forward`` whose activations are recomputed in the backward pass instead of kept."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation keep nothing anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Transformer block of ``model`` in registration order: a language model's, an encoder's,
    both stacks of an encoder-decoder, the trunk's under a task head."""
    from lmforge.model.layers import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Full activation checkpointing of every block: only each block's input is kept for backward.

    The block's ``forward`` is replaced on the instance, so no wrapper module appears and the
    parameter names stay the same. Dropout masks are recomputed identically (the RNG state is
    saved with each block's input).
    """
    for block in transformer_blocks(model):
        block.forward = _checkpointed(block.forward)


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block's forward (torchtitan's per-block compile).

    Compiling the forward rather than the module keeps FSDP's and DDP's hooks outside the graph
    and the parameter names unchanged; all blocks share one compiled graph.
    """
    for block in transformer_blocks(model):
        block.forward = torch.compile(block.forward)


def apply_fsdp(model: nn.Module, world: World, device: torch.device, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype | None) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, head) over all ranks, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(model)
    n = len(blocks)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by the backward pass: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(model: nn.Module, tcfg: TrainConfig, world: World, device: torch.device, strategy: str,
                amp_dtype: torch.dtype, find_unused_parameters: bool = False) -> nn.Module:
    """Apply activation checkpointing, compile and data parallelism to ``model``; returns what to step.

    ``model`` itself stays the module whose parameters the optimizer updates and whose state
    dict is saved (under FSDP it is sharded in place; under DDP it is wrapped). With one process
    and ``train.compile`` the whole model is compiled, as before; with DDP or FSDP each block is.
    ``find_unused_parameters``: DDP looks for parameters a step did not reach (task heads).
    """
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tcfg.compile and strategy != "none":
        apply_compile(model)
    if strategy == "fsdp":
        if amp_dtype == torch.float16:
            raise LMForgeError("train.dtype=float16 is not supported with FSDP; use bfloat16")
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # the sliced logits; never changed in place
        fsdp_mp = tcfg.mixed_precision == "fsdp" and amp_dtype != torch.float32
        reduce = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tcfg.reduce_dtype]
        apply_fsdp(model, world, device, param_dtype=amp_dtype if fsdp_mp else None,
                   reduce_dtype=reduce if fsdp_mp else None)
        return model
    model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
            find_unused_parameters=find_unused_parameters,
        )
    if tcfg.compile:
        return torch.compile(model)
    return model


def autocast_dtype(tcfg: TrainConfig, strategy: str, amp_dtype: torch.dtype) -> torch.dtype:
    """The dtype for ``torch.autocast``: float32 (none) when FSDP's mixed-precision policy casts instead."""
    if strategy == "fsdp" and tcfg.mixed_precision == "fsdp":
        return torch.float32
    return amp_dtype


@contextlib.contextmanager
def gradient_sync(step_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only if ``enabled``.

    Micro-batches before the last of a step accumulate locally (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync(False)``); the last one reduces the sum once.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(step_model, DistributedDataParallel):
        with (contextlib.nullcontext() if enabled else step_model.no_sync()):
            yield
        return
    if hasattr(step_model, "set_requires_gradient_sync"):  # an FSDP2 module
        step_model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)
        return
    yield


def scalar(value: Any) -> float:
    """A Python float from a tensor, a DTensor (e.g. FSDP's gradient norm) or a number."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
