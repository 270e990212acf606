"""Dropout with the CPU's cheap mask, and attention that drops its weights with it."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.dropout import Dropout, dropout, keep_mask
from lmforge.model.layers import attend


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_rate_and_scale(p):
    torch.manual_seed(0)
    keep, scale = keep_mask((2000, 1000), p)
    n = keep.numel()
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # five standard errors
    cut = round(p * 32768)
    assert scale == pytest.approx(1.0 / (1.0 - cut / 32768), rel=1e-12)
    assert abs(cut / 32768 - p) <= 1 / 65536


def test_mask_has_no_pattern_across_the_four_quarters_of_each_draw():
    """Each int64 draw gives four elements' bits: every position in the group drops at the rate."""
    torch.manual_seed(1)
    keep, _ = keep_mask((400_000, 4), 0.25)
    rates = 1.0 - keep.float().mean(0)
    assert torch.all((rates - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / 400_000)), rates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_values_gradient_and_expectation(dtype):
    torch.manual_seed(2)
    x = torch.randn(300, 500, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.2)
    torch.manual_seed(3)
    keep, scale = keep_mask(x.shape, 0.2)
    expected = torch.where(keep, x.detach().double() * scale, 0.0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    y.double().sum().backward()
    torch.testing.assert_close(x.grad.double(), keep.double() * scale, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=0)
    # the expected output is the input: ones through dropout average to 1
    ones = dropout(torch.ones(1000, 1000, dtype=torch.float64), 0.2)
    assert abs(ones.mean().item() - 1.0) < 5 * math.sqrt(0.2 / 0.8 / 1e6)


def test_eval_and_zero_rate_are_the_identity_and_seeds_repeat():
    x = torch.randn(64, 64)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.3)
    layer.eval()
    assert layer(x) is x
    layer.train()
    torch.manual_seed(4)
    a = layer(x)
    torch.manual_seed(4)
    assert torch.equal(a, layer(x))
    assert not torch.equal(a, layer(x))  # the generator moved on


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_dropout_matches_the_formula_in_float64(causal):
    """The written-out path: softmax(q kᵀ/√D masked) with the drawn mask applied, times v."""
    torch.manual_seed(5)
    B, H, T, S, D = 3, 2, 7, 7 if causal else 9, 8
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (T, S, S))
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool)
    pad[1, ..., 5:] = False
    mask = None if causal else pad
    torch.manual_seed(6)
    y = attend(q, k, v, mask, causal=causal, dropout_p=0.25, scale=1 / math.sqrt(D))
    torch.manual_seed(6)
    keep, scale = keep_mask((B, H, T, S), 0.25)
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(D)
    allowed = torch.ones(T, S, dtype=torch.bool).tril() if causal else pad
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = (weights * keep.double() * scale) @ v.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    # gradients too
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((y.double() * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_attention_without_dropout_is_sdpa():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, causal=True, scale=0.5),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5))
