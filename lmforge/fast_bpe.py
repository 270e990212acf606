"""The same byte-level BPE, run by ``tiktoken``: several times faster, with provably identical ids.

``tokenizers`` applies the merge *rules* in order: it repeatedly merges the adjacent pair ``(a, b)``
whose rule comes first (leftmost on ties). ``tiktoken`` instead merges the adjacent pair whose
*concatenation* is the token of lowest rank, whatever pair it was made from, and emits a whole
pre-token directly when it is in the vocabulary. For the same merges (token rank = rule order)
the two agree on every input when:

1. each multi-byte token comes from exactly one rule, and token ids increase with rule order;
2. every token, encoded alone by the rules, gives itself back (``model.tokenize(t) == [t]``).

Why 2 is enough: suppose the rules ever leave two adjacent symbols ``u``, ``v`` whose concatenation
is a token ``t`` although ``(u, v)`` is not its rule (only then can tiktoken act differently). The
boundaries on either side of ``uv`` exist from the start, so no merge ever crosses them, and the
rules inside them run exactly as they would on ``t`` alone: encoding ``t`` alone would stop at
``[u, v]``, against 2. So every pair tiktoken may merge is a rule, of the same rank, and both pick
the same pair at each step (lowest rank, then leftmost); a pre-token found whole in the
vocabulary encodes to itself by 2. The text is split the same way as well: the same GPT-2 pattern
(``tests/test_tokenizer.py`` checks both regex engines put every Unicode code point in the same
class) and the same special tokens, matched before the split.

:func:`byte_level_encoder` checks all of this on a trained ``tokenizer.json`` and returns ``None``
for anything else (another pre-tokenizer, a normalizer, dropout, added tokens that are not plain
special tokens, tiktoken not installed): those tokenizers keep the ``tokenizers`` path.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

# GPT-2's split pattern, as the ByteLevel pre-tokenizer of ``tokenizers`` uses it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table used by byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def byte_level_encoder(hf: Any) -> Any | None:
    """A ``tiktoken.Encoding`` giving the same ids as the ``tokenizers`` pipeline ``hf``, or None."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(hf.to_str())
    special = _plain_special_tokens(spec)
    ranks = _ranks_if_equivalent(hf, spec, set(special)) if special is not None else None
    if ranks is None:
        return None
    return tiktoken.Encoding("lmforge-byte-level-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def _plain_special_tokens(spec: dict) -> dict[str, int] | None:
    """Special token -> id when the pipeline is exactly the byte-level BPE lmforge trains, else None."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
            or not pre.get("use_regex", True)):
        return None
    if (model.get("type") != "BPE" or model.get("dropout") is not None or model.get("unk_token") is not None
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("byte_fallback") or model.get("ignore_merges")):
        return None
    special = {}
    for token in spec.get("added_tokens") or []:
        if not token.get("special") or token.get("normalized") or token.get("lstrip") or token.get("rstrip") \
                or token.get("single_word") or not token.get("content"):
            return None
        special[token["content"]] = token["id"]
    # tiktoken tries the special tokens in no fixed order, tokenizers the longest first: they agree
    # only when no special token starts another one.
    if any(a != b and b.startswith(a) for a in special for b in special):
        return None
    return special


def _ranks_if_equivalent(hf: Any, spec: dict, special: set[str]) -> dict[bytes, int] | None:
    """Token bytes -> id when conditions 1 and 2 of the module docstring hold, else None."""
    to_byte = unicode_to_byte()
    ranks: dict[bytes, int] = {}
    for token, i in spec["model"]["vocab"].items():
        if token in special:
            continue
        if any(c not in to_byte for c in token):
            return None
        ranks[bytes(to_byte[c] for c in token)] = i
    if len(ranks) != len(spec["model"]["vocab"]) - len(special & set(spec["model"]["vocab"])):
        return None  # two tokens with the same bytes
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    vocab = spec["model"]["vocab"]
    previous = -1
    produced = set()
    for merge in spec["model"]["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        i = vocab.get(a + b)
        if i is None or i <= previous or a + b in produced:  # condition 1
            return None
        previous = i
        produced.add(a + b)
    if len(produced) != sum(len(t) > 1 for t in ranks):
        return None  # a multi-byte token that no rule makes
    model = hf.model
    for token in produced:  # condition 2
        pieces = model.tokenize(token)
        if len(pieces) != 1 or pieces[0].value != token:
            return None
    return ranks
