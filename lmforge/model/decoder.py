"""Decoder-only (GPT-style) language model: tokens in, next-token logits out.

embedding (+ positions) -> n_layer pre-norm blocks of causal self-attention and feed-forward
-> final norm -> output head. GPT-2 is pos_encoding=learned, norm=layernorm, ffn=gelu_tanh,
bias=True, tie_embeddings=True; Llama is rotary, rmsnorm, swiglu, no bias, untied. Both are
checked against the Hugging Face implementations in tests/test_decoder.py.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model.dropout import Dropout
from lmforge.model.layers import (Block, KVCache, Linear, embed_tokens, embedding_scale, init_for_scaled_embeddings, init_gpt_style,
                                  make_norm, position_encoding)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise LMForgeError("model.vocab_size is 0; set it to the tokenizer's vocabulary size before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb, self.rotary = position_encoding(cfg)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.emb_scale = embedding_scale(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) weights, zero biases, unit norms; the projections that write into the
        residual stream (attention o_proj, feed-forward down_proj) get std / sqrt(2 * n_layer), as in
        GPT-2, so the residual stream's variance does not grow with depth. Safe to call again after
        building on the meta device and materialising (``to_empty``): the model has no buffers."""
        init_gpt_style(self, self.cfg.init_std, self.cfg.n_layer)
        if self.emb_scale != 1.0:  # sinusoidal positions: the original Transformer's start
            init_for_scaled_embeddings(self, [self.tok_emb], self.cfg.d_model)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` positions
        (device and dtype default to the model's)."""
        param = self.tok_emb.weight
        cfg = self.cfg
        return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim,
                       device=device or param.device, dtype=dtype or param.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """idx [B, T] token ids -> float32 logits [B, T, vocab_size] ([B, 1, vocab_size] if last_only).

        attention_mask: bool [B, S_total] (S_total = cache.length + T with a cache, else T),
        True = real token; padding is never attended to. positions: [B, T] (default
        cache.length + 0..T-1). cache: from ``new_cache``; the new keys/values are appended.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            if self.rotary is None and start + T > self.cfg.block_size:
                raise LMForgeError(
                    f"sequence of {start + T} tokens is longer than the model's context ({self.cfg.block_size}); "
                    "crop the input to block_size tokens"
                )
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        elif positions.dim() == 1:
            positions = positions.unsqueeze(0)

        x = self.drop(embed_tokens(self.tok_emb, idx, self.emb_scale, self.pos_emb, positions))
        rope = self.rotary(positions) if self.rotary is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, key_padding_mask=attention_mask, rope=rope,
                      cache=cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm_f(x)).float()
        return logits[..., : self.cfg.vocab_size]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied head counted once). ``exclude_embeddings`` leaves out the
        token and learned position tables (Kaplan et al.'s "non-embedding" count); an untied
        output head is kept, it is a matmul like any other."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_emb, nn.Embedding):
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward: 6N + 12 * n_layer * d_model * seq_len
        (PaLM, appendix B). N counts every weight used in a matmul: the non-embedding parameters
        plus the output head (tied or not); lookups in embedding tables cost no FLOPs."""
        cfg = self.cfg
        n_matmul = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n_matmul += self.lm_head.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * seq_len
