"""LoRA: zero adapters change nothing, merging keeps the outputs, only adapters (and the head) train,
and a LoRA task checkpoint merges into a plain one with ``lmforge lora-merge``."""

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.encoder import EncoderModel
from lmforge.model.heads import SequenceClassifier
from lmforge.model.lora import LoRALinear, apply_lora, count_trainable, has_lora, merge_lora, set_trainable


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(arch="decoder", **kw):
    cfg = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=32, arch=arch, **kw)
    return DecoderLM(cfg) if arch == "decoder" else EncoderModel(cfg)


@pytest.mark.parametrize("arch,ffn", [("decoder", "swiglu"), ("encoder", "gelu")])
def test_zero_adapters_equal_the_base_model(arch, ffn):
    torch.manual_seed(0)
    base = tiny(arch, ffn=ffn).eval()
    adapted = copy.deepcopy(base)
    n = apply_lora(adapted, rank=4, alpha=8)
    per_block = 4 + (3 if ffn == "swiglu" else 2)
    assert n == 2 * per_block
    idx = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(base(idx), adapted.eval()(idx))


def test_merge_equals_base_plus_adapter():
    torch.manual_seed(0)
    model = tiny("decoder", bias=True).eval()
    apply_lora(model, rank=4, alpha=16)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)  # a trained adapter
    idx = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        adapted = model(idx)
        # base + adapter by hand for one layer
        layer = model.blocks[0].attn.q_proj
        x = torch.randn(5, 32)
        by_hand = layer.base(x) + x @ layer.lora_A.t() @ layer.lora_B.t() * (16 / 4)
        assert torch.allclose(layer(x), by_hand, atol=1e-6)
        assert merge_lora(model) == 12
        assert not has_lora(model)
        assert torch.allclose(model(idx), adapted, atol=1e-5)
    assert set(model.state_dict()) == set(tiny("decoder", bias=True).state_dict())


def test_only_adapters_and_head_train():
    torch.manual_seed(0)
    trunk = tiny("encoder")
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    apply_lora(trunk, rank=2, alpha=4)
    clf = SequenceClassifier(trunk, 3, "mean", dropout=0.0)
    set_trainable(clf, "lora", trunk)
    names = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("classifier.") for n in names)
    trainable, total = count_trainable(clf)
    assert 0 < trainable < total / 5
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 40, (4, 8))
    mask = torch.ones_like(idx, dtype=torch.bool)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(clf(idx, mask), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, value in before.items():  # the base weights did not move
        key = name
        state = trunk.state_dict()
        if key not in state:
            key = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state[key], value), name
    assert any(m.lora_B.abs().sum() > 0 for m in trunk.modules() if isinstance(m, LoRALinear))
    set_trainable(clf, "frozen", trunk)
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
