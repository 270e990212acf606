"""Parameter groups for weight decay, the AdamW set-up, and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model import DecoderLM
from lmforge.train.optim import build_optimizer, lr_at, param_groups


def tiny_model(**overrides) -> DecoderLM:
    kw = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32)
    kw.update(overrides)
    return DecoderLM(ModelConfig(**kw))


def group_names(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay = {name_of[id(p)] for p in groups[0]["params"]}
    no_decay = {name_of[id(p)] for p in groups[1]["params"]}
    return decay, no_decay


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("norm,bias,pos", [("layernorm", True, "learned"), ("rmsnorm", False, "rotary")])
def test_param_groups_decay_only_linear_matrices(tied, norm, bias, pos):
    model = tiny_model(tie_embeddings=tied, norm=norm, bias=bias, pos_encoding=pos, ffn="swiglu")
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = group_names(model, groups)

    # Reference by name and shape, independent of the module-type rule under test:
    # matrices of the attention/feed-forward projections and an untied head decay; nothing else.
    names = dict(model.named_parameters())  # a tied head appears once, as tok_emb.weight
    expected_decay = {n for n, p in names.items()
                      if p.dim() == 2 and n.endswith(("_proj.weight", "lm_head.weight"))}
    assert decay == expected_decay
    assert no_decay == set(names) - expected_decay
    assert decay.isdisjoint(no_decay)
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter exactly once

    assert "tok_emb.weight" in no_decay
    assert ("lm_head.weight" in decay) == (not tied)
    assert all(n in no_decay for n in names if n.endswith(".bias"))
    assert any("norm" in n for n in no_decay)
    if pos == "learned":
        assert "pos_emb.weight" in no_decay


def test_adamw_decays_only_the_decay_group():
    """With zero gradients AdamW's update is 0, so only decoupled decay moves weights: p *= 1 - lr*wd."""
    model = tiny_model(bias=True)
    tcfg = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, max_steps=10)
    opt = build_optimizer(model, tcfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (tcfg.beta1, tcfg.beta2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, _ = group_names(model, opt.param_groups)
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(lr_at(0, tcfg))
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * 0.5) if n in decay else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0)


def reference_lr(step, lr, min_lr, warmup, decay_steps):
    """The schedule written out in float64: linear warmup, half-cosine decay, floor."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    t = (step - warmup) / (decay_steps - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("warmup,max_steps,decay_steps", [(10, 100, None), (10, 100, 60), (0, 50, None), (5, 5, None)])
def test_lr_schedule_matches_formula(warmup, max_steps, decay_steps):
    tcfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=warmup, max_steps=max_steps, decay_steps=decay_steps)
    end = max_steps if decay_steps is None else decay_steps
    for step in range(max_steps + 20):
        want = reference_lr(step, 3e-3, 3e-4, warmup, end)
        assert lr_at(step, tcfg) == pytest.approx(want, rel=1e-12, abs=0)
    # Landmarks, independent of the formula above.
    if warmup:
        assert 0 < lr_at(0, tcfg) < lr_at(warmup - 1, tcfg) < 3e-3
    if end > warmup:
        assert lr_at(warmup, tcfg) == pytest.approx(3e-3)
        if (end - warmup) % 2 == 0:
            assert lr_at((warmup + end) // 2, tcfg) == pytest.approx((3e-3 + 3e-4) / 2)
    assert lr_at(end, tcfg) == pytest.approx(3e-4)
    assert lr_at(end + 1000, tcfg) == pytest.approx(3e-4)
    decaying = [lr_at(s, tcfg) for s in range(warmup, end + 1)]
    assert all(a >= b for a, b in zip(decaying, decaying[1:]))
