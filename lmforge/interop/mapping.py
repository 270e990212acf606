"""What every architecture's mapping shares: strict tensor bookkeeping and config reading.

A mapping must account for every tensor: each Hugging Face tensor is taken exactly once, with
the shape its config.json implies, or checked as a buffer that lmforge recomputes (a causal mask,
position ids, rotary frequencies). Whatever is left over is an error unless the user named its
prefix to leave out. Nothing is guessed: a missing tensor, a wrong shape, or a setting lmforge
cannot reproduce exactly stops the conversion with the name of what is wrong.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError


class Weights:
    """The tensors of a Hugging Face checkpoint, taken one by one by a mapping."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, arch: str):
        self.tensors = dict(tensors)
        self.source, self.arch = source, arch
        self.converted: dict[str, int] = {}  # dtype name -> tensors upcast to float32
        self.buffers: list[str] = []

    def prefix_of(self, *candidates: str) -> str:
        """The first prefix (e.g. 'transformer.') that some tensor name starts with, else ''."""
        for p in candidates:
            if any(name.startswith(p) for name in self.tensors):
                return p
        return ""

    def rename(self, fn: Callable[[str], str]) -> None:
        self.tensors = {fn(k): v for k, v in self.tensors.items()}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor ``name`` as float32, removed from the pool; refused if absent or of another shape."""
        if name not in self.tensors:
            raise LMForgeError(
                f"{self.source} lacks tensor {name!r} (shape {tuple(shape)}) that the {self.arch} config.json implies; "
                "the weights are incomplete or belong to another config.json"
            )
        t = self.tensors.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise LMForgeError(
                f"{self.source}: tensor {name!r} has shape {tuple(t.shape)} but the {self.arch} config.json implies "
                f"{tuple(shape)}; the weights belong to another config.json"
            )
        if not t.is_floating_point():
            raise LMForgeError(f"{self.source}: tensor {name!r} has dtype {t.dtype}, not a floating-point weight; "
                               "the checkpoint is damaged")
        if t.dtype != torch.float32:  # half and bfloat16 values are all exact in float32
            key = str(t.dtype).removeprefix("torch.")
            self.converted[key] = self.converted.get(key, 0) + 1
            t = t.float()
        return t.contiguous()

    def buffer(self, name: str, expected: torch.Tensor, what: str) -> None:
        """A stored buffer that lmforge recomputes: accepted (and consumed) only if it holds the standard values."""
        if name not in self.tensors:
            return
        t = self.tensors.pop(name)
        same = tuple(t.shape) == tuple(expected.shape) and (
            torch.allclose(t.double(), expected.double(), rtol=1e-5, atol=1e-6) if t.is_floating_point()
            else torch.equal(t.long(), expected.long()))
        if not same:
            raise LMForgeError(
                f"{self.source}: buffer {name!r} ({what}) differs from the standard one that lmforge computes; "
                f"this {self.arch} variant cannot be mapped exactly"
            )
        self.buffers.append(name)

    def check_leftovers(self, drop_prefixes: tuple[str, ...] = ()) -> list[str]:
        """Names dropped by the user's prefixes; any other leftover is an error."""
        dropped = [n for n in self.tensors if drop_prefixes and n.startswith(drop_prefixes)]
        rest = sorted(n for n in self.tensors if n not in dropped)
        if rest:
            shown = ", ".join(repr(n) for n in rest[:4]) + (f" and {len(rest) - 4} more" if len(rest) > 4 else "")
            prefix = rest[0].split(".")[0] + "."
            raise LMForgeError(
                f"{self.source} holds {len(rest)} tensor(s) that the {self.arch} mapping has no place for ({shown}); "
                f"if they are a task head you do not need, leave them out with --drop-prefix {prefix}"
            )
        return dropped


class HFConfig:
    """A Hugging Face config.json with required keys, defaults as transformers uses them, and refusals."""

    def __init__(self, raw: dict, arch: str):
        self.raw, self.arch = raw, arch

    def need(self, key: str) -> Any:
        value = self.raw.get(key)
        if value is None:
            raise LMForgeError(f"config.json of this {self.arch} checkpoint has no {key!r}; the file is incomplete")
        return value

    def get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def refuse(self, key: str, value: Any, reason: str) -> None:
        raise LMForgeError(f"{self.arch} with {key}={value!r} cannot be mapped exactly: {reason}")


def model_config(**kw: Any) -> ModelConfig:
    try:
        return ModelConfig(pad_vocab_multiple=1, **kw)
    except LMForgeError as e:
        raise LMForgeError(f"the checkpoint's config.json gives an lmforge model that is not valid: {e}") from None


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a (possibly vocabulary-padded) table."""
    return t[:n].contiguous()


def bias_or_zeros(state: dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    """A bias from the lmforge state dict, or zeros where the model has none (bias=false): the same output."""
    t = state.get(name)
    return t if t is not None else torch.zeros(size)


def _linear_shape(ours: str, d: int, ff: int) -> tuple[int, int]:
    return (ff, d) if ours == "ffn.up_proj" else (d, ff) if ours == "ffn.down_proj" else (d, d)


def encoder_blocks_from_hf(w: "Weights", cfg: ModelConfig, p: str, linears: tuple, norms: tuple) -> dict[str, torch.Tensor]:
    """A post-norm encoder's blocks (BERT, MPNet: ``{p}encoder.layer.{i}.``) and pooler, given the
    (lmforge name, Hugging Face name) pairs of each block's linear layers and norms."""
    d, ff, out = cfg.d_model, cfg.ff_dim, {}
    for i in range(cfg.n_layer):
        h, o = f"{p}encoder.layer.{i}.", f"encoder.blocks.{i}."
        for ours, theirs in linears:
            shape = _linear_shape(ours, d, ff)
            out[o + ours + ".weight"] = w.take(h + theirs + ".weight", shape)
            out[o + ours + ".bias"] = w.take(h + theirs + ".bias", (shape[0],))
        for ours, theirs in norms:
            out[o + ours + ".weight"] = w.take(h + theirs + ".weight", (d,))
            out[o + ours + ".bias"] = w.take(h + theirs + ".bias", (d,))
    if cfg.pooler:
        out["pooler.weight"] = w.take(p + "pooler.dense.weight", (d, d))
        out["pooler.bias"] = w.take(p + "pooler.dense.bias", (d,))
    return out


#: Hugging Face hidden_act -> lmforge ffn, for the post-norm encoders (BERT, MPNet)
_ENCODER_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def encoder_ffn(hf: "HFConfig") -> str:
    """The lmforge ``ffn`` of an encoder's ``hidden_act``, or a refusal naming the ones mapped."""
    act = hf.get("hidden_act", "gelu")
    if act not in _ENCODER_ACT:
        hf.refuse("hidden_act", act, f"lmforge's feed-forward has {', '.join(_ENCODER_ACT)}")
    return _ENCODER_ACT[act]


def encoder_config_to_hf(arch: "Architecture", cfg: ModelConfig, tokens: dict, **extra: Any) -> dict:
    """config.json of a post-norm encoder (BERT, MPNet): the keys both share, then ``extra``."""
    return {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ff_dim,
        "hidden_act": "gelu" if cfg.ffn == "gelu" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": tokens.get("pad"), **extra,
    }


def encoder_blocks_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, linears: tuple,
                         norms: tuple) -> dict[str, torch.Tensor]:
    """:func:`encoder_blocks_from_hf` backwards (biases written as zeros where the model has none)."""
    d, out = cfg.d_model, {}
    for i in range(cfg.n_layer):
        h, o = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
        for ours, theirs in linears:
            out[h + theirs + ".weight"] = state[o + ours + ".weight"]
            out[h + theirs + ".bias"] = bias_or_zeros(state, o + ours + ".bias", _linear_shape(ours, d, cfg.ff_dim)[0])
        for ours, theirs in norms:
            out[h + theirs + ".weight"] = state[o + ours + ".weight"]
            out[h + theirs + ".bias"] = bias_or_zeros(state, o + ours + ".bias", d)
    if cfg.pooler:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = state["pooler.weight"], state["pooler.bias"]
    return out


# ------------------------------------------------------------------------------------ architectures

class Architecture:
    """One Hugging Face architecture, both ways (see lmforge/interop/architectures.py and marian.py)."""

    model_type = ""
    hf_class = ""
    #: what an lmforge model needs to be exported as this architecture
    shape = ""

    def config_from_hf(self, hf: HFConfig, names: set[str]) -> tuple[ModelConfig, list[str]]:
        raise NotImplementedError

    def from_hf(self, w: Weights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_problems(self, cfg: ModelConfig) -> list[str]:
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig, tokens: dict) -> dict:
        raise NotImplementedError

    def to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
        raise NotImplementedError


def common_problems(cfg: ModelConfig, arch: str, pos: str, norm: str, ffns: tuple[str, ...], norm_position: str) -> list[str]:
    """The settings of ``cfg`` that differ from what an architecture needs, each as 'key=value (needs ...)'."""
    problems = []
    if cfg.arch != arch:
        problems.append(f"model.arch={cfg.arch} (needs {arch})")
    if cfg.pos_encoding != pos:
        problems.append(f"pos_encoding={cfg.pos_encoding} (needs {pos})")
    if cfg.norm != norm:
        problems.append(f"norm={cfg.norm} (needs {norm})")
    if cfg.ffn not in ffns:
        problems.append(f"ffn={cfg.ffn} (needs {' or '.join(ffns)})")
    if cfg.norm_position != norm_position:
        problems.append(f"norm_position={cfg.norm_position} (needs {norm_position})")
    return problems


def one_dropout(hf: HFConfig, keys: tuple[str, ...], default: float | tuple[float, ...], notes: list[str]) -> float:
    """lmforge's one dropout rate from several (the first key's), with a note when they differ."""
    defaults = default if isinstance(default, tuple) else (default,) * len(keys)
    values = [float(hf.get(k, d)) for k, d in zip(keys, defaults)]
    if len(set(values)) > 1:
        notes.append(f"dropout: lmforge has one rate; took {keys[0]}={values[0]} (the others: "
                     + ", ".join(f"{k}={v}" for k, v in zip(keys[1:], values[1:])) + "); training only")
    return values[0]


def output_head(w: Weights, cfg: ModelConfig, embedding: torch.Tensor, name: str) -> torch.Tensor:
    """The output head: the embedding when tied (a stored copy must equal it), else its own tensor."""
    if not cfg.tie_embeddings:
        return w.take(name, (cfg.vocab_size, cfg.d_model))
    tied_copy(w, name, embedding, "ties the output head to the embedding",
              "set tie_word_embeddings=false in config.json if the head is its own")
    return embedding


def tied_copy(w: Weights, name: str, table: torch.Tensor, tie: str, fix: str) -> None:
    """A stored copy of a tied tensor, consumed if present; it must equal the tensor it copies."""
    if w.has(name) and not torch.equal(w.take(name, tuple(table.shape)), table):
        raise LMForgeError(f"{w.source}: config.json {tie} but {name!r} differs from it; {fix}")
