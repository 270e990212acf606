"""Encoder-decoder Transformer (Vaswani et al. 2017), built from the decoder-only model's pieces.

source ids -> embedding (+ positions) -> n_encoder_layer blocks of bidirectional self-attention
(source padding masked) -> encoder norm = the memory.
target ids -> embedding (+ positions) -> n_layer blocks of causal self-attention, cross-attention
over the memory and feed-forward -> final norm -> output head (tied to the target embedding,
plus a bias over the vocabulary with ``output_bias``). With ``copy_attention`` the output is a
pointer-generator (:class:`CopyHead`): the vocabulary distribution mixed with a copy of the source.

Source and target share one token embedding by default (a joint vocabulary); positions are
sinusoidal (in either ``sinusoidal_layout``), learned or rotary (rotary on self-attention only);
norms sit before each sublayer (pre) or after the residual sum (post, the original paper).
Marian (``lmforge import`` of an opus-mt model) is sinusoidal with the halves layout, post-norm,
biases everywhere and an output bias. Weight names follow ``DecoderLM``
for the decoder side (``tok_emb``, ``pos_emb``, ``blocks``, ``norm_f``, ``lm_head``), so a
language model's weights can start the decoder (and the encoder) of a translation model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.padding import IGNORE_INDEX
from lmforge.errors import LMForgeError
from lmforge.model.decoder import DecoderLM
from lmforge.model.dropout import Dropout
from lmforge.model.heads import token_loss
from lmforge.model.layers import (
    Block,
    KVCache,
    LearnedPositionalEncoding,
    Linear,
    MultiHeadAttention,
    PositionalEncoding,
    RotaryEmbedding,
    attend,
    embed_tokens,
    embedding_scale,
    init_for_scaled_embeddings,
    init_gpt_style,
    make_norm,
)

#: a decoder block's memory: the encoder output [B, S, d], or its keys and values projected once
Memory = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CrossAttention(MultiHeadAttention):
    """Cross-attention whose keys/values can be projected from the memory once per source.

    During decoding the memory does not change from one step to the next, so
    :meth:`project` computes its keys and values once and every step passes them in place
    of the memory. Same weights (and names) as :class:`MultiHeadAttention`.
    """

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, S, d] -> keys, values [B, n_head, S, head_dim] (grouped heads repeated)."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return k, v

    def forward(self, x: torch.Tensor, memory: Memory, *, key_padding_mask: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        """x [B, T, d] attends over memory; key_padding_mask bool [B, S], True = real source token."""
        k, v = self.project(memory) if isinstance(memory, torch.Tensor) else memory
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        mask = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
        y = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class CopyHead(nn.Module):
    """Pointer-generator output (See et al. 2017, "Get To The Point"): copy source tokens or generate.

    One attention head of the decoder's final state h_t over the memory m_s (the encoder output):

        a_t = softmax_s(q(h_t) . k(m_s) / sqrt(d) + beta [src_{s-1} = y_{t-1}] + pi_s)   (padding masked)
        c_t = sum_s a_ts m_s                                   (what the head reads)
        p_gen = sigmoid(w . [h_t; c_t] + b)                    (generate or copy)
        P(y) = p_gen softmax(logits)_y + (1 - p_gen) sum_{s: src_s = y} a_ts

    y_{t-1} is the decoder's input at step t (the token it wrote last). The learned scalar beta
    (starting at 0) favours the source position right after an occurrence of that token: once a
    model has copied the first piece of a word or a name, the next piece is where to continue. A
    Transformer can learn this on its own from much data; one shared weight learns it from a few
    hundred examples. pi (one learned number per source position, starting at 0; positions past
    the table share its last entry) is a prior over where copies come from: news puts the facts
    of a headline in its first sentence. The joint vocabulary holds every source token, so
    copying needs no extended vocabulary. A model can then write a name or a number it has seen
    once straight from the source, and the copy attention gets a direct learning signal from
    every target token that occurs in the source.
    """

    def __init__(self, d_model: int, max_source: int):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(2 * d_model, 1)
        self.follow = nn.Parameter(torch.zeros(1))  # beta (one element, not a 0-d tensor: FSDP2 shards no scalars)
        self.position_prior = nn.Parameter(torch.zeros(max_source))  # pi
        self.scale = 1.0 / math.sqrt(d_model)

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, S, d] -> (keys, memory), computed once per source when decoding."""
        return self.k_proj(memory), memory

    def read(self, h: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor], src: torch.Tensor,
             src_mask: torch.Tensor | None, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy attention a [B, T, S] and the gate's logit [B, T, 1] (p_gen = sigmoid), float32."""
        keys, mem = memory
        scores = (self.q_proj(h) @ keys.transpose(1, 2)).float() * self.scale  # [B, T, S]
        after = torch.zeros_like(scores, dtype=torch.bool)  # [b, t, s]: src[b, s - 1] == prev[b, t]
        after[:, :, 1:] = src[:, None, :-1] == prev[:, :, None]
        positions = torch.arange(scores.size(-1), device=scores.device).clamp(max=self.position_prior.numel() - 1)
        scores = scores + self.follow.float() * after + self.position_prior.float()[positions]
        if src_mask is not None:
            scores = scores.masked_fill(~src_mask.bool()[:, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        gate = self.gate(torch.cat([h, attn.to(mem.dtype) @ mem], dim=-1)).float()  # [B, T, 1]
        return attn, gate

    @staticmethod
    def additions(attn: torch.Tensor, gate: torch.Tensor, src: torch.Tensor, log_generate_src: torch.Tensor) -> torch.Tensor:
        """What copying adds to log P at each source position's token [B, T, S]: 0 except at a token's
        first occurrence with a copy share, where log P(y) = log_generate(y) + added.

        Only the source's tokens get a copy share, so the mixture is computed there:
        added = softplus(log copy(y) + log(1 - p_gen) - log_generate(y)); copy(y) at a source
        position s sums the attention of every position holding its token, and a token that occurs
        several times is counted once (at its first occurrence). log_generate_src [B, T, S] is
        log_generate at each source position's token.
        """
        S = attn.size(-1)
        same = src[:, :, None] == src[:, None, :]  # [B, S, S]
        share = attn @ same.to(attn.dtype)  # [B, T, S]: copy(src[b, s]) at step t
        first = ~(same & torch.ones(S, S, dtype=torch.bool, device=src.device).tril(-1)).any(-1)  # [B, S]
        has = (share > 0) & first[:, None, :]
        # where the share is 0 nothing is added, and log is never evaluated at 0 (finite gradients)
        log_share = torch.log(torch.where(has, share, torch.ones_like(share)))
        added = F.softplus(log_share + F.logsigmoid(-gate) - log_generate_src)
        return torch.where(has, added, torch.zeros_like(added))

    def forward(self, h: torch.Tensor, logits: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                src: torch.Tensor, src_mask: torch.Tensor | None, prev: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] (normed decoder states), logits [B, T, V], prev [B, T] (the decoder's input
        ids) -> log P [B, T, V] (float32)."""
        attn, gate = self.read(h, memory, src, src_mask, prev)
        log_generate = F.logsigmoid(gate) + logits.float().log_softmax(dim=-1)  # [B, T, V]
        index = src[:, None, :].expand(*attn.shape)
        return log_generate.scatter_add(2, index, self.additions(attn, gate, src, log_generate.gather(2, index)))

    def loss(self, h: torch.Tensor, logits: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
             src: torch.Tensor, src_mask: torch.Tensor | None, prev: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """The summed label-smoothed cross-entropy of :meth:`forward`'s distribution over the tokens
        whose label is not ``ignore_index``, without building that distribution (the mixture, its
        scatter and the loss's second log-softmax over it are [B, T, V] float32 tensors each):

            -log P(y) = -log_generate(y) - added(y)
            -mean_v log P(v) = -log sigmoid(gate) - mean_v log_softmax(logits)_v - sum_s added_s / V
        """
        attn, gate = self.read(h, memory, src, src_mask, prev)
        log_softmax = logits.float().log_softmax(dim=-1)  # [B, T, V]: the only tensor of that size
        keep = labels != ignore_index
        target = labels.masked_fill(~keep, 0)
        picked = log_softmax.gather(2, torch.cat([target[..., None], src[:, None, :].expand(*attn.shape)], dim=-1))
        log_gate = F.logsigmoid(gate)  # log p_gen [B, T, 1]
        log_generate = log_gate + picked  # [B, T, 1 + S]: at the label, then at each source token
        added = self.additions(attn, gate, src, log_generate[..., 1:])
        log_p_label = log_generate[..., 0] + (added * (src[:, None, :] == target[..., None])).sum(-1)
        mean_log_p = log_gate[..., 0] + log_softmax.mean(-1) + added.sum(-1) / log_softmax.size(-1)
        per_token = -(1.0 - label_smoothing) * log_p_label - label_smoothing * mean_log_p
        return per_token.masked_fill(~keep, 0.0).sum()


class Seq2SeqBlock(Block):
    """A :class:`Block` (pre-norm) that can also be post-norm: x = norm(x + sublayer(x)).

    Post-norm is the original Transformer; pre-norm trains more stably without warmup tricks
    and is the default. Both use the same weights under the same names.
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__(cfg, cross_attention)
        if cross_attention:
            self.cross_attn = CrossAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.bias, cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def forward(self, x: torch.Tensor, *, causal: bool = True, key_padding_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None, memory: Memory | None = None,
                memory_padding_mask: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.post_norm:
            return super().forward(x, causal=causal, key_padding_mask=key_padding_mask, rope=rope, cache=cache,
                                   memory=memory, memory_padding_mask=memory_padding_mask, attn_bias=attn_bias)
        h = self.attn(x, causal=causal, key_padding_mask=key_padding_mask, rope=rope, cache=cache, bias=attn_bias)
        x = self.attn_norm(x + self.drop(h))
        if memory is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, memory, key_padding_mask=memory_padding_mask)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class Seq2SeqLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise LMForgeError("model.vocab_size is 0; set it to the tokenizer's vocabulary size "
                               "before building the model")
        self.cfg = cfg
        self.n_encoder_layer = cfg.n_encoder_layer or cfg.n_layer
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.src_emb = None if cfg.share_embeddings else nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = self.src_pos_emb = self.rotary = None
        if cfg.pos_encoding == "learned":  # one table per side: source and target positions mean different things
            self.pos_emb = LearnedPositionalEncoding(cfg.block_size, cfg.d_model)
            self.src_pos_emb = LearnedPositionalEncoding(cfg.block_size, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.pos_emb = self.src_pos_emb = PositionalEncoding(cfg.d_model, cfg.block_size, cfg.sinusoidal_layout)
        else:
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # As in the paper (section 3.4) sinusoidally-positioned embeddings are multiplied by
        # sqrt(d_model), so that the unit-amplitude positions do not drown the tokens (init_weights).
        self.emb_scale = embedding_scale(cfg)
        # embed_norm: a norm over the summed embeddings of each side (an encoder-decoder started from BERT)
        self.src_embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = Dropout(cfg.dropout)
        self.encoder_blocks = nn.ModuleList(Seq2SeqBlock(cfg) for _ in range(self.n_encoder_layer))
        self.blocks = nn.ModuleList(Seq2SeqBlock(cfg, cross_attention=True) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a norm; pre-norm stacks need one at the top.
        self.encoder_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        # output_bias: a bias over the vocabulary (Marian's final_logits_bias)
        self.lm_head = Linear(cfg.d_model, cfg.padded_vocab_size, bias=cfg.output_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.copy_head = CopyHead(cfg.d_model, cfg.block_size) if cfg.copy_attention else None
        self.init_weights()

    # The decoder-only model's KV cache (one slot per decoder block) serves unchanged.
    new_cache = DecoderLM.new_cache

    def init_weights(self) -> None:
        """The decoder-only model's initialisation (normal(0, init_std), residual projections scaled
        by 1/sqrt(2 * n_layer), unit norms), except with embeddings scaled by sqrt(d_model)
        (sinusoidal positions), which follow the original Transformer: token embeddings start at
        normal(0, 1/sqrt(d_model)), so that scaled tokens have unit variance per feature next to the
        sinusoids' 1/2, and every linear layer starts Xavier-uniform. Such embeddings put O(1)
        values per feature into the residual stream; sublayers started at init_std = 0.02 (and
        smaller still for residual projections) would add ~1% to it, and the model would take
        thousands of steps to learn to read the source at all (a 3 + 3-block model at lr 3e-3
        stayed at chance on copying 10-30 random tokens for 800 steps; with Xavier it reaches
        0.35 nats/token in 500)."""
        init_gpt_style(self, self.cfg.init_std, self.cfg.n_layer)
        if self.emb_scale != 1.0:
            init_for_scaled_embeddings(self, [t for t in (self.tok_emb, self.src_emb) if t is not None],
                                       self.cfg.d_model)

    def _embed(self, ids: torch.Tensor, table: nn.Embedding, pos: nn.Module | None, norm: nn.Module | None,
               start: int):
        T = ids.size(1)
        if self.rotary is None and start + T > self.cfg.block_size:
            raise LMForgeError(
                f"sequence of {start + T} tokens is longer than the model's positions ({self.cfg.block_size}); "
                "crop it or train with a larger model.block_size"
            )
        positions = torch.arange(start, start + T, device=ids.device).unsqueeze(0)
        x = embed_tokens(table, ids, self.emb_scale, pos, positions)
        if norm is not None:
            x = norm(x)
        return self.drop(x), (self.rotary(positions) if self.rotary is not None else None)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, S] (right-padded), src_mask bool [B, S] (True = real token) -> memory [B, S, d]."""
        x, rope = self._embed(src, self.src_emb or self.tok_emb, self.src_pos_emb, self.src_embed_norm, 0)
        for block in self.encoder_blocks:
            x = block(x, causal=False, key_padding_mask=src_mask, rope=rope)
        return self.encoder_norm(x)

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's cross-attention keys and values (and, last, the copy head's keys and
        the memory), for :meth:`decode` to reuse at every step."""
        kv = [block.cross_attn.project(memory) for block in self.blocks]
        return kv + [self.copy_head.project(memory)] if self.copy_head is not None else kv

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]],
               memory_mask: torch.Tensor | None = None, cache: KVCache | None = None,
               last_only: bool = False, src: torch.Tensor | None = None) -> torch.Tensor:
        """tgt [B, T] -> float32 logits [B, T, vocab_size] ([B, 1, vocab_size] if last_only).

        memory: the encoder output, or :meth:`project_memory` of it. cache: from ``new_cache``;
        the new target tokens continue at position cache.length. With ``copy_attention`` the
        source ids ``src`` [B, S] are needed too, and the result is log-probabilities (a valid
        input to softmax and cross-entropy like any logits).
        """
        if self.copy_head is not None and src is None:
            raise ValueError("a copy-attention model decodes with the source ids (src=...)")
        h = self._states(tgt, memory, memory_mask, cache, last_only)
        logits = self.lm_head(h).float()[..., : self.cfg.vocab_size]
        if self.copy_head is None:
            return logits
        prev = tgt[:, -1:] if last_only else tgt
        return self.copy_head(h, logits, self._copy_memory(memory), src, memory_mask, prev)

    def _states(self, tgt: torch.Tensor, memory, memory_mask: torch.Tensor | None, cache: KVCache | None,
                last_only: bool) -> torch.Tensor:
        """The decoder's final normed states [B, T, d] ([B, 1, d] if last_only)."""
        start = cache.length if cache is not None else 0
        x, rope = self._embed(tgt, self.tok_emb, self.pos_emb, self.embed_norm, start)
        for i, block in enumerate(self.blocks):
            mem = memory if isinstance(memory, torch.Tensor) else memory[i]
            x = block(x, causal=True, rope=rope, cache=cache.layer(i) if cache is not None else None,
                      memory=mem, memory_padding_mask=memory_mask)
        if cache is not None:
            cache.advance(tgt.size(1))
        if last_only:
            x = x[:, -1:]
        return self.norm_f(x)

    def _copy_memory(self, memory) -> tuple[torch.Tensor, torch.Tensor]:
        return self.copy_head.project(memory) if isinstance(memory, torch.Tensor) else memory[-1]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher forcing: logits [B, T, vocab_size] of the next target token at every target position.

        With ``labels`` [B, T] (-100 where there is none) the summed label-smoothed cross-entropy
        instead, the training loss: a copy head then never builds its full [B, T, V] distribution.
        """
        memory = self.encode(src, src_mask)
        if labels is None:
            return self.decode(tgt, memory, src_mask, src=src)
        h = self._states(tgt, memory, src_mask, None, False)
        logits = self.lm_head(h).float()[..., : self.cfg.vocab_size]
        if self.copy_head is None:
            return token_loss(logits, labels, "sum", label_smoothing)
        return self.copy_head.loss(h, logits, self._copy_memory(memory), src, src_mask, tgt, labels, label_smoothing)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (shared tensors counted once); ``exclude_embeddings`` leaves out the lookup tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            tables = [self.tok_emb, self.src_emb, self.pos_emb, self.src_pos_emb]
            n -= sum(t.weight.numel() for t in tables if isinstance(t, nn.Embedding))
        return n
