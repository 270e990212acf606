"""Text <-> token ids: a character-level tokenizer and byte-level BPE, both stored as ``tokenizer.json``.

Both kinds are Hugging Face ``tokenizers`` pipelines, so the saved file loads unchanged in
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.

* ``bpe``: GPT-2 style byte-level BPE. Text is split with the GPT-2 regex, each piece is mapped to
  bytes and merged by the learned merge rules. Any UTF-8 text round-trips.
* ``char``: one token per character, as in nanoGPT's shakespeare_char. Built as a BPE model with
  no merges whose vocabulary is the distinct characters of the training text. With
  ``byte_fallback`` the 256 tokens ``<0x00>`` ... ``<0xFF>`` are added (as Llama does), so a
  character never seen in training is encoded as its UTF-8 bytes and still round-trips.

Byte-level BPE is encoded by ``tiktoken`` running the same merges when it is installed and its ids are
provably the same (:mod:`lmforge.fast_bpe`), several times faster; else by ``tokenizers``.

Vocabulary order: special tokens first (so the end-of-text token is id 0 when there is one),
then the byte tokens (char with byte_fallback), then the characters in code point order. With
no special tokens and no byte fallback the ids are exactly nanoGPT's ``sorted(set(text))``.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LMForgeError

FILE_NAME = "tokenizer.json"
KINDS = ("char", "bpe")


def byte_token(b: int) -> str:
    """The name of the fallback token for byte ``b`` (Llama's spelling, e.g. ``<0x0A>``)."""
    return f"<0x{b:02X}>"


def _frame(post: dict | None, hf: HFTokenizer) -> tuple[int | None, int | None]:
    """The first special token before and after the text in a ``tokenizer.json`` post-processor."""
    kind = (post or {}).get("type")
    if kind == "Sequence":
        frames = [_frame(p, hf) for p in post.get("processors") or []]
        return next((f for f in frames if f != (None, None)), (None, None))
    if kind in ("BertProcessing", "RobertaProcessing"):
        return hf.token_to_id(post["cls"][0]), hf.token_to_id(post["sep"][0])
    if kind != "TemplateProcessing":
        return None, None
    before, after, seen = [], [], False
    for piece in post.get("single") or []:
        if "Sequence" in piece:
            seen = True
        elif "SpecialToken" in piece:
            (after if seen else before).append(hf.token_to_id(piece["SpecialToken"]["id"]))
    return (before[0] if before else None), (after[0] if after else None)


class Tokenizer:
    """A trained tokenizer: ``encode`` / ``decode`` / ``save`` / ``load`` around a Hugging Face pipeline."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        spec = json.loads(hf.to_str())
        model = spec.get("model") or {}
        # A BPE model without merges maps every character to itself: that is the char tokenizer.
        is_char = model.get("type") == "BPE" and not model.get("merges")
        self.kind: str = "char" if is_char else "bpe"
        self.byte_fallback: bool = bool(model.get("byte_fallback")) if is_char else True
        added = sorted(hf.get_added_tokens_decoder().items())
        self.special_tokens: list[str] = [t.content for _, t in added if t.special]
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.eot_id: int | None = hf.token_to_id(self.special_tokens[0]) if self.special_tokens else None
        self._char_table = self._build_char_table() if is_char else None
        self._fast_bpe: object = None if is_char else _UNCHECKED  # see _fast_encoder
        self._model_spec = {k: model.get(k) for k in ("type", "continuing_subword_prefix")}
        self._pieces: tuple[frozenset[int], frozenset[int]] | None = None  # see _word_pieces
        #: (start id, end id) its post-processor puts around a single text: [CLS] ... [SEP] (BERT),
        #: <s> ... </s> (RoBERTa, MPNet); None for either where there is none
        self.frame: tuple[int | None, int | None] = _frame(spec.get("post_processor"), hf)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "char", vocab_size: int = 2048,
              special_tokens: Sequence[str] = ("<|endoftext|>",), byte_fallback: bool = True,
              *, progress: bool = False) -> Tokenizer:
        """Learn a tokenizer from an iterable of strings (consumed once, streamed)."""
        if kind not in KINDS:
            raise LMForgeError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
            raise LMForgeError(f"special tokens must be distinct non-empty strings, got {special_tokens}")
        if kind == "char":
            return cls._train_char(texts, special_tokens, byte_fallback)
        return cls._train_bpe(texts, vocab_size, special_tokens, progress)

    @classmethod
    def _train_char(cls, texts: Iterable[str], special_tokens: list[str], byte_fallback: bool) -> Tokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise LMForgeError("cannot train a tokenizer on empty text; give a corpus that contains text")
        tokens = list(special_tokens)
        if byte_fallback:
            tokens += [byte_token(b) for b in range(256)]
        tokens += sorted(chars - set(tokens))  # code point order, as nanoGPT's sorted(set(text))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=byte_fallback))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
        return cls(hf)

    @classmethod
    def _train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str],
                   progress: bool) -> Tokenizer:
        if vocab_size < 256 + len(special_tokens):
            raise LMForgeError(
                f"vocab_size {vocab_size} is too small for byte-level BPE; use at least 256 + {len(special_tokens)}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in special_tokens],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=progress,
        )
        seen_text = False

        def watch(it: Iterable[str]):
            nonlocal seen_text
            for text in it:
                seen_text = seen_text or bool(text)
                yield text

        hf.train_from_iterator(watch(texts), trainer)
        if not seen_text:
            raise LMForgeError("cannot train a tokenizer on empty text; give a corpus that contains text")
        return cls(hf)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the one inside a directory."""
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise LMForgeError(f"tokenizer file {file} not found; "
                               "run `lmforge prepare` or give the path of a tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON or schema
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LMForgeError(f"{file} is not a valid tokenizer.json ({first}); "
                               "recreate it with `lmforge prepare`") from None
        tokenizer = cls(hf)
        tokenizer._use_configured_eos(file.with_name("tokenizer_config.json"))
        return tokenizer

    def _use_configured_eos(self, config: Path) -> None:
        """A Hugging Face ``tokenizer_config.json`` beside the file (an imported model's) may name the
        end-of-text token; Llama's ``</s>`` is not its first special token, so take it from there."""
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and self._hf.token_to_id(eos) is not None:
            self.eot_id = self._hf.token_to_id(eos)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (to ``path`` itself if it ends in .json, else inside the directory ``path``)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / FILE_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        self._hf.save(str(tmp))
        os.replace(tmp, file)  # a reader never sees a half-written file

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts, spread over all cores."""
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like :meth:`encode_batch` but returns int64 numpy arrays (no Python int per token)."""
        fast = self._fast_encoder()
        if fast is not None:
            return list(self._encode_fast_bpe(fast, texts, ahead=len(texts)))
        out: list[np.ndarray | None] = [None] * len(texts)
        slow: list[int] = []
        for i, text in enumerate(texts):
            ids = self._encode_chars_fast(text) if self._char_table is not None else None
            if ids is None:
                slow.append(i)
            else:
                out[i] = ids
        if slow:
            # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not use
            encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            encodings = encode([texts[i] for i in slow], add_special_tokens=False)
            for i, enc in zip(slow, encodings):
                ids = np.array(enc.ids, dtype=np.int64)
                if self.kind == "char" and not self.byte_fallback:
                    self._check_known_chars(texts[i])
                out[i] = ids
        return out  # type: ignore[return-value]

    def encode_stream(self, texts: Iterable[str], ahead: int = 8) -> Iterator[np.ndarray]:
        """Encode texts one after another (as :meth:`encode_arrays`), yielding each in order.

        At most ``ahead`` texts are read before their ids are taken, so memory stays bounded
        for any number of texts, while all cores keep encoding.
        """
        fast = self._fast_encoder()
        if fast is not None:
            yield from self._encode_fast_bpe(fast, texts, ahead)
            return
        texts = iter(texts)
        while batch := list(islice(texts, ahead)):
            yield from self.encode_arrays(batch)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise LMForgeError(f"token id {bad} is outside the vocabulary (size {self.vocab_size}); "
                               "use ids produced by this tokenizer")
        return self._hf.decode(ids, skip_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` with each token's (start, end) character span in ``text``."""
        enc = self._hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def word_initial_ids(self) -> frozenset[int]:
        """Ids of the tokens that begin a word and hold a letter or digit: a WordPiece's tokens without
        its continuation mark (``##``); a BPE's or unigram's tokens that start with the space mark
        (``Ġ`` byte-level, ``▁`` SentencePiece). Empty for a character-level tokenizer, whose tokens
        are letters, and special tokens are never included."""
        return self._word_pieces()[0]

    def continuation_ids(self) -> frozenset[int]:
        """Ids of the pieces that continue the word before them: a WordPiece's ``##`` tokens, a BPE's
        or unigram's tokens without the space mark, each starting with a letter or digit. Empty for a
        character-level tokenizer; special tokens are never included."""
        return self._word_pieces()[1]

    def _word_pieces(self) -> tuple[frozenset[int], frozenset[int]]:
        if self._pieces is None:
            special = set(self._hf.get_added_tokens_decoder())
            initial, continues = set(), set()
            wordpiece = self._model_spec["type"] == "WordPiece"
            mark = (self._model_spec["continuing_subword_prefix"] or "##") if wordpiece else ""
            for t, i in ({} if self.kind == "char" else self._hf.get_vocab()).items():
                if i in special:
                    continue
                if wordpiece and t.startswith(mark):
                    if t[len(mark):][:1].isalnum():
                        continues.add(i)
                elif wordpiece or t[:1] in ("Ġ", "▁"):
                    if any(c.isalnum() for c in (t if wordpiece else t[1:])):
                        initial.add(i)
                elif t[:1].isalnum():
                    continues.add(i)
            self._pieces = (frozenset(initial), frozenset(continues))
        return self._pieces

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens}, byte_fallback={self.byte_fallback})")

    # ------------------------------------------------------------------ byte-level BPE fast path
    def _fast_encoder(self):
        """tiktoken running this tokenizer's merges, when its ids are provably the same (see
        :mod:`lmforge.fast_bpe`); None otherwise. Checked once, on the first encode."""
        if self._fast_bpe is _UNCHECKED:
            from lmforge.fast_bpe import byte_level_encoder

            self._fast_bpe = byte_level_encoder(self._hf)
        return self._fast_bpe

    @staticmethod
    def _encode_fast_bpe(encoder, texts: Iterable[str], ahead: int) -> Iterator[np.ndarray]:
        """Encode with tiktoken straight into numpy, one text per thread (it releases the GIL); a
        text's ids are yielded as soon as it and those before it are done, so no core waits for a batch."""
        def one(text: str) -> np.ndarray:
            return encoder.encode_to_numpy(text, allowed_special="all").astype(np.int64)

        threads = _cores()
        if threads <= 1 or ahead <= 1:
            yield from map(one, texts)
            return
        with ThreadPoolExecutor(threads) as pool:
            pending: deque = deque()
            for text in texts:
                pending.append(pool.submit(one, text))
                if len(pending) >= max(ahead, threads):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    # ------------------------------------------------------------------ char fast path
    def _build_char_table(self) -> np.ndarray:
        """Code point -> id lookup for single-character tokens; -1 marks characters not in the vocabulary."""
        singles = {tok: i for tok, i in self._hf.get_vocab(with_added_tokens=False).items() if len(tok) == 1}
        size = max((ord(c) for c in singles), default=0) + 2  # the last entry stays -1 for larger code points
        table = np.full(size, -1, dtype=np.int64)
        for c, i in singles.items():
            table[ord(c)] = i
        return table

    def _encode_chars_fast(self, text: str) -> np.ndarray | None:
        """One id per character by table lookup, or None when the full pipeline is needed.

        The Rust BPE walks a no-merge vocabulary at only a few MB/s, while a table lookup over the
        UTF-32 code points runs at tens of MB/s on one core. The result is identical (tested); texts
        holding a special token or an unknown character take the general path.
        """
        if any(s in text for s in self.special_tokens):
            return None
        table = self._char_table
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = table[np.minimum(codepoints, len(table) - 1)]
        if ids.size and ids.min() < 0:
            return None
        return ids

    def _check_known_chars(self, text: str) -> None:
        for s in self.special_tokens:
            text = text.replace(s, "")
        vocab = self._hf.get_vocab(with_added_tokens=False)
        unknown = sorted({c for c in set(text) if c not in vocab})
        if unknown:
            shown = "".join(unknown[:10])
            raise LMForgeError(f"text holds {len(unknown)} character(s) missing from the char vocabulary "
                               f"({shown!r}); retrain the tokenizer with byte_fallback=true or on this text")


_UNCHECKED = object()  # the fast byte-level encoder has not been looked for yet


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class StreamDecoder:
    """Turns ids into text one at a time without ever emitting half of a multi-byte character.

    Byte tokens (and byte-level BPE pieces) can end in the middle of a UTF-8 character; the decoded
    text then ends in U+FFFD. Such ids are held back until the character is complete. Once the held
    ids decode cleanly they are emitted and forgotten, so each push costs only a few ids of decoding.
    """

    MAX_HELD = 8  # a UTF-8 character has at most 4 bytes; past this the bytes are invalid: emit them

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.held: list[int] = []

    def push(self, token_id: int) -> str:
        self.held.append(int(token_id))
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd") and len(self.held) < self.MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text
