"""Summarization: (document, summary) pairs, scored by ROUGE-1/2/L (rouge-score).

Examples come from JSONL with ``document`` and ``summary`` keys (or a TSV with those columns).
The demo recipe ``summarization-bbc`` writes headlines for BBC news articles
(``../shared/data/summarization``). The yardstick is the lead baseline: the article's first
words as the headline.
"""

from __future__ import annotations

from typing import Sequence

from lmforge.tasks.metrics import lead_sentence, lead_words, rouge
from lmforge.tasks.model import Decoding, TaskModel, load_task_model

NAME = "summarization"


def summarize(task_model: TaskModel, documents: Sequence[str], decoding: Decoding | None = None,
              batch_size: int = 16) -> list[str]:
    """One summary per document."""
    return task_model.generate(documents, decoding, batch_size)


def lead_baseline(documents: Sequence[str], references: Sequence[str], n_words: int | None) -> dict[str, float]:
    """ROUGE of the first ``n_words`` words of each document (its first sentence when ``n_words`` is
    None) against the reference summaries."""
    leads = [lead_sentence(d) if n_words is None else lead_words(d, n_words) for d in documents]
    return rouge(leads, references)


def load(path: str, device: str = "cpu") -> TaskModel:
    """A summarization checkpoint (any other kind is refused with the command that fits it)."""
    return load_task_model(path, expect=NAME, device=device)
