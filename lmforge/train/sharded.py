"""Checkpoints of a multi-process run: every rank writes its shards, any number of processes reads them.

Model and optimizer state go through ``torch.distributed.checkpoint`` into ``dcp/`` (only tensors,
and DCP's ``.metadata`` pickle is read first by an unpickler that resolves only DCP's own record
classes, so nothing that could run code is unpickled), so a run resumes at any world size; rank 0 also writes the
consolidated ``model.safetensors`` that generate, eval and export read. The temp-dir-and-rename
protocol of :mod:`lmforge.train.checkpoint` makes a checkpoint appear complete or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.train.checkpoint import (CHECKPOINTS, CONFIG, DCP_DIR, RNG_DIR, STATE_JSON, TOKENIZER, WEIGHTS,
                                      _fsync_tree, _load_tensors, _publish, _remove_leftovers, _tied_names,
                                      capture_rng_state, copy_tokenizer, read_json, require_file, run_choices)


def save_sharded_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    cfg: Config,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
    sampler_state: dict | None = None,
    metrics: dict | None = None,
    grad_scaler: Any = None,
    tokenizer_path: str | Path | None = None,
    keep_last: int = 2,
    extra: dict | None = None,
) -> Path:
    """The checkpoint of a multi-process run; every rank calls it (it is a collective).

    Model and optimizer state go through ``torch.distributed.checkpoint`` into ``dcp/``, each
    rank writing its own shards (the directory must be on a file system all ranks share), so the
    run can resume on any number of processes. Rank 0 also writes the consolidated
    ``model.safetensors`` (for generate, eval and export), ``config.json``, ``tokenizer.json`` and
    ``train_state.json``; each rank writes its RNG state to ``rng/rank_NNNNN.pt``. Only tensors go
    into ``dcp/``; its ``.metadata`` is checked by :func:`check_dcp_metadata` before it is read. The same temp-dir-and-rename protocol
    as :func:`save_checkpoint` makes the checkpoint appear complete or not at all.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    ckpt_root = Path(run_dir) / CHECKPOINTS
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else Path(cfg.data.data_dir) / TOKENIZER
    if not tokenizer_path.is_file():
        raise LMForgeError(f"tokenizer {tokenizer_path} not found; run `lmforge prepare` for data.data_dir first")
    name = f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_{name}_sharded"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpt_root)
        (tmp / RNG_DIR).mkdir(parents=True)
    dist.barrier()

    tied = _tied_names(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": {k: v for k, v in model_state.items() if k not in tied}, "optimizer": optim_state["state"]},
             checkpoint_id=str(tmp / DCP_DIR))
    torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    if rank == 0:
        weights = {k: v.detach().contiguous() for k, v in full.items() if k not in tied}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        copy_tokenizer(tokenizer_path, tmp)
        state_json = {"step": step, "sampler": sampler_state, "metrics": metrics or {}, "world_size": world_size,
                      "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None, **(extra or {})}
        (tmp / STATE_JSON).write_text(json.dumps(state_json, indent=2) + "\n", encoding="utf-8")
    del full
    dist.barrier()  # every rank's files are written
    if rank == 0:
        _fsync_tree(tmp)
        _publish(ckpt_root, tmp, name, keep_last)
    dist.barrier()  # nobody moves on before the checkpoint is in place
    return ckpt_root / name


def load_sharded_train_state(ckpt: str | Path, rank: int) -> dict[str, Any]:
    """Step, sampler position, metrics, grad scaler and this rank's RNG state (None if it had no rank
    of that number) of a sharded checkpoint. Model and optimizer: :func:`load_sharded_checkpoint`."""
    ckpt = Path(ckpt)
    info = read_json(require_file(ckpt, STATE_JSON, "the checkpoint is incomplete; resume from another one"))
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise LMForgeError(f"training state in {ckpt} is incomplete; resume from another checkpoint")
    rng_file = ckpt / RNG_DIR / f"rank_{rank:05d}.pt"
    rng = _load_tensors(rng_file) if rng_file.is_file() else None
    return {"step": info["step"], "sampler": info.get("sampler"), "metrics": info.get("metrics") or {},
            "grad_scaler": info.get("grad_scaler"), "world_size": info.get("world_size"), "rng": rng,
            **run_choices(info)}


class _MetadataOnly:
    """What a DCP ``.metadata`` pickle may refer to: DCP's own record classes, torch's dtypes and
    ``Size``, paths and plain containers. Anything else (a function that runs code) is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
             ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}

    @classmethod
    def allowed(cls, module: str, name: str) -> bool:
        if (module, name) in cls.NAMES:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module in cls.MODULES:
            import importlib

            return isinstance(getattr(importlib.import_module(module), name, None), type)
        return False


def check_dcp_metadata(path: Path) -> None:
    """Read ``dcp/.metadata`` with an unpickler that resolves only :class:`_MetadataOnly` names, so
    a file that would run code is refused before torch's reader (a plain ``pickle.load``) sees it."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if not _MetadataOnly.allowed(module, name):
                raise LMForgeError(f"{path} refers to {module}.{name}, which checkpoint metadata never holds "
                                   "(loading it could run code); refusing it: resume from another checkpoint")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            Restricted(f).load()
    except LMForgeError:
        raise
    except Exception as e:
        raise LMForgeError(f"{path} is corrupt or truncated ({type(e).__name__}); resume from another checkpoint "
                           "(e.g. the previous step)") from None


def load_sharded_checkpoint(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``dcp/`` into ``model`` and ``optimizer`` at this run's world size (any; one process too).

    ``model`` is the module the optimizer updates: plain, or sharded in place by FSDP2, or the
    module inside DDP. DCP reshards the saved tensors to however they are laid out now.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    model_state, optim_state = get_state_dict(model, optimizer)  # also creates AdamW's state to load into
    tied = _tied_names(model)
    target = {"model": {k: v for k, v in model_state.items() if k not in tied}, "optimizer": optim_state["state"]}
    import warnings

    import torch.distributed as dist

    check_dcp_metadata(ckpt / DCP_DIR / ".metadata")
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(target, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not dist.is_initialized())
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LMForgeError(
            f"cannot read the sharded state in {ckpt / DCP_DIR} ({first[:200]}); "
            "resume from another checkpoint (e.g. the previous step)"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A single-process ``optimizer.state_dict()`` (parameters numbered) into a DDP or FSDP run's optimizer.

    The numbers are turned into parameter names (the optimizer lists the parameters in the same
    order in both runs), and the full tensors are then sharded as the model is.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names_by_id = {id(p): n for n, p in model.named_parameters()}
    names = [names_by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
    try:
        named = {
            "state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as e:
        raise LMForgeError(
            f"the optimizer state does not fit this model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "resume from another checkpoint or start a new run"
        ) from None
