"""Parameter groups for weight decay, the AdamW set-up, and the learning-rate schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM
from lmforge.train.optim import (NS_COEFFICIENTS, Muon, build_optimizer, lr_at, muon_params, newton_schulz_dtype,
                                 orthogonalize, param_groups, set_lr)


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


def test_fresh_parameters_learn_at_their_scaled_rate():
    """Only the named parameters move lr_scale times as far: AdamW's first step is lr * sign(grad)."""
    model = tiny_model(bias=True)
    tcfg = TrainConfig(lr=0.01, weight_decay=0.0, warmup_steps=0, max_steps=10, fresh_lr_scale=10.0)
    fresh = {n for n, _ in model.named_parameters() if n.startswith("blocks.0.")}
    opt = build_optimizer(model, tcfg, "cpu", fresh)
    assert len(opt.param_groups) == 4
    assert len(build_optimizer(model, TrainConfig(), "cpu", fresh).param_groups) == 2  # scale 1: no split
    set_lr(opt, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        step = (before[n] - p.detach()).abs()
        torch.testing.assert_close(step, torch.full_like(step, 0.1 if n in fresh else 0.01), rtol=1e-3, atol=1e-6)
    with pytest.raises(LMForgeError, match="fresh_lr_scale works with train.optimizer=adamw"):
        build_optimizer(model, TrainConfig(optimizer="muon", fresh_lr_scale=10.0), "cpu", fresh)


def test_layer_lr_decay_scales_each_block_from_the_top():
    """train.layer_lr_decay d on a classifier over an L-block encoder: AdamW's first step is
    lr * scale * sign(grad), with scale d**(L+1) for the embeddings, d**(L-k) for block k and 1 for
    what sits above the blocks, written out here by parameter name."""
    from lmforge.model.encoder import EncoderModel
    from lmforge.model.heads import SequenceClassifier

    n_layer, d, lr = 3, 0.5, 0.01
    model = SequenceClassifier(EncoderModel(ModelConfig(arch="encoder", vocab_size=50, block_size=16, n_layer=n_layer,
                                                        n_head=2, d_model=32, bias=True)), n_labels=2)

    def expected(name: str) -> float:
        if name.startswith("trunk.encoder.blocks."):
            return d ** (n_layer - int(name.split(".")[3]))
        if name.startswith(("trunk.tok_emb", "trunk.pos_emb", "trunk.type_emb", "trunk.embed_norm")):
            return d ** (n_layer + 1)
        return 1.0

    tcfg = TrainConfig(lr=lr, weight_decay=0.0, warmup_steps=0, max_steps=10, layer_lr_decay=d)
    opt = build_optimizer(model, tcfg, "cpu")
    names = dict(model.named_parameters())
    assert {expected(n) for n in names} == {1.0, d, d ** 2, d ** 3, d ** 4}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)  # every parameter exactly once
    set_lr(opt, lr)
    before = {n: p.detach().clone() for n, p in names.items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in names.items():
        step = (before[n] - p.detach()).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr * expected(n)), rtol=1e-3, atol=1e-7, msg=n)
    # with fresh_lr_scale the two scales multiply; 1 leaves the groups as they were
    fresh = {n for n in names if n.startswith("classifier.")}
    both = build_optimizer(model, TrainConfig(layer_lr_decay=d, fresh_lr_scale=10.0), "cpu", fresh)
    assert {g.get("lr_scale", 1.0) for g in both.param_groups} == {10.0, 1.0, d, d ** 2, d ** 3, d ** 4}
    assert len(build_optimizer(model, TrainConfig(), "cpu").param_groups) == 2
    with pytest.raises(LMForgeError, match="layer_lr_decay works with train.optimizer=adamw"):
        build_optimizer(model, TrainConfig(optimizer="muon", layer_lr_decay=d), "cpu")
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(LMForgeError, match="train.layer_lr_decay"):
            TrainConfig(layer_lr_decay=bad)


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


def test_minutes_schedule_decays_over_the_time_budget_or_the_step_cap():
    tcfg = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=1010, max_minutes=2.0, schedule="minutes")
    steps_only = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=1010)
    budget = 120.0
    for step, elapsed in [(0, 0.0), (3, 1.0), (3, 100.0), (10, 5.0), (50, 30.0), (100, 60.0), (400, 90.0),
                          (600, 10.0), (999, 119.0), (500, 120.0), (500, 500.0), (1010, 1.0)]:
        by_time = min(elapsed / budget, 1.0)
        if step < 10:
            cosine = 2e-4 + (2e-3 - 2e-4) * (1 + math.cos(math.pi * by_time)) / 2
            want = min(2e-3 * (step + 1) / 11, cosine)  # the ramp, capped by the cosine over time
        else:
            t = max(min((step - 10) / 1000, 1.0), by_time)  # whichever of steps and time is further along
            want = 2e-4 + (2e-3 - 2e-4) * (1 + math.cos(math.pi * t)) / 2
        assert lr_at(step, tcfg, elapsed) == pytest.approx(want, rel=1e-12, abs=0)
    assert lr_at(5, tcfg, 60.0) == pytest.approx(2e-3 * 6 / 11)      # the ramp caps the cosine early on
    assert lr_at(3, tcfg, 120.0) == pytest.approx(2e-4)               # ... and the cosine the ramp
    assert lr_at(110, tcfg, 60.0) == pytest.approx(1.1e-3)            # half the budget: half way down
    assert lr_at(100, tcfg, 120.0) == pytest.approx(2e-4)             # budget spent: min_lr
    assert lr_at(1010, tcfg, 0.0) == pytest.approx(2e-4)              # step cap reached first: min_lr too
    for step in (0, 5, 10, 300, 700, 1010):  # while the steps are further along: the step schedule exactly
        assert lr_at(step, tcfg, 0.0) == lr_at(step, steps_only)
    with pytest.raises(LMForgeError, match="max_minutes"):
        TrainConfig(schedule="minutes")
    with pytest.raises(LMForgeError, match="train.schedule"):
        TrainConfig(schedule="hours")


def test_cooldown_holds_the_peak_then_falls_linearly_over_the_last_fraction():
    """Warmup-stable-decay against its formula written out: ramp, flat at lr, straight line to
    min_lr over the last ``cooldown`` of the schedule, by steps or by the clock."""
    tcfg = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=410, cooldown=0.25)
    for step in range(430):
        if step < 10:
            want = 2e-3 * (step + 1) / 11
        else:
            t = min((step - 10) / 400, 1.0)
            want = 2e-3 if t <= 0.75 else 2e-3 + (t - 0.75) / 0.25 * (2e-4 - 2e-3)
        assert lr_at(step, tcfg) == pytest.approx(want, rel=1e-12, abs=0)
    assert lr_at(310, tcfg) == pytest.approx(2e-3)                    # the cool-down starts here
    assert lr_at(360, tcfg) == pytest.approx(1.1e-3)                  # half way down it
    assert lr_at(410, tcfg) == pytest.approx(2e-4)
    timed = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=100_000, max_minutes=2.0,
                        schedule="minutes", cooldown=0.5)
    assert lr_at(50, timed, 59.0) == pytest.approx(2e-3)              # first half of the budget: the peak
    assert lr_at(50, timed, 90.0) == pytest.approx(1.1e-3)            # three quarters: half way down
    assert lr_at(50, timed, 120.0) == pytest.approx(2e-4)
    assert lr_at(5, timed, 30.0) == pytest.approx(2e-3 * 6 / 11)      # the ramp caps it early on
    assert lr_at(5, timed, 120.0) == pytest.approx(2e-4)
    full = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=410, cooldown=1.0)
    assert [lr_at(s, full) for s in (10, 210, 410)] == pytest.approx([2e-3, 1.1e-3, 2e-4])
    for bad in (-0.1, 1.5):
        with pytest.raises(LMForgeError, match="train.cooldown"):
            TrainConfig(cooldown=bad)


# ------------------------------------------------------------------------------------------------ Muon

@pytest.mark.parametrize("shape", [(24, 72), (72, 24), (40, 40)])
def test_orthogonalize_equals_the_polynomial_on_the_singular_values(shape):
    """Newton-Schulz keeps the singular vectors and maps each singular value s/||G||_F through
    a s + b s^3 + c s^5 five times: the float64 SVD reference, built from the formula."""
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = s / torch.linalg.matrix_norm(g)
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    expected = u @ torch.diag(s) @ vh
    torch.testing.assert_close(orthogonalize(g), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(orthogonalize(g.float()), expected.float(), rtol=0, atol=2e-4)
    assert 0.6 < s.median() and s.max() < 1.25  # about U V^T: directions move about equally far
    stack = torch.stack([g, 2 * g.flip(0), -g])
    torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(m) for m in stack]))
    # In bf16 (GPUs, and CPUs where it is measured faster): bf16's rounding (2^-8 relative) on entries
    # of about 0.3, far below the iteration's own spread of singular values; float32 comes back.
    half = orthogonalize(g.float(), dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), expected, rtol=0, atol=0.03)
    assert (half.double() - expected).abs().max() > 1e-4  # it did run in bf16


def test_newton_schulz_dtype_is_pinned_or_measured():
    cpu = torch.device("cpu")
    model = tiny_model()
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), cpu)
    assert newton_schulz_dtype(muon, TrainConfig(muon_ns_dtype="float32"), cpu) == "float32"
    assert newton_schulz_dtype(muon, TrainConfig(muon_ns_dtype="bfloat16", dtype="float32"), cpu) == "bfloat16"
    assert newton_schulz_dtype(muon, TrainConfig(), cpu) in ("float32", "bfloat16")
    assert newton_schulz_dtype(build_optimizer(model, TrainConfig(), cpu), TrainConfig(), cpu) is None
    with pytest.raises(LMForgeError, match="train.muon_ns_dtype"):
        TrainConfig(muon_ns_dtype="float16")


def model_and_grads(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16, bias=True,
                                  tie_embeddings=tied))
    idx = torch.randint(0, 50, (2, 8))
    return model, idx


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_block_matrices_only(tied):
    model, _ = model_and_grads(tied)
    chosen = muon_params(model)
    names = {name for name, p in model.named_parameters() if id(p) in chosen}
    expected = {name for name, p in model.named_parameters()
                if name.startswith("blocks.") and p.dim() == 2}
    assert names == expected and names
    assert not any(n.startswith(("tok_emb", "lm_head", "pos_emb")) for n in names)


def test_muon_step_matches_formula_and_adamw_groups_match_torch():
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10, weight_decay=0.1, optimizer="muon", muon_lr=0.05)
    model, idx = model_and_grads(tied=False)
    twin = copy.deepcopy(model).double()
    ours = build_optimizer(model, tcfg, "cpu")
    assert isinstance(ours, Muon) and [bool(g["muon"]) for g in ours.param_groups] == [False, False, True]
    matrices = muon_params(model)
    twin_params = dict(twin.named_parameters())
    torch_adamw = torch.optim.AdamW(
        [p for n, p in twin.named_parameters() if id(dict(model.named_parameters())[n]) not in matrices],
        lr=1e-2, betas=(tcfg.beta1, tcfg.beta2), weight_decay=0.0)
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in ours.param_groups[0]["params"])}
    buffers = {}
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(idx).float().logsumexp(-1).mean().backward()  # any differentiable scalar
        ours.step()
        # reference, float64, by hand: Muon for the block matrices, torch's AdamW for the rest
        with torch.no_grad():
            for name, p in model.named_parameters():
                q = twin_params[name]
                if id(p) in matrices:
                    buf = buffers.setdefault(name, torch.zeros_like(q))
                    buf.mul_(0.95).add_(q.grad, alpha=0.05)
                    step = orthogonalize(0.05 * q.grad + 0.95 * buf)
                    q.mul_(1 - 0.05 * 0.1).sub_(0.05 * max(1, q.shape[0] / q.shape[1]) ** 0.5 * step)
                elif name in decayed:
                    q.mul_(1 - 1e-2 * 0.1)  # AdamW's decoupled decay, then the plain Adam step below
        torch_adamw.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), twin_params[name].detach(), rtol=0, atol=1e-5,
                                       msg=name)


def test_unknown_optimizer_is_refused():
    with pytest.raises(LMForgeError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")


def test_muon_steps_without_importing_torchs_compiler_stack():
    """torch.optim.Optimizer's add_param_group and zero_grad import torch._dynamo (and sympy) on first
    use, about 1 s of start-up; Muon calls the methods unwrapped, so a Muon run pays it only when it
    first saves a checkpoint."""
    import subprocess
    import sys

    code = """
import sys, torch
from lmforge.config import ModelConfig, TrainConfig
from lmforge.model import DecoderLM
from lmforge.train.optim import build_optimizer
model = DecoderLM(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32))
opt = build_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
before = {n: p.detach().clone() for n, p in model.named_parameters()}
for _ in range(2):
    model(torch.randint(0, 50, (2, 16))).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
assert all(p.grad is None for p in model.parameters())
assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
print(sorted(m for m in ("torch._dynamo", "sympy", "torch.distributed.tensor") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
