"""Translation: (source, target) sentence pairs, scored by BLEU and chrF (sacrebleu).

Examples come from a TSV file whose header names a ``source`` and a ``target`` column, or from
JSONL with those keys. The demo recipe ``translation-bible`` trains English -> Spanish on the
King James Bible and the Reina-Valera (``../shared/data/mt``); ``translation-bible-decoder``
trains the decoder-only design on the same data for comparison.
"""

from __future__ import annotations

from typing import Sequence

from lmforge.tasks.model import Decoding, TaskModel, load_task_model

NAME = "translation"


def translate(task_model: TaskModel, texts: Sequence[str], decoding: Decoding | None = None,
              batch_size: int = 32) -> list[str]:
    """Translate each text (one sentence or verse per text)."""
    return task_model.generate(texts, decoding, batch_size)


def load(path: str, device: str = "cpu") -> TaskModel:
    """A translation checkpoint (any other kind is refused with the command that fits it)."""
    return load_task_model(path, expect=NAME, device=device)
