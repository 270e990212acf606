"""Output text recovered from the source where the tokenizer lost case and spacing (an uncased
WordPiece, as BERT's), and left as decoded where it lost nothing (byte-level BPE)."""

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from lmforge.tasks.surface import lossless, surface_text
from lmforge.tokenizer import Tokenizer

SOURCE = ("Wal-Mart is being sued over $28bn, says Yukos' owner. It's \"great\" (really) in the U.S., "
          "and it is late. The owner's boss said so.")


@pytest.fixture(scope="module")
def wordpiece():
    """An uncased BERT-style WordPiece tokenizer: lower-cases, splits at punctuation, ## pieces."""
    words = ["[UNK]", "wal", "-", "mart", "is", "being", "sued", "over", "$", "28", "##bn", ",", "says", "yu", "##kos",
             "'", "owner", ".", "it", "s", '"', "great", "(", "really", ")", "in", "the", "u", "and", "late",
             "rude", "lyrics", "30", "claims", "of", "boss"]
    hf = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    return Tokenizer(hf)


@pytest.mark.parametrize("output, expected", [
    ("wal-mart sued over rude lyrics", "Wal-Mart sued over rude lyrics"),      # case and hyphen from the source
    ("yukos owner sued $ 28bn", "Yukos owner sued $28bn"),                     # "$28bn" joined as in the source
    ("the owner of yukos says it is great", "The owner of Yukos says it is great"),  # "It" opens a sentence only
    ("u. s. boss sued over $ 30bn claims", "U.S. boss sued over $30bn claims"),
    ("great , really", "Great, really"),                                       # generated punctuation glued
    ("great ' s boss", "Great's boss"),                                       # "'s" attached as in the source
    ("wal-mart ' great lyrics '", "Wal-Mart 'great lyrics'"),                  # a pair of quotes around words
    ("rude lyrics ' sued", "Rude lyrics' sued"),                               # alone after "s": possessive
    ("wal-mart ' sued", "Wal-Mart sued"),                                      # alone after another word: dropped
    ("wal-mart ' great ' lyrics ' sued", "Wal-Mart 'great' lyrics' sued"),
    ("' great ' owner ' sued", "'Great' owner sued"),
    ("it ' great", "It great"),                     # the source's "It's" copied up to its mark: the mark alone
    ("it ' s great", "It's great"),                                            # ... and in full, as written
    ('" rude lyrics " sued', '"Rude lyrics" sued'),                            # first letter after the mark
    ("wal-mart ' sued ' over ' rude ' lyrics", "Wal-Mart 'sued' over 'rude' lyrics"),
    ("mart - owner sued", "Mart-owner sued"),                # a hyphen against one word only joins both
    ("wal - sued", "Wal-sued"),                              # (the copied run "Wal-" ends at the hyphen)
    ("owner sued -", "Owner sued"),                          # a hyphen at either end is dropped
    ("- owner sued", "Owner sued"),
])
def test_surface_from_source(wordpiece, output, expected):
    ids = wordpiece.encode(output)
    assert wordpiece.decode(ids) != expected  # the plain decoding has lost it
    assert surface_text(wordpiece, SOURCE, ids) == expected


def test_continuation_piece_joins_the_word_before(wordpiece):
    ids = wordpiece.encode("yukos") + [wordpiece.token_to_id("##bn")]
    assert surface_text(wordpiece, SOURCE, ids) == "Yukosbn"


def test_lossless_tokenizer_output_is_its_decoding():
    text = "Wal-Mart is sued over $28bn. ¿Qué? 你好"
    tok = Tokenizer.train([text * 3], kind="bpe", vocab_size=300)
    assert lossless(tok, text)
    ids = tok.encode("sued over $28bn. wal")
    assert surface_text(tok, text, ids) == tok.decode(ids).strip() == "sued over $28bn. wal"


def test_word_initial_ids(wordpiece):
    """no_repeat_words' tokens: WordPiece words without ## and punctuation; BPE's space-marked words."""
    names = {wordpiece.id_to_token(i) for i in wordpiece.word_initial_ids()}
    assert {"wal", "mart", "yu", "28", "owner"} <= names
    assert not names & {"##bn", "##kos", "-", "$", "'", ","}
    bpe = Tokenizer.train(["the owner sued the owner over lyrics, and the owner paid. " * 20], kind="bpe",
                          vocab_size=300)
    words = {bpe.id_to_token(i) for i in bpe.word_initial_ids()}
    assert "Ġowner" in words and all(w.startswith("Ġ") and w[1:].strip(",.") for w in words)
    assert not words & set(bpe.special_tokens)
    char = Tokenizer.train(["abc abc"], kind="char")
    assert char.word_initial_ids() == frozenset()


def test_continuation_ids(wordpiece):
    """source_words' pieces: WordPiece's ## pieces that start with a letter or digit; BPE's pieces
    without the space mark; none for a character-level tokenizer."""
    pieces = {wordpiece.id_to_token(i) for i in wordpiece.continuation_ids()}
    assert {"##bn", "##kos"} <= pieces and all(p.startswith("##") for p in pieces)
    assert not pieces & wordpiece.word_initial_ids()
    bpe = Tokenizer.train(["the owner sued the owner over lyrics, and the owner paid. " * 20], kind="bpe",
                          vocab_size=300)
    pieces = {bpe.id_to_token(i) for i in bpe.continuation_ids()}
    assert pieces and all(p[:1].isalnum() for p in pieces)
    assert not pieces & {bpe.id_to_token(i) for i in bpe.word_initial_ids()} and not pieces & set(bpe.special_tokens)
    assert "," not in pieces
    char = Tokenizer.train(["abc abc"], kind="char")
    assert char.continuation_ids() == frozenset()


def test_possessive_quote_the_source_does_not_have(wordpiece):
    ids = wordpiece.encode("owner ' s lyrics sued")
    assert surface_text(wordpiece, "Rude lyrics were sued.", ids) == "Owner's lyrics sued"
    ids = wordpiece.encode("lyrics ' s boss sued")  # after a word ending in "s": the mark alone
    assert surface_text(wordpiece, "Rude lyrics were sued.", ids) == "Lyrics' boss sued"
    ids = wordpiece.encode("yukos ' s boss")  # "Yukos' owner" in the source: the run stops before its mark
    assert surface_text(wordpiece, SOURCE, ids) == "Yukos' boss"
