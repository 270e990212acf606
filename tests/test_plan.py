"""`lmforge plan` against measurements on small models: parameter counts, FLOPs, optimizer and gradient
bytes, and activation memory measured on CPU by tracking every tensor the forward pass allocates."""

import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmforge.cli import main
from lmforge.config import PRESETS, Config, ModelConfig, TrainConfig
from lmforge.recipes import build_section
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM, layers
from lmforge.plan import (Cluster, activation_bytes, estimate_memory, flops_per_token, make_plan, max_micro_batch,
                          param_counts)
from lmforge.train.distributed import apply_activation_checkpointing
from lmforge.train.optim import build_optimizer

#: how close the activation estimate must be to the measurement
ACTIVATION_TOL = {"float32": 0.02, "bfloat16": 0.05}
#: the peak (forward and the start of backward) is estimated more coarsely
PEAK_TOL = 0.10

SHAPES = {
    "gpt2-like": dict(pos_encoding="learned", ffn="gelu_tanh", norm="layernorm", bias=True),
    "llama-like": dict(pos_encoding="rotary", ffn="swiglu", norm="rmsnorm", n_kv_head=2, tie_embeddings=False),
    "padded-vocab": dict(pos_encoding="sinusoidal", ffn="gelu", pad_vocab_multiple=64),
}


def small(shape: str, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=100, block_size=64, n_layer=3, n_head=4, d_model=64), **SHAPES[shape], **kw})


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, counting every storage an operation creates
    (views share their base's storage) until it is freed: a CPU stand-in for torch.cuda.memory_allocated."""

    def __init__(self, existing):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.sizes or key in self.existing or storage.nbytes() == 0:
                    continue
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)


def measure(cfg: ModelConfig, batch: int, checkpointing: bool, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes alive after the forward pass and loss, peak bytes through the backward pass), parameters excluded."""
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    tracker = LiveBytes(list(model.parameters()) + [x, y])
    with tracker:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        after_forward = tracker.live
        loss.backward()
    return after_forward, tracker.peak


# -------------------------------------------------------------------------------------- counts and FLOPs

@pytest.mark.parametrize("shape", list(SHAPES))
def test_parameter_count_and_flops_equal_the_model(shape):
    for tie in (True, False):
        cfg = small(shape, tie_embeddings=tie)
        model = DecoderLM(cfg)
        counts = param_counts(cfg)
        assert counts["total"] == model.num_params()
        assert counts["non_embedding"] == model.num_params(exclude_embeddings=True)
        assert counts["per_block"] == sum(p.numel() for p in model.blocks[0].parameters())
        assert flops_per_token(cfg) == model.flops_per_token(cfg.block_size)


@pytest.mark.parametrize("preset", ["gpt2-124m", "gpt2-350m", "llama-1b"])
def test_presets_have_their_published_sizes(preset):
    cfg = build_section(ModelConfig, {"preset": preset, "vocab_size": PRESETS[preset]["vocab_size"]}, "model")
    with torch.device("meta"):  # shapes only: nothing allocated
        model = DecoderLM(cfg)
    assert param_counts(cfg)["total"] == model.num_params()
    expected = {"gpt2-124m": 124_475_904, "gpt2-350m": 354_871_296, "llama-1b": 1_100_048_384}[preset]
    assert model.num_params() == expected  # GPT-2's 124M with the vocabulary padded to 50304; TinyLlama's 1.1B


def test_weights_gradients_and_adamw_state_bytes_are_measured_ones():
    cfg = small("llama-like")
    model = DecoderLM(cfg)
    optimizer = build_optimizer(model, TrainConfig(), "cpu")
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)  # the scalar step counters aside
    est = estimate_memory(cfg, "ddp", 1, 2, compute_bytes=4)
    assert est["weights"] == weights and est["gradients"] == grads and est["optimizer"] == state


# --------------------------------------------------------------------------------------------- activations

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep", "recompute"])
def test_activation_estimate_matches_the_measured_memory(monkeypatch, shape, dtype, checkpointing):
    # the plan books a fused attention kernel (a GPU's: no T x T weights kept); on the CPU short bf16
    # attention is written out and keeps its weights, so measure it through SDPA here
    monkeypatch.setattr(layers, "CPU_BF16_WRITTEN_OUT_MAX", 0)
    cfg = small(shape)
    after_forward, peak = measure(cfg, batch=4, checkpointing=checkpointing, dtype=dtype)
    compute_bytes = 4 if dtype == torch.float32 else 2
    est = activation_bytes(cfg, 4, compute_bytes, checkpointing)
    expected = est["total"]
    if dtype == torch.bfloat16 and not checkpointing:
        # autocast's bf16 copies of the weights are kept for the backward pass: `plan` books them under weights
        expected += 2 * sum(m.weight.numel() for m in DecoderLM(cfg).modules() if isinstance(m, torch.nn.Linear))
    tol = ACTIVATION_TOL[str(dtype).removeprefix("torch.")]
    assert abs(expected - after_forward) <= tol * after_forward, (expected, after_forward)
    if not checkpointing:
        extra = est["backward_extra"]
        assert abs(expected + extra - peak) <= PEAK_TOL * peak, (expected + extra, peak)
    else:
        assert abs(expected + est["backward_extra"] - peak) <= PEAK_TOL * peak, (expected + est["backward_extra"],
                                                                                 peak)


def test_activations_scale_with_the_batch_and_checkpointing_saves_most():
    cfg = small("gpt2-like", n_layer=4)
    one, four = activation_bytes(cfg, 1)["total"], activation_bytes(cfg, 4)["total"]
    assert four == pytest.approx(4 * one)
    kept = activation_bytes(cfg, 4)["blocks"]
    recomputed = activation_bytes(cfg, 4, activation_checkpointing=True)["blocks"]
    assert recomputed < kept / 5
    measured_keep, _ = measure(cfg, 4, False, torch.float32)
    measured_recompute, _ = measure(cfg, 4, True, torch.float32)
    assert measured_keep - measured_recompute == pytest.approx(kept - recomputed, rel=0.02)


# --------------------------------------------------------------------------------------------- the plan

def test_fsdp_shards_and_the_largest_micro_batch_fits():
    cfg = build_section(ModelConfig, {"preset": "llama-1b"}, "model")
    ddp = estimate_memory(cfg, "ddp", 8, 1)
    fsdp = estimate_memory(cfg, "fsdp", 8, 1)
    p = param_counts(cfg)["total"]
    assert ddp["optimizer"] == 8 * p and fsdp["optimizer"] == 8 * p / 8
    assert fsdp["total"] < ddp["total"]
    memory = 40e9
    for ac in (False, True):
        b = max_micro_batch(cfg, "fsdp", 8, memory, ac, 2)
        assert b >= 1
        assert estimate_memory(cfg, "fsdp", 8, b, ac, 2)["total"] <= memory < \
            estimate_memory(cfg, "fsdp", 8, b + 1, ac, 2)["total"]
    assert max_micro_batch(cfg, "fsdp", 8, 1e9, True, 2) == 0  # not even one sequence fits in 1 GB


def test_plan_time_per_step_at_the_stated_mfu():
    cfg = Config(model=build_section(ModelConfig, {"preset": "gpt2-124m"}, "model"),
                 train=TrainConfig(batch_size=64, grad_accum=8))
    plan = make_plan(cfg, Cluster(gpu="H100", count=8), mfu=0.5)
    tokens = 64 * 1024 * 8
    assert plan["tokens_per_step"] == tokens and plan["micro_batch_per_gpu"] == 8
    assert plan["step_time_s"] == pytest.approx(tokens * plan["flops_per_token"] / (8 * 989e12 * 0.5))
    assert plan["strategies"]["ddp"]["without_checkpointing"]["fits"]
    unknown = make_plan(cfg, Cluster(gpu="RTX 4090", count=2, memory=24e9))
    assert unknown["step_time_s"] is None and unknown["gpu_memory"] == 24e9
    with pytest.raises(LMForgeError, match="--gpu-memory"):
        make_plan(cfg, Cluster(gpu="RTX 4090", count=2))
    with pytest.raises(LMForgeError, match="--mfu"):
        make_plan(cfg, Cluster(), mfu=1.5)


def test_plan_command(capsys):
    main(["plan", "-c", "gpt2-124m", "--gpus", "4", "--gpu", "H200", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] == 124_475_904 and plan["gpus"] == 4 and plan["gpu_memory"] == 141e9
    main(["plan", "--preset", "llama-1b", "--gpu", "A100", "--gpus", "16", "--train.batch_size=64"])
    text = capsys.readouterr().out
    assert "1,100,048,384 parameters" in text and "memory per GPU (GB)" in text and "fsdp" in text
    with pytest.raises(SystemExit) as e:
        main(["plan", "--gpu", "T4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory" in err[0]
