"""GGUF export for llama.cpp: the ``gguf`` package's reader reads every tensor back (f32 bitwise, f16 and
q8_0 within their rounding), transformers loads the file (``from_pretrained(dir, gguf_file=...)``) with
lmforge's weights and logits, its tokenizer encodes as lmforge's, and what llama.cpp cannot run the
same way is refused with one line."""

import numpy as np
import pytest
import torch

from test_interop import (  # noqa: E402  (the interop tests' tiny models, tokenizer and checks)
    BERT_STYLE,
    GPT2_STYLE,
    LLAMA_STYLE,
    PADDED_V,
    SAMPLES,
    TEXT,
    assert_same_decoder,
    assert_same_logits_all_ids,
    gpt2_model,
    hf_dir,
    llama_model,
    lmforge_checkpoint,
    quiet,
)

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.interop import import_checkpoint
from lmforge.interop.convert import export_source
from lmforge.interop.gguf import check_gguf, export_gguf
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint, load_model, read_config

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")

pytestmark = pytest.mark.usefixtures("one_thread")

STYLES = {
    "gpt2": GPT2_STYLE,
    "gpt2-untied-nobias": {**GPT2_STYLE, "tie_embeddings": False, "bias": False},
    "llama": LLAMA_STYLE,  # grouped key/value heads (4 query, 2 key/value), untied; d_ff 48: not whole q8_0 blocks
    "llama-tied": {**LLAMA_STYLE, "tie_embeddings": True, "d_ff": 64, "n_kv_head": 1},
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], kind="bpe", vocab_size=320)


def load_gguf(path, ckpt):
    """transformers' model from the file. Its GGUF reader maps gpt2's context_length and feed_forward_length
    to keys GPT2Config does not read (llama.cpp does), so those two sizes are given as n_positions and n_inner."""
    mcfg = read_config(latest_checkpoint(ckpt)).model
    kw = {"n_positions": mcfg.block_size, "n_inner": mcfg.ff_dim} if mcfg.pos_encoding == "learned" else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                    output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.generation_config.eos_token_id = None  # the checks run greedy decoding past the end token, as lmforge's
    return model.eval()


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, fields


# ----------------------------------------------------------------------------------------------
# transformers loads the file: same weights, same logits and greedy tokens


@pytest.mark.parametrize("style", STYLES.values(), ids=STYLES.keys())
def test_f32_file_loads_in_transformers_with_the_same_weights_and_logits(tmp_path, tok, style):
    ckpt = lmforge_checkpoint(tmp_path, tok, **style)
    export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)
    theirs = load_gguf(tmp_path / "model.gguf", ckpt)
    # transformers undoes the file's layout (GPT-2's transposes, llama's rotary row order) on its own, so
    # its weights equal the Hugging Face export's bit for bit
    expected = export_source(ckpt).state
    state = theirs.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items()), [k for k, v in expected.items()
                                                                          if not torch.equal(state[k], v)]
    assert theirs.config.tie_word_embeddings == style["tie_embeddings"]
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, theirs, tok.vocab_size)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_quantized_files_match_the_rounded_model_and_stay_close(tmp_path, tok, name):
    """q8_0 and f16: transformers' logits equal lmforge's with its matrices rounded the same way (1e-4; this
    checks the quantized layout), and stay within a measured bound of the exact model's."""
    ckpt = lmforge_checkpoint(tmp_path, tok, **STYLES[name])
    ours, _, _ = load_model(ckpt)
    torch.manual_seed(0)
    idx = torch.randint(0, tok.vocab_size, (4, 64))
    with torch.no_grad():
        exact = ours(idx)
    # measured on these random models (weights of std 0.2, 64 positions): max |logit difference|
    # f16 0.004 (gpt2) / 0.012 (llama), q8_0 0.10 / 0.26, logits of std 1.2; bounds with about 2x margin
    bounds = {"f16": 0.03, "q8_0": 0.5}
    for dtype, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        path = tmp_path / f"model-{dtype}.gguf"
        export_gguf(ckpt, path, dtype=dtype, log=quiet)
        with torch.no_grad():
            theirs = load_gguf(path, ckpt)(idx).logits
            rounded, _, _ = load_model(ckpt)
            for pname, p in rounded.named_parameters():
                if p.ndim == 2 and pname != "pos_emb.weight":  # the matrices; vectors and positions stay f32
                    q = qtype if p.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)))
            assert (rounded(idx) - theirs).abs().max().item() <= 1e-4, dtype
        assert (exact - theirs).abs().max().item() <= bounds[dtype], dtype
        assert (exact.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9


# ----------------------------------------------------------------------------------------------
# gguf's reader: every tensor, its type and values; the metadata llama.cpp reads


def test_reader_reads_back_every_tensor(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **STYLES["llama"])
    for dtype in ("f32", "f16", "q8_0"):
        export_gguf(ckpt, tmp_path / f"{dtype}.gguf", dtype=dtype, log=quiet)
    f32 = {t.name: t for t in read(tmp_path / "f32.gguf")[0].tensors}
    n_layer = 2
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(f32) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(n_layer) for n in per_layer}
    ours, _, _ = load_model(ckpt)
    for name, t in f32.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    # tensors without a layout change read back bit for bit as lmforge's
    state = {k: v.numpy() for k, v in ours.state_dict().items()}
    for name, ours_name in (("token_embd.weight", "tok_emb.weight"),
                            ("blk.1.attn_v.weight", "blocks.1.attn.v_proj.weight"),
                            ("blk.0.ffn_down.weight", "blocks.0.ffn.down_proj.weight"),
                            ("output_norm.weight", "norm_f.weight"), ("output.weight", "lm_head.weight")):
        assert np.array_equal(np.asarray(f32[name].data), state[ours_name]), name
    # query and key rows: llama.cpp rotates adjacent pairs (2i, 2i+1) of a head where lmforge rotates i and i + D/2
    D = 8
    for name, ours_name, heads in (("blk.0.attn_q.weight", "blocks.0.attn.q_proj.weight", 4),
                                   ("blk.1.attn_k.weight", "blocks.1.attn.k_proj.weight", 2)):
        order = [h * D + i + half * D // 2 for h in range(heads) for i in range(D // 2) for half in (0, 1)]
        assert np.array_equal(np.asarray(f32[name].data), state[ours_name][order]), name
    for dtype in ("f16", "q8_0"):
        for t in read(tmp_path / f"{dtype}.gguf")[0].tensors:
            exact = np.asarray(f32[t.name].data)
            if exact.ndim == 1:  # norms stay f32
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(np.asarray(t.data), exact)
                continue
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(exact.shape)
            if t.tensor_type == gguf.GGMLQuantizationType.F16:  # f16 asked, or q8_0 rows of 48 (not 32-blocks)
                assert dtype == "f16" or exact.shape[-1] % 32, t.name
                assert np.array_equal(values, exact.astype(np.float16).astype(np.float32)), t.name
                continue
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and dtype == "q8_0", t.name
            # q8_0: blocks of 32 values, each an int8 times one f16 scale (block max / 127): the error is at most
            # half a step plus the scale's own f16 rounding
            blocks = exact.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(values.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-12), t.name
    sizes = {d: (tmp_path / f"{d}.gguf").stat().st_size for d in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_metadata_and_tokenizer(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **STYLES["llama"])
    export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)
    _, fields = read(tmp_path / "model.gguf")
    assert fields["general.architecture"] == "llama"
    assert {k: fields[f"llama.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length",
                                               "block_count", "attention.head_count", "attention.head_count_kv",
                                               "rope.dimension_count", "vocab_size")} == {
        "context_length": 64, "embedding_length": 32, "feed_forward_length": 48, "block_count": 2,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8, "vocab_size": 320}
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320 and tokens[0] == "<|endoftext|>"
    assert types[0] == gguf.TokenType.CONTROL and set(types[1:]) == {gguf.TokenType.NORMAL}
    eot = tok.token_to_id("<|endoftext|>")
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (eot, eot)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    # transformers builds its tokenizer from the file alone: the same ids as lmforge's, the same text back
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert auto.eos_token == "<|endoftext|>"
    for text in SAMPLES:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), text
        assert auto.decode(ids) == tok.decode(ids)


def llama3_tokenizer():
    """A byte-level BPE split with Llama 3's pattern, as Llama 3's tokenizer.json has it."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.interop.gguf import LLAMA3_SPLIT

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT * 20], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Tokenizer(hf)


def test_llama3_pre_tokenizer(tmp_path):
    """An imported Llama 3 tokenizer splits text with its own pattern (digits in threes, ...): llama.cpp's
    "llama-bpe", and transformers' tokenizer built from the file encodes as lmforge's."""
    tok3 = llama3_tokenizer()
    ckpt = lmforge_checkpoint(tmp_path, tok3, **STYLES["llama"])
    export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)
    assert read(tmp_path / "model.gguf")[1]["tokenizer.ggml.pre"] == "llama-bpe"
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    # (SAMPLES' last text names GPT-2's <|endoftext|>, which transformers' GGUF tokenizer adds as a new token when
    # the vocabulary lacks it; this one has <|end_of_text|>)
    for text in SAMPLES[:-1] + ["<|end_of_text|>after the end", "2345 and 452345: digits in threes", "a\n\n  b\tc"]:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert ids == tok3.encode(text), text
        assert auto.decode(ids) == tok3.decode(ids)


# ----------------------------------------------------------------------------------------------
# vocabularies larger than the tokenizer


@pytest.mark.parametrize("make", [gpt2_model, llama_model], ids=["gpt2", "llama"])
def test_imported_padded_vocabulary(tmp_path, tok, make):
    """An imported checkpoint whose vocabulary (384) is larger than its tokenizer (320): the extra ids are
    unused [PADn] tokens of the file, their rows kept."""
    import_checkpoint(hf_dir(tmp_path, make(PADDED_V), tok), tmp_path / "ours", log=quiet)
    lines = []
    export_gguf(tmp_path / "ours", tmp_path / "model.gguf", log=lines.append)
    assert any("64 unused padding ids" in ln for ln in lines)
    _, fields = read(tmp_path / "model.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == PADDED_V and tokens[320:] == [f"[PAD{i}]" for i in range(320, PADDED_V)]
    assert set(types[320:]) == {gguf.TokenType.UNUSED}
    ours, _, _ = load_model(tmp_path / "ours")
    theirs = load_gguf(tmp_path / "model.gguf", tmp_path / "ours")
    with torch.no_grad():
        assert_same_logits_all_ids(ours, theirs, PADDED_V)


def test_lmforge_padding_rows_are_left_out(tmp_path, tok):
    ckpt = lmforge_checkpoint(tmp_path, tok, **GPT2_STYLE, pad_vocab_multiple=128)
    lines = []
    export_gguf(ckpt, tmp_path / "model.gguf", log=lines.append)
    assert any("padding rows" in ln for ln in lines)
    reader, fields = read(tmp_path / "model.gguf")
    assert len(fields["tokenizer.ggml.tokens"]) == 320
    assert [t for t in reader.tensors if t.name == "token_embd.weight"][0].data.shape == (320, 32)
    ours, _, _ = load_model(ckpt)
    assert_same_decoder(ours, load_gguf(tmp_path / "model.gguf", ckpt), tok.vocab_size, check_greedy=False)


# ----------------------------------------------------------------------------------------------
# refusals and the command line


@pytest.mark.parametrize("style, words", [
    (BERT_STYLE, "model.arch=encoder cannot be exported as GGUF.*--format hf"),
    (dict(pos_encoding="sinusoidal"), "pos_encoding=sinusoidal has no llama.cpp architecture"),
    ({**GPT2_STYLE, "ffn": "gelu"}, "ffn=gelu \\(llama.cpp's gpt2 computes GELU with the tanh approximation"),
    ({**LLAMA_STYLE, "bias": True}, "as GGUF llama: bias=true"),
    (dict(pos_encoding="rotary", norm="layernorm", ffn="swiglu"), "norm=layernorm"),
    (dict(pos_encoding="learned", ffn="gelu_tanh", n_kv_head=2), "n_kv_head=2"),
])
def test_what_llama_cpp_cannot_run_the_same_is_refused(tmp_path, tok, style, words):
    ckpt = lmforge_checkpoint(tmp_path, tok, **style)
    with pytest.raises(LMForgeError, match=words) as e:
        export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp_*"))


def test_encoder_decoder_and_tokenizers_llama_cpp_splits_otherwise_are_refused(tmp_path):
    with pytest.raises(LMForgeError, match="model.arch=seq2seq cannot be exported as GGUF"):
        check_gguf(ModelConfig(arch="seq2seq", pos_encoding="learned"), "ckpt")
    char_tok = Tokenizer.train([TEXT], kind="char")
    ckpt = lmforge_checkpoint(tmp_path, char_tok, **GPT2_STYLE)
    with pytest.raises(LMForgeError, match="character-level tokenizer; GGUF export writes byte-level BPE.*"
                                           "data.tokenizer=bpe"):
        export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)
    # a byte-level BPE that puts a space before the text: llama.cpp's gpt2 tokenizer would split it otherwise
    from tokenizers import pre_tokenizers

    spaced = llama3_tokenizer()
    spaced._hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    ckpt = lmforge_checkpoint(tmp_path / "spaced", spaced, **STYLES["llama"])
    with pytest.raises(LMForgeError, match="not a byte-level BPE that llama.cpp splits the same way .*--format hf"):
        export_gguf(ckpt, tmp_path / "model.gguf", log=quiet)


def test_cli_export_gguf_and_its_errors(tmp_path, tok, capsys):
    lmforge_checkpoint(tmp_path, tok, **STYLES["llama"])
    main(["export", str(tmp_path / "run"), "--format", "gguf", "--dtype", "q8_0"])
    out = capsys.readouterr().out
    assert (tmp_path / "run-q8_0.gguf").is_file() and "as GGUF llama (q8_0)" in out and "llama-completion -m" in out
    assert "written f16" in out  # ffn_down's rows of 48 values are not whole q8_0 blocks
    for argv, words in (
        (["export", str(tmp_path / "run"), "--format", "gguf", "--dtype", "q8_0"], "already exists"),
        (["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "f16"], "--dtype applies to --format gguf"),
        (["export", str(tmp_path / "run"), "x.gguf", "--format", "gguf", "--max-shard-size", "1GB"],
         "--max-shard-size applies to --format hf"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


# ----------------------------------------------------------------------------------------------
# llama.cpp itself, through its Python binding (llama-cpp-python, built from source: not in the test
# extra; the test skips without it)


def llama_cpp_model(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = 0  # GGML_TYPE_F32: a float32 key/value cache (the default f16 cache would round attention's inputs)
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, type_k=f32,
                           type_v=f32, flash_attn=False, verbose=False, **kw)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_llama_cpp_runs_the_file_with_lmforge_logits_and_tokens(tmp_path, tok, name):
    pytest.importorskip("llama_cpp")
    ckpt = lmforge_checkpoint(tmp_path, tok, **STYLES[name])
    ours, _, _ = load_model(ckpt)
    torch.manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (48,))
    with torch.no_grad():
        exact = ours(ids[None])[0]
    # measured with llama.cpp 0.3.36's CPU backend: f32 differs by at most 7e-6 (llama) and 2e-3 (gpt2: its GELU
    # reads a float16 table); q8_0 by 0.34 (llama.cpp also rounds the activations to 8 bits), on these random models
    bounds = {("f32", "llama"): 1e-4, ("f32", "gpt2"): 0.01, ("q8_0", "llama"): 0.7, ("q8_0", "gpt2"): 0.7}
    for dtype in ("f32", "q8_0"):
        export_gguf(ckpt, tmp_path / f"{dtype}.gguf", dtype=dtype, log=quiet)
        llm = llama_cpp_model(tmp_path / f"{dtype}.gguf")
        llm.eval(ids.tolist())
        theirs = torch.from_numpy(np.array(llm.scores[:48]))
        assert (exact - theirs).abs().max().item() <= bounds[dtype, name], dtype
        if dtype == "f32":
            assert torch.equal(exact.argmax(-1), theirs.argmax(-1))
            for text in SAMPLES:
                encoded = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                assert encoded == tok.encode(text), text
                assert llm.detokenize(encoded, special=True).decode("utf-8") == tok.decode(encoded), text


def test_llama_cpp_splits_as_llama3(tmp_path):
    pytest.importorskip("llama_cpp")
    tok3 = llama3_tokenizer()
    export_gguf(lmforge_checkpoint(tmp_path, tok3, **STYLES["llama"]), tmp_path / "model.gguf", log=quiet)
    llm = llama_cpp_model(tmp_path / "model.gguf", vocab_only=True)
    for text in SAMPLES[:-1] + ["<|end_of_text|>after the end", "2345 and 452345: digits in threes", "a\n\n  b\tc"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tok3.encode(text), text
