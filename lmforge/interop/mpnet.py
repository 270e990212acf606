"""MPNet (encoder; all-mpnet-base-v2 and the other MPNet sentence encoders), both ways.

MPNet is BERT's post-norm encoder with three differences:

* a learned relative-position bias, one score per head for each of 32 buckets of key - query
  distance (up to 128 apart), computed once and added to every block's attention scores
  (``encoder.relative_attention_bias``; lmforge's ``rel_pos``, ``model.rel_pos_buckets=32``);
* no token-type embeddings;
* positions numbered as RoBERTa numbers them: the table's rows 0 and 1 are never used by a real
  token (1 is the padding id), the first token is row 2. lmforge keeps rows 2.. as its position
  table (``block_size`` = max_position_embeddings - 2) and writes two zero rows back on export.

Hugging Face computes the buckets for 32 whatever ``relative_attention_num_buckets`` says, so
another value is refused.
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
    rows,
)

#: rows of the position table before the first token's (Hugging Face's padding_idx + 1)
POSITION_OFFSET = 2
BUCKETS, MAX_DISTANCE = 32, 128
_LINEARS = (("attn.q_proj", "attention.attn.q"), ("attn.k_proj", "attention.attn.k"),
            ("attn.v_proj", "attention.attn.v"), ("attn.o_proj", "attention.attn.o"),
            ("ffn.up_proj", "intermediate.dense"), ("ffn.down_proj", "output.dense"))
_NORMS = (("attn_norm", "attention.LayerNorm"), ("ffn_norm", "output.LayerNorm"))


class MPNet(Architecture):
    model_type, hf_class = "mpnet", "MPNetModel"
    shape = (f"encoder, learned positions, layernorm, post-norm, embed_norm, no token types, rel_pos_buckets = "
             f"{BUCKETS} up to {MAX_DISTANCE} apart, gelu or gelu_tanh, n_kv_head = n_head")

    def config_from_hf(self, hf, names):
        notes: list[str] = []
        ffn = encoder_ffn(hf)
        buckets = hf.get("relative_attention_num_buckets", BUCKETS)
        if buckets != BUCKETS:
            hf.refuse("relative_attention_num_buckets", buckets,
                      f"MPNet computes its relative positions in {BUCKETS} buckets whatever the config says")
        table = hf.get("max_position_embeddings", 514)
        if table <= POSITION_OFFSET:
            hf.refuse("max_position_embeddings", table, f"MPNet's first token sits at row {POSITION_OFFSET}")
        cfg = model_config(
            arch="encoder", vocab_size=hf.need("vocab_size"), block_size=table - POSITION_OFFSET,
            n_layer=hf.need("num_hidden_layers"), n_head=hf.need("num_attention_heads"), d_model=hf.need("hidden_size"),
            d_ff=hf.need("intermediate_size"), pos_encoding="learned", ffn=ffn, norm="layernorm",
            norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), bias=True, type_vocab_size=0,
            embed_norm=True, pooler=any(n.endswith("pooler.dense.weight") for n in names),
            rel_pos_buckets=BUCKETS, rel_pos_max_distance=MAX_DISTANCE,
            dropout=one_dropout(hf, ("hidden_dropout_prob", "attention_probs_dropout_prob"), 0.1, notes),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        return cfg, notes

    def from_hf(self, w, cfg):
        p = w.prefix_of("mpnet.")
        d, V, L = cfg.d_model, cfg.vocab_size, cfg.block_size + POSITION_OFFSET
        e = p + "embeddings."
        w.buffer(e + "position_ids", torch.arange(L).unsqueeze(0), "the position ids 0..max_position_embeddings-1")
        out = {"tok_emb.weight": w.take(e + "word_embeddings.weight", (V, d)),
               "pos_emb.weight": w.take(e + "position_embeddings.weight", (L, d))[POSITION_OFFSET:].contiguous(),
               "embed_norm.weight": w.take(e + "LayerNorm.weight", (d,)),
               "embed_norm.bias": w.take(e + "LayerNorm.bias", (d,)),
               "rel_pos.weight": w.take(p + "encoder.relative_attention_bias.weight", (BUCKETS, cfg.n_head))}
        return out | encoder_blocks_from_hf(w, cfg, p, _LINEARS, _NORMS)

    def export_problems(self, cfg):
        problems = common_problems(cfg, "encoder", "learned", "layernorm", ("gelu", "gelu_tanh"), "post")
        if not cfg.embed_norm:
            problems.append("embed_norm=false (MPNet normalises its embeddings)")
        if cfg.type_vocab_size:
            problems.append(f"type_vocab_size={cfg.type_vocab_size} (MPNet has no token types)")
        if (cfg.rel_pos_buckets, cfg.rel_pos_max_distance) != (BUCKETS, MAX_DISTANCE):
            problems.append(f"rel_pos_buckets={cfg.rel_pos_buckets}, rel_pos_max_distance={cfg.rel_pos_max_distance} "
                            f"(MPNet: {BUCKETS}, {MAX_DISTANCE})")
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.kv_heads} (MPNet has no grouped key/value heads)")
        return problems

    def config_to_hf(self, cfg, tokens):
        return encoder_config_to_hf(self, cfg, tokens, max_position_embeddings=cfg.block_size + POSITION_OFFSET,
                                    relative_attention_num_buckets=BUCKETS, bos_token_id=tokens.get("bos"),
                                    eos_token_id=tokens.get("eos"))

    def to_hf(self, state, cfg):
        d = cfg.d_model
        notes = [] if cfg.bias else ["bias=false: MPNet always has biases, written as zeros (same outputs)"]
        if not cfg.pooler:
            notes.append("no pooler (model.pooler=false): load with MPNetModel.from_pretrained(OUT_DIR, add_pooling_layer=False)")
        e = "embeddings."
        pos = state["pos_emb.weight"]
        out = {e + "word_embeddings.weight": rows(state["tok_emb.weight"], cfg.vocab_size),
               e + "position_embeddings.weight": torch.cat([pos.new_zeros(POSITION_OFFSET, d), pos]),
               e + "LayerNorm.weight": state["embed_norm.weight"],
               e + "LayerNorm.bias": bias_or_zeros(state, "embed_norm.bias", d),
               "encoder.relative_attention_bias.weight": state["rel_pos.weight"]}
        return out | encoder_blocks_to_hf(state, cfg, _LINEARS, _NORMS), notes
