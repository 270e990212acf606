"""Translation: (source, target) sentence pairs, scored by BLEU and chrF (sacrebleu).

Examples come from a TSV file whose header names a ``source`` and a ``target`` column, or from
JSONL with those keys. The demo recipe ``translation-bible`` trains English -> Spanish on the
King James Bible and the Reina-Valera (``../shared/data/mt``); ``translation-bible-decoder``
trains the decoder-only design on the same data for comparison.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from lmforge.tasks.metrics import carried_names
from lmforge.tasks.model import Decoding, TaskModel, load_task_model

NAME = "translation"


def translate(task_model: TaskModel, texts: Sequence[str], decoding: Decoding | None = None,
              batch_size: int = 32) -> list[str]:
    """Translate each text (one sentence or verse per text)."""
    return task_model.generate(texts, decoding, batch_size)


def load(path: str, device: str = "cpu") -> TaskModel:
    """A translation checkpoint (any other kind is refused with the command that fits it)."""
    return load_task_model(path, expect=NAME, device=device)


_SYLLABLE = re.compile(r"[^aeiouy]*[aeiouy]+")
_ENDING = re.compile(r"[^aeiouy]*$")


def with_made_up_names(pairs: Sequence[tuple[str, str]], copies: int, seed: int = 0) -> list[tuple[str, str]]:
    """``pairs`` and, for each pair whose target carries names over from its source unchanged
    (:func:`~lmforge.tasks.metrics.carried_names`), ``copies`` more of it with each such name replaced,
    in both texts, by a made-up one (the same within a pair, drawn anew for each copy).

    A model learns to generate the names its training pairs hold and to copy no others; a test text
    from another book names other people. The made-up names are strung from the syllables and
    endings of the names themselves (``Harbona`` -> ``har``, ``bo``, ``na``), so they read as names
    and split into word pieces as rare names do, and none is a word of the pairs; a model trained
    on them has to copy a name it has never seen, piece by piece. Seeded: the same pairs each time.
    """
    pairs = list(pairs)
    if copies <= 0:
        return pairs
    carried = [carried_names(s, t) for s, t in pairs]
    names = sorted(set().union(*carried))
    if not names:
        return pairs
    syllables = sorted({syl for n in names for syl in _SYLLABLE.findall(n.lower()) if syl.isalpha()})
    endings = sorted({e for n in names if (e := _ENDING.search(n.lower()).group()).isalpha() or not e})
    if not syllables:  # names without a vowel (acronyms): nothing to string new ones from
        return pairs
    known = {w.lower() for s, t in pairs for w in re.findall(r"\w+", s + " " + t)}
    rng = random.Random(seed)

    def made_up() -> str | None:
        for _ in range(1000):
            name = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))) + rng.choice(endings)
            if len(name) > 2 and name not in known:
                return name.capitalize()
        return None  # too few syllables to make a new name from

    out = list(pairs)
    for (source, target), found in zip(pairs, carried):
        if not found:
            continue
        # longest first, so that "Beth-lehem" is replaced whole before "Beth" could be
        pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(found, key=len, reverse=True))) + r")(?!\w)")
        for _ in range(copies):
            new = {n: made_up() for n in sorted(found)}
            if None in new.values():
                continue
            out.append((pattern.sub(lambda m: new[m.group(1)], source), pattern.sub(lambda m: new[m.group(1)], target)))
    return out
