"""Reading and writing the files of a Hugging Face checkpoint directory.

Weights: ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, or PyTorch's ``pytorch_model.bin`` (also sharded). A ``.bin``
file is a pickle; it is read with ``torch.load(weights_only=True)``, which restores tensors and
plain containers only and refuses anything else, so a file crafted to run code is an error,
never executed. Tokenizers: ``tokenizer.json``, or the older files (``vocab.txt``,
``vocab.json`` + ``merges.txt``, ...) converted by ``transformers`` when it is installed. Marian's
SentencePiece files (``source.spm``, ``target.spm``) are not converted: such a checkpoint needs a
``tokenizer.json`` beside them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LMForgeError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"cannot read {what} {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "fix or replace the file") from None


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise LMForgeError(f"{hf_dir} has no {HF_CONFIG}; give the directory of a Hugging Face checkpoint "
                           "(config.json + weights + tokenizer)")
    cfg = read_json_file(path, "model config")
    if not isinstance(cfg, dict):
        raise LMForgeError(f"{path} does not hold a model configuration (a JSON object); fix the file")
    return cfg


# ---------------------------------------------------------------------------------------------- weights

def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors reports bad headers and truncation with its own types
        raise LMForgeError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "download or convert it again") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, others for damaged files
        from lmforge.train.checkpoint import refused_global

        refused = refused_global(e)
        why = (f"it holds {refused}, which a weights_only load refuses" if refused
               else f"{type(e).__name__}: it does not load with weights_only=True")
        raise LMForgeError(
            f"refused to load {path} ({why}); lmforge never unpickles code, so convert the checkpoint to "
            "safetensors with a tool you trust"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LMForgeError(f"{path} does not hold a flat mapping of names to tensors (a state dict); "
                           "save the model's state_dict() or convert it to safetensors")
    return obj


def _load_sharded(hf_dir: Path, index_name: str, loader) -> dict[str, torch.Tensor]:
    index_path = hf_dir / index_name
    index = read_json_file(index_path, "weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LMForgeError(f"{index_path} has no weight_map; the checkpoint is damaged, download it again")
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = hf_dir / str(shard)
        if Path(str(shard)).name != str(shard) or not shard_path.is_file():
            raise LMForgeError(f"{index_path} names shard {shard!r}, which is not in {hf_dir}; download the missing shard")
        tensors.update(loader(shard_path))
    listed = set(weight_map)
    missing = sorted(listed - tensors.keys())
    if missing:
        raise LMForgeError(f"{index_path} lists {missing[0]!r} but its shard does not hold it; the checkpoint is damaged")
    return tensors


def load_hf_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint by name, and the file(s) they came from."""
    if (hf_dir / SAFETENSORS_INDEX).is_file():
        return _load_sharded(hf_dir, SAFETENSORS_INDEX, _load_safetensors), SAFETENSORS_INDEX
    if (hf_dir / SAFETENSORS).is_file():
        return _load_safetensors(hf_dir / SAFETENSORS), SAFETENSORS
    if (hf_dir / PICKLE_INDEX).is_file():
        return _load_sharded(hf_dir, PICKLE_INDEX, _load_pickle), PICKLE_INDEX
    if (hf_dir / PICKLE).is_file():
        return _load_pickle(hf_dir / PICKLE), PICKLE
    raise LMForgeError(f"{hf_dir} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE} or {PICKLE_INDEX}); "
                       "copy the model's weight files into it")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as Hugging Face counts), '200MB', '64KB', or plain bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise LMForgeError(f"cannot read the size {text!r}; write it as e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise LMForgeError(f"the size {text!r} must be positive")
    return size


def save_hf_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` (a larger single tensor gets a
    shard of its own) plus ``model.safetensors.index.json``. Returns the files written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    metadata = {"format": "pt"}  # transformers expects it
    if len(shards) == 1:
        save_file(shards[0], out_dir / SAFETENSORS, metadata=metadata)
        return [SAFETENSORS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, out_dir / fname, metadata=metadata)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names + [SAFETENSORS_INDEX]


# -------------------------------------------------------------------------------------------- tokenizer

def import_tokenizer(hf_dir: Path, out_dir: Path) -> str:
    """Put the checkpoint's tokenizer into ``out_dir`` as tokenizer.json (+ its tokenizer_config.json and
    special_tokens_map.json when present, so an export writes them back). Returns how it was obtained."""
    from lmforge.tokenizer import Tokenizer

    for name in TOKENIZER_FILES[1:]:
        if (hf_dir / name).is_file():
            read_json_file(hf_dir / name, "tokenizer setting")
            shutil.copyfile(hf_dir / name, out_dir / name)
    if (hf_dir / "tokenizer.json").is_file():
        Tokenizer.load(hf_dir / "tokenizer.json")  # refuses a damaged file with a clear message
        shutil.copyfile(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
        return "tokenizer.json copied" + _without_batch_settings(out_dir / "tokenizer.json")
    marian = [n for n in ("source.spm", "target.spm") if (hf_dir / n).is_file()]
    if marian:
        raise LMForgeError(
            f"{hf_dir} has a Marian tokenizer ({', '.join(marian)} + vocab.json: a SentencePiece model per side over "
            "one vocabulary), which lmforge does not convert; add a tokenizer.json with the same token ids "
            "(one tokenizer for both sides) to import this model")
    old_files = [n for n in ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")
                 if (hf_dir / n).is_file()]
    if not old_files:
        raise LMForgeError(f"{hf_dir} has no tokenizer (tokenizer.json, vocab.txt, vocab.json + merges.txt or "
                           "tokenizer.model); copy the model's tokenizer files into it")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LMForgeError(f"{hf_dir} has a tokenizer in the older format ({', '.join(old_files)}) and converting it "
                           "needs transformers; pip install 'lmforge[hf]' or add a tokenizer.json") from None
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as e:
        raise LMForgeError(f"transformers could not read the tokenizer in {hf_dir} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}); add a tokenizer.json") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise LMForgeError(f"transformers read the tokenizer in {hf_dir} ({type(hf_tok).__name__}) but cannot express it "
                           "as a tokenizer.json; add a tokenizer.json")
    backend.save(str(out_dir / "tokenizer.json"))
    Tokenizer.load(out_dir / "tokenizer.json")
    return (f"tokenizer.json built from {', '.join(old_files)} by transformers ({type(hf_tok).__name__})"
            + _without_batch_settings(out_dir / "tokenizer.json"))


def _without_batch_settings(path: Path) -> str:
    """Drop a fixed padding or truncation stored in tokenizer.json (some checkpoints pad every text to 128
    tokens): they are batch settings, and lmforge's encode must return each text's own tokens."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(path))
    if hf.padding is None and hf.truncation is None:
        return ""
    hf.no_padding()
    hf.no_truncation()
    hf.save(str(path))
    return " (its stored padding/truncation removed: lmforge pads and crops batches itself)"


def special_token(tok_config: dict | None, key: str) -> str | None:
    """The text of a special token named in tokenizer_config.json (a string or an AddedToken dict)."""
    if not tok_config:
        return None
    value = tok_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
