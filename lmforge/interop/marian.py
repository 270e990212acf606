"""Marian (``MarianMTModel``, the opus-mt translation models) <-> lmforge's ``Seq2SeqLM``, both ways.

Marian is the original post-norm Transformer: sinusoidal positions with the sines in the first
half of the features and the cosines in the second (``sinusoidal_layout=halves``), embeddings
scaled by sqrt(d_model), biases everywhere, one embedding for source, target and output head (or
one per side), and ``final_logits_bias`` added to the logits (``output_bias``). Its stored
position tables are checked against the float64 formula; lmforge computes positions in float32,
within about 1e-7 per unit of position of it (under 1e-4 at position 1024). Layer names:

    self_attn.{q,k,v,out}_proj, self_attn_layer_norm  -> attn.{q,k,v,o}_proj, attn_norm
    encoder_attn.*, encoder_attn_layer_norm           -> cross_attn.*, cross_norm (decoder)
    fc1, fc2, final_layer_norm                        -> ffn.up_proj, ffn.down_proj, ffn_norm
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.interop.mapping import (
    Architecture,
    HFConfig,
    Weights,
    bias_or_zeros,
    common_problems,
    model_config,
    one_dropout,
    output_head,
    rows,
    tied_copy,
)
from lmforge.model.layers import sinusoidal_encoding

_MARIAN_ACT = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}
_MARIAN_ACT_OUT = {"silu": "swish", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
#: settings with the one value lmforge maps: (key, value needed, transformers' default when absent, why)
_MARIAN_FIXED = (
    ("scale_embedding", True, False, "lmforge scales sinusoidally-positioned embeddings by sqrt(d_model)"),
    ("normalize_before", False, False, "Marian's layers are post-norm"),
    ("normalize_embedding", False, False, "Marian has no embedding norm"),
    ("add_final_layer_norm", False, False, "post-norm stacks have no final norm"),
    ("static_position_embeddings", True, True, "Marian's positions are fixed sinusoids"),
    ("add_bias_logits", False, False, "MarianMTModel's only logits bias is final_logits_bias"),
    ("is_encoder_decoder", True, True, "lmforge maps MarianMTModel, the encoder-decoder"),
)
_MARIAN_NORM_EPS = 1e-5  # Marian's nn.LayerNorm default; config.json has no key for it


class Marian(Architecture):
    model_type, hf_class = "marian", "MarianMTModel"
    shape = ("encoder-decoder (arch=seq2seq), sinusoidal positions in halves layout, layernorm with norm_eps 1e-5, "
             "post-norm, silu, relu, gelu or gelu_tanh, n_kv_head = n_head")

    def config_from_hf(self, hf, names):
        notes: list[str] = []
        act = hf.get("activation_function", "gelu")
        if act not in _MARIAN_ACT:
            hf.refuse("activation_function", act, f"supported: {', '.join(_MARIAN_ACT)}")
        for key, needed, default, why in _MARIAN_FIXED:
            if hf.get(key, default) != needed:
                hf.refuse(key, hf.get(key, default), f"{why}; supported: {str(needed).lower()}")
        V = hf.need("vocab_size")
        if hf.get("decoder_vocab_size", V) != V:
            hf.refuse("decoder_vocab_size", hf.get("decoder_vocab_size", V),
                      f"lmforge has one vocabulary for both sides; supported: vocab_size ({V})")
        heads = _one_value(hf, ("encoder_attention_heads", "decoder_attention_heads"), "number of attention heads")
        ffn_dim = _one_value(hf, ("encoder_ffn_dim", "decoder_ffn_dim"), "feed-forward width")
        for key in ("encoder_layerdrop", "decoder_layerdrop", "activation_dropout"):
            if float(hf.get(key, 0.0)):
                notes.append(f"{key}={hf.get(key, 0.0)}: lmforge has no such dropout; training only")
        cfg = model_config(
            arch="seq2seq", vocab_size=V, block_size=hf.get("max_position_embeddings", 1024),
            n_layer=hf.need("decoder_layers"), n_encoder_layer=hf.need("encoder_layers"), n_head=heads,
            d_model=hf.need("d_model"), d_ff=ffn_dim, pos_encoding="sinusoidal", sinusoidal_layout="halves",
            ffn=_MARIAN_ACT[act], norm="layernorm", norm_position="post", norm_eps=_MARIAN_NORM_EPS, bias=True,
            share_embeddings=bool(hf.get("share_encoder_decoder_embeddings", True)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), output_bias="final_logits_bias" in names,
            dropout=one_dropout(hf, ("dropout", "attention_dropout"), (0.1, 0.0), notes),
            init_std=float(hf.get("init_std", 0.02)),
        )
        return cfg, notes

    def from_hf(self, w, cfg):
        p = w.prefix_of("model.")
        d, ff, V = cfg.d_model, cfg.ff_dim, cfg.vocab_size
        out = _marian_embeddings(w, cfg, p)
        positions = sinusoidal_encoding(cfg.block_size, d, layout="halves", dtype=torch.float64)
        for side, ours, n, cross in (("encoder", "encoder_blocks", cfg.n_encoder_layer, False),
                                     ("decoder", "blocks", cfg.n_layer, True)):
            w.buffer(f"{p}{side}.embed_positions.weight", positions, "the sinusoidal positions")
            for i in range(n):
                h, o = f"{p}{side}.layers.{i}.", f"{ours}.{i}."
                for mine, theirs, shape in _marian_linears(d, ff, cross):
                    out[o + mine + ".weight"] = w.take(h + theirs + ".weight", shape)
                    out[o + mine + ".bias"] = w.take(h + theirs + ".bias", (shape[0],))
                for mine, theirs in _marian_norms(cross):
                    out[o + mine + ".weight"] = w.take(h + theirs + ".weight", (d,))
                    out[o + mine + ".bias"] = w.take(h + theirs + ".bias", (d,))
        if cfg.output_bias:
            out["lm_head.bias"] = w.take("final_logits_bias", (1, V))[0]
        return out

    def export_problems(self, cfg):
        problems = common_problems(cfg, "seq2seq", "sinusoidal", "layernorm", tuple(_MARIAN_ACT_OUT), "post")
        if cfg.pos_encoding == "sinusoidal" and cfg.sinusoidal_layout != "halves":
            problems.append(f"sinusoidal_layout={cfg.sinusoidal_layout} (needs halves)")
        if cfg.norm_eps != _MARIAN_NORM_EPS:
            problems.append(f"norm_eps={cfg.norm_eps} (Marian's LayerNorms use {_MARIAN_NORM_EPS})")
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.kv_heads} (Marian has no grouped key/value heads)")
        if cfg.copy_attention:
            problems.append("copy_attention=true (Marian has no copy head)")
        if cfg.embed_norm:
            problems.append("embed_norm=true (Marian has no embedding norm)")
        return problems

    def config_to_hf(self, cfg, tokens):
        eos, n_encoder = tokens.get("eos"), cfg.n_encoder_layer or cfg.n_layer
        return {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "decoder_vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "max_position_embeddings": cfg.block_size, "encoder_layers": n_encoder, "decoder_layers": cfg.n_layer,
            "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
            "encoder_ffn_dim": cfg.ff_dim, "decoder_ffn_dim": cfg.ff_dim,
            "activation_function": _MARIAN_ACT_OUT[cfg.ffn], "scale_embedding": True,
            "share_encoder_decoder_embeddings": cfg.share_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
            "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": cfg.init_std,
            "is_encoder_decoder": True, "use_cache": True, "pad_token_id": tokens.get("pad"), "eos_token_id": eos,
            "forced_eos_token_id": eos, "decoder_start_token_id": tokens.get("decoder_start"), "bos_token_id": None,
        }

    def to_hf(self, state, cfg):
        d = cfg.d_model
        notes = [] if cfg.bias else ["bias=false: Marian always has biases, written as zeros (same outputs)"]
        out = _marian_embeddings_to_hf(state, cfg)
        for side, ours, n, cross in (("encoder", "encoder_blocks", cfg.n_encoder_layer or cfg.n_layer, False),
                                     ("decoder", "blocks", cfg.n_layer, True)):
            for i in range(n):
                h, o = f"model.{side}.layers.{i}.", f"{ours}.{i}."
                for mine, theirs, shape in _marian_linears(d, cfg.ff_dim, cross):
                    out[h + theirs + ".weight"] = state[o + mine + ".weight"]
                    out[h + theirs + ".bias"] = bias_or_zeros(state, o + mine + ".bias", shape[0])
                for mine, theirs in _marian_norms(cross):
                    out[h + theirs + ".weight"] = state[o + mine + ".weight"]
                    out[h + theirs + ".bias"] = bias_or_zeros(state, o + mine + ".bias", d)
        if cfg.output_bias:  # absent, transformers starts final_logits_bias at zero: the same outputs
            out["final_logits_bias"] = rows(state["lm_head.bias"], cfg.vocab_size)[None].contiguous()
        return out, notes


def _one_value(hf: HFConfig, keys: tuple[str, str], what: str) -> int:
    """A setting that Marian gives each side and lmforge's encoder-decoder has once."""
    first, second = hf.need(keys[0]), hf.need(keys[1])
    if first != second:
        hf.refuse(keys[1], second, f"lmforge's encoder and decoder have one {what}; supported: {keys[0]} ({first})")
    return first


def _marian_embeddings(w: Weights, cfg: ModelConfig, p: str) -> dict[str, torch.Tensor]:
    """Token tables and output head. Shared: one table, stored as shared.weight and/or copies under the
    encoder's and decoder's embed_tokens (copies must be equal); else one table per side."""
    shape = (cfg.vocab_size, cfg.d_model)
    names = [p + "shared.weight", p + "decoder.embed_tokens.weight", p + "encoder.embed_tokens.weight"]
    if cfg.share_embeddings:
        first = next((n for n in names if w.has(n)), names[0])
        out = {"tok_emb.weight": w.take(first, shape)}
        for name in names[1:]:
            tied_copy(w, name, out["tok_emb.weight"], f"shares one embedding ({first!r}) between encoder and decoder",
                      "set share_encoder_decoder_embeddings=false in config.json if they are separate")
    else:
        out = {"src_emb.weight": w.take(names[2], shape), "tok_emb.weight": w.take(names[1], shape)}
    out["lm_head.weight"] = output_head(w, cfg, out["tok_emb.weight"], "lm_head.weight")
    return out


def _marian_embeddings_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Shared and tied: shared.weight alone. Shared but untied: also each side's copy, because
    transformers 5 then unties the sides' tables from shared.weight as well."""
    V = cfg.vocab_size
    table = rows(state["tok_emb.weight"], V)
    if not cfg.share_embeddings:
        out = {"model.encoder.embed_tokens.weight": rows(state["src_emb.weight"], V),
               "model.decoder.embed_tokens.weight": table}
    elif cfg.tie_embeddings:
        out = {"model.shared.weight": table}
    else:
        out = {"model.shared.weight": table, "model.encoder.embed_tokens.weight": table.clone(),
               "model.decoder.embed_tokens.weight": table.clone()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = rows(state["lm_head.weight"], V)
    return out


def _marian_linears(d: int, ff: int, cross: bool) -> list[tuple[str, str, tuple[int, int]]]:
    attention = [("attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if cross else [])
    out = [(f"{mine}.{a}_proj", f"{theirs}.{b}_proj", (d, d)) for mine, theirs in attention
           for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))]
    return out + [("ffn.up_proj", "fc1", (ff, d)), ("ffn.down_proj", "fc2", (d, ff))]


def _marian_norms(cross: bool) -> list[tuple[str, str]]:
    return ([("attn_norm", "self_attn_layer_norm")] + ([("cross_norm", "encoder_attn_layer_norm")] if cross else [])
            + [("ffn_norm", "final_layer_norm")])
