"""A task checkpoint in use: build or load the model of either design, and turn texts into outputs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lmforge.config import Config, ModelConfig, TaskConfig
from lmforge.errors import LMForgeError
from lmforge.generate import beam
from lmforge.tasks.data import cut_tokens
from lmforge.tasks.format import SpecialIds, TaskFormat
from lmforge.tasks.surface import surface_text

SEQ2SEQ_TASKS = ("translation", "summarization")


_TASK = TaskConfig()


@dataclass
class Decoding:
    """Search settings: beam_size 1 is greedy; output length limit = max_len_a * source tokens + max_len_b.
    The defaults and meanings are the task section's (:class:`~lmforge.config.TaskConfig`)."""

    beam_size: int = _TASK.beam_size
    length_penalty: float = _TASK.length_penalty
    early_stopping: bool = _TASK.early_stopping
    no_repeat_ngram_size: int = _TASK.no_repeat_ngram_size
    no_immediate_repeat: bool = _TASK.no_immediate_repeat
    no_repeat_words: bool = _TASK.no_repeat_words
    source_words: bool = _TASK.source_words
    max_len_a: float = _TASK.max_len_a
    max_len_b: int = _TASK.max_len_b

    @classmethod
    def from_task(cls, task: TaskConfig, **overrides) -> "Decoding":
        values = {f.name: getattr(task, f.name) for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        out = cls(**values)
        if out.beam_size < 1:
            raise LMForgeError(f"beam size must be at least 1 (1 = greedy), got {out.beam_size}")
        if out.max_len_a < 0 or out.max_len_b < 0 or out.max_len_a == out.max_len_b == 0:
            raise LMForgeError("max_len_a and max_len_b must not be negative, nor both 0")
        return out


def output_limit(mcfg: ModelConfig, source_len: int, decoding: Decoding) -> int:
    """Most output tokens (<eos> included) for a formatted source of ``source_len`` tokens: the
    task's a * len + b, within the model's positions (learned or sinusoidal)."""
    limit = int(decoding.max_len_a * source_len + decoding.max_len_b)
    if mcfg.pos_encoding != "rotary":
        room = mcfg.block_size if mcfg.arch == "seq2seq" else mcfg.block_size - source_len + 1
        limit = min(limit, room)
    return max(limit, 1)


@torch.no_grad()
def decode_ids(model: nn.Module, fmt: TaskFormat, sources: Sequence[list[int]], decoding: Decoding,
               batch_size: int = 32, tokenizer=None) -> list[list[int]]:
    """Output token ids (without <eos>) for formatted sources, in batches of similar length.
    ``tokenizer``: the one the model reads, for ``decoding.no_repeat_words`` and ``source_words``
    (its word-initial and continuation pieces; without it those two have no effect), and so that
    no id beyond it is written (an imported model's padded vocabulary)."""
    constraints = beam.Constraints(
        decoding.no_repeat_ngram_size, decoding.no_immediate_repeat,
        tokenizer.word_initial_ids() if tokenizer is not None and decoding.no_repeat_words else frozenset(),
        tokenizer.continuation_ids() if tokenizer is not None and decoding.source_words else frozenset(),
        decodable=tokenizer.vocab_size if tokenizer is not None and tokenizer.vocab_size < model.cfg.vocab_size else 0)
    was_training = model.training
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            srcs = [sources[i] for i in chunk]
            max_lens = [output_limit(model.cfg, len(s), decoding) for s in srcs]
            if fmt.arch == "seq2seq":
                state = beam.Seq2SeqState(model, srcs, fmt.ids.bos, fmt.ids.pad, max(max_lens))
            else:
                state = beam.DecoderOnlyState(model, srcs, fmt.ids.pad, max(max_lens))
            outs = beam.decode(state, max_lens, fmt.ids.eos, decoding.beam_size, decoding.length_penalty,
                               decoding.early_stopping, constraints.for_sources(srcs))
            for i, out in zip(chunk, outs):
                outputs[i] = out
    finally:
        model.train(was_training)
    return outputs


class TaskModel:
    """A model with its tokenizer and input format: texts in, outputs out."""

    def __init__(self, model: nn.Module, cfg: Config, tokenizer):
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        ids = SpecialIds.from_tokenizer(tokenizer, cfg.task.source_prefix, cfg.task.decoder_start)
        self.fmt = TaskFormat(cfg.model.arch, ids)

    def encode_sources(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Formatted sources, each cut to task.max_source_len tokens in whole words
        (:func:`~lmforge.tasks.data.cut_tokens`: a source must not end in half a word, which the
        ``source_words`` rule would take for one of its words); also how many were cut."""
        room = self.cfg.task.max_source_len - self.fmt.source_room
        ids = self.tokenizer.encode_batch(list(texts)) if texts else []
        cut = sum(len(s) > room for s in ids)
        continues = self.tokenizer.continuation_ids()
        return [self.fmt.source(cut_tokens(s, room, continues)) for s in ids], cut

    def generate(self, texts: Sequence[str], decoding: Decoding | None = None, batch_size: int = 32,
                 warn=None) -> list[str]:
        """The output text for each source text."""
        decoding = decoding or Decoding.from_task(self.cfg.task)
        sources, cut = self.encode_sources(texts)
        if cut:
            (warn or (lambda m: print(m, file=sys.stderr)))(
                f"note: {cut} of {len(texts)} inputs were longer than task.max_source_len="
                f"{self.cfg.task.max_source_len} tokens and were cut to it"
            )
        return self.output_texts(texts, self.decode_ids(sources, decoding, batch_size))

    def decode_ids(self, sources: Sequence[list[int]], decoding: Decoding, batch_size: int = 32) -> list[list[int]]:
        """Output token ids for formatted sources (:func:`decode_ids` with this model's tokenizer)."""
        return decode_ids(self.model, self.fmt, sources, decoding, batch_size, self.tokenizer)

    def output_texts(self, sources: Sequence[str], outputs: Sequence[list[int]]) -> list[str]:
        """The text of each output, written as its source writes what it copies (a lossy tokenizer
        loses case and spacing; see :mod:`lmforge.tasks.surface`)."""
        return [surface_text(self.tokenizer, s, o) for s, o in zip(sources, outputs)]


def checkpoint_task(path: str | Path) -> str:
    """The task a checkpoint was trained for: lm, translation or summarization."""
    from lmforge.train import checkpoint as ckpt_io

    return ckpt_io.read_config(ckpt_io.latest_checkpoint(path)).task.name


def load_task_model(path: str | Path, expect: str | None = None, device: str = "cpu") -> TaskModel:
    """The task model of a checkpoint from ``lmforge finetune``; ``expect`` names the task the
    caller needs (a checkpoint of another kind is refused with the command that fits it)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.train import checkpoint as ckpt_io

    ckpt = ckpt_io.latest_checkpoint(path)
    cfg = ckpt_io.read_config(ckpt)
    wanted = f"`lmforge finetune {expect}`" if expect else "`lmforge finetune`"
    if cfg.task.name == "lm":
        raise LMForgeError(f"{ckpt} is a language-model checkpoint (from `lmforge train`); "
                           f"give one trained with {wanted}, or use `lmforge generate` for it")
    if (expect and cfg.task.name != expect) or cfg.task.name not in SEQ2SEQ_TASKS:
        from lmforge.tasks.registry import TASKS

        command = TASKS[cfg.task.name].command if cfg.task.name in TASKS else "finetune"
        raise LMForgeError(f"{ckpt} is a {cfg.task.name} checkpoint, not {expect or 'translation or summarization'}; "
                           f"use `lmforge {command}` for it, or give one trained with {wanted}")
    tok_path = ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size != cfg.model.vocab_size and not ckpt_io.padded_vocabulary(
            ckpt, cfg.model.vocab_size, tokenizer.vocab_size):
        raise LMForgeError(f"{tok_path} has {tokenizer.vocab_size} tokens but the model in {ckpt} has "
                           f"{cfg.model.vocab_size}; copy the tokenizer the model was trained with into {ckpt}")
    from lmforge.model import build_model

    model = build_model(cfg.model)
    ckpt_io.load_weights(model, ckpt)
    model.to(device).eval()
    return TaskModel(model, cfg, tokenizer)


def warm_start_config(saved: ModelConfig, wanted: ModelConfig) -> ModelConfig:
    """The model settings for starting ``wanted.arch`` from a checkpoint with ``saved`` settings:
    the checkpoint's shape, with the recipe's dropout and copy head; from a language model, an
    encoder as deep as its decoder, pre-norm, one shared embedding; from a BERT-style encoder, its
    blocks as the encoder and the recipe's ``n_layer`` decoder blocks of the same shape."""
    if saved.arch == "seq2seq" and wanted.arch == "decoder":
        raise LMForgeError("an encoder-decoder checkpoint cannot start a decoder-only model; "
                           "use --model.arch=seq2seq or start from a language-model checkpoint")
    if saved.arch == "encoder" and wanted.arch != "seq2seq":
        raise LMForgeError("an encoder checkpoint cannot start a decoder-only model; use --model.arch=seq2seq "
                           "(the encoder-decoder) or start from a language-model checkpoint")
    if saved.arch == "encoder" and saved.rel_pos_buckets:
        raise LMForgeError("an encoder with a relative-position bias (MPNet) cannot start an encoder-decoder, "
                           "whose blocks have none; start from a BERT-style encoder or a language model")
    if saved.arch == "encoder":
        return replace(saved, dropout=wanted.dropout, arch="seq2seq", n_encoder_layer=saved.n_layer,
                       n_layer=min(wanted.n_layer, saved.n_layer), share_embeddings=True, type_vocab_size=0,
                       pooler=False, copy_attention=wanted.copy_attention)
    out = replace(saved, dropout=wanted.dropout, arch=wanted.arch)
    if saved.arch == "decoder" and wanted.arch == "seq2seq":
        out = replace(out, n_encoder_layer=None, norm_position="pre", share_embeddings=True,
                      copy_attention=wanted.copy_attention)
    return out


#: seq2seq weight name prefix -> the decoder-only weight that starts it (the rest keep their names)
_FROM_DECODER = {"encoder_blocks.": "blocks.", "src_pos_emb.": "pos_emb.", "encoder_norm.": "norm_f.",
                 "src_emb.": "tok_emb."}


def _from_encoder(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """An encoder's weights under encoder-decoder names: its blocks become the encoder, its first
    ``n_layer`` blocks the decoder's self-attention and feed-forward (cross-attention starts fresh),
    its token embedding both sides' (and the tied output layer), its embedding norm both sides';
    the segment-0 embedding, added to every token of a one-segment input, is folded into both
    sides' learned positions."""
    out: dict[str, torch.Tensor] = {}
    positions = state.get("pos_emb.weight")
    if positions is not None and "type_emb.weight" in state:
        positions = positions + state["type_emb.weight"][0]
    for name, tensor in state.items():
        if name.startswith("encoder.blocks."):
            out["encoder_" + name.removeprefix("encoder.")] = tensor
            i, rest = name.removeprefix("encoder.blocks.").split(".", 1)
            if int(i) < n_layer:
                out[f"blocks.{i}.{rest}"] = tensor
        elif name.startswith("embed_norm."):
            out["src_" + name] = out[name] = tensor
        elif name.startswith("encoder.norm_f."):
            out["encoder_norm." + name.removeprefix("encoder.norm_f.")] = tensor
    if positions is not None:
        out["src_pos_emb.weight"] = out["pos_emb.weight"] = positions
    if "tok_emb.weight" in state:  # the output layer is tied to it
        out["tok_emb.weight"] = out["lm_head.weight"] = state["tok_emb.weight"]
    return out


def warm_start_state(model: nn.Module, ckpt: Path) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """What :func:`warm_start` copies: (tensors by the model's names, names that start fresh, and
    what the checkpoint is: "model", "language model" or "encoder"). A checkpoint of the model's
    own kind fills everything and is not read here (``{}``, ``[]``, "model")."""
    from safetensors.torch import load_file

    from lmforge.train import checkpoint as ckpt_io

    saved_arch = ckpt_io.read_config(ckpt).model.arch
    if saved_arch == getattr(model.cfg, "arch", "decoder"):
        return {}, [], "model"
    state = load_file(ckpt_io.require_file(ckpt, ckpt_io.WEIGHTS, "the checkpoint is incomplete; use another one"))
    if "lm_head.weight" not in state and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]  # a tied head is stored once
    if saved_arch == "encoder":
        state, what, prefixes = _from_encoder(state, model.cfg.n_layer), "encoder", {}
    else:
        what, prefixes = "language model", _FROM_DECODER
    copied, fresh = {}, []
    for name, tensor in model.state_dict().items():
        source = name
        for prefix, lm_prefix in prefixes.items():
            if name.startswith(prefix):
                source = lm_prefix + name[len(prefix):]
        if source in state and tuple(state[source].shape) == tuple(tensor.shape):
            copied[name] = state[source]
        else:
            fresh.append(name)
    return copied, fresh, what


def warm_start(model: nn.Module, ckpt: Path) -> tuple[str, list[str]]:
    """Copy a checkpoint's weights into ``model``. From a decoder-only language model into an
    encoder-decoder, the decoder takes the language model's blocks and both encoder and decoder its
    embedding; encoder blocks take the same blocks (now attending both ways); cross-attention starts
    fresh. From a BERT-style encoder, see :func:`_from_encoder`. Returns a one-line account and the
    names of the parameters that start fresh."""
    from lmforge.train import checkpoint as ckpt_io

    copied, fresh, what = warm_start_state(model, ckpt)
    if what == "model":
        ckpt_io.load_weights(model, ckpt)
        return f"all weights from {ckpt}", []
    model.load_state_dict(copied, strict=False)
    return (f"{len(copied)} tensors from the {what} {ckpt}; {len(fresh)} start fresh "
            f"({', '.join(sorted({n.split('.')[2] if n.startswith('blocks.') else n.split('.')[0] for n in fresh}))})",
            fresh)
