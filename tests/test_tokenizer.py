"""Tokenizer: exact round trips, nanoGPT's char vocabulary, files, transformers compatibility, streaming."""

import json
import time
from pathlib import Path

import pytest

from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer, byte_token

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

TRAIN_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?\n",
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n中文文本，混合 English 和数字 123。",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin tone 👍🏽, keycap 1️⃣ 🙂",
    "control": "\x00\x01\x02\x07\x08\t\n\x0b\x0c\r\n\x1b[31m\x7f\x80\x9f end\u200b\u2028\ufeff",
    "mixed": "Ünïcödé ñ café naïve Ωμέγα русский עברית العربية हिन्दी 한국어 日本語 \U0001f600\U00010348",
    "special": "doc one<|endoftext|>doc two<|endoftext|>",
    "spaces": "   leading and trailing   \n\n\n\t\t  ",
    "empty": "",
}


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train([TRAIN_TEXT], "char")


@pytest.fixture(scope="module")
def bpe_tok():
    return Tokenizer.train([TRAIN_TEXT, SAMPLES["chinese"]], "bpe", vocab_size=400)


@pytest.fixture(params=["char", "bpe"])
def tok(request, char_tok, bpe_tok):
    return char_tok if request.param == "char" else bpe_tok


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(tok, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_batch(tok):
    texts = list(SAMPLES.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_char_vocab_layout(char_tok):
    chars = sorted(set(TRAIN_TEXT))
    assert char_tok.kind == "char" and char_tok.byte_fallback
    assert char_tok.vocab_size == 1 + 256 + len(chars)
    assert char_tok.eot_id == 0 and char_tok.id_to_token(0) == "<|endoftext|>"
    assert [char_tok.id_to_token(1 + b) for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    # one id per known character, in code point order after the special and byte tokens
    assert char_tok.encode(TRAIN_TEXT[:300]) == [257 + chars.index(c) for c in TRAIN_TEXT[:300]]
    # an unseen character falls back to its UTF-8 bytes
    assert char_tok.encode("é") == [1 + b for b in "é".encode()]


def test_char_fast_path_matches_pipeline(char_tok):
    """The table lookup used for speed must give what the Hugging Face pipeline gives."""
    for text in [TRAIN_TEXT, TRAIN_TEXT + "é漢🙂", "x<|endoftext|>y", ""]:
        assert char_tok.encode(text) == char_tok._hf.encode(text, add_special_tokens=False).ids


def test_char_vocab_tinyshakespeare_is_nanogpt():
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"{TINY_SHAKESPEARE} not present")
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tok = Tokenizer.train([text], "char", special_tokens=[], byte_fallback=False)
    chars = sorted(set(text))  # nanoGPT data/shakespeare_char/prepare.py
    stoi = {c: i for i, c in enumerate(chars)}
    assert tok.vocab_size == len(chars) == 65
    assert [tok.id_to_token(i) for i in range(65)] == chars
    assert tok.eot_id is None and tok.special_tokens == []
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_char_without_byte_fallback_refuses_unknown_characters():
    tok = Tokenizer.train(["abc\n"], "char", special_tokens=[], byte_fallback=False)
    assert tok.vocab_size == 4
    assert tok.encode("cab\n") == [3, 1, 2, 0]  # "\n" < "a" < "b" < "c"
    with pytest.raises(LMForgeError, match="byte_fallback"):
        tok.encode("abcd")


def test_char_encode_one_megabyte_is_fast(char_tok):
    text = (TRAIN_TEXT * (1_000_000 // len(TRAIN_TEXT) + 1))[:1_000_000]
    start = time.perf_counter()
    ids = char_tok.encode_arrays([text])[0]
    elapsed = time.perf_counter() - start
    assert len(ids) == 1_000_000
    assert elapsed < 1.0, f"char encoding of 1 MB took {elapsed:.2f} s"


def test_special_tokens(tok):
    assert tok.special_tokens == ["<|endoftext|>"]
    assert tok.eot_id == 0
    ids = tok.encode("a<|endoftext|>b")
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_several_special_tokens_come_first():
    tok = Tokenizer.train([TRAIN_TEXT], "bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<sep>"])
    assert [tok.token_to_id(s) for s in ["<|endoftext|>", "<pad>", "<sep>"]] == [0, 1, 2]
    assert tok.special_tokens == ["<|endoftext|>", "<pad>", "<sep>"]


def test_bpe_learns_merges(bpe_tok):
    assert bpe_tok.kind == "bpe"
    assert bpe_tok.vocab_size == 400  # the requested size, specials and 256 byte symbols included
    text = SAMPLES["english"] + TRAIN_TEXT[:200]
    assert len(bpe_tok.encode(TRAIN_TEXT[:500])) < 0.5 * len(TRAIN_TEXT[:500].encode())
    assert len(bpe_tok.encode(text)) < len(text.encode())


def test_bpe_pieces_give_the_same_ids_as_the_whole(bpe_tok):
    """Pieces cut after a newline followed by a non-space give the ids of the uncut text."""
    text = TRAIN_TEXT[:2000]
    cuts = [i + 1 for i, c in enumerate(text[:-1]) if c == "\n" and not text[i + 1].isspace()]
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert sum(bpe_tok.encode_batch(pieces), []) == bpe_tok.encode(text)


def test_training_errors():
    with pytest.raises(LMForgeError, match="empty"):
        Tokenizer.train([], "char")
    with pytest.raises(LMForgeError, match="empty"):
        Tokenizer.train(["", ""], "bpe", vocab_size=300)
    with pytest.raises(LMForgeError, match="too small"):
        Tokenizer.train([TRAIN_TEXT], "bpe", vocab_size=100)
    with pytest.raises(LMForgeError, match="kind"):
        Tokenizer.train([TRAIN_TEXT], "wordpiece")
    with pytest.raises(LMForgeError, match="distinct"):
        Tokenizer.train([TRAIN_TEXT], "char", special_tokens=["<a>", "<a>"])


def test_decode_refuses_foreign_ids(char_tok):
    with pytest.raises(LMForgeError, match="outside the vocabulary"):
        char_tok.decode([1, char_tok.vocab_size])


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)  # a directory: writes tokenizer.json inside
    assert (tmp_path / "tokenizer.json").is_file()
    tok.save(tmp_path / "copy.json")  # an explicit file name
    for source in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "copy.json"):
        loaded = Tokenizer.load(source)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id, loaded.byte_fallback) == \
               (tok.kind, tok.vocab_size, tok.eot_id, tok.byte_fallback)
        for text in SAMPLES.values():
            assert loaded.encode(text) == tok.encode(text)
    json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))  # plain JSON


def test_load_errors(tmp_path):
    with pytest.raises(LMForgeError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(LMForgeError, match="not found"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LMForgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(LMForgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_transformers_loads_the_file(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in SAMPLES.values():
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text
    assert len(hf) == tok.vocab_size


def test_stream_decoder_concatenates_to_decode(tok):
    for text in SAMPLES.values():
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_stream_decoder_holds_partial_characters():
    tok = Tokenizer.train(["abc"], "char")
    ids = tok.encode("a🙂b")  # the emoji is unseen: four byte tokens
    assert ids[1:5] == [tok.token_to_id(byte_token(b)) for b in "🙂".encode()]
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "🙂", "b"]
    assert stream.flush() == ""
    # bytes that never form a character are still emitted (as U+FFFD), at the latest on flush
    stream = tok.stream_decoder()
    assert stream.push(ids[1]) == ""
    assert stream.flush() == "\ufffd"
