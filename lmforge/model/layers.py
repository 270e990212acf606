"""The Transformer's pieces, one class or function per idea, named as in the article.

Shapes: B = batch, T = query length, S = key/value (source) length, H = heads, D = head size.
Nothing here knows about optimizers, devices or ranks; the decoder (and later an
encoder-decoder) assemble these pieces. docs/theory.md puts each formula beside the
function below that computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import hardware
from lmforge.config import ModelConfig
from lmforge.model.dropout import Dropout, dropout

# ----------------------------------------------------------------------------------------------
# Linear layers


class Linear(nn.Linear):
    """``nn.Linear`` (y = x Wᵀ + b, same parameters and state dict) whose products with 1-4 rows on
    the CPU in float32 without gradients (decoding: one new token per sequence or beam; training
    is never affected) may take an equivalent BLAS
    call, y = (W xᵀ)ᵀ + b, where ``hardware.few_rows_by_columns`` measured it faster on this
    machine; a single row is then computed twice (some BLAS builds read W at a third of the
    memory bandwidth for one row and near it for two)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (1 <= rows <= 4 and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            one, few = hardware.few_rows_by_columns(torch.get_num_threads())
            if one if rows == 1 else few:
                return linear_by_columns(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linear_by_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b computed as (W xᵀ + b)ᵀ, one row doubled to two."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1)
    flat = flat.contiguous()
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t()[:rows].contiguous().view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Positional encodings


def sinusoidal_encoding(positions: int | torch.Tensor, d: int, base: float = 10000.0, layout: str = "interleaved",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d)),  PE(pos, 2i+1) = cos(pos / base^(2i/d)).

    ``layout="halves"`` puts the same values in another order: the ceil(d/2) sines first, then
    the d//2 cosines (Marian's layout). ``positions`` is a count ``n_pos`` (-> rows 0..n_pos-1,
    shape [n_pos, d]) or a tensor of positions of any shape (-> shape [*positions.shape, d]).
    Computed on the fly (float32 unless ``dtype`` says otherwise), so there is no buffer to go
    stale when the model is moved, cast or built on the meta device.
    """
    if isinstance(positions, int):
        positions = torch.arange(positions)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=positions.device, dtype=dtype) / d))
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # [..., ceil(d/2)]
    if layout == "halves":
        return torch.cat((torch.sin(angles), torch.cos(angles[..., : d // 2])), dim=-1)
    pe = torch.empty(*positions.shape, d, device=positions.device, dtype=dtype)
    pe[..., 0::2] = torch.sin(angles)
    pe[..., 1::2] = torch.cos(angles[..., : d // 2])
    return pe


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions, ADDED to the token embeddings (the original Transformer).

    The article's sample code multiplied the embedding by the encoding, which wipes out the
    token information wherever the sine is near zero; here it is a plain sum. ``layout``:
    see :func:`sinusoidal_encoding`.
    """

    def __init__(self, d_model: int, max_len: int, layout: str = "interleaved"):
        super().__init__()
        self.d_model, self.max_len, self.layout = d_model, max_len, layout

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model], positions [B, T] or [1, T] -> x + PE(positions)."""
        return x + sinusoidal_encoding(positions, self.d_model, layout=self.layout).to(x.dtype)


class LearnedPositionalEncoding(nn.Embedding):
    """One trained vector per position (GPT-2's ``wpe``), added to the token embeddings.

    A subclass of ``nn.Embedding`` so its weight is simply ``pos_emb.weight``.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__(max_len, d_model)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x + super().forward(positions)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), in the Llama / Hugging Face "rotate_half" layout.

    The head vector is split in two halves (x1, x2); the pair (x1[i], x2[i]) is rotated by the
    angle pos * theta^(-2i/D). Keys and queries are rotated, so q.k depends only on the
    distance between the two positions. cos/sin are computed on the fly in float32 (no buffer).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, sin), each float32 [B, T, head_dim]."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]: the same angle for i and i + D/2
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles behind cos/sin [B, T, D]: x*cos + rotate_half(x)*sin."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Normalisation


def position_encoding(cfg: ModelConfig) -> tuple[nn.Module | None, "RotaryEmbedding | None"]:
    """(positions added to the token embeddings, rotary embedding) as ``cfg.pos_encoding`` says:
    learned or sinusoidal tables, or rotation of queries and keys (one of the two is None)."""
    if cfg.pos_encoding == "learned":
        return LearnedPositionalEncoding(cfg.block_size, cfg.d_model), None
    if cfg.pos_encoding == "sinusoidal":
        return PositionalEncoding(cfg.d_model, cfg.block_size, cfg.sinusoidal_layout), None
    return None, RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


@torch.no_grad()
def init_gpt_style(model: nn.Module, std: float, n_layer: int) -> None:
    """GPT-2's initialisation: linear weights and embeddings normal(0, std), the projections that
    write into the residual stream (attention o_proj, feed-forward down_proj) std / sqrt(2 * n_layer)
    so its variance does not grow with depth, zero biases, unit norms."""
    residual_std = std / math.sqrt(2 * n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.reset_parameters()


def embedding_scale(cfg: ModelConfig) -> float:
    """sqrt(d_model) with sinusoidal positions (the original Transformer's rule), else 1: the token
    embeddings are multiplied by it so that unit-amplitude sinusoids do not drown them."""
    return math.sqrt(cfg.d_model) if cfg.pos_encoding == "sinusoidal" else 1.0


def embed_tokens(table: nn.Embedding, ids: torch.Tensor, scale: float, pos: nn.Module | None,
                 positions: torch.Tensor) -> torch.Tensor:
    """Token embeddings times ``scale`` (:func:`embedding_scale`), plus the positions' table or
    sinusoids when there is one: added, never multiplied (the article's code multiplied them)."""
    x = table(ids)
    if scale != 1.0:
        x = x * scale
    return pos(x, positions) if pos is not None else x


@torch.no_grad()
def init_for_scaled_embeddings(model: nn.Module, tables: list[nn.Embedding], d_model: int) -> None:
    """With embeddings scaled by sqrt(d_model): token tables normal(0, 1/sqrt(d_model)), so scaled
    tokens have unit variance per feature beside the sinusoids' 1/2, and every linear layer (but
    an output layer tied to a table) Xavier-uniform, so sublayers write O(1) values into an O(1)
    residual stream (GPT-style 0.02 would add ~1% to it and learning would crawl)."""
    tied = {id(t.weight) for t in tables}
    for table in tables:
        nn.init.normal_(table.weight, mean=0.0, std=d_model ** -0.5)
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in tied:
            nn.init.xavier_uniform_(module.weight)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (no centring, no bias), computed in float32."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-2: mean and variance, weight and optional bias) or RMSNorm (Llama)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------------------------
# Attention


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, q_len, k_len], True where a query may look at a key.

    Query i sits at key index ``offset + i`` (offset = tokens already in the KV cache), so the
    causal rule is key_index <= offset + i. ``key_padding_mask`` [B, k_len] is True for real
    tokens. In causal self-attention a query may always see itself: a padding query (left
    padding) would otherwise have every key masked, and softmax over nothing is NaN, which then
    leaks through the padded keys of the next layer. Real tokens always see themselves anyway,
    so this changes nothing for them. Returns None when no mask is needed.
    """
    mask = None
    if causal:
        q_pos = torch.arange(q_len, device=device) + offset
        k_pos = torch.arange(k_len, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, S]
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        if causal:
            keep = keep | (k_pos[None, :] == q_pos[:, None])[None, None]
        mask = keep if mask is None else mask & keep
    return mask


#: on the CPU, bf16 attention with at most this many scores per head (query x key length) is
#: written out: SDPA's CPU kernel runs bf16 3-4x slower than two bf16 matrix products at these
#: sizes, and faster only for long sequences (``benchmarks/attention.py`` measures both)
CPU_BF16_WRITTEN_OUT_MAX = 256 * 256


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
           causal: bool = False, dropout_p: float = 0.0, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v over [B, H, T, D] x [B, H, S, D]; ``mask`` bool, True = may look,
    or float, added to the scores (a position bias with -inf where a query may not look).

    ``F.scaled_dot_product_attention``, except on the CPU while dropping attention weights (torch's
    math path draws that mask with the slow ``bernoulli_``; here it comes from :func:`dropout`) or
    in bf16 with at most :data:`CPU_BF16_WRITTEN_OUT_MAX` scores per head: the same formula is
    then written out. Every query here has at least one key it may look at (see
    :func:`attention_mask`).
    """
    written_out = q.device.type == "cpu" and (
        dropout_p > 0.0 or (q.dtype == torch.bfloat16 and q.size(-2) * k.size(-2) <= CPU_BF16_WRITTEN_OUT_MAX))
    if not written_out:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                              scale=scale)
    return attention_formula(q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale)


def attention_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                      causal: bool = False, dropout_p: float = 0.0, scale: float) -> torch.Tensor:
    """:func:`attend`'s formula written out: two matrix products and a softmax, with the mask's
    disallowed scores at -inf and the weights' dropout mask from :func:`dropout`."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril_()
    if mask is not None and mask.dtype != torch.bool:  # an additive mask: position bias, -inf where not allowed
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(dropout(scores.softmax(-1), dropout_p), v)


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head) + mask) V, per head, then the output projection.

    Self-attention when ``memory`` is None; cross-attention otherwise, with queries from ``x``
    [B, T, d] and keys/values from ``memory`` [B, S, d], S free to differ from T (keys and values
    are reshaped with the *source* length S; the article's code used T and broke here).
    ``n_kv_head < n_head`` gives grouped-query attention: each key/value head serves
    n_head / n_kv_head query heads.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        assert d_model % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.q_proj = Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = Linear(n_head * self.head_dim, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: "LayerKVCache | None" = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d].

        key_padding_mask: bool [B, S] over the keys (with a cache: over cache + new tokens),
        True = real token. rope: (cos, sin) from RotaryEmbedding for the new tokens (self-attention
        only). cache: this layer's slot in a KVCache; the new keys/values are appended to it.
        bias: [1 or B, n_head, T, S] added to the scores (a relative position bias, MPNet's).
        """
        B, T, _ = x.shape
        source = x if memory is None else memory
        S = source.size(1)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(source).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            assert memory is None, "rotary positions apply to self-attention only"
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        offset = 0
        if cache is not None:
            assert memory is None, "the KV cache holds self-attention keys only"
            offset = cache.length
            k, v = cache.update(k, v)
        if self.n_kv_head != self.n_head:  # grouped heads: repeat each key/value head for its query group
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

        k_len = k.size(2)
        # The fast paths: plain causal masking, or no mask at all (one new token sees every cached key).
        plain_causal = bias is None and causal and key_padding_mask is None and offset == 0 and T == k_len
        no_mask_needed = bias is None and causal and key_padding_mask is None and T == 1
        mask = None
        if not (plain_causal or no_mask_needed):
            mask = attention_mask(T, k_len, causal=causal, key_padding_mask=key_padding_mask,
                                  offset=offset, device=x.device)
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        y = attend(q, k, v, mask, causal=plain_causal, dropout_p=self.dropout if self.training else 0.0,
                   scale=1.0 / math.sqrt(self.head_dim))  # the 1/sqrt(d_head) the article left out
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


# ----------------------------------------------------------------------------------------------
# Feed-forward and the block


#: the plain (not gated) feed-forward activations
_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network.

    gelu / gelu_tanh / relu / silu: down(act(up(x)))  (GPT-2 uses the tanh approximation of GELU,
                                    the original Transformer ReLU, Marian SiLU, there called swish).
    swiglu:                         down(silu(gate(x)) * up(x))  (Llama: gated).
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", bias: bool = False):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = Linear(d_model, d_ff, bias=bias)
        else:
            self.act = _ACTIVATIONS[kind]
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), [x + cross_attn(norm(x), memory)], x + ffn(norm(x)).

    ``cross_attention=True`` adds attention over an encoder's output (an encoder-decoder's
    decoder block); a decoder-only model leaves it off.
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.bias, cfg.dropout)
        if cross_attention:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.bias, cfg.dropout)
        self.ffn_norm = make_norm(cfg)
        self.ffn = FeedForward(cfg.d_model, cfg.ff_dim, cfg.ffn, cfg.bias)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = True,
        key_padding_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: "LayerKVCache | None" = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), causal=causal, key_padding_mask=key_padding_mask, rope=rope, cache=cache,
                      bias=attn_bias)
        x = x + self.drop(h)
        if memory is not None:
            h = self.cross_attn(self.cross_norm(x), memory, key_padding_mask=memory_padding_mask)
            x = x + self.drop(h)
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of every layer, for decoding one token at a time.

    ``k[layer]`` and ``v[layer]`` are [B, n_kv_head, max_len, head_dim]; ``length`` counts the
    positions filled (the same for every row: batches are left-padded, and the attention mask
    says which slots are padding). The model advances ``length`` after all layers have written.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0

    def layer(self, i: int) -> "LayerKVCache":
        return LayerKVCache(self, i)

    def advance(self, n: int) -> None:
        self.length += n


class LayerKVCache:
    """One layer's view of a KVCache: ``update`` writes new keys/values after the filled part."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.index = cache, layer

    @property
    def length(self) -> int:
        return self.cache.length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, D] at positions length..length+T; return all keys/values so far."""
        start, end = self.cache.length, self.cache.length + k.size(2)
        if end > self.cache.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.cache.max_len} allocated")
        k_all, v_all = self.cache.k[self.index], self.cache.v[self.index]
        k_all[:, :, start:end] = k
        v_all[:, :, start:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]
