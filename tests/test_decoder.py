"""DecoderLM: sizes, causality, padding, KV cache, learning, and agreement with Hugging Face GPT-2 / Llama."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM, KVCache

POS_KINDS = ["learned", "sinusoidal", "rotary"]


def tiny(pos_encoding="learned", **kw):
    base = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, d_model=32, pos_encoding=pos_encoding)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**base)).eval()


def build_on_meta(preset, **kw):
    cfg = ModelConfig(**{**PRESETS[preset], **kw})
    with torch.device("meta"):
        return DecoderLM(cfg)


# ----------------------------------------------------------------------------------------------
# Sizes and names


def test_gpt2_124m_parameter_count():
    # wte 50257*768 + wpe 1024*768 + 12 * (2 LayerNorms + qkv + proj + fc + proj) + ln_f; head tied.
    d, L, V, T = 768, 12, 50257, 1024
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    expected = V * d + T * d + L * per_layer + 2 * d
    assert expected == 124_439_808
    model = build_on_meta("gpt2-124m", pad_vocab_multiple=1)
    assert model.num_params() == 124_439_808
    assert model.num_params(exclude_embeddings=True) == expected - V * d - T * d
    # FLOPs: 6N (N = weights used in matmuls, the tied head included) + 12 L d T
    n_matmul = L * per_layer + 2 * d + V * d
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * L * d * 1024
    padded = build_on_meta("gpt2-124m")  # vocab padded to a multiple of 64
    assert padded.tok_emb.weight.shape == (50304, 768)


def test_llama_1b_parameter_count():
    model = build_on_meta("llama-1b")
    d, L, V, kv, ff = 2048, 22, 32000, 4 * 64, 5632
    per_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * ff
    assert model.num_params() == 2 * V * d + L * per_layer + d == 1_100_048_384


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds(preset):
    model = build_on_meta(preset, vocab_size=PRESETS[preset].get("vocab_size", 65))
    assert model.num_params() > 0


def test_weight_names_and_tied_head():
    model = tiny("learned", bias=True)
    names = set(model.state_dict())
    for name in ["tok_emb.weight", "pos_emb.weight", "blocks.0.attn_norm.weight", "blocks.0.attn_norm.bias",
                 "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.bias", "blocks.0.attn.o_proj.weight",
                 "blocks.1.ffn_norm.weight", "blocks.1.ffn.up_proj.weight", "blocks.1.ffn.down_proj.bias",
                 "norm_f.weight", "lm_head.weight"]:
        assert name in names, name
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny("rotary", tie_embeddings=False, ffn="swiglu", norm="rmsnorm")
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert "blocks.0.ffn.gate_proj.weight" in untied.state_dict()
    assert not any(n.startswith("pos_emb") for n in untied.state_dict())


def test_vocab_size_required():
    with pytest.raises(LMForgeError, match="vocab_size"):
        DecoderLM(ModelConfig(vocab_size=0))


def test_padded_vocab_logits_are_sliced():
    model = tiny(vocab_size=50, pad_vocab_multiple=64)
    assert model.tok_emb.weight.shape[0] == 64
    assert model(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, d_model=256, n_head=4, n_layer=8, bias=True, init_std=0.02)
    model = DecoderLM(cfg)
    block = model.blocks[3]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith("proj.bias"))
    assert (block.attn_norm.weight == 1).all() and (block.attn_norm.bias == 0).all()


# ----------------------------------------------------------------------------------------------
# Causality and padding


@pytest.mark.parametrize("pos", POS_KINDS)
def test_future_tokens_never_change_earlier_logits(pos):
    model = tiny(pos, n_kv_head=2)
    idx = torch.randint(0, 50, (2, 12))
    logits = model(idx)
    for t in [0, 5, 11]:
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        new = model(changed)
        torch.testing.assert_close(new[:, :t], logits[:, :t], atol=1e-6, rtol=1e-6)
        assert (new[:, t] - logits[:, t]).abs().max() > 1e-4


def left_pad(rows, width, pad_value=0):
    idx = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        idx[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return idx, mask, positions


@pytest.mark.parametrize("pos", POS_KINDS)
def test_left_padding_is_hidden(pos):
    model = tiny(pos, n_kv_head=2)
    rows = [torch.randint(0, 50, (n,)).tolist() for n in (9, 4, 1)]
    idx, mask, positions = left_pad(rows, 9, pad_value=0)
    idx2, _, _ = left_pad(rows, 9, pad_value=37)
    logits = model(idx, attention_mask=mask, positions=positions)
    logits2 = model(idx2, attention_mask=mask, positions=positions)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[mask], logits2[mask], atol=1e-5, rtol=1e-5)
    for r, row in enumerate(rows):  # each row alone, unpadded, gives the same logits
        alone = model(torch.tensor([row]))[0]
        torch.testing.assert_close(logits[r, 9 - len(row):], alone, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_refused():
    model = tiny("learned", block_size=8)
    with pytest.raises(LMForgeError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("pos", POS_KINDS)
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_matches_full_recompute(pos, n_kv_head):
    model = tiny(pos, n_kv_head=n_kv_head, ffn="swiglu", norm="rmsnorm")
    idx = torch.randint(0, 50, (2, 14))
    full = model(idx)
    cache = model.new_cache(batch_size=2, max_len=14)
    assert isinstance(cache, KVCache)
    pieces = [model(idx[:, :5], cache=cache)]  # prefill
    pieces.append(model(idx[:, 5:8], cache=cache))  # a chunk after cached tokens
    for t in range(8, 14):  # then one token at a time
        pieces.append(model(idx[:, t:t + 1], cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS_KINDS)
def test_kv_cache_with_left_padded_batch(pos):
    model = tiny(pos, n_kv_head=2)
    rows = [torch.randint(0, 50, (n,)).tolist() for n in (6, 2, 4)]
    extra = torch.randint(0, 50, (3, 5))
    idx, mask, positions = left_pad(rows, 6)
    full_idx = torch.cat([idx, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.bool)], dim=1)
    full_pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, 6)], dim=1)
    full = model(full_idx, attention_mask=full_mask, positions=full_pos)

    cache = model.new_cache(3, 11)
    steps = [model(idx, attention_mask=mask, positions=positions, cache=cache)]
    for t in range(5):
        steps.append(model(extra[:, t:t + 1], attention_mask=full_mask[:, :7 + t],
                           positions=full_pos[:, 6 + t:7 + t], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[full_mask], full[full_mask], atol=1e-5, rtol=1e-5)
    for r, row in enumerate(rows):  # and equal to each row alone, without padding or cache
        alone = model(torch.tensor([row + extra[r].tolist()]))[0]
        torch.testing.assert_close(cached[r, 6 - len(row):], alone, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error():
    model = tiny()
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ----------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("pos", POS_KINDS)
def test_loss_at_initialisation_is_log_vocab(pos):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=64, pos_encoding=pos))
    x = torch.randint(0, 1000, (8, 64))
    y = torch.randint(0, 1000, (8, 64))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    # sinusoidal models start as the original Transformer (tied table at std 1/sqrt(d), so logits of
    # unit variance: about half a nat above uniform); the others at std 0.02 (near-uniform logits)
    assert abs(loss - math.log(1000)) < (0.8 if pos == "sinusoidal" else 0.1)


def test_sinusoidal_decoder_reads_its_positions_from_the_start():
    """Unit-amplitude sinusoids beside 0.02-scale token embeddings drowned the tokens and a
    GPT-style start stayed at chance (3.46 nats after 200 steps, ln 32 = 3.47) on continuing a
    repeated 8-token pattern; with sqrt(d)-scaled embeddings and Xavier layers it learns (2.66)."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, d_model=32,
                                  pos_encoding="sinusoidal"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        seq = torch.randint(0, 32, (16, 8), generator=g).repeat(1, 5)[:, :33]
        loss = F.cross_entropy(model(seq[:, :-1])[:, 8:].flatten(0, 1), seq[:, 9:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 3.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, d_model=64,
                                  pos_encoding="rotary", norm="rmsnorm", ffn="swiglu"))
    data = torch.randint(0, 40, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert (model(idx) - model(idx)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Hugging Face references (independent implementations of the same architectures)


def randomize_(module, std=0.1):
    """Random values everywhere (norm weights around 1), so no term can hide behind a zero."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + std * torch.randn_like(p) if name.endswith("weight") else std * torch.randn_like(p))
            else:
                p.normal_(0, std)


def test_matches_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    randomize_(hf)
    ours = DecoderLM(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32,
                                 pos_encoding="learned", ffn="gelu_tanh", norm="layernorm", bias=True,
                                 tie_embeddings=True, norm_eps=1e-5)).eval()
    sd = hf.state_dict()
    d = 32
    mapped = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
              "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        h = f"transformer.h.{i}."
        qkv_w, qkv_b = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]  # Conv1D: [in, out]
        for j, name in enumerate(["q_proj", "k_proj", "v_proj"]):
            mapped[f"blocks.{i}.attn.{name}.weight"] = qkv_w[:, j * d:(j + 1) * d].T
            mapped[f"blocks.{i}.attn.{name}.bias"] = qkv_b[j * d:(j + 1) * d]
        pairs = {"attn.o_proj": "attn.c_proj", "ffn.up_proj": "mlp.c_fc", "ffn.down_proj": "mlp.c_proj"}
        for ours_name, hf_name in pairs.items():
            mapped[f"blocks.{i}.{ours_name}.weight"] = sd[h + hf_name + ".weight"].T
            mapped[f"blocks.{i}.{ours_name}.bias"] = sd[h + hf_name + ".bias"]
        for ours_name, hf_name in {"attn_norm": "ln_1", "ffn_norm": "ln_2"}.items():
            mapped[f"blocks.{i}.{ours_name}.weight"] = sd[h + hf_name + ".weight"]
            mapped[f"blocks.{i}.{ours_name}.bias"] = sd[h + hf_name + ".bias"]
    mapped["lm_head.weight"] = mapped["tok_emb.weight"]
    ours.load_state_dict(mapped)

    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
        assert diff <= 1e-4
        # Left-padded batch: HF with its attention mask and position ids, compared on real tokens.
        rows = [idx[0, :20].tolist(), idx[1, :7].tolist()]
        pidx, mask, positions = left_pad(rows, 20)
        hf_logits = hf(pidx, attention_mask=mask.long(), position_ids=positions).logits
        ours_logits = ours(pidx, attention_mask=mask, positions=positions)
        assert (ours_logits[mask] - hf_logits[mask]).abs().max().item() <= 1e-4


def test_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"  # the explicit softmax path, not SDPA
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomize_(hf)
    ours = DecoderLM(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                 d_ff=48, pos_encoding="rotary", rope_theta=500.0, ffn="swiglu", norm="rmsnorm",
                                 norm_eps=1e-5, bias=False, tie_embeddings=False)).eval()
    sd = hf.state_dict()
    mapped = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
              "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        h = f"model.layers.{i}."
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            mapped[f"blocks.{i}.attn.{name}.weight"] = sd[h + f"self_attn.{name}.weight"]
        for name in ["gate_proj", "up_proj", "down_proj"]:
            mapped[f"blocks.{i}.ffn.{name}.weight"] = sd[h + f"mlp.{name}.weight"]
        mapped[f"blocks.{i}.attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        mapped[f"blocks.{i}.ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
    ours.load_state_dict(mapped)

    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
        # Positions far from 0 exercise the rotary frequencies.
        positions = torch.arange(17, 57)[None].expand(2, 40)
        hf_logits = hf(idx, position_ids=positions).logits
        assert (ours(idx, positions=positions) - hf_logits).abs().max().item() <= 1e-4
