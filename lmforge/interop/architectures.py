"""The mapped architectures: GPT-2, Llama (decoders), BERT, MPNet (encoders, MPNet in
:mod:`lmforge.interop.mpnet`) and Marian (encoder-decoder, in :mod:`lmforge.interop.marian`).

Each gives both directions: Hugging Face config.json and tensors -> lmforge ModelConfig and
state dict, and back. Names on the lmforge side are those of ``DecoderLM`` / ``EncoderModel`` /
``Seq2SeqLM``.

* GPT-2 stores its projections as ``Conv1D`` ([in, out], the transpose of ``nn.Linear``) and
  fuses the query, key and value projections into one ``c_attn``: split and transposed here.
* Llama's names match lmforge's almost one to one; its RMSNorms have no bias; the rotary
  "rotate_half" layout is the one ``layers.RotaryEmbedding`` uses, so q/k need no permutation.
* BERT is post-norm: ``attention.output.LayerNorm`` normalises x + attention(x) (lmforge's
  ``attn_norm`` of a post-norm block) and ``output.LayerNorm`` normalises x + ffn(x) (``ffn_norm``).
"""

from __future__ import annotations

import torch

from lmforge.interop.mapping import (
    Architecture,
    bias_or_zeros,
    common_problems,
    encoder_blocks_from_hf,
    encoder_blocks_to_hf,
    encoder_config_to_hf,
    encoder_ffn,
    model_config,
    one_dropout,
    output_head,
    rows,
)
from lmforge.interop.marian import Marian
from lmforge.interop.mpnet import MPNet

# ---------------------------------------------------------------------------------------------- GPT-2

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class GPT2(Architecture):
    model_type, hf_class = "gpt2", "GPT2LMHeadModel"
    shape = "decoder, learned positions, layernorm, gelu or gelu_tanh, pre-norm, n_kv_head = n_head"

    def config_from_hf(self, hf, names):
        notes: list[str] = []
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACT:
            hf.refuse("activation_function", act, f"lmforge's feed-forward has {', '.join(_GPT2_ACT)}")
        if not hf.get("scale_attn_weights", True):
            hf.refuse("scale_attn_weights", False, "lmforge always scales attention by 1/sqrt(head size)")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            hf.refuse("scale_attn_by_inverse_layer_idx", True, "lmforge has no per-layer attention scaling")
        if hf.get("add_cross_attention", False):
            hf.refuse("add_cross_attention", True, "a decoder-only model has no cross-attention")
        cfg = model_config(
            vocab_size=hf.need("vocab_size"), block_size=hf.need("n_positions"), n_layer=hf.need("n_layer"),
            n_head=hf.need("n_head"), d_model=hf.need("n_embd"), d_ff=hf.get("n_inner", None),
            pos_encoding="learned", ffn=_GPT2_ACT[act], norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            dropout=one_dropout(hf, ("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.1, notes),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        return cfg, notes

    def from_hf(self, w, cfg):
        p = w.prefix_of("transformer.")
        d, ff, V, L = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.block_size
        out = {"tok_emb.weight": w.take(p + "wte.weight", (V, d)), "pos_emb.weight": w.take(p + "wpe.weight", (L, d))}
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool)).view(1, 1, L, L)
        for i in range(cfg.n_layer):
            h, o = f"{p}h.{i}.", f"blocks.{i}."
            w.buffer(h + "attn.bias", causal, "the causal mask")
            w.buffer(h + "attn.masked_bias", torch.tensor(-1e4), "the masked-score constant")
            qkv_w, qkv_b = w.take(h + "attn.c_attn.weight", (d, 3 * d)), w.take(h + "attn.c_attn.bias", (3 * d,))
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[o + f"attn.{name}.weight"] = qkv_w[:, j * d:(j + 1) * d].T.contiguous()
                out[o + f"attn.{name}.bias"] = qkv_b[j * d:(j + 1) * d].contiguous()
            for ours, theirs, shape in (("attn.o_proj", "attn.c_proj", (d, d)), ("ffn.up_proj", "mlp.c_fc", (d, ff)),
                                        ("ffn.down_proj", "mlp.c_proj", (ff, d))):
                out[o + ours + ".weight"] = w.take(h + theirs + ".weight", shape).T.contiguous()  # Conv1D [in, out]
                out[o + ours + ".bias"] = w.take(h + theirs + ".bias", (shape[1],))
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[o + ours + ".weight"] = w.take(h + theirs + ".weight", (d,))
                out[o + ours + ".bias"] = w.take(h + theirs + ".bias", (d,))
        out["norm_f.weight"], out["norm_f.bias"] = w.take(p + "ln_f.weight", (d,)), w.take(p + "ln_f.bias", (d,))
        out["lm_head.weight"] = output_head(w, cfg, out["tok_emb.weight"], "lm_head.weight")
        return out

    def export_problems(self, cfg):
        problems = common_problems(cfg, "decoder", "learned", "layernorm", ("gelu", "gelu_tanh"), "pre")
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.kv_heads} (GPT-2 has no grouped key/value heads)")
        return problems

    def config_to_hf(self, cfg, tokens):
        return {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff_dim,
            "activation_function": "gelu_new" if cfg.ffn == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "initializer_range": cfg.init_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "bos_token_id": tokens.get("bos"), "eos_token_id": tokens.get("eos"), "pad_token_id": tokens.get("pad"),
        }

    def to_hf(self, state, cfg):
        d, V = cfg.d_model, cfg.vocab_size
        notes = [] if cfg.bias else ["bias=false: GPT-2 always has biases, written as zeros (same outputs)"]
        out = {"transformer.wte.weight": rows(state["tok_emb.weight"], V), "transformer.wpe.weight": state["pos_emb.weight"]}
        for i in range(cfg.n_layer):
            h, o = f"transformer.h.{i}.", f"blocks.{i}."
            out[h + "attn.c_attn.weight"] = torch.cat(
                [state[o + f"attn.{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj")], dim=1).contiguous()
            out[h + "attn.c_attn.bias"] = torch.cat(
                [bias_or_zeros(state, o + f"attn.{n}.bias", d) for n in ("q_proj", "k_proj", "v_proj")])
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
                weight = state[o + ours + ".weight"]
                out[h + theirs + ".weight"] = weight.T.contiguous()
                out[h + theirs + ".bias"] = bias_or_zeros(state, o + ours + ".bias", weight.shape[0])
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[h + theirs + ".weight"] = state[o + ours + ".weight"]
                out[h + theirs + ".bias"] = bias_or_zeros(state, o + ours + ".bias", d)
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = bias_or_zeros(state, "norm_f.bias", d)
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = rows(state["lm_head.weight"], V)
        return out, notes


# ---------------------------------------------------------------------------------------------- Llama

class Llama(Architecture):
    model_type, hf_class = "llama", "LlamaForCausalLM"
    shape = "decoder, rotary positions, rmsnorm, swiglu, pre-norm"

    def config_from_hf(self, hf, names):
        notes: list[str] = []
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            hf.refuse("hidden_act", act, "lmforge's gated feed-forward is SwiGLU (silu)")
        rope = hf.get("rope_parameters", None) or {}
        scaling = hf.get("rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
        if scaling or rope_type != "default":
            hf.refuse("rope_parameters", rope or scaling, "lmforge has plain rotary positions (rope_type default) only")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        d, n_head = hf.need("hidden_size"), hf.need("num_attention_heads")
        head_dim = hf.get("head_dim", None)
        if head_dim is not None and head_dim * n_head != d:
            hf.refuse("head_dim", head_dim, f"lmforge's head size is hidden_size / num_attention_heads = {d // n_head}")
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            hf.refuse("attention_bias", attn_bias, f"lmforge has biases everywhere or nowhere (mlp_bias={mlp_bias})")
        dropout = float(hf.get("attention_dropout", 0.0))
        if dropout:
            notes.append(f"dropout: lmforge applies attention_dropout={dropout} to the residual branches too; training only")
        cfg = model_config(
            vocab_size=hf.need("vocab_size"), block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf.need("num_hidden_layers"), n_head=n_head, n_kv_head=hf.get("num_key_value_heads", n_head),
            d_model=d, d_ff=hf.need("intermediate_size"), pos_encoding="rotary", rope_theta=theta, ffn="swiglu",
            norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bias=attn_bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=dropout,
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        return cfg, notes

    def from_hf(self, w, cfg):
        p = w.prefix_of("model.")
        d, kv, ff, V = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.ff_dim, cfg.vocab_size
        D = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        out = {"tok_emb.weight": w.take(p + "embed_tokens.weight", (V, d))}
        for i in range(cfg.n_layer):
            h, o = f"{p}layers.{i}.", f"blocks.{i}."
            w.buffer(h + "self_attn.rotary_emb.inv_freq", inv_freq, "the rotary frequencies")
            for name, shape in (("q_proj", (d, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, d))):
                out[o + f"attn.{name}.weight"] = w.take(h + f"self_attn.{name}.weight", shape)
                if cfg.bias:
                    out[o + f"attn.{name}.bias"] = w.take(h + f"self_attn.{name}.bias", (shape[0],))
            for name, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
                out[o + f"ffn.{name}.weight"] = w.take(h + f"mlp.{name}.weight", shape)
                if cfg.bias:
                    out[o + f"ffn.{name}.bias"] = w.take(h + f"mlp.{name}.bias", (shape[0],))
            out[o + "attn_norm.weight"] = w.take(h + "input_layernorm.weight", (d,))
            out[o + "ffn_norm.weight"] = w.take(h + "post_attention_layernorm.weight", (d,))
        out["norm_f.weight"] = w.take(p + "norm.weight", (d,))
        out["lm_head.weight"] = output_head(w, cfg, out["tok_emb.weight"], "lm_head.weight")
        return out

    def export_problems(self, cfg):
        return common_problems(cfg, "decoder", "rotary", "rmsnorm", ("swiglu",), "pre")

    def config_to_hf(self, cfg, tokens):
        return {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "bos_token_id": tokens.get("bos"), "eos_token_id": tokens.get("eos"), "pad_token_id": tokens.get("pad"),
        }

    def to_hf(self, state, cfg):
        V = cfg.vocab_size
        out = {"model.embed_tokens.weight": rows(state["tok_emb.weight"], V)}
        for i in range(cfg.n_layer):
            h, o = f"model.layers.{i}.", f"blocks.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[h + f"self_attn.{name}.weight"] = state[o + f"attn.{name}.weight"]
                if cfg.bias:
                    out[h + f"self_attn.{name}.bias"] = state[o + f"attn.{name}.bias"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[h + f"mlp.{name}.weight"] = state[o + f"ffn.{name}.weight"]
                if cfg.bias:
                    out[h + f"mlp.{name}.bias"] = state[o + f"ffn.{name}.bias"]
            out[h + "input_layernorm.weight"] = state[o + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = state[o + "ffn_norm.weight"]
        out["model.norm.weight"] = state["norm_f.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = rows(state["lm_head.weight"], V)
        return out, []


# ---------------------------------------------------------------------------------------------- BERT

class Bert(Architecture):
    model_type, hf_class = "bert", "BertModel"
    shape = ("encoder, learned positions, layernorm, post-norm, embed_norm, type_vocab_size >= 1, gelu or gelu_tanh, "
             "n_kv_head = n_head")

    def config_from_hf(self, hf, names):
        notes: list[str] = []
        ffn = encoder_ffn(hf)
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            hf.refuse("position_embedding_type", pos, "lmforge's encoder has absolute learned positions")
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag, False):
                hf.refuse(flag, True, "lmforge's encoder is bidirectional, without cross-attention")
        pooler = any(n.endswith("pooler.dense.weight") for n in names)
        cfg = model_config(
            arch="encoder", vocab_size=hf.need("vocab_size"), block_size=hf.get("max_position_embeddings", 512),
            n_layer=hf.need("num_hidden_layers"), n_head=hf.need("num_attention_heads"), d_model=hf.need("hidden_size"),
            d_ff=hf.need("intermediate_size"), pos_encoding="learned", ffn=ffn, norm="layernorm",
            norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), bias=True,
            type_vocab_size=hf.get("type_vocab_size", 2), embed_norm=True, pooler=pooler,
            dropout=one_dropout(hf, ("hidden_dropout_prob", "attention_probs_dropout_prob"), 0.1, notes),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        return cfg, notes

    def from_hf(self, w, cfg):
        if any(n.endswith((".gamma", ".beta")) for n in w.tensors):  # early checkpoints' LayerNorm names
            w.rename(lambda n: n[:-6] + ".weight" if n.endswith(".gamma") else n[:-5] + ".bias" if n.endswith(".beta") else n)
        p = w.prefix_of("bert.")
        d, V, L, types = cfg.d_model, cfg.vocab_size, cfg.block_size, cfg.type_vocab_size
        e = p + "embeddings."
        w.buffer(e + "position_ids", torch.arange(L).unsqueeze(0), "the position ids 0..max_position_embeddings-1")
        if w.has(e + "token_type_ids"):
            w.buffer(e + "token_type_ids", torch.zeros_like(w.tensors[e + "token_type_ids"]), "default token types")
        out = {"tok_emb.weight": w.take(e + "word_embeddings.weight", (V, d)),
               "pos_emb.weight": w.take(e + "position_embeddings.weight", (L, d)),
               "type_emb.weight": w.take(e + "token_type_embeddings.weight", (types, d)),
               "embed_norm.weight": w.take(e + "LayerNorm.weight", (d,)),
               "embed_norm.bias": w.take(e + "LayerNorm.bias", (d,))}
        return out | encoder_blocks_from_hf(w, cfg, p, _BERT_LINEARS, _BERT_NORMS)

    def export_problems(self, cfg):
        problems = common_problems(cfg, "encoder", "learned", "layernorm", ("gelu", "gelu_tanh"), "post")
        if not cfg.embed_norm:
            problems.append("embed_norm=false (BERT normalises its embeddings)")
        if cfg.type_vocab_size < 1:
            problems.append("type_vocab_size=0 (BERT has token-type embeddings)")
        if cfg.rel_pos_buckets:
            problems.append(f"rel_pos_buckets={cfg.rel_pos_buckets} (BERT has no relative-position bias)")
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.kv_heads} (BERT has no grouped key/value heads)")
        return problems

    def config_to_hf(self, cfg, tokens):
        return encoder_config_to_hf(self, cfg, tokens, max_position_embeddings=cfg.block_size,
                                    type_vocab_size=cfg.type_vocab_size, position_embedding_type="absolute")

    def to_hf(self, state, cfg):
        d, V = cfg.d_model, cfg.vocab_size
        notes = [] if cfg.bias else ["bias=false: BERT always has biases, written as zeros (same outputs)"]
        if not cfg.pooler:
            notes.append("no pooler (model.pooler=false): load with BertModel.from_pretrained(OUT_DIR, add_pooling_layer=False)")
        e = "embeddings."
        out = {e + "word_embeddings.weight": rows(state["tok_emb.weight"], V),
               e + "position_embeddings.weight": state["pos_emb.weight"],
               e + "token_type_embeddings.weight": state["type_emb.weight"],
               e + "LayerNorm.weight": state["embed_norm.weight"],
               e + "LayerNorm.bias": bias_or_zeros(state, "embed_norm.bias", d)}
        return out | encoder_blocks_to_hf(state, cfg, _BERT_LINEARS, _BERT_NORMS), notes


#: lmforge's and BERT's names of each block's linear layers and norms
_BERT_LINEARS = (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                 ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                 ("ffn.up_proj", "intermediate.dense"), ("ffn.down_proj", "output.dense"))
_BERT_NORMS = (("attn_norm", "attention.output.LayerNorm"), ("ffn_norm", "output.LayerNorm"))

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (GPT2(), Llama(), Bert(), MPNet(), Marian())}
