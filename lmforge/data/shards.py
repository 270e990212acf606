"""Corpus -> tokenizer.json + memory-mapped token shards + meta.json, with bounded memory.

``prepare`` makes three kinds of passes over the corpus, each streaming pieces of at most
``PIECE_BYTES``:

1. count the characters (the train/val cut is a character position) and, for the char
   tokenizer, collect the alphabet;
2. (bpe only, when no matching tokenizer exists) train the tokenizer on the corpus, or on an
   evenly spread sample of it when the corpus is larger than ``BPE_SAMPLE_BYTES``;
3. tokenize the pieces in parallel, a bounded number ahead, and append the ids to the shard files.

The split is by position, as in nanoGPT: the first ``1 - val_fraction`` of the characters are
train, the rest val; for a single file, train = ``encode(text[:int(n * 0.9)])``. With
``data.val_corpus`` the validation text comes from its own files instead, and the whole corpus is
train. The tokenizer learns from the training text only. ``data.convert`` (OpenCC) is applied to
every piece as it is read, so every pass sees the converted text. Each document
ends with the end-of-text token when the tokenizer has special tokens.

Shards are raw little-endian arrays (``uint16`` when the vocabulary has fewer than 65,536
tokens, else ``uint32``) named ``train_000.bin``, ``val_000.bin``, ...; ``meta.json`` is written
last, so its presence means the shards are complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.config import DataConfig
from lmforge.data.sources import SHAKESPEARE, converter, iter_pieces, resolve_corpus
from lmforge.errors import LMForgeError
from lmforge.lock import DirectoryLock
from lmforge.tokenizer import FILE_NAME, Tokenizer

META = "meta.json"
IN_PROGRESS = "prepare.incomplete"  # exists while prepare writes; marks the outputs as not ours to reuse
SPLITS = ("train", "val")
PIECE_BYTES = 1 << 18  # 256 KiB of text per encode task: enough work per task, little memory per batch
BATCH_PIECES = max(8, 4 * (os.cpu_count() or 1))  # pieces read ahead of the writer: keeps every core busy
BPE_SAMPLE_BYTES = 1 << 30  # train byte-level BPE on at most ~1 GiB of text, spread over the corpus


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id (uint16 below 65,536 tokens, else uint32)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to ``{split}_000.bin``, ``{split}_001.bin``, ... of ``shard_tokens`` each."""

    def __init__(self, data_dir: str | Path, split: str, dtype: np.dtype | str, shard_tokens: int):
        if shard_tokens < 1:
            raise LMForgeError(f"data.shard_tokens must be at least 1, got {shard_tokens}")
        self.data_dir, self.split = Path(data_dir), split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._file = None
        self._room = 0  # tokens the open shard can still take

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids do not fit in {self.dtype}")
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while ids.size:
            if self._room == 0:
                self._next_shard()
            head, ids = ids[: self._room], ids[self._room:]
            self._file.write(head.tobytes())
            self._room -= head.size
            self.tokens += head.size

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
            self._file = None
        return {"files": list(self.files), "tokens": self.tokens}

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.files):03d}.bin"
        self._file = open(self.data_dir / name, "wb")
        self.files.append(name)
        self._room = self.shard_tokens


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise LMForgeError(f"no prepared data in {data_dir} (meta.json missing); run `lmforge prepare` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LMForgeError(f"{path} is corrupt; rerun `lmforge prepare`") from None


class TokenDataset:
    """A read-only, memory-mapped view of one split: ``len(ds)`` tokens, ``ds.window(start, length)``."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise LMForgeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.data_dir, self.split = Path(data_dir), split
        self.meta = load_meta(data_dir)
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int | None = self.meta.get("eot_id")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards: list[np.memmap] = []
        for name in self.meta[split]["files"]:
            path = self.data_dir / name
            if not path.is_file():
                raise LMForgeError(f"token shard {path} is missing; rerun `lmforge prepare`")
            if path.stat().st_size % dtype.itemsize:
                raise LMForgeError(f"token shard {path} is truncated; rerun `lmforge prepare`")
            if path.stat().st_size:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        # offsets[i] = index of the first token of shard i; offsets[-1] = total
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if int(self.offsets[-1]) != self.meta[split]["tokens"]:
            raise LMForgeError(f"the {split} shards in {data_dir} hold {int(self.offsets[-1])} tokens, meta.json "
                               f"says {self.meta[split]['tokens']}; rerun `lmforge prepare`")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the {self.split} split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            begin = start + filled - int(self.offsets[shard])
            take = min(length - filled, len(self.shards[shard]) - begin)
            out[filled:filled + take] = self.shards[shard][begin:begin + take]
            filled += take
            shard += 1
        return out


# ---------------------------------------------------------------------- prepare
def fingerprint(cfg: DataConfig) -> dict:
    """What prepared data depends on: each corpus file (as named, size, modification second) and the
    settings. Recorded in meta.json; data prepared from anything else is not reused silently."""
    def files(corpus: list[str]) -> list[list]:
        out = []
        for name in resolve_corpus(corpus):  # fails on a missing path
            if name == SHAKESPEARE:
                out.append([name])
            else:
                st = os.stat(name)
                out.append([name, st.st_size, int(st.st_mtime)])
        return out

    result = {"files": files(cfg.corpus), "tokenizer": _tokenizer_spec(cfg), "val_fraction": cfg.val_fraction,
              "shard_tokens": cfg.shard_tokens}
    if cfg.val_corpus:  # only when used, so data prepared before the option existed is still recognised
        result["val_files"] = files(cfg.val_corpus)
    return result


def check_fingerprint(cfg: DataConfig, meta: dict) -> None:
    """Refuse prepared data whose corpus or settings differ from ``cfg`` (data prepared before
    fingerprints were recorded is taken as it is)."""
    saved = meta.get("fingerprint")
    if saved is None:
        return
    now = json.loads(json.dumps(fingerprint(cfg)))  # the same JSON types as the saved one
    if now != saved:
        what = [key for key in {**saved, **now} if now.get(key) != saved.get(key)]
        detail = {"files": "the corpus files (names, sizes or modification times)", "tokenizer": "the tokenizer settings",
                  "val_fraction": "data.val_fraction", "shard_tokens": "data.shard_tokens",
                  "val_files": "the validation files (data.val_corpus)"}
        raise LMForgeError(
            f"{cfg.data_dir} holds data prepared from other inputs ({', '.join(detail[k] for k in what)} differ); "
            f"use a new data.data_dir, or run `lmforge prepare` with this recipe to prepare it again")


def prepare(cfg: DataConfig, progress: bool = True) -> dict:
    """Tokenize ``cfg.corpus`` into ``cfg.data_dir``; returns the contents of meta.json. The data
    directory is locked meanwhile: another process preparing it waits."""
    with DirectoryLock(cfg.data_dir, "data preparation", wait=True):
        return _prepare(cfg, progress)


def _prepare(cfg: DataConfig, progress: bool) -> dict:
    start = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMForgeError(f"cannot create data_dir {data_dir} ({e.strerror}); choose another data.data_dir") from None
    # fails early on a missing path
    sources = resolve_corpus(cfg.corpus) + (resolve_corpus(cfg.val_corpus) if cfg.val_corpus else [])
    spec = _tokenizer_spec(cfg)
    tokenizer = _reusable_tokenizer(data_dir, spec, progress)
    reused = tokenizer is not None

    # Pass 1: count characters (and learn the alphabet when training a char tokenizer).
    counts = {"chars": 0, "bytes": 0, "documents": 0}
    val_chars = 0
    alphabet: Counter[str] = Counter()
    learn_alphabet = tokenizer is None and cfg.tokenizer == "char"
    with _bar(progress, None, "reading") as bar:
        for split, text, last in _split_pieces(cfg, None):
            n_bytes = len(text.encode("utf-8"))
            counts["chars"] += len(text)
            counts["bytes"] += n_bytes
            counts["documents"] += last
            if split == "val":
                val_chars += len(text)
            elif learn_alphabet:
                alphabet.update(text)
            bar.update(n_bytes)
    if counts["chars"] == val_chars:
        raise LMForgeError(f"the corpus {cfg.corpus} contains no text; give files with some text in them")
    if learn_alphabet:  # the char tokenizer depends only on the characters (and how often they occur)
        kept = "".join(sorted(c for c, n in alphabet.items() if n >= cfg.min_char_count))
        tokenizer = Tokenizer.train([kept], "char", special_tokens=cfg.special_tokens,
                                    byte_fallback=cfg.byte_fallback)

    # Pass 2: byte-level BPE, on an evenly spread sample when the corpus is big.
    if tokenizer is None:
        stride = max(1, -(-counts["bytes"] // BPE_SAMPLE_BYTES))
        _log(progress, f"training byte-level BPE (vocab {cfg.vocab_size}) on "
                       f"{'all' if stride == 1 else f'1/{stride} of'} {counts['bytes'] / 1e6:.1f} MB")
        sample = (text for i, (split, text, _) in enumerate(_split_pieces(cfg, None))
                  if i % stride == 0 and split == "train")
        tokenizer = Tokenizer.train(sample, "bpe", vocab_size=cfg.vocab_size,
                                    special_tokens=cfg.special_tokens, progress=progress)

    # Pass 3: tokenize and write the shards. Old outputs go first so a crash never leaves a stale meta.json.
    (data_dir / IN_PROGRESS).touch()
    for old in [data_dir / META, *data_dir.glob("train_*.bin"), *data_dir.glob("val_*.bin")]:
        old.unlink(missing_ok=True)
    if not reused:
        tokenizer.save(data_dir / FILE_NAME)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(data_dir, split, dtype, cfg.shard_tokens) for split in SPLITS}
    cut = counts["chars"] - val_chars if cfg.val_corpus else int(counts["chars"] * (1 - cfg.val_fraction))
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=np.int64)
    split_chars = {"train": cut, "val": counts["chars"] - cut}
    with _bar(progress, counts["bytes"], f"tokenizing ({tokenizer.kind})") as bar:
        items: deque[tuple[str, str, bool]] = deque()  # the pieces being encoded, oldest first

        def texts() -> Iterator[str]:
            for item in _split_pieces(cfg, cut):
                items.append(item)
                yield item[1]

        for ids in tokenizer.encode_stream(texts(), ahead=BATCH_PIECES):
            split, text, last = items.popleft()
            writers[split].write(ids if not last or eot is None else np.concatenate([ids, eot]))
            bar.update(len(text.encode("utf-8")))
    splits = {split: {**writer.close(), "chars": split_chars[split]} for split, writer in writers.items()}

    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.kind,
        "eot_id": tokenizer.eot_id,
        "special_tokens": tokenizer.special_tokens,
        "corpus": list(cfg.corpus),
        "val_corpus": list(cfg.val_corpus),
        "sources": len(sources),
        "documents": counts["documents"],
        "chars": counts["chars"],
        "bytes": counts["bytes"],
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        **splits,
        "tokenizer_spec": spec,
        "fingerprint": fingerprint(cfg),
    }
    tmp = data_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, data_dir / META)
    (data_dir / IN_PROGRESS).unlink()
    seconds = time.perf_counter() - start
    _log(progress, f"wrote {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
                   f"({dtype.name}, vocab {tokenizer.vocab_size}) to {data_dir} in {seconds:.1f} s "
                   f"({counts['bytes'] / 1e6 / seconds:.1f} MB/s)")
    return meta


def _split_pieces(cfg: DataConfig, cut: int | None) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(split, text, ends_document)``, converted by ``data.convert``. With ``data.val_corpus`` the
    corpus is train and the val corpus val; otherwise the piece holding character ``cut`` is cut in two
    (``cut`` None: everything is train)."""
    convert = converter(cfg.convert) or (lambda text: text)
    pieces = ((convert(text), last) for _, text, last in iter_pieces(cfg.corpus, PIECE_BYTES))
    if cfg.val_corpus or cut is None:
        yield from (("train", text, last) for text, last in pieces)
        if cfg.val_corpus:
            yield from (("val", convert(text), last) for _, text, last in iter_pieces(cfg.val_corpus, PIECE_BYTES))
        return
    pos = 0
    for text, last in pieces:
        if pos + len(text) <= cut:
            yield "train", text, last
        elif pos >= cut:
            yield "val", text, last
        else:
            yield "train", text[: cut - pos], False
            yield "val", text[cut - pos:], last
        pos += len(text)


def _tokenizer_spec(cfg: DataConfig) -> dict:
    """What decides the tokenizer: when it changes, the tokenizer is trained again."""
    spec = {"kind": cfg.tokenizer, "special_tokens": list(cfg.special_tokens), "corpus": list(cfg.corpus)}
    if cfg.tokenizer == "bpe":
        spec["vocab_size"] = cfg.vocab_size
    else:
        spec["byte_fallback"] = cfg.byte_fallback
        if cfg.min_char_count > 1:  # keys added only when set: older specs stay equal
            spec["min_char_count"] = cfg.min_char_count
    if cfg.convert:
        spec["convert"] = cfg.convert
    if cfg.val_corpus:  # the tokenizer learns from the training text, which the val corpus changes
        spec["val_corpus"] = list(cfg.val_corpus)
    return spec


def _reusable_tokenizer(data_dir: Path, spec: dict, progress: bool) -> Tokenizer | None:
    """The tokenizer.json already in data_dir, if it may be used; None means train a new one.

    It is reused when the previous ``prepare`` was made with the same tokenizer settings, or when
    the directory holds a tokenizer.json and nothing else of ours (a tokenizer the user brought).
    """
    file = data_dir / FILE_NAME
    if not file.is_file() or (data_dir / IN_PROGRESS).exists():  # none, or left by an interrupted prepare
        return None
    if (data_dir / META).is_file():
        try:
            previous = json.loads((data_dir / META).read_text(encoding="utf-8")).get("tokenizer_spec")
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        return Tokenizer.load(file) if previous == spec else None
    tokenizer = Tokenizer.load(file)
    _log(progress, f"using the existing {file} ({tokenizer.kind}, vocab {tokenizer.vocab_size})")
    return tokenizer


def _bar(progress: bool, total: int | None, desc: str) -> tqdm:
    # disable=None: bars only on a terminal, so logs and error output stay clean
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                disable=None if progress else True, dynamic_ncols=True, file=sys.stderr)


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)
