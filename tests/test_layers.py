"""Each layer against its formula, written out independently in float64."""

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.layers import (
    Block,
    FeedForward,
    LearnedPositionalEncoding,
    Linear,
    MultiHeadAttention,
    PositionalEncoding,
    RMSNorm,
    RotaryEmbedding,
    CPU_BF16_WRITTEN_OUT_MAX,
    apply_rotary,
    attend,
    linear_by_columns,
    make_norm,
    sinusoidal_encoding,
)

torch.manual_seed(0)


def linear64(x, layer):
    """x W^T + b in float64 from a layer's weights."""
    y = x.double() @ layer.weight.detach().double().T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    return y


def reference_attention(mha, x, memory=None, mask=None):
    """softmax(Q K^T / sqrt(d) + M) V per head, M = 0 where allowed and -inf elsewhere, all in float64.

    mask: bool [B, T, S] (True = may attend) or None. Grouped heads: query head h uses kv head
    h // (n_head / n_kv_head)."""
    src = x if memory is None else memory
    B, T, _ = x.shape
    S = src.shape[1]
    H, Hkv, D = mha.n_head, mha.n_kv_head, mha.head_dim
    q = linear64(x, mha.q_proj).reshape(B, T, H, D)
    k = linear64(src, mha.k_proj).reshape(B, S, Hkv, D)
    v = linear64(src, mha.v_proj).reshape(B, S, Hkv, D)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    group = H // Hkv
    for b in range(B):
        for h in range(H):
            scores = q[b, :, h] @ k[b, :, h // group].T / math.sqrt(D)  # [T, S]
            if mask is not None:
                scores = scores + torch.where(mask[b], 0.0, float("-inf")).double()
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, h // group]
    return linear64(out.reshape(B, T, H * D), mha.o_proj)


def make_mha(n_head=4, n_kv_head=None, bias=True, d=32):
    mha = MultiHeadAttention(d, n_head, n_kv_head, bias=bias)
    with torch.no_grad():  # non-zero biases so that every term is exercised
        for p in mha.parameters():
            p.normal_(0, 0.3)
    return mha.eval()


def causal_mask(B, T):
    return torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T)


def test_self_attention_matches_formula():
    mha = make_mha()
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(mha(x).double(), reference_attention(mha, x), atol=1e-5, rtol=1e-4)


def test_causal_self_attention_matches_formula():
    mha = make_mha()
    x = torch.randn(2, 7, 32)
    expected = reference_attention(mha, x, mask=causal_mask(2, 7))
    torch.testing.assert_close(mha(x, causal=True).double(), expected, atol=1e-5, rtol=1e-4)


def test_scores_are_scaled_by_sqrt_head_dim():
    """Without the 1/sqrt(d) the output would differ: compare against the unscaled formula."""
    mha = make_mha()
    x = torch.randn(1, 5, 32)
    got = mha(x).double()
    saved = mha.q_proj.weight.data.clone()
    mha.q_proj.weight.data *= math.sqrt(mha.head_dim)
    mha.q_proj.bias.data *= math.sqrt(mha.head_dim)
    unscaled = reference_attention(mha, x)
    mha.q_proj.weight.data = saved
    assert (got - unscaled).abs().max() > 1e-3


def test_grouped_query_attention_matches_formula():
    mha = make_mha(n_head=8, n_kv_head=2)
    assert mha.k_proj.weight.shape == (2 * 4, 32)
    x = torch.randn(2, 5, 32)
    expected = reference_attention(mha, x, mask=causal_mask(2, 5))
    torch.testing.assert_close(mha(x, causal=True).double(), expected, atol=1e-5, rtol=1e-4)


def test_cross_attention_with_different_source_length_and_padding():
    mha = make_mha(n_kv_head=2)
    x = torch.randn(2, 5, 32)  # target length 5
    memory = torch.randn(2, 9, 32)  # source length 9
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 6:] = False  # row 0: the last 3 source tokens are padding
    pad[1, :2] = False  # row 1: the first 2
    out = mha(memory=memory, x=x, key_padding_mask=pad)
    assert out.shape == (2, 5, 32)
    expected = reference_attention(mha, x, memory, mask=pad[:, None, :].expand(2, 5, 9))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    # The padded source positions are invisible: changing them changes nothing.
    memory2 = memory.clone()
    memory2[0, 6:] = torch.randn(3, 32) * 10
    memory2[1, :2] = torch.randn(2, 32) * 10
    torch.testing.assert_close(mha(x, memory2, key_padding_mask=pad), out, atol=1e-6, rtol=1e-5)


def test_causal_attention_with_left_padding_matches_formula_and_hides_padding():
    mha = make_mha(n_kv_head=2)
    B, T = 3, 6
    x = torch.randn(B, T, 32)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :2] = False
    real[2, :5] = False
    out = mha(x, causal=True, key_padding_mask=real)
    assert torch.isfinite(out).all()  # padding queries see only themselves, never nothing (NaN)
    allowed = causal_mask(B, T) & real[:, None, :]
    expected = reference_attention(mha, x, mask=allowed)
    torch.testing.assert_close(out[real].double(), expected[real], atol=1e-5, rtol=1e-4)
    x2 = torch.where(real[..., None], x, torch.randn(B, T, 32) * 100)
    torch.testing.assert_close(mha(x2, causal=True, key_padding_mask=real)[real], out[real], atol=1e-5, rtol=1e-5)


def test_sinusoidal_encoding_matches_formula():
    n_pos, d = 200, 48
    pe = sinusoidal_encoding(n_pos, d)
    expected = torch.zeros(n_pos, d, dtype=torch.float64)
    for pos in range(n_pos):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            expected[pos, 2 * i] = math.sin(angle)
            expected[pos, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(pe.double(), expected, atol=2e-5, rtol=0)
    # An odd width ends with a sine column.
    odd = sinusoidal_encoding(10, 7).double()
    for pos in range(10):
        for j in range(7):
            angle = pos / 10000 ** (2 * (j // 2) / 7)
            assert odd[pos, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-6)


def test_sinusoidal_halves_layout_matches_formula():
    """Marian's layout: the sines of all frequencies, then their cosines (an odd width has one more sine)."""
    for n_pos, d in ((200, 48), (10, 7)):
        half = (d + 1) // 2
        expected = torch.zeros(n_pos, d, dtype=torch.float64)
        for pos in range(n_pos):
            for j in range(d):
                i = j if j < half else j - half
                angle = pos / 10000 ** (2 * i / d)
                expected[pos, j] = math.sin(angle) if j < half else math.cos(angle)
        torch.testing.assert_close(sinusoidal_encoding(n_pos, d, layout="halves").double(), expected, atol=2e-5, rtol=0)
        exact = sinusoidal_encoding(n_pos, d, layout="halves", dtype=torch.float64)
        assert exact.dtype == torch.float64
        torch.testing.assert_close(exact, expected, atol=1e-12, rtol=0)
    x = torch.randn(2, 5, 8)
    out = PositionalEncoding(8, max_len=16, layout="halves")(x, torch.arange(5)[None])
    torch.testing.assert_close(out, x + sinusoidal_encoding(5, 8, layout="halves"))


def test_positional_encoding_is_added_not_multiplied():
    d, T = 16, 10
    enc = PositionalEncoding(d, max_len=64)
    x = torch.randn(2, T, d)
    positions = torch.arange(T)[None].expand(2, T)
    out = enc(x, positions)
    torch.testing.assert_close(out, x + sinusoidal_encoding(T, d))
    # Position 0 has sin(0) = 0 in the even columns: a product would erase the token there.
    assert torch.allclose(out[:, 0, 0::2], x[:, 0, 0::2])
    # Per-row positions (left padding) pick each row's own encoding.
    shifted = torch.stack([torch.arange(T), (torch.arange(T) - 3).clamp(min=0)])
    out2 = enc(x, shifted)
    torch.testing.assert_close(out2[1, 3:], x[1, 3:] + sinusoidal_encoding(T - 3, d))


def test_learned_positional_encoding_adds_rows():
    enc = LearnedPositionalEncoding(8, 4)
    x = torch.randn(1, 3, 4)
    positions = torch.tensor([[2, 5, 7]])
    torch.testing.assert_close(enc(x, positions), x + enc.weight[[2, 5, 7]][None])


def explicit_rotation(x, positions, theta):
    """Rotate each pair (x[i], x[i + D/2]) by pos * theta^(-2i/D), written out in float64."""
    x = x.double()
    out = torch.empty_like(x)
    D = x.shape[-1]
    half = D // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            angle = pos * theta ** (-2 * i / D)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * c - b * s
            out[..., t, i + half] = b * c + a * s
    return out


def test_rotary_matches_explicit_rotation():
    rope = RotaryEmbedding(head_dim=8, theta=500.0)
    x = torch.randn(2, 3, 6, 8)  # [B, H, T, D]
    positions = torch.tensor([0, 1, 2, 5, 17, 100])
    cos, sin = rope(positions[None].expand(2, 6))
    got = apply_rotary(x, cos, sin)
    torch.testing.assert_close(got.double(), explicit_rotation(x, positions, 500.0), atol=1e-5, rtol=1e-5)
    # A rotation keeps lengths.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cm, sm = rope(torch.tensor([[m]]))
        cn, sn = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # direction matters: not a trivial invariant


def test_rmsnorm_matches_formula():
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 12) * 3
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.detach().double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_matches_formula():
    norm = make_norm(ModelConfig(d_model=12, n_head=2, norm="layernorm", bias=True, norm_eps=1e-5))
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 12) * 3 + 1
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    expected = (x64 - mean) / torch.sqrt(var + 1e-5) * norm.weight.detach().double() + norm.bias.detach().double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert make_norm(ModelConfig(d_model=12, n_head=2, norm="layernorm", bias=False)).bias is None


def test_swiglu_matches_formula():
    ffn = FeedForward(16, 24, kind="swiglu")
    x = torch.randn(2, 3, 16)
    gate, up = linear64(x, ffn.gate_proj), linear64(x, ffn.up_proj)
    silu = gate / (1 + torch.exp(-gate))
    expected = (silu * up) @ ffn.down_proj.weight.detach().double().T
    torch.testing.assert_close(ffn(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
def test_gelu_feed_forward_matches_formula(kind):
    ffn = FeedForward(16, 64, kind=kind, bias=True)
    with torch.no_grad():
        ffn.up_proj.bias.normal_()
        ffn.down_proj.bias.normal_()
    x = torch.randn(2, 3, 16)
    h = linear64(x, ffn.up_proj)
    if kind == "gelu":
        act = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(ffn(x).double(), linear64(act, ffn.down_proj), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "silu"])
def test_plain_relu_and_silu_feed_forward_match_formula(kind):
    ffn = FeedForward(16, 64, kind=kind, bias=True)
    assert not hasattr(ffn, "gate_proj")  # not gated: up and down projections only
    with torch.no_grad():
        ffn.up_proj.bias.normal_()
        ffn.down_proj.bias.normal_()
    x = torch.randn(2, 3, 16)
    h = linear64(x, ffn.up_proj)
    act = h.clamp(min=0) if kind == "relu" else h / (1 + torch.exp(-h))
    torch.testing.assert_close(ffn(x).double(), linear64(act, ffn.down_proj), atol=1e-5, rtol=1e-5)


def test_block_is_pre_norm_residual():
    cfg = ModelConfig(vocab_size=10, d_model=16, n_head=2, norm="rmsnorm", ffn="swiglu")
    block = Block(cfg).eval()
    x = torch.randn(2, 5, 16)
    h = x + reference_attention(block.attn, block.attn_norm(x), mask=causal_mask(2, 5)).float()
    expected = h + block.ffn(block.ffn_norm(h))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


def test_decoder_block_with_cross_attention():
    cfg = ModelConfig(vocab_size=10, d_model=16, n_head=2)
    block = Block(cfg, cross_attention=True).eval()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 9, 16)
    h = x + block.attn(block.attn_norm(x), causal=True)
    h = h + reference_attention(block.cross_attn, block.cross_norm(h), memory).float()
    expected = h + block.ffn(block.ffn_norm(h))
    torch.testing.assert_close(block(x, memory=memory), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (1, 1, 24), (2, 2, 24), (4, 1, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_by_columns_matches_formula(shape, bias):
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(shape)
    y = linear_by_columns(x, layer.weight, layer.bias)
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    assert torch.allclose(y.double(), linear64(x, layer), atol=1e-5)


@pytest.mark.parametrize("measured", [(True, True), (False, False), (True, False)])
def test_linear_takes_the_measured_route_for_few_rows(monkeypatch, measured):
    """1-4 rows in float32 on the CPU without gradients go by columns exactly where the probe said
    so; more rows, gradients, other dtypes and autocast never do; every route gives the formula's
    numbers."""
    import lmforge.model.layers as layers

    calls = []
    monkeypatch.setattr(layers.hardware, "few_rows_by_columns", lambda threads: measured)
    monkeypatch.setattr(layers, "linear_by_columns", lambda *a: calls.append(a[0].shape) or linear_by_columns(*a))
    layer = Linear(24, 40)
    for rows, expected in ((1, measured[0]), (3, measured[1]), (4, measured[1]), (5, False)):
        calls.clear()
        x = torch.randn(rows, 1, 24)
        with torch.no_grad():
            assert torch.allclose(layer(x).double(), linear64(x, layer), atol=1e-5)
        assert bool(calls) == expected, (rows, measured)
    calls.clear()
    layer(torch.randn(1, 24))  # with gradients: training's numbers never change
    with torch.no_grad():
        layer.double()(torch.randn(1, 24, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer.float()(torch.randn(1, 24))
    assert not calls


def test_few_rows_probe_answers_for_one_and_for_several_rows():
    from lmforge import hardware

    one, few = hardware.few_rows_by_columns(1, megabytes=8, repeats=1)
    assert isinstance(one, bool) and isinstance(few, bool)


@pytest.mark.parametrize("T,S,causal", [(7, 7, False), (7, 7, True), (5, 9, False), (300, 300, False),
                                          (300, 300, True), (7, 7, "bias"), (300, 300, "bias")])
def test_bf16_attention_on_the_cpu_matches_the_formula_by_either_route(monkeypatch, T, S, causal):
    """bf16 attention on the CPU is written out up to CPU_BF16_WRITTEN_OUT_MAX scores per head and
    goes through SDPA above it; both routes give the float64 formula to bf16 precision, values and
    gradients, with causal masking, key padding, or an additive bias (MPNet's) with padding at -inf."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    gen = torch.Generator().manual_seed(T + S)
    B, H, D = 2, 2, 16
    q, k, v = (torch.randn(B, H, n, D, generator=gen).bfloat16().requires_grad_() for n in (T, S, S))
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool)
    pad[1, ..., S // 2:] = False
    bias = torch.randn(1, H, T, S, generator=gen) if causal == "bias" else torch.zeros(1, H, T, S)
    mask = bias.masked_fill(~pad, float("-inf")).bfloat16() if causal == "bias" else None if causal else pad
    y = attend(q, k, v, mask, causal=causal is True, scale=1 / math.sqrt(D))
    assert y.dtype == torch.bfloat16
    assert len(calls) == (T * S > CPU_BF16_WRITTEN_OUT_MAX)
    allowed = torch.ones(T, S, dtype=torch.bool).tril() if causal is True else pad
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-2, -1) / math.sqrt(D) + bias.bfloat16().double()
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = weights @ v64
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q64, k64, v64))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2)
