"""Bidirectional encoder (BERT-like): tokens in, one contextual vector per token out.

token embedding (+ positions) (+ token-type embedding) [-> embedding norm] -> n_layer blocks of
self-attention without the causal mask (padding keys masked; MPNet adds a learned relative-position
bias to every block's scores) and feed-forward -> [final norm].

The blocks are the decoder's (``layers.Block`` via ``Seq2SeqBlock``, which adds post-norm), run
with ``causal=False``. BERT is ``pos_encoding=learned, norm=layernorm, norm_position=post,
ffn=gelu, bias=True, type_vocab_size=2, embed_norm=True, pooler=True``: post-norm blocks end in
a norm, so there is no final one. A pre-norm encoder gets a final norm, as the decoder does.
Checked against ``transformers.BertModel`` in tests/test_encoder.py and tests/test_interop.py.
Task heads (classification, tagging) sit on top of :class:`EncoderModel` and are not part of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model.dropout import Dropout
from lmforge.model.layers import embed_tokens, embedding_scale, init_for_scaled_embeddings, init_gpt_style, make_norm, position_encoding
from lmforge.model.seq2seq import Seq2SeqBlock


class RelativePositionBias(nn.Embedding):
    """One learned score per head for each bucket of relative distances (key position - query
    position), added to the attention scores of every block (T5, MPNet): [buckets, n_head].

    Half the buckets hold keys after the query, half those before; in each half distances below a
    quarter of the buckets get one bucket each, longer ones share buckets spaced logarithmically up
    to ``max_distance``, beyond which they all fall in the last one.
    """

    def __init__(self, buckets: int, n_head: int, max_distance: int):
        super().__init__(buckets, n_head)
        self.max_distance = max_distance

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        half = self.num_embeddings // 2
        exact = half // 2
        out = (relative > 0).long() * half  # keys after the query
        n = relative.abs()
        far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                       * (half - exact)).long()
        return out + torch.where(n < exact, n, far.clamp(max=half - 1))

    def forward(self, T: int) -> torch.Tensor:  # type: ignore[override]
        """The bias of a sequence of T tokens: [1, n_head, T, T]."""
        pos = torch.arange(T, device=self.weight.device)
        return super().forward(self.bucket(pos[None, :] - pos[:, None])).permute(2, 0, 1).unsqueeze(0)


class Encoder(nn.Module):
    """The stack of bidirectional blocks: x [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Seq2SeqBlock(cfg) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a norm; a pre-norm stack needs one at the top.
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else None

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """key_padding_mask: bool [B, T], True = real token (padding is never attended to);
        attn_bias: added to every block's attention scores (:class:`RelativePositionBias`)."""
        for block in self.blocks:
            x = block(x, causal=False, key_padding_mask=key_padding_mask, rope=rope, attn_bias=attn_bias)
        return self.norm_f(x) if self.norm_f is not None else x


class EncoderModel(nn.Module):
    """Embeddings + :class:`Encoder` (+ BERT's pooler): ids [B, T] -> hidden states [B, T, d_model]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise LMForgeError("model.vocab_size is 0; set it to the tokenizer's vocabulary size before building the model")
        if cfg.arch != "encoder":
            raise LMForgeError(f"EncoderModel needs model.arch=encoder, got {cfg.arch!r}; build {cfg.arch} models "
                               "with their own class (lmforge.train.checkpoint.load_model picks it)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb, self.rotary = position_encoding(cfg)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.rel_pos = (RelativePositionBias(cfg.rel_pos_buckets, cfg.n_head, cfg.rel_pos_max_distance)
                        if cfg.rel_pos_buckets else None)
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = Dropout(cfg.dropout)
        self.encoder = Encoder(cfg)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model, bias=True) if cfg.pooler else None
        self.emb_scale = embedding_scale(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As ``DecoderLM.init_weights``: normal(0, init_std), residual projections scaled by
        1/sqrt(2 * n_layer), zero biases, unit norms."""
        init_gpt_style(self, self.cfg.init_std, self.cfg.n_layer)
        if self.emb_scale != 1.0:  # sinusoidal positions: the original Transformer's start
            init_for_scaled_embeddings(self, [self.tok_emb], self.cfg.d_model)

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        token_logits: bool = False,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx [B, T] -> hidden states [B, T, d_model] (BERT's ``last_hidden_state``), or with
        ``token_logits`` float32 scores of every vocabulary token at every position [B, T, vocab_size]
        through the (tied) token embedding, h E^T: the masked-language-model output.

        attention_mask: [B, T], True/1 = real token (padding, e.g. on the right, is never attended
        to; its own outputs are computed but meaningless). extra: [B, T, d_model] added to the input
        embeddings before the embedding norm (a task's marks, e.g. SRL's predicate). token_type_ids: [B, T] segment ids
        (default 0). positions: [B, T] (default 0..T-1).
        """
        B, T = idx.shape
        if positions is None:
            if self.rotary is None and T > self.cfg.block_size:
                raise LMForgeError(f"sequence of {T} tokens is longer than the model's context ({self.cfg.block_size}); "
                                   "crop the input to block_size tokens")
            positions = torch.arange(T, device=idx.device).unsqueeze(0)
        elif positions.dim() == 1:
            positions = positions.unsqueeze(0)
        x = embed_tokens(self.tok_emb, idx, self.emb_scale, self.pos_emb, positions)
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(idx)
            x = x + self.type_emb(token_type_ids)
        elif token_type_ids is not None:
            raise LMForgeError("token_type_ids given but the model has no token types (model.type_vocab_size=0); "
                               "leave them out")
        if extra is not None:
            x = x + extra.to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        mask = attention_mask.bool() if attention_mask is not None else None
        bias = self.rel_pos(T) if self.rel_pos is not None else None
        hidden = self.encoder(x, key_padding_mask=mask, rope=rope, attn_bias=bias)
        if token_logits:
            return (hidden @ self.tok_emb.weight.t())[..., : self.cfg.vocab_size].float()
        return hidden

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(first token's state)) [B, d_model]."""
        if self.pooler is None:
            raise LMForgeError("this encoder has no pooler (model.pooler=false); use the hidden states instead")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            tables = [self.tok_emb, self.pos_emb, self.type_emb]
            n -= sum(t.weight.numel() for t in tables if isinstance(t, nn.Embedding))
        return n
