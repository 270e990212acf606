"""EncoderModel: bidirectional attention, padding, token types, pre/post-norm, the pooler, and
agreement with transformers' BertModel."""

import pytest
import torch

from lmforge.config import Config, DataConfig, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model.encoder import Encoder, EncoderModel
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_model, save_checkpoint

V = 50
BERT_LIKE = dict(norm_position="post", bias=True, type_vocab_size=2, embed_norm=True, pooler=True, norm_eps=1e-12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    base = dict(arch="encoder", vocab_size=V, block_size=32, n_layer=2, n_head=4, d_model=32, init_std=0.2)
    base.update(kw)
    torch.manual_seed(0)
    return EncoderModel(ModelConfig(**base)).eval()


def test_weight_names_and_shapes():
    model = tiny(**BERT_LIKE)
    names = set(model.state_dict())
    for name in ["tok_emb.weight", "pos_emb.weight", "type_emb.weight", "embed_norm.weight", "embed_norm.bias",
                 "encoder.blocks.0.attn.q_proj.weight", "encoder.blocks.1.ffn_norm.bias", "pooler.weight"]:
        assert name in names, name
    assert not any(n.startswith("encoder.norm_f") for n in names)  # post-norm blocks end in a norm
    pre = tiny(pos_encoding="rotary", norm="rmsnorm", ffn="swiglu")
    assert "encoder.norm_f.weight" in pre.state_dict() and isinstance(pre.encoder, Encoder)
    assert not any(n.startswith(("pos_emb", "type_emb", "embed_norm", "pooler")) for n in pre.state_dict())
    assert tiny().num_params(exclude_embeddings=True) < tiny().num_params()


@pytest.mark.parametrize("kw", [{}, BERT_LIKE, dict(pos_encoding="rotary", n_kv_head=2), dict(pos_encoding="sinusoidal")])
def test_every_token_sees_the_whole_sequence(kw):
    model = tiny(**kw)
    idx = torch.randint(0, V, (2, 10))
    out = model(idx)
    assert out.shape == (2, 10, 32) and torch.isfinite(out).all()
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    assert (model(changed)[:, 0] - out[:, 0]).abs().max() > 1e-4  # a later token changes the first output


@pytest.mark.parametrize("kw", [{}, BERT_LIKE, dict(pos_encoding="rotary")])
def test_right_padding_is_hidden(kw):
    model = tiny(**kw)
    rows = [torch.randint(0, V, (n,)).tolist() for n in (9, 4, 1)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    other = torch.full((3, 9), 7, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for r, row in enumerate(rows):
        idx[r, :len(row)] = other[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = True
    out, out2 = model(idx, attention_mask=mask), model(other, attention_mask=mask)
    torch.testing.assert_close(out[mask], out2[mask], atol=1e-5, rtol=1e-5)
    for r, row in enumerate(rows):  # each row alone, unpadded, gives the same states
        torch.testing.assert_close(out[r, :len(row)], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)


def test_token_types_and_pooler():
    model = tiny(**BERT_LIKE)
    idx = torch.randint(0, V, (2, 6))
    zeros = model(idx)
    torch.testing.assert_close(zeros, model(idx, token_type_ids=torch.zeros_like(idx)))
    assert (model(idx, token_type_ids=torch.ones_like(idx)) - zeros).abs().max() > 1e-4
    pooled = model.pool(zeros)
    torch.testing.assert_close(pooled, torch.tanh(model.pooler(zeros[:, 0])))
    plain = tiny()
    with pytest.raises(LMForgeError, match="no pooler"):
        plain.pool(plain(idx))
    with pytest.raises(LMForgeError, match="no token types"):
        plain(idx, token_type_ids=torch.zeros_like(idx))


def test_too_long_and_wrong_configs_are_refused():
    with pytest.raises(LMForgeError, match="longer than the model's context"):
        tiny(block_size=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(LMForgeError, match="arch=encoder only"):
        ModelConfig(vocab_size=V, type_vocab_size=2)
    with pytest.raises(LMForgeError, match="arch=encoder only"):
        ModelConfig(vocab_size=V, pooler=True)
    with pytest.raises(LMForgeError, match="needs model.arch=encoder"):
        EncoderModel(ModelConfig(vocab_size=V))


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.5, **BERT_LIKE)
    idx = torch.randint(0, V, (1, 8))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert (model(idx) - model(idx)).abs().max() > 1e-4


def test_load_model_builds_an_encoder(tmp_path):
    tok = Tokenizer.train(["some text for a tiny tokenizer"], kind="char")
    tok.save(tmp_path / "tokenizer.json")
    model = tiny(**{**BERT_LIKE, "vocab_size": tok.vocab_size})
    cfg = Config(model=model.cfg, data=DataConfig(data_dir=str(tmp_path)))
    ckpt = save_checkpoint(tmp_path / "run", model, cfg, step=0, tokenizer_path=tmp_path / "tokenizer.json")
    loaded, cfg2, _ = load_model(ckpt)
    assert isinstance(loaded, EncoderModel) and cfg2.model.arch == "encoder"
    idx = torch.randint(0, tok.vocab_size, (2, 5))
    torch.testing.assert_close(loaded(idx), model(idx))


def test_matches_transformers_bert():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                                     hidden_act="gelu", layer_norm_eps=1e-12)
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.2 * torch.randn_like(p))
    from lmforge.interop.architectures import Bert
    from lmforge.interop.mapping import HFConfig, Weights

    bert = Bert()
    cfg, _ = bert.config_from_hf(HFConfig(hf_cfg.to_dict(), "bert"), set(hf.state_dict()))
    ours = EncoderModel(cfg).eval()
    ours.load_state_dict(bert.from_hf(Weights(hf.state_dict(), "test", "bert"), cfg))
    idx = torch.randint(0, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    types = torch.tensor([[0] * 6 + [1] * 6, [0] * 4 + [1] * 8])
    with torch.no_grad():
        theirs = hf(idx, attention_mask=mask, token_type_ids=types)
        hidden = ours(idx, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (hidden[real] - theirs.last_hidden_state[real]).abs().max().item() <= 1e-4
    assert (ours.pool(hidden) - theirs.pooler_output).abs().max().item() <= 1e-4
