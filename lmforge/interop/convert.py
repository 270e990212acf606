"""``lmforge import`` and ``lmforge export``: whole checkpoint directories, both ways.

import: config.json + weights + tokenizer of a Hugging Face checkpoint -> an lmforge checkpoint
directory (model.safetensors, config.json, tokenizer.json) that ``load_model``, ``generate``,
``eval`` and ``train --train.init_from`` accept. It also holds ``recipe.yaml`` (the model's
settings, for fine-tuning: ``lmforge train -c OUT_DIR/recipe.yaml --data.corpus=...``) and
``data/tokenizer.json``, the data directory that recipe prepares into with the same tokenizer.
An encoder-decoder (Marian) becomes a translation checkpoint (``task.name=translation``, its
decoder's start token in ``task.decoder_start``) for ``translate``, ``eval`` and ``finetune``.

export: an lmforge checkpoint -> config.json, model.safetensors (sharded past a size, with
model.safetensors.index.json) and tokenizer.json + tokenizer_config.json +
special_tokens_map.json, which ``transformers`` loads with its Auto classes.

Vocabulary larger than the tokenizer: many checkpoints pad the embedding beyond their tokenizer
(Llama 3, Qwen2, phi-2, GPT-NeoX). The model keeps its vocabulary as ``transformers`` has it
(``model.vocab_size`` = config.json's vocab_size: the rows of the embedding and head, the width of the
logits), extra rows included, and export writes them back, so the round trip stays exact. The number
of ids that can be decoded is the tokenizer's own size, read from tokenizer.json at load time;
``generate_text`` never produces an id at or above it (see :mod:`lmforge.generate.sampling`). The
import also writes ``vocabulary.json`` (both sizes): ``load_model`` accepts a tokenizer smaller than
the model only where that record names the two sizes, so a wrong tokenizer.json copied into any
checkpoint is still refused. A tokenizer larger than the model's vocabulary is refused, and so is any
difference for an encoder-decoder (its beam search has no such mask).

Both write into a temporary directory beside OUT_DIR and rename it when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import yaml
from safetensors.torch import save_file

from lmforge.config import Config, DataConfig, ModelConfig, TaskConfig, TrainConfig
from lmforge.errors import LMForgeError
from lmforge.interop.architectures import ARCHITECTURES, Architecture
from lmforge.interop.hf_files import (
    HF_CONFIG,
    TOKENIZER_FILES,
    import_tokenizer,
    load_hf_weights,
    parse_size,
    read_hf_config,
    read_json_file,
    save_hf_weights,
    special_token,
)
from lmforge.interop.mapping import HFConfig, Weights
from lmforge.model import build_model

Log = Callable[[str], None]
RECIPE = "recipe.yaml"
#: written by import when the model's vocabulary is larger than its tokenizer: {"vocab_size": model's,
#: "tokenizer_vocab_size": tokenizer's}; load_model accepts the difference only where it is recorded
DEFAULT_SHARD_SIZE = "5GB"


def supported() -> str:
    return "; ".join(f"{a.model_type} ({a.hf_class}: {a.shape})" for a in ARCHITECTURES.values())


def _unsupported(model_type: object, where: str) -> LMForgeError:
    extra = (" Of the encoder-decoder models lmforge maps marian only (t5, bart and their kin differ in positions "
             "and norms)." if model_type in ("t5", "bart", "mbart", "pegasus") else "")
    return LMForgeError(f"{where}: architecture {model_type!r} is not supported; lmforge maps "
                        f"{', '.join(ARCHITECTURES)}.{extra} Convert a checkpoint of one of these")


def _fresh_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LMForgeError(f"{out_dir} already exists and is not empty; choose a new output directory or remove it")


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked before): replaced by the complete directory
    os.rename(tmp, out_dir)


def _temp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp_{out_dir.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


# ------------------------------------------------------------------------------------------------ import

def model_from_hf(raw_config: dict, tensors: dict[str, torch.Tensor], source: str = "the checkpoint",
                  drop_prefixes: tuple[str, ...] = ()) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """The lmforge model (float32, eval mode) equal to a Hugging Face config dict + state dict.

    Refuses what it cannot map exactly (see :mod:`lmforge.interop.mapping`). The info dict holds
    the architecture, the :class:`Weights` bookkeeping, the dropped tensor names and notes.
    """
    model_type = raw_config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise _unsupported(model_type, source)
    mcfg, notes = arch.config_from_hf(HFConfig(raw_config, model_type), set(tensors))
    weights = Weights(tensors, source, model_type)
    state = arch.from_hf(weights, mcfg)
    dropped = weights.check_leftovers(tuple(drop_prefixes))
    model = build_model(mcfg, empty=True)
    expected = model.state_dict()
    for name in expected:  # the mapping's own bookkeeping; a failure here is a bug in it, not in the input
        assert name in state and tuple(state[name].shape) == tuple(expected[name].shape), name
    model.load_state_dict(state, strict=True)
    assert not (mcfg.arch != "encoder" and mcfg.tie_embeddings) or model.lm_head.weight is model.tok_emb.weight
    info = {"architecture": model_type, "weights": weights, "dropped": dropped, "notes": notes}
    return model.eval(), mcfg, info


def from_transformers(hf_model: torch.nn.Module) -> torch.nn.Module:
    """An lmforge copy of an in-memory transformers model (GPT2LMHeadModel, LlamaForCausalLM, BertModel,
    MarianMTModel)."""
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return model_from_hf(hf_model.config.to_dict(), state, type(hf_model).__name__)[0]


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, drop_prefixes: tuple[str, ...] = (),
                      log: Log = print) -> dict:
    """Convert the Hugging Face checkpoint in ``hf_dir`` into an lmforge checkpoint at ``out_dir``.

    ``drop_prefixes``: tensor-name prefixes to leave out (e.g. ``cls.`` for BERT's pre-training
    heads); any other tensor without a place in the lmforge model is an error. Returns a summary.
    """
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import CONFIG, TOKENIZER, VOCABULARY_RECORD, WEIGHTS, unique_state_dict

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LMForgeError(f"{hf_dir} is not a directory; give the directory of a Hugging Face checkpoint")
    _fresh_out_dir(out_dir)
    raw = read_hf_config(hf_dir)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise _unsupported(model_type, str(hf_dir / HF_CONFIG))  # before reading any weights
    tensors, source = load_hf_weights(hf_dir)
    model, mcfg, info = model_from_hf(raw, tensors, str(hf_dir / source), drop_prefixes)
    model_type, weights, dropped, notes = info["architecture"], info["weights"], info["dropped"], info["notes"]

    tmp = _temp_dir(out_dir)
    try:
        how_tokenizer = import_tokenizer(hf_dir, tmp)
        tokenizer = Tokenizer.load(tmp / TOKENIZER)
        _check_vocabulary(tokenizer.vocab_size, mcfg, hf_dir, notes)
        out_abs = out_dir.resolve()
        specials = list(tokenizer.special_tokens)
        cfg = Config(
            model=mcfg,
            data=DataConfig(tokenizer="bpe", vocab_size=max(tokenizer.vocab_size, 256 + len(specials)),
                            special_tokens=specials, data_dir=str(out_abs / "data")),
            train=TrainConfig(out_dir=f"{out_abs}-finetune", init_from=str(out_abs)),
            task=_translation_task(raw, mcfg, tokenizer, hf_dir) if mcfg.arch == "seq2seq" else TaskConfig(),
        )
        save_file(unique_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        if tokenizer.vocab_size < mcfg.vocab_size:
            record = {"vocab_size": mcfg.vocab_size, "tokenizer_vocab_size": tokenizer.vocab_size,
                      "about": f"{hf_dir}: the model's vocabulary is larger than its tokenizer (a padded embedding); "
                               f"ids {tokenizer.vocab_size}..{mcfg.vocab_size - 1} are kept and never generated"}
            (tmp / VOCABULARY_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _write_recipe(tmp / RECIPE, cfg, out_abs)
        (tmp / "data").mkdir()
        for name in (*TOKENIZER_FILES, VOCABULARY_RECORD):  # the record beside the tokenizer travels with it
            if (tmp / name).is_file():
                shutil.copyfile(tmp / name, tmp / "data" / name)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    stored = unique_state_dict(model)
    n_params = sum(t.numel() for t in stored.values())
    classes = raw.get("architectures") or [ARCHITECTURES[model_type].hf_class]
    log(f"import {hf_dir} ({model_type}: {', '.join(map(str, classes))}, {source}) -> {out_dir}")
    layers = f"{mcfg.n_encoder_layer or mcfg.n_layer}+{mcfg.n_layer}" if mcfg.arch == "seq2seq" else mcfg.n_layer
    log(f"  model: {mcfg.arch}, {layers} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads"
        f"{f' ({mcfg.kv_heads} key/value)' if mcfg.kv_heads != mcfg.n_head else ''}, vocab {mcfg.vocab_size}, "
        f"{mcfg.pos_encoding} positions, {mcfg.norm} ({mcfg.norm_position}-norm), {mcfg.ffn}, "
        f"{'tied' if mcfg.tie_embeddings else 'untied'} head{', pooler' if mcfg.pooler else ''}"
        f"{', output bias' if mcfg.output_bias else ''}; {n_params:,} parameters")
    log(f"  mapped {len(tensors) - len(dropped) - len(weights.buffers)} checkpoint tensors onto {len(stored)} lmforge "
        f"tensors{' (the head tied to the embedding)' if mcfg.arch != 'encoder' and mcfg.tie_embeddings else ''}")
    if weights.converted:
        log("  upcast to float32 (exact): " + ", ".join(f"{n} {k}" for k, n in weights.converted.items()) + " tensors")
    if weights.buffers:
        log(f"  checked and recomputed {len(weights.buffers)} buffers (e.g. {weights.buffers[0]})")
    if dropped:
        log(f"  left out {len(dropped)} tensors as asked (--drop-prefix): {', '.join(dropped[:4])}"
            f"{' ...' if len(dropped) > 4 else ''}")
    for note in notes:
        log(f"  note: {note}")
    log(f"  tokenizer: {how_tokenizer} ({tokenizer.vocab_size} tokens)")
    if mcfg.arch == "decoder" and tokenizer.vocab_size < mcfg.vocab_size:
        log(f"  use: lmforge generate {out_dir} --prompt ... (training takes a vocabulary equal to the tokenizer's, "
            "so this one is not fine-tuned with recipe.yaml)")
    elif mcfg.arch == "decoder":
        log(f"  use: lmforge generate {out_dir} --prompt ...; fine-tune: lmforge train -c {out_dir / RECIPE} "
            "--data.corpus=YOUR_TEXT")
    if mcfg.arch == "seq2seq":
        log(f"  use: lmforge translate {out_dir} TEXT ...; fine-tune: lmforge finetune translation -c "
            f"{out_dir / RECIPE} --train PAIRS.tsv --valid PAIRS.tsv")
    return {"architecture": model_type, "out_dir": str(out_dir), "tensors": len(stored), "dropped": dropped,
            "buffers": list(weights.buffers), "converted": dict(weights.converted), "notes": notes,
            "num_params": n_params}


def _check_vocabulary(n_tokens: int, mcfg: ModelConfig, hf_dir: Path, notes: list[str]) -> None:
    """The model's vocabulary may be larger than the tokenizer (a padded embedding, kept as it is and
    never generated); a tokenizer larger than the model, or any difference for an encoder-decoder, is refused."""
    V = mcfg.vocab_size
    if n_tokens > V:
        raise LMForgeError(
            f"the tokenizer of {hf_dir} has {n_tokens} tokens but the model's vocabulary (config.json vocab_size) "
            f"is only {V}, so ids {V} and above have no embedding; give the tokenizer the model was trained with"
        )
    if n_tokens < V and mcfg.arch == "seq2seq":
        raise LMForgeError(
            f"the tokenizer of {hf_dir} has {n_tokens} tokens but the encoder-decoder's vocabulary (config.json "
            f"vocab_size) is {V}; lmforge's translation decoding needs the two equal for an encoder-decoder, "
            "so this checkpoint cannot be imported as it is"
        )
    if n_tokens < V:
        notes.append(f"the model's vocabulary ({V}) is larger than its tokenizer ({n_tokens} tokens): the {V - n_tokens} "
                     f"extra rows (ids {n_tokens}..{V - 1}) are kept as they are and never generated")


def _translation_task(raw: dict, mcfg: ModelConfig, tokenizer, hf_dir: Path) -> TaskConfig:
    """An imported encoder-decoder is a translation model: the token its decoder starts from is named in
    task.decoder_start, and its end token must be the tokenizer's (lmforge ends sources and outputs with it)."""
    eos = raw.get("eos_token_id")
    if isinstance(eos, int) and eos != tokenizer.eot_id:
        raise LMForgeError(
            f"{hf_dir}: config.json's eos_token_id is {eos} but the tokenizer's end token is "
            f"{tokenizer.id_to_token(tokenizer.eot_id)!r} (id {tokenizer.eot_id}); name the end token as eos_token "
            "in tokenizer_config.json")
    start = raw.get("decoder_start_token_id", raw.get("pad_token_id"))
    text = tokenizer.id_to_token(start) if isinstance(start, int) else None
    if text is None:
        raise LMForgeError(f"{hf_dir}: config.json's decoder_start_token_id {start!r} is not a token of the tokenizer; "
                           "the tokenizer belongs to another model")
    return TaskConfig(name="translation", decoder_start=text, max_source_len=min(256, mcfg.block_size),
                      max_target_len=min(128, mcfg.block_size))


def _write_recipe(path: Path, cfg: Config, out_abs: Path) -> None:
    """recipe.yaml (written to ``path``, read from ``out_abs``): the model's settings and the imported
    tokenizer, to fine-tune the imported model."""
    full = cfg.to_dict()
    recipe = {"model": {k: v for k, v in full["model"].items() if k != "preset"},
              "data": {"tokenizer": "bpe", "data_dir": cfg.data.data_dir,
                       "vocab_size": cfg.data.vocab_size, "special_tokens": cfg.data.special_tokens},
              "train": {"init_from": str(out_abs), "out_dir": cfg.train.out_dir}}
    if cfg.model.arch == "seq2seq":
        recipe["task"] = {k: full["task"][k] for k in ("name", "decoder_start", "max_source_len", "max_target_len")}
        header = (f"# Fine-tune the imported model: lmforge finetune translation -c {out_abs / RECIPE} "
                  "--train PAIRS.tsv --valid PAIRS.tsv\n")
    else:
        header = (f"# Fine-tune the imported model: lmforge train -c {out_abs / RECIPE} --data.corpus=YOUR_TEXT\n"
                  "# (data.data_dir holds the model's tokenizer, so `prepare` tokenizes with it.)\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ export

def architecture_for(cfg: ModelConfig, where: str) -> Architecture:
    """The Hugging Face architecture that expresses ``cfg`` exactly, or a clear refusal."""
    if cfg.arch == "encoder":
        arch = ARCHITECTURES["mpnet" if cfg.rel_pos_buckets else "bert"]
    elif cfg.arch == "seq2seq":
        arch = ARCHITECTURES["marian"]
    elif cfg.pos_encoding == "learned":
        arch = ARCHITECTURES["gpt2"]
    elif cfg.pos_encoding == "rotary":
        arch = ARCHITECTURES["llama"]
    else:
        raise LMForgeError(
            f"{where}: pos_encoding={cfg.pos_encoding} has no exact Hugging Face equivalent among the architectures "
            f"lmforge maps ({supported()}); train with pos_encoding=learned (gpt2) or rotary (llama) to export"
        )
    problems = arch.export_problems(cfg)
    if problems:
        raise LMForgeError(
            f"{where}: cannot be exported exactly as {arch.model_type} ({arch.shape}): {'; '.join(problems)}; "
            f"lmforge exports {', '.join(ARCHITECTURES)}, so change these settings to export"
        )
    return arch


def _token_ids(tokenizer, tok_config: dict | None, decoder: bool) -> tuple[dict, dict]:
    """bos/eos/pad ids for config.json and the special-token names for the tokenizer files."""
    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        text = special_token(tok_config, key)
        if text is not None and tokenizer.token_to_id(text) is not None:
            names[key] = text
    if tok_config is None and decoder and tokenizer.eot_id is not None:
        eot = tokenizer.id_to_token(tokenizer.eot_id)
        names.update(bos_token=eot, eos_token=eot)  # GPT-2's convention: one end-of-text token for both
    ids = {short: tokenizer.token_to_id(names[f"{short}_token"]) for short in ("bos", "eos", "pad")
           if f"{short}_token" in names}
    return ids, names


def _load_checkpoint(ckpt: Path) -> tuple[torch.nn.Module, Config, object, dict]:
    """Model, Config and Tokenizer of a checkpoint; for an encoder-decoder (a translation or summarization
    checkpoint) also the ids its decoding uses: eos, pad and decoder_start."""
    from lmforge.train.checkpoint import load_model, read_config

    if read_config(ckpt).model.arch != "seq2seq":
        return (*load_model(ckpt), {})
    from lmforge.tasks.model import load_task_model

    task_model = load_task_model(ckpt)
    ids = task_model.fmt.ids
    return task_model.model, task_model.cfg, task_model.tokenizer, {"eos": ids.eos, "pad": ids.pad,
                                                                    "decoder_start": ids.bos}


class ExportSource(NamedTuple):
    """A checkpoint read for export: its weights under Hugging Face names and layouts, and what describes them."""
    ckpt: Path
    cfg: Config
    tokenizer: object
    arch: Architecture
    state: dict[str, torch.Tensor]  # Hugging Face names, float32 on the CPU, padding rows cut
    notes: list[str]
    ids: dict  # bos / eos / pad (and decoder_start for an encoder-decoder) token ids
    names: dict  # special-token names for tokenizer_config.json
    tok_config: dict | None  # the imported model's own tokenizer_config.json


def export_source(ckpt_dir: str | Path, check: Callable[[ModelConfig, str], None] | None = None) -> ExportSource:
    """Read the checkpoint ``ckpt_dir`` (or a run directory's latest) for export. ``check(model config,
    where)`` refuses what the target format cannot express before the Hugging Face mapping is chosen."""
    from lmforge.train.checkpoint import latest_checkpoint, read_config

    ckpt = latest_checkpoint(ckpt_dir)
    if check is not None:
        check(read_config(ckpt).model, str(ckpt))
    model, cfg, tokenizer, task_ids = _load_checkpoint(ckpt)
    mcfg = cfg.model
    arch = architecture_for(mcfg, str(ckpt))
    hf_state, notes = arch.to_hf(model.state_dict(), mcfg)
    hf_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf_state.items()}
    if mcfg.padded_vocab_size != mcfg.vocab_size:
        notes.append(f"the embedding's {mcfg.padded_vocab_size - mcfg.vocab_size} padding rows "
                     f"(pad_vocab_multiple={mcfg.pad_vocab_multiple}, never produced) are left out: vocab {mcfg.vocab_size}")
    if tokenizer.vocab_size < mcfg.vocab_size:
        notes.append(f"the model's vocabulary ({mcfg.vocab_size}) is larger than its tokenizer ({tokenizer.vocab_size} "
                     f"tokens): the extra rows are written back as they are (vocab_size {mcfg.vocab_size})")
    tok_config = read_json_file(ckpt / "tokenizer_config.json", "tokenizer setting") \
        if (ckpt / "tokenizer_config.json").is_file() else None
    ids, names = _token_ids(tokenizer, tok_config, mcfg.arch == "decoder")
    if task_ids:  # an encoder-decoder: the ids its translations use
        ids = {**ids, **task_ids}
        names.setdefault("eos_token", tokenizer.id_to_token(task_ids["eos"]))
        names.setdefault("pad_token", tokenizer.id_to_token(task_ids["pad"]))
    return ExportSource(ckpt, cfg, tokenizer, arch, hf_state, notes, ids, names, tok_config)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                      log: Log = print) -> dict:
    """Write the lmforge checkpoint ``ckpt_dir`` (or a run directory's latest) as a Hugging Face checkpoint."""
    from lmforge.train.checkpoint import TOKENIZER

    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    _fresh_out_dir(out_dir)
    src = export_source(ckpt_dir)
    ckpt, mcfg, tokenizer, arch, hf_state = src.ckpt, src.cfg.model, src.tokenizer, src.arch, src.state
    notes, tok_config, names = src.notes, src.tok_config, src.names
    hf_config = {**arch.config_to_hf(mcfg, src.ids), "dtype": "float32"}

    tmp = _temp_dir(out_dir)
    try:
        files = save_hf_weights(hf_state, tmp, max_bytes)
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(ckpt / TOKENIZER, tmp / TOKENIZER)
        if tok_config is not None and tok_config.get("tokenizer_class") == "MarianTokenizer":
            tok_config = {**tok_config, "tokenizer_class": "PreTrainedTokenizerFast"}  # its .spm files stay behind
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        elif tok_config is not None:  # the imported model's own settings (casing, special tokens, lengths)
            shutil.copyfile(ckpt / "tokenizer_config.json", tmp / "tokenizer_config.json")
        else:
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mcfg.block_size,
                          "clean_up_tokenization_spaces": False, **names}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        if (ckpt / "special_tokens_map.json").is_file():
            shutil.copyfile(ckpt / "special_tokens_map.json", tmp / "special_tokens_map.json")
        else:
            (tmp / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    total = sum(t.numel() for t in hf_state.values())
    log(f"export {ckpt} -> {out_dir} as {arch.model_type} ({arch.hf_class}; load with transformers' Auto classes)")
    log(f"  {len(hf_state)} tensors, {total:,} values, float32, in {', '.join(f for f in files if f.endswith('.safetensors'))}"
        f"{' + model.safetensors.index.json' if len(files) > 1 else ''}")
    for note in notes:
        log(f"  note: {note}")
    log(f"  tokenizer: tokenizer.json, tokenizer_config.json, special_tokens_map.json ({tokenizer.vocab_size} tokens)")
    return {"architecture": arch.model_type, "out_dir": str(out_dir), "files": files, "tensors": len(hf_state),
            "notes": notes}
