"""Corpus metrics from the reference libraries: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score).

BLEU and chrF are corpus-level with sacrebleu's defaults (13a tokenization, one reference per
segment), so the numbers compare with published sacrebleu scores. ROUGE is the mean over
examples of each example's F-measure, with the Porter stemmer (as in most summarization papers).
"names" (translation) is the share of names carried over as they are: of the capitalised words
of each reference (its first word aside) that its source also contains, spelt alike, the share
its output contains. All scores are on a 0-100 scale.
"""

from __future__ import annotations

import re

from typing import Sequence

from lmforge.errors import LMForgeError

METRICS = ("bleu", "chrf", "names", "rouge1", "rouge2", "rougeL")

_WORD = re.compile(r"\w+(?:[-'’]\w+)*")


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise LMForgeError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                           "give one of each per example")
    if not references:
        raise LMForgeError("no examples to score; give at least one hypothesis and reference")


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise LMForgeError("BLEU and chrF need the sacrebleu package; install it with "
                           "pip install 'lmforge[tasks]' (or pip install sacrebleu)") from None
    return sacrebleu


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    sacrebleu = _sacrebleu()
    _check(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    sacrebleu = _sacrebleu()
    _check(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LMForgeError("ROUGE needs the rouge-score package; install it with "
                           "pip install 'lmforge[tasks]' (or pip install rouge-score)") from None
    _check(hypotheses, references)
    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(hypotheses, references):
        for kind, value in scorer.score(ref, hyp).items():  # score(target, prediction)
            totals[kind] += value.fmeasure
    return {kind: 100.0 * total / len(references) for kind, total in totals.items()}


def carried_names(source: str, target: str) -> set[str]:
    """The names a target carries over from its source unchanged: its capitalised words (its first
    word aside, which any sentence capitalises) that the source also contains, spelt alike."""
    return {w for w in _WORD.findall(target)[1:] if w[0].isupper()} & set(_WORD.findall(source))


def names_kept(sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Of the names each reference carries over from its source unchanged (capitalised words past
    the reference's first that the source also contains), the share (0-100) the hypothesis has
    too; None when no reference carries any."""
    _check(hypotheses, references)
    kept = total = 0
    for source, hyp, ref in zip(sources, hypotheses, references):
        names = carried_names(source, ref)
        kept += len(names & set(_WORD.findall(hyp)))
        total += len(names)
    return 100.0 * kept / total if total else None


def score(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[str],
          sources: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics in ``names`` (any of METRICS) of the hypotheses against the references; "names"
    needs the sources and is left out when no reference carries a name over."""
    out: dict[str, float] = {}
    for name in names:
        if name not in METRICS:
            raise LMForgeError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
    if "bleu" in names:
        out["bleu"] = bleu(hypotheses, references)
    if "chrf" in names:
        out["chrf"] = chrf(hypotheses, references)
    if "names" in names and sources is not None and (kept := names_kept(sources, hypotheses, references)) is not None:
        out["names"] = kept
    if any(n.startswith("rouge") for n in names):
        out.update(rouge(hypotheses, references))
    return out


def lead_sentence(document: str) -> str:
    """The first sentence of a document (up to the first . ! or ? followed by white space, or the
    first line break): the other lead baseline of headline generation."""
    first_line = document.strip().split("\n", 1)[0]
    return " ".join(re.split(r"(?<=[.!?])\s+", first_line, maxsplit=1)[0].split())


def lead_words(document: str, n_words: int) -> str:
    """The first ``n_words`` words of a document: the lead baseline of headline generation."""
    return " ".join(document.split()[:n_words])
