"""Checkpoints: atomic on disk, exact on resume, and refused with a clear message when damaged.

Layout of a run directory::

    run_dir/checkpoints/step_000500/   model.safetensors   weights (a tied head is stored once)
                                       config.json         the whole Config (vocab_size resolved)
                                       tokenizer.json      copied from the data directory
                                       train_state.pt      optimizer, RNG states (tensors only; loaded with weights_only)
                                       train_state.json    step, sampler position, last metrics
    run_dir/checkpoints/latest         name of the newest checkpoint directory

A run of several processes (torchrun) writes instead of ``train_state.pt``: ``dcp/`` (model and
optimizer, sharded by ``torch.distributed.checkpoint``, readable at any world size) and
``rng/rank_NNNNN.pt`` (each rank's RNG states); ``model.safetensors`` is still the whole model,
gathered on rank 0, so generate, eval and export read it as usual.

A checkpoint is written into a hidden temporary directory beside its final
place and renamed when complete; then ``latest`` is replaced (``os.replace``)
and older checkpoints beyond ``keep_last`` are removed. A process killed at any
moment therefore leaves every ``step_*`` directory complete and ``latest``
pointing at one of them (or, if ``latest`` is lost, the newest is found by name).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import Config

from lmforge.recipes import config_from_dict
from lmforge.errors import LMForgeError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
STATE_PT = "train_state.pt"
STATE_JSON = "train_state.json"
#: written by `lmforge import` beside a model whose vocabulary is padded beyond its tokenizer
VOCABULARY_RECORD = "vocabulary.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- saving

def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each shared tensor kept once, under its first name.

    With tied embeddings ``lm_head.weight`` is ``tok_emb.weight``; safetensors refuses
    to store two names for one memory, and storing it twice would double the file.
    """
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module | dict[str, torch.Tensor],
    cfg: Config,
    *,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    grad_scaler: Any = None,
    sampler_state: dict | None = None,
    metrics: dict | None = None,
    tokenizer_path: str | Path | None = None,
    keep_last: int = 2,
    extra: dict | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:06d}`` atomically and point ``latest`` at it.

    ``model`` is the plain module (not a compiled or distributed wrapper), or the weights to write
    (a state dict that holds a tied head once, e.g. an average of checkpoints). With an
    ``optimizer`` the checkpoint can be resumed: the optimizer, the RNG states (read
    here, so call this after the step's random draws) and the sampler state go with it.
    ``tokenizer_path`` defaults to ``cfg.data.data_dir/tokenizer.json``. ``extra``: more JSON
    facts of the run for ``train_state.json`` (e.g. the dtype it chose).
    Returns the checkpoint directory.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else Path(cfg.data.data_dir) / TOKENIZER
    if not tokenizer_path.is_file():
        raise LMForgeError(f"tokenizer {tokenizer_path} not found; run `lmforge prepare` for data.data_dir first")
    _remove_leftovers(ckpt_root)

    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp_{name}_{os.getpid()}"
    try:
        tmp.mkdir()
        weights = model if isinstance(model, dict) else unique_state_dict(model)
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        copy_tokenizer(tokenizer_path, tmp)
        if optimizer is not None:
            torch.save({
                "step": step,
                "optimizer": optimizer.state_dict(),
                "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
                "rng": capture_rng_state(),
            }, tmp / STATE_PT)
        state_json = {"step": step, "sampler": sampler_state, "metrics": metrics or {}, **(extra or {})}
        (tmp / STATE_JSON).write_text(json.dumps(state_json, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # disk full, read-only, quota: torch reports some as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
        raise LMForgeError(f"cannot write checkpoint {final} ({_write_error(e, ckpt_root)}); the previous "
                           "checkpoint is intact: free space or fix permissions, then --resume") from None
    _publish(ckpt_root, tmp, name, keep_last)
    return final


def copy_tokenizer(tokenizer_path: Path, into: Path) -> None:
    """Copy a tokenizer.json into a checkpoint directory, with the vocabulary.json beside it, if any:
    the record that the model's embedding is padded beyond the tokenizer travels with it."""
    shutil.copyfile(tokenizer_path, into / TOKENIZER)
    record = Path(tokenizer_path).parent / VOCABULARY_RECORD
    if record.is_file():
        shutil.copyfile(record, into / VOCABULARY_RECORD)


def padded_vocabulary(where: Path, vocab_size: int, n_tokens: int) -> bool:
    """Whether the vocabulary.json in directory ``where`` (from ``lmforge import``) records a model
    vocabulary of ``vocab_size`` ids padded beyond a tokenizer of ``n_tokens``."""
    try:
        record = json.loads((Path(where) / VOCABULARY_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("vocab_size") == vocab_size
            and record.get("tokenizer_vocab_size") == n_tokens)


def _write_error(e: Exception, where: Path) -> str:
    """What went wrong writing into ``where``, in words (torch's zip writer hides ENOSPC)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < (64 << 20):
        return f"no space left on the device: {free >> 20} MiB free"
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _publish(ckpt_root: Path, tmp: Path, name: str, keep_last: int) -> None:
    """Rename the complete ``tmp`` to ``name``, point ``latest`` at it, prune older checkpoints."""
    final = ckpt_root / name
    if final.exists():  # the same step saved again (e.g. a resumed run ending where it began)
        old = ckpt_root / f".trash_{name}_{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)

    pointer_tmp = ckpt_root / f".{LATEST}.tmp"
    pointer_tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)

    _prune(ckpt_root, keep_last=keep_last, keep=name)


# ---------------------------------------------------------------------------- sharded (several processes)

def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another, earlier-named parameter (the tied head): stored once."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), key=lambda q: -len(q.parts)):
        if p.is_file():
            _fsync_file(p)
        else:
            _fsync_dir(p)
    _fsync_dir(root)


def is_sharded(ckpt: str | Path) -> bool:
    """True for a checkpoint written by several processes (model and optimizer in ``dcp/``)."""
    return (Path(ckpt) / DCP_DIR).is_dir()


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in ckpt_root.iterdir() if ckpt_root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    """Remove all but the newest ``keep_last`` checkpoints, never ``keep``.

    A doomed directory is first renamed out of the ``step_*`` namespace, so a crash
    mid-delete never leaves a half-deleted directory that looks like a checkpoint.
    """
    dirs = [p for _, p in step_dirs(ckpt_root) if p.name != keep]
    doomed = dirs[: max(0, len(dirs) - (keep_last - 1))]
    for p in doomed:
        trash = ckpt_root / f".trash_{p.name}_{os.getpid()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(ckpt_root: Path) -> None:
    """Temporary and half-deleted directories of an earlier, interrupted save."""
    for p in ckpt_root.iterdir():
        if p.name.startswith((".tmp_", ".trash_")):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ finding

def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: a checkpoint itself, a run dir, or its checkpoints/."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"checkpoint path {path} does not exist; pass a run directory or a checkpoint directory")
    if (path / WEIGHTS).exists() or (path / CONFIG).exists() or _STEP_DIR.match(path.name):
        return path
    ckpt_root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(name) and (ckpt_root / name).is_dir():
            return ckpt_root / name
    dirs = step_dirs(ckpt_root)  # the pointer is missing or stale: fall back to the newest by step
    if dirs:
        return dirs[-1][1]
    raise LMForgeError(f"no checkpoint found in {path}; train first (`lmforge train`) or pass a checkpoint directory")


# ------------------------------------------------------------------------------------------------ loading

def require_file(ckpt: Path, filename: str, fix: str) -> Path:
    f = ckpt / filename
    if not f.is_file():
        raise LMForgeError(f"checkpoint {ckpt} has no {filename}; {fix}")
    return f


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(
            f"{path} is not valid JSON ({e}); the checkpoint is damaged, use another one (e.g. the previous step)"
        ) from None


def read_config(ckpt: str | Path) -> Config:
    """The Config a checkpoint was trained with."""
    ckpt = Path(ckpt)
    path = require_file(ckpt, CONFIG, "the checkpoint is incomplete; use another one (e.g. the previous step)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise LMForgeError(f"{path} does not hold a configuration; the checkpoint is damaged, use another one")
    try:
        cfg = config_from_dict(raw)
    except LMForgeError as e:
        raise LMForgeError(f"{path}: {e}") from None
    if cfg.model.vocab_size < 1:
        raise LMForgeError(f"{path} has no model.vocab_size; the checkpoint is damaged, use another one")
    return cfg


def read_weights(ckpt: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``ckpt/model.safetensors``, refusing a missing, corrupt or truncated file."""
    path = require_file(Path(ckpt), WEIGHTS, "the checkpoint is incomplete; use another one (e.g. the previous step)")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors reports truncation and bad headers with its own error types
        raise LMForgeError(
            f"{path} is corrupt or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "use another checkpoint (e.g. the previous step)"
        ) from None


def load_weights(model: nn.Module, ckpt: str | Path, device: str | torch.device = "cpu") -> None:
    """Copy ``model.safetensors`` into ``model``, refusing corrupt files and shape or name mismatches."""
    path = Path(ckpt) / WEIGHTS
    state = read_weights(ckpt, device)
    expected = model.state_dict()
    for name, tensor in list(state.items()):
        if tensor.dim() == 0 and name in expected and tuple(expected[name].shape) == (1,):
            state[name] = tensor = tensor.reshape(1)  # a number saved as a scalar, now held as one element
        if name not in expected:
            raise LMForgeError(
                f"{path} holds weight {name!r} that this model does not have; "
                "the checkpoint belongs to a different architecture, load it with its own config.json"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LMForgeError(
                f"{path}: weight {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; use the model settings the checkpoint was trained with"
            )
    loaded_storage = {expected[n].untyped_storage().data_ptr() for n in state}
    missing = [n for n, t in expected.items() if n not in state and t.untyped_storage().data_ptr() not in loaded_storage]
    if missing:
        raise LMForgeError(
            f"{path} lacks weights {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
            "the checkpoint belongs to a different architecture or is damaged, use another one"
        )
    model.load_state_dict(state, strict=False)


def refused_global(e: Exception) -> str | None:
    """The object a ``weights_only`` load refused (e.g. ``posix.system``), or None for another error."""
    import pickle
    import re

    if not isinstance(e, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL (\S+)", str(e))
    return found.group(1) if found else "an object that is not a tensor"


def _load_tensors(path: Path) -> Any:
    """A ``.pt`` file of tensors and plain values, never running code (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = refused_global(e)
        if refused is not None:
            raise LMForgeError(f"refused {path}: it holds {refused}, not only tensors and plain values (loading it "
                               "could run code); resume from another checkpoint") from None
        raise LMForgeError(
            f"{path} is corrupt or truncated ({type(e).__name__}); resume from another checkpoint (e.g. the previous step)"
        ) from None


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """Optimizer, RNG and sampler state of a resumable checkpoint, merged into one dict."""
    ckpt = Path(ckpt)
    fix = "it holds weights only; start a new run with --train.init_from to reuse them"
    pt = require_file(ckpt, STATE_PT, fix)
    info = read_json(require_file(ckpt, STATE_JSON, fix))
    state = _load_tensors(pt)
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys() or not isinstance(info, dict):
        raise LMForgeError(f"training state in {ckpt} is incomplete; resume from another checkpoint")
    if info.get("step") != state["step"]:
        raise LMForgeError(
            f"{ckpt}: {STATE_PT} is at step {state['step']} but {STATE_JSON} at step {info.get('step')}; "
            "the checkpoint is damaged, resume from another one"
        )
    return {**state, "sampler": info.get("sampler"), "metrics": info.get("metrics") or {}, **run_choices(info)}


#: what a run measured and chose when it started (autocast dtype, Muon's Newton-Schulz dtype): a
#: resumed run keeps them, so it continues exactly as it would have
RUN_CHOICES = ("dtype", "muon_ns_dtype")


def run_choices(info: dict) -> dict[str, Any]:
    return {key: info.get(key) for key in RUN_CHOICES}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, Any]:
    """Model (in eval mode on ``device``), Config and Tokenizer of the checkpoint that ``path`` names.

    ``path`` is a checkpoint directory or a run directory (its latest checkpoint). The tokenizer's size
    must equal the model's vocabulary (``cfg.model.vocab_size``), except in an imported checkpoint whose
    embedding is padded beyond its tokenizer (Llama 3, Qwen2, ...), as recorded by ``lmforge import`` in
    vocabulary.json: the tokenizer's ``vocab_size`` is then the number of ids that can be decoded, and
    ``generate_text`` never produces the others. A tokenizer larger than the model is always refused.
    """
    from lmforge.model import build_model
    from lmforge.tokenizer import Tokenizer

    ckpt = latest_checkpoint(path)
    cfg = read_config(ckpt)
    tok_path = require_file(ckpt, TOKENIZER, "copy the tokenizer.json of the data directory it was trained on into it")
    tokenizer = Tokenizer.load(tok_path)
    n_tokens, vocab = tokenizer.vocab_size, cfg.model.vocab_size
    if n_tokens > vocab:
        raise LMForgeError(
            f"{tok_path} has {n_tokens} tokens but the model in {ckpt} has a vocabulary of only {vocab}; "
            f"copy the tokenizer.json of the data the model was trained on into {ckpt}"
        )
    if n_tokens < vocab and not padded_vocabulary(ckpt, vocab, n_tokens):
        raise LMForgeError(
            f"{tok_path} has {n_tokens} tokens but the model in {ckpt} has a vocabulary of {vocab} (and no "
            f"{VOCABULARY_RECORD} from `lmforge import` records a padded embedding of these sizes); "
            f"copy the tokenizer.json of the data the model was trained on into {ckpt}"
        )
    model = build_model(cfg.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return model, cfg, tokenizer
