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


# ---------------------------------------------------------------------- byte-level BPE through tiktoken
# The merges run by tiktoken (lmforge.fast_bpe) must give exactly the ids of the tokenizers pipeline.

TRICKY = ["a", "Z", "é", "ß", "ǅ", "Ω", "я", "ש", "ع", "ह", "ि", "한", "日", "本", "語", "，", "。", "１", "٣", "৩",
          "0", "7", "½", "Ⅻ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\u0301",
          "'s", "'S", "'re", "'ll", "'", "!", "?!", "...", "-", "_", "$", "🙂", "👨‍👩‍👧", "🇫🇷", "👍🏽", "1️⃣",
          "\U00010348", "\U00020000", "\x00", "\x7f", "<|endoftext|>", "<|endoftext", "the", " the", "ing"]


@pytest.fixture(scope="module")
def mixed_bpe():
    """Byte-level BPE whose merges span scripts, digits and whitespace runs."""
    pytest.importorskip("tiktoken")
    corpus = [TRAIN_TEXT, *SAMPLES.values(), SAMPLES["chinese"] * 5, SAMPLES["mixed"] * 5,
              "".join(TRICKY) * 20, "  \n\n   x 12345 67 '' \t\t\n" * 10]
    return Tokenizer.train(corpus, "bpe", vocab_size=700, special_tokens=["<|endoftext|>", "<pad>"])


def _pipeline_ids(tok, texts):
    return [enc.ids for enc in tok._hf.encode_batch(texts, add_special_tokens=False)]


def test_fast_bpe_gives_the_pipeline_ids_on_mixed_script_text(mixed_bpe):
    import random

    assert mixed_bpe._fast_encoder() is not None  # the tiktoken path is the one under test
    rng = random.Random(0)
    texts = list(SAMPLES.values()) + [TRAIN_TEXT, "".join(TRICKY), " " * 9 + "x", "x" + "\n" * 5 + " y  "]
    texts += ["".join(rng.choices(TRICKY, k=rng.randint(0, 40))) for _ in range(400)]
    fast = [ids.tolist() for ids in mixed_bpe.encode_arrays(texts)]
    assert fast == _pipeline_ids(mixed_bpe, texts)
    assert mixed_bpe.encode("<pad><|endoftext|>") == [1, 0]


def test_fast_bpe_regex_classes_match_tokenizers():
    """Both regex engines put every code point in the same class of GPT-2's pattern (letter, number,
    space, other): with a merge P + byte for each probe P in "a1!", ``P + c`` starts with that merge
    exactly when c joins P's piece, so equal ids mean equal classes."""
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.fast_bpe import GPT2_PATTERN, unicode_to_byte

    to_char = {b: c for c, b in unicode_to_byte().items()}
    ranks = {bytes([b]): b for b in range(256)}
    merges = []
    for p in b"a1!":
        for b in range(256):
            ranks.setdefault(bytes([p, b]), len(ranks))
            merges.append((to_char[p], to_char[b]))
    vocab = {"".join(to_char[b] for b in token): i for token, i in ranks.items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    enc = tiktoken.Encoding("probe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    # Every code point of planes 0 and 1 (where new scripts and emoji are added), a stride elsewhere.
    points = [c for c in [*range(0x20000), *range(0x20000, 0x110000, 61)] if not 0xD800 <= c < 0xE000]
    texts = ["".join(f"a{chr(c)}1{chr(c)}!{chr(c)}\n" for c in points[i:i + 4096]) for i in range(0, len(points), 4096)]
    assert enc.encode_ordinary_batch(texts, num_threads=2) == _pipeline_ids(Tokenizer(hf), texts)


def test_fast_bpe_refused_where_ids_could_differ(char_tok, mixed_bpe):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.fast_bpe import byte_level_encoder, unicode_to_byte

    assert char_tok._fast_encoder() is None
    # "abc" made from ("ab", "c") although "bc" is merged first: the rules encode "abc" as [a, bc],
    # tiktoken (which emits a piece found whole in the vocabulary) as [abc]. Condition 2 catches it.
    vocab = {c: i for i, c in enumerate(sorted(unicode_to_byte()))}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(hf)
    assert tok.encode("abc") == [vocab["a"], vocab["bc"]]
    assert tok._fast_encoder() is None
    # an added token that is not special (matched after normalization) keeps the general path too
    hf = HFTokenizer.from_str(mixed_bpe._hf.to_str())
    hf.add_tokens([AddedToken("hello", special=False)])
    assert byte_level_encoder(hf) is None

