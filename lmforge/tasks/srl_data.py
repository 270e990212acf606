"""Semantic role labelling data: CoNLL-U Plus as in Universal PropBank, a document split, and the scorer.

Columns 1-10 are CoNLL-U; column 11 is the predicate sense (``_`` if none); then one argument
column per predicate, in sentence order, with labels (ARG0-ARG5, ARGM-*, C-/R- prefixed, V) on
the argument's head word. Quirks of the Universal PropBank files, kept as they are: a sentence
without predicates has one empty 12th field; ``# propbank = no-up`` sentences are not annotated
(empty 11th and 12th fields; they are left out of training and scoring); empty nodes (ids like
``8.1``) are not words and are passed through untouched. :func:`write_conllu` of
:func:`read_conllu` gives the file back byte for byte.

Scoring is CoNLL-2009 style, on dependencies: precision, recall and F1 of (predicate, argument
head word, label) triples (``V`` is not an argument), plus predicate identification and senses.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError

NONE = "_"


@dataclass
class Sentence:
    """One sentence: comment lines and token rows (fields split on tabs), as read."""

    comments: list[str]
    rows: list[list[str]]
    line: int = 0  # line number of the first token row (for messages)
    path: str = ""
    row_lines: list[int] = field(default_factory=list)

    # ---------------------------------------------------------------- views
    @property
    def word_rows(self) -> list[int]:
        """Indices of the rows that are words (integer ids; not empty nodes or multiword ranges)."""
        return [i for i, r in enumerate(self.rows) if r[0].isdigit()]

    @property
    def words(self) -> list[str]:
        return [self.rows[i][1] for i in self.word_rows]

    @property
    def lemmas(self) -> list[str]:
        return [self.rows[i][2] if self.rows[i][2] not in ("", NONE) else self.rows[i][1].lower()
                for i in self.word_rows]

    @property
    def annotated(self) -> bool:
        return not any(c.strip().replace(" ", "") == "#propbank=no-up" for c in self.comments)

    @property
    def sent_id(self) -> str:
        for c in self.comments:
            if c.startswith("# sent_id ="):
                return c.split("=", 1)[1].strip()
        return ""

    @property
    def predicates(self) -> list[int]:
        """Word indices of the predicates, in sentence order."""
        return [w for w, i in enumerate(self.word_rows) if self.rows[i][10] not in ("", NONE)]

    @property
    def senses(self) -> list[str]:
        return [self.rows[self.word_rows[w]][10] for w in self.predicates]

    def arguments(self) -> list[list[str]]:
        """Per predicate: the label of every word (``_`` = none)."""
        n = len(self.predicates)
        return [[self.rows[i][11 + k] for i in self.word_rows] for k in range(n)]

    def with_predictions(self, predicates: list[int], senses: list[str], labels: list[list[str]]) -> "Sentence":
        """A copy whose column 11 and argument columns hold the given predicates, senses and labels."""
        words = self.word_rows
        sense_of = dict(zip(predicates, senses))
        rows = []
        for i, r in enumerate(self.rows):
            base = (r + [NONE] * 10)[:10]
            if i in words:
                w = words.index(i)
                rows.append(base + [sense_of.get(w, NONE)] + ([col[w] for col in labels] if labels else [""]))
            else:  # an empty node: keep its first ten fields
                rows.append(base + ["", ""])
        return Sentence(list(self.comments), rows, self.line, self.path)


def read_conllu(path: str | Path) -> list[Sentence]:
    """Sentences of a CoNLL-U Plus file, checked: every word row has 11 columns plus one argument
    column per predicate of its sentence."""
    p = Path(path)
    if not p.is_file():
        raise LMForgeError(f"file {p} not found; give a CoNLL-U Plus file (Universal PropBank format)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{p} is not UTF-8 ({e}); convert it to UTF-8") from None
    sentences: list[Sentence] = []
    comments: list[str] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 0

    def flush() -> None:
        nonlocal comments, rows, lines
        if rows:
            sentences.append(_check(Sentence(comments, rows, start, str(p), lines)))
        elif comments:
            raise LMForgeError(f"{p}:{start}: comment lines without token rows; remove them or add the sentence")
        comments, rows, lines = [], [], []

    for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), start=1):
        if not line.strip():
            flush()
            continue
        if line.startswith("#"):
            if rows:
                raise LMForgeError(f"{p}:{n}: a comment inside a sentence; put a blank line before it")
            if not comments:
                start = n
            comments.append(line)
            continue
        if not rows and not comments:
            start = n
        fields = line.split("\t")
        if len(fields) < 10:
            raise LMForgeError(f"{p}:{n}: {len(fields)} tab-separated columns; a CoNLL-U Plus row needs at least 11 "
                               "(10 CoNLL-U columns, the predicate sense, then one argument column per predicate)")
        rows.append(fields)
        lines.append(n)
    flush()
    if not sentences:
        raise LMForgeError(f"{p} holds no sentences; give a CoNLL-U Plus file")
    return sentences


def _check(s: Sentence) -> Sentence:
    words = s.word_rows
    if not words:
        raise LMForgeError(f"{s.path}:{s.line}: a sentence without word rows; give each sentence integer-id rows")
    for k, i in enumerate(words, start=1):  # word ids run 1, 2, 3, ... within a sentence
        if int(s.rows[i][0]) != k:
            raise LMForgeError(f"{s.path}:{s.row_lines[i]}: word id {s.rows[i][0]} where {k} was expected "
                               "(ids repeated, skipped or out of order); number the words 1, 2, 3, ... per sentence")
    if not s.annotated:
        return s
    for i in words:
        if len(s.rows[i]) < 11:
            raise LMForgeError(f"{s.path}:{s.row_lines[i]}: {len(s.rows[i])} columns; a row needs 11 "
                               "(10 CoNLL-U columns and the predicate sense) plus one argument column per predicate")
    n_pred = len(s.predicates)
    for i in words:
        n_args = len(s.rows[i]) - 11
        if n_args != n_pred and not (n_pred == 0 and n_args == 1 and s.rows[i][11] == ""):
            raise LMForgeError(f"{s.path}:{s.row_lines[i]}: {n_args} argument columns but the sentence has {n_pred} "
                               f"predicates (column 11); give one argument column per predicate, in sentence order")
    return s


def write_conllu(sentences: list[Sentence], path: str | Path | None = None) -> str:
    """The CoNLL-U Plus text of the sentences (written to ``path`` when given)."""
    out = "".join("".join(c + "\n" for c in s.comments) + "".join("\t".join(r) + "\n" for r in s.rows) + "\n"
                  for s in sentences)
    if path is not None:
        Path(path).write_text(out, encoding="utf-8")
    return out


def document_id(s: Sentence) -> str:
    """The document a sentence belongs to: its sent_id without the trailing -NNNN."""
    sid = s.sent_id
    return sid.rsplit("-", 1)[0] if "-" in sid else sid


def split_by_document(sentences: list[Sentence], valid_fraction: float = 0.2) -> tuple[list[Sentence], list[Sentence]]:
    """(train, valid): whole documents go to valid when the CRC-32 of their id falls in the first
    ``valid_fraction`` of its range, so the split is fixed by the ids alone."""
    train, valid = [], []
    for s in sentences:
        h = zlib.crc32(document_id(s).encode("utf-8")) / 2 ** 32
        (valid if h < valid_fraction else train).append(s)
    return train, valid


# ------------------------------------------------------------------------------------------------ scoring


def _triples(sentences: list[Sentence]):
    args, preds, senses = set(), set(), set()
    for n, s in enumerate(sentences):
        if not s.annotated:
            continue
        columns = s.arguments()
        for k, (p, sense) in enumerate(zip(s.predicates, s.senses)):
            preds.add((n, p))
            senses.add((n, p, sense))
            for w, label in enumerate(columns[k]):
                if label not in (NONE, "", "V"):
                    args.add((n, p, w, label))
    return args, preds, senses


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "correct": tp, "predicted": n_pred, "gold": n_gold}


def score(gold: list[Sentence], pred: list[Sentence]) -> dict[str, Any]:
    """Precision/recall/F1 of argument triples (overall and per label), predicate identification,
    senses, and the CoNLL-2009 labelled score (arguments and senses counted together)."""
    if len(gold) != len(pred):
        raise LMForgeError(f"{len(pred)} predicted sentences for {len(gold)} gold ones; score files of the same sentences")
    for n, (g, p) in enumerate(zip(gold, pred)):
        if g.words != p.words:
            raise LMForgeError(f"sentence {n + 1} ({g.sent_id or g.line}) has other words in the prediction; "
                               "score files of the same sentences")
    pred = [p if g.annotated else g for g, p in zip(gold, pred)]
    ga, gp, gs = _triples(gold)
    pa, pp, ps = _triples(pred)
    per_label = {}
    for label in sorted({t[3] for t in ga | pa}):
        g_l = {t for t in ga if t[3] == label}
        p_l = {t for t in pa if t[3] == label}
        per_label[label] = _prf(len(g_l & p_l), len(p_l), len(g_l))
    return {
        "arguments": _prf(len(ga & pa), len(pa), len(ga)),
        "predicates": _prf(len(gp & pp), len(pp), len(gp)),
        "senses": _prf(len(gs & ps), len(ps), len(gs)),
        "conll2009": _prf(len(ga & pa) + len(gs & ps), len(pa) + len(ps), len(ga) + len(gs)),
        "per_label": per_label,
    }


def format_score(scores: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    for key in ("arguments", "predicates", "senses", "conll2009"):
        s = scores[key]
        lines.append(f"{key:<12} P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  "
                     f"({s['correct']}/{s['predicted']} predicted, {s['gold']} gold)")
    lines.append(f"{'label':<12}{'P':>8}{'R':>8}{'F1':>8}{'gold':>7}")
    for label, s in scores["per_label"].items():
        lines.append(f"{label:<12}{s['precision']:>8.4f}{s['recall']:>8.4f}{s['f1']:>8.4f}{s['gold']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m lmforge.tasks.srl_data split FILE OUT_DIR [VALID_FRACTION]``: write
    OUT_DIR/<stem>.train.conllu and .valid.conllu, split by document."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "split":
        print(main.__doc__, file=sys.stderr)
        sys.exit(2)
    path, out = Path(argv[1]), Path(argv[2])
    train, valid = split_by_document(read_conllu(path), float(argv[3]) if len(argv) > 3 else 0.2)
    out.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".conllu")
    write_conllu(train, out / f"{stem}.train.conllu")
    write_conllu(valid, out / f"{stem}.valid.conllu")
    print(f"{out / (stem + '.train.conllu')}: {len(train)} sentences; {out / (stem + '.valid.conllu')}: {len(valid)}")


if __name__ == "__main__":
    main()
