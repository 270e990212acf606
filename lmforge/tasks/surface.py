"""The written form of a generated output, recovered from its source where the tokenizer lost it.

A lossy tokenizer (an uncased WordPiece, as BERT's and MiniLM's) lower-cases the text and splits
it at punctuation, so its decoding reads ``wal - mart sued over $ 28bn``. A summary copies most of
its words from the article, and the article still has them as written. :func:`surface_text`
writes every run of output tokens that the source contains, as the source has it
(``Wal-Mart``, ``$28bn``), joined to its neighbours as the source joins them; the tokens no
source run holds are decoded by the tokenizer, continuation pieces (``##bn``) glued to the word
before them and punctuation to the word it follows; the first letter is capitalised when the
first word is lower-case. A word the source capitalises only where it opens a sentence, and writes
in lower case elsewhere, is copied in lower case. A quotation mark the output has on its own is
placed by its role, not by the spacing of some occurrence in the source (a copied run keeps a
mark only inside it, as in ``O'Neill`` or ``Yukos's``): before ``s`` it is the possessive
(``Labour's``, and ``MPs'`` after a word ending in ``s``); otherwise marks pair up from the left,
each pair around the words between them (``Blair 'will not quit'``), and a last mark without a
partner is the possessive of a word ending in ``s`` (``Yukos' owner``) or, after any other word,
dropped: headlines have no other lone quotation mark. A hyphen written against one word only
(``Net- spam``, where a copied run ended at the source's ``Net-``) joins both (``Net-spam``), and
one at either end of the output is dropped: headlines join a hyphen on both sides or space it on
both (``Blunkett row should end - Blair``).

A tokenizer that gives a source back as it was (byte-level BPE, a cased SentencePiece) loses
nothing: its decoding is the output text, untouched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

#: a generated piece starting with one of these is glued to the text before it
_CLOSING = tuple(",.;:!?%)]}")
#: text ending with one of these is glued to the piece after it
_OPENING = tuple("$£€#([{")
#: WordPiece's mark of a piece that continues a word
_CONTINUES = "##"
#: quotation marks, placed by their role (see the module)
_QUOTES = ("'", '"')
_POSSESSIVE = re.compile(r"s\b")
_SPACE_BEFORE_CLOSING = re.compile(r"\s+([,.;:!?%)\]}])")
_SPACE_AFTER_OPENING = re.compile(r"([$£€#(\[{])\s+")
_ONE_SIDED_HYPHEN = re.compile(r"(?<=\w)- (?=\w)|(?<=\w) -(?=\w)")
_END_HYPHEN = re.compile(r"^[\s-]*-\s*|\s*-[\s-]*$")


def lossless(tokenizer, text: str, ids: Sequence[int] | None = None) -> bool:
    """Whether the tokenizer gives ``text`` back exactly from its tokens (``ids``, when already encoded)."""
    return tokenizer.decode(tokenizer.encode(text) if ids is None else ids) == text


def _sentence_start(source: str, start: int) -> bool:
    before = source[:start].rstrip()
    return not before or before[-1] in ".!?:;\"'\n"


def _runs(output: Sequence[int], source: Sequence[int], starts: Sequence[bool],
          quotes: frozenset[int] = frozenset()) -> list[tuple[int, int, int]]:
    """Segments of the output as (output start, length, source start or -1): at each position the
    longest run of tokens that also stands in the source (the first occurrence that does not open a
    sentence, where there is one: its case is the word's own), else one token. A run neither starts
    nor ends with a token of ``quotes``: those stand alone there, to be placed by their role."""
    where = defaultdict(list)
    for p, t in enumerate(source):
        where[t].append(p)
    segments, i = [], 0
    while i < len(output):
        best, at = 0, -1
        for p in where.get(output[i], ()):
            n = 0
            while i + n < len(output) and p + n < len(source) and source[p + n] == output[i + n]:
                n += 1
            if output[i] in quotes:
                n = min(n, 1)
            while n > 1 and output[i + n - 1] in quotes:
                n -= 1
            if n > best or (n == best and n and starts[at] and not starts[p]):
                best, at = n, p
        segments.append((i, max(best, 1), at))
        i += max(best, 1)
    return segments


def surface_text(tokenizer, source: str, output: Sequence[int]) -> str:
    """The text of output token ids, written as the source writes what it copies (see the module)."""
    output = [int(t) for t in output]
    src_ids, offsets = tokenizer.encode_offsets(source)
    if lossless(tokenizer, source, src_ids):
        return tokenizer.decode(output).strip()
    starts = [_sentence_start(source, a) for a, _ in offsets]
    lower_words = {w for w in re.findall(r"\w+", source) if w.islower()}
    parts: list[tuple[str, bool]] = []  # (text, glued to what comes before)
    generated: list[int] = []  # consecutive tokens no source run holds, decoded together

    def flush() -> None:
        if generated:
            text = tokenizer.decode(generated).strip().removeprefix(_CONTINUES)
            text = _SPACE_AFTER_OPENING.sub(r"\1", _SPACE_BEFORE_CLOSING.sub(r"\1", text))
            first = tokenizer.id_to_token(generated[0]) or ""
            parts.append((text, first.startswith(_CONTINUES) or text.startswith(_CLOSING)))
            generated.clear()

    quotes = frozenset(i for i in map(tokenizer.token_to_id, _QUOTES) if i is not None)
    for start, n, at in _runs(output, src_ids, starts, quotes):
        first = tokenizer.id_to_token(output[start]) or ""
        if n == 1 and first in _QUOTES:
            flush()
            parts.append((first, False))  # placed by _joined
            continue
        if at < 0:
            generated.append(output[start])
            continue
        flush()
        text = source[offsets[at][0]:offsets[at + n - 1][1]]
        word = re.match(r"\w+", text)
        if starts[at] and word and word.group().lower() in lower_words and word.group()[1:].islower():
            text = text[0].lower() + text[1:]  # capitalised only as a sentence's first word
        # joined in the source to the token the output has just before it ("$" + "28bn", "Yukos" + "'")
        joined = (at > 0 and start > 0 and src_ids[at - 1] == output[start - 1]
                  and offsets[at - 1][1] == offsets[at][0])
        # punctuation the source writes against the word before it ("'s", ",") stays against it
        attached = offsets[at][0] > 0 and not source[offsets[at][0] - 1].isspace() and not text[0].isalnum()
        parts.append((text, joined or attached or first.startswith(_CONTINUES) or text.startswith(_CLOSING)))
    flush()
    return _capitalised(_END_HYPHEN.sub("", _ONE_SIDED_HYPHEN.sub("-", _joined(parts))))


def _joined(parts: list[tuple[str, bool]]) -> str:
    """The parts' texts, spaced as marked, with lone quotation marks placed by role (see the module)."""
    parts = [p for p in parts if p[0]]
    possessive = {k for k, (text, _) in enumerate(parts)
                  if text in _QUOTES and k + 1 < len(parts) and _POSSESSIVE.match(parts[k + 1][0])}
    for k in sorted(possessive):
        if k > 0 and parts[k - 1][0].endswith("s"):  # "MPs' ", never "MPs's"
            parts[k + 1] = (parts[k + 1][0][1:].lstrip(), False)
    quotes = [k for k, (text, _) in enumerate(parts) if text in _QUOTES and k not in possessive]
    opening = set(quotes[0:len(quotes) - 1:2])  # pairs from the left
    if len(quotes) % 2 and not (quotes[-1] > 0 and parts[quotes[-1] - 1][0].endswith("s")):
        parts[quotes[-1]] = ("", True)  # a last one alone: only a possessive after "s" stays
    out, glue_next = "", False
    for k, (text, glued) in enumerate(parts):
        if not text:
            continue
        if text in _QUOTES:
            glued = k not in opening
        elif k - 1 in possessive and _POSSESSIVE.match(text):  # (not when its s was dropped after an s)
            glued = True  # the possessive 's
        if out and not glued and not glue_next and not out.endswith(_OPENING):
            out += " "
        out += text
        glue_next = k in opening
    return out


def _capitalised(out: str) -> str:
    """The first letter in upper case when the first word is all lower case."""
    words = out.split(" ", 1)
    first = next((i for i, c in enumerate(words[0]) if c.isalpha()), None)
    if first is not None and words[0] == words[0].lower():
        out = out[:first] + out[first].upper() + out[first + 1:]
    return out
