"""``lmforge export CKPT OUT.gguf --format gguf``: one GGUF file for llama.cpp and the programs built on it.

GGUF is llama.cpp's single-file format: typed key/value metadata (architecture, sizes, tokenizer),
then the tensors, each in its own type (f32, f16 or a block quantization such as q8_0). The file is
written with the ``gguf`` package, llama.cpp's own Python library, following the steps of llama.cpp's
``convert_hf_to_gguf.py`` for the two decoder shapes lmforge has:

* the weights are mapped to Hugging Face names and layouts by the Hugging Face export's own
  architectures (:func:`lmforge.interop.convert.export_source`), then renamed with gguf's table
  (``get_tensor_name_map``: ``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``);
* gpt2 (learned positions, LayerNorm, GELU): GPT-2's Conv1D matrices ([in, out]) are transposed back
  to [out, in]; a model without biases gets zero biases (same outputs);
* llama (rotary positions, RMSNorm, SwiGLU, grouped key/value heads): the rows of the query and key
  projections are permuted. llama.cpp rotates pairs of adjacent values of a head; lmforge (like
  Hugging Face) rotates its two halves, and the permutation turns one layout into the other
  (transformers' GGUF loader applies the inverse);
* tensor types: vectors (norms, biases) and the position table stay f32, the matrices take
  ``--dtype``; a matrix whose rows are not whole q8_0 blocks (32 values) is written f16;
* tokenizer: byte-level BPE as llama.cpp's ``gpt2`` tokenizer model (tokens, token types, merges,
  the special-token ids) with the pre-tokenizer's split pattern named as llama.cpp knows it: GPT-2's
  (lmforge's own BPE) or Llama 3's; ids beyond the tokenizer (a padded vocabulary) are unused
  ``[PADn]`` tokens, as the converter writes them.

What llama.cpp would compute differently is refused with one line naming the setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.interop.convert import ExportSource, Log, export_source

DTYPES = ("f32", "f16", "q8_0")
ARCHS = {"learned": "gpt2", "rotary": "llama"}  # lmforge's decoder position encoding -> llama.cpp architecture
#: GPT-2's Conv1D weights, stored [in, out]; GGUF holds [out, in] like every other matrix
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
#: Llama 3's split pattern (tokenizer.json: Split then ByteLevel without its own pattern): llama.cpp's "llama-bpe"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LMForgeError("GGUF export needs the gguf package (llama.cpp's Python library); "
                           "pip install 'lmforge[gguf]'") from None
    return gguf


def check_gguf(mcfg: ModelConfig, where: str) -> None:
    """Refuse, in one line, a model that llama.cpp's gpt2 or llama graph would compute differently."""
    if mcfg.arch != "decoder":
        raise LMForgeError(f"{where}: model.arch={mcfg.arch} cannot be exported as GGUF: llama.cpp runs decoder-only "
                           "language models (gpt2- and llama-shaped); export it with --format hf instead")
    if mcfg.pos_encoding not in ARCHS:
        raise LMForgeError(f"{where}: pos_encoding={mcfg.pos_encoding} has no llama.cpp architecture; GGUF export "
                           "takes learned positions (gpt2) or rotary (llama), so train with one of these to export")
    problems = []
    if ARCHS[mcfg.pos_encoding] == "gpt2" and mcfg.ffn == "gelu":
        problems.append("ffn=gelu (llama.cpp's gpt2 computes GELU with the tanh approximation: train with "
                        "ffn=gelu_tanh)")
    if ARCHS[mcfg.pos_encoding] == "llama" and mcfg.bias:
        problems.append("bias=true (a llama-shaped GGUF has no biases in transformers' GGUF reader, so such a "
                        "file would not load the same everywhere: train with bias=false)")
    if problems:
        raise LMForgeError(f"{where}: cannot be exported as GGUF {ARCHS[mcfg.pos_encoding]}: {'; '.join(problems)}")


# ------------------------------------------------------------------------------------------- tokenizer

def gguf_tokenizer(ckpt: Path, vocab_size: int) -> dict:
    """tokenizer.json as llama.cpp's ``gpt2`` tokenizer: tokens and types for every id below
    ``vocab_size``, merges, pre-tokenizer; a tokenizer llama.cpp would split differently is refused."""
    from lmforge.train.checkpoint import TOKENIZER

    gguf = _gguf()
    path = ckpt / TOKENIZER
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("merges") and decoder.get("type") != "ByteLevel":
        raise LMForgeError(f"{path} is a character-level tokenizer; GGUF export writes byte-level BPE "
                           "(llama.cpp's gpt2 tokenizer), so train with data.tokenizer=bpe to export as GGUF")
    pre_name = _pre_tokenizer(pre)
    if model.get("type") != "BPE" or pre_name is None or decoder.get("type") != "ByteLevel" or spec.get("normalizer"):
        raise LMForgeError(
            f"{path} is not a byte-level BPE that llama.cpp splits the same way (model {model.get('type')}, "
            f"pre-tokenizer {pre.get('type')}, normalizer {(spec.get('normalizer') or {}).get('type')}); GGUF export "
            "writes GPT-2's and Llama 3's byte-level BPE only: export this model with --format hf")
    by_id = {i: t for t, i in model.get("vocab", {}).items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise LMForgeError(f"{path} has token id {max(by_id)} but the model's vocabulary is {vocab_size}; "
                           "the tokenizer belongs to another model")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # a row of a padded vocabulary: never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name, "n_tokens": len(by_id)}


def _pre_tokenizer(pre: dict) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer it reproduces, else None."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's own pattern, built into ByteLevel
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space", False)):
        return "llama-bpe"
    return None


# ------------------------------------------------------------------------------------------- tensors

def _permute_rotary(w, n_head: int):
    """Rows of a query/key projection from rotate-half order (each head: first half, second half) to
    llama.cpp's adjacent pairs: convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(src: ExportSource, arch_name: str, dtype: str) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, GGML type) of every tensor: named by gguf's table, laid out and typed as
    llama.cpp's converter does; q8_0 data is already quantized (bytes)."""
    gguf = _gguf()
    mcfg = src.cfg.model
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    names = gguf.get_tensor_name_map(arch, mcfg.n_layer)
    wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    out = []
    for hf_name, t in src.state.items():
        if hf_name.endswith(_CONV1D):
            t = t.T
        elif hf_name.endswith("self_attn.q_proj.weight"):
            t = _permute_rotary(t, mcfg.n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            t = _permute_rotary(t, mcfg.kv_heads)
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:  # the mapping above produces only names that gguf's table knows
            raise AssertionError(f"gguf has no name for {hf_name}")
        name = f"{name}.{suffix}"
        data = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        matrix = data.ndim == 2 and suffix == "weight" and name != "position_embd.weight"
        qtype = wanted if matrix else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's fallback for rows of partial blocks
        out.append((name, gguf.quants.quantize(data, qtype), qtype))
    return out


# ------------------------------------------------------------------------------------------- export

def export_gguf(ckpt_dir: str | Path, out_path: str | Path, dtype: str = "f32", log: Log = print) -> dict:
    """Write the lmforge checkpoint ``ckpt_dir`` (or a run directory's latest) as one GGUF file."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise LMForgeError(f"unknown GGUF --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    out_path = Path(out_path)
    if out_path.exists():
        raise LMForgeError(f"{out_path} already exists; choose a new output file or remove it")
    src = export_source(ckpt_dir, check=check_gguf)
    mcfg = src.cfg.model
    arch_name = ARCHS[mcfg.pos_encoding]
    tok = gguf_tokenizer(src.ckpt, mcfg.vocab_size)
    tensors = gguf_tensors(src, arch_name, dtype)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp_{out_path.name}_{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        w.add_name(src.ckpt.parent.parent.name if src.ckpt.parent.name == "checkpoints" else src.ckpt.name)
        w.add_file_type(ftype)
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(mcfg.block_size)
        w.add_embedding_length(mcfg.d_model)
        w.add_feed_forward_length(mcfg.ff_dim)
        w.add_block_count(mcfg.n_layer)
        w.add_head_count(mcfg.n_head)
        w.add_head_count_kv(mcfg.kv_heads)
        if arch_name == "llama":
            w.add_vocab_size(mcfg.vocab_size)
            w.add_rope_freq_base(mcfg.rope_theta)
            w.add_rope_dimension_count(mcfg.head_dim)
            w.add_layer_norm_rms_eps(mcfg.norm_eps)
        else:
            w.add_layer_norm_eps(mcfg.norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if src.ids.get(key) is not None:
                add(src.ids[key])
        w.add_add_bos_token(False)  # lmforge's models see the prompt's own tokens, nothing before them
        w.add_add_eos_token(False)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    counts: dict[str, int] = {}
    for _, _, qtype in tensors:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    notes = list(src.notes)
    if dtype == "q8_0" and counts.get("F16"):
        notes.append(f"{counts['F16']} matrices have rows that are not whole q8_0 blocks of 32 values: written f16")
    log(f"export {src.ckpt} -> {out_path} as GGUF {arch_name} ({dtype}); run it with llama.cpp: "
        f"llama-completion -m {out_path} -no-cnv -p 'Your prompt' (older builds: llama-cli)")
    log(f"  {len(tensors)} tensors ({', '.join(f'{n} {k.lower()}' for k, n in sorted(counts.items()))}), "
        f"{out_path.stat().st_size:,} bytes")
    for note in notes:
        log(f"  note: {note}")
    log(f"  tokenizer: byte-level BPE (pre-tokenizer {tok['pre']}), {tok['n_tokens']} tokens, "
        f"{len(tok['merges'])} merges"
        + (f", {mcfg.vocab_size - tok['n_tokens']} unused padding ids" if mcfg.vocab_size > tok["n_tokens"] else ""))
    return {"architecture": arch_name, "out_path": str(out_path), "dtype": dtype, "tensors": len(tensors),
            "types": counts, "notes": notes}
