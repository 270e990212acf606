"""Sentiment analysis (any text classification): TSV ``text``/``label`` in, a label and probabilities out.

``lmforge finetune sentiment --train a.tsv --valid b.tsv --init-from CKPT`` puts a
:class:`~lmforge.model.heads.SequenceClassifier` on a trunk and trains it (the :class:`Sentiment` objective);
``lmforge classify CKPT "text"`` labels texts. Scores: accuracy, macro-F1, per-class precision,
recall and F1, and the confusion matrix (``confusion.png`` in the run directory).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.model.heads import SequenceClassifier, Special, pad_batch
from lmforge.tasks.head import HeadObjective, load_head_checkpoint, to_device

NAME = "sentiment"


# ------------------------------------------------------------------------------------------------ data


def read_labelled(path: str | Path, text_key: str = "text", label_key: str = "label",
                  with_labels: bool = True) -> list[tuple[str, str | None, str]]:
    """(text, label, "file:line") rows of a TSV file with a header row. Unquoted fields, split on tabs."""
    p = Path(path)
    if not p.is_file():
        raise LMForgeError(f"file {p} not found; give a TSV file with a header row ({text_key}<TAB>{label_key})")
    rows = []
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise LMForgeError(f"{p} is empty; give a TSV file with a header row ({text_key}<TAB>{label_key})")
        for key in (text_key,) + ((label_key,) if with_labels else ()):
            if key not in header:
                raise LMForgeError(f"{p}:1: no column {key!r} in the header {header}; name the columns "
                                   f"{text_key} and {label_key} (or set task.source_key / task.target_key)")
        ti = header.index(text_key)
        li = header.index(label_key) if label_key in header else None
        for fields in reader:
            line = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise LMForgeError(f"{p}:{line}: {len(fields)} fields but the header has {len(header)}; "
                                   "one tab between fields, no tabs inside a field")
            text = fields[ti].strip()
            label = fields[li].strip() if li is not None else None
            if not text:
                raise LMForgeError(f"{p}:{line}: the {text_key} field is empty; give a text or remove the line")
            if with_labels and not label:
                raise LMForgeError(f"{p}:{line}: the {label_key} field is empty; give a label or remove the line")
            rows.append((text, label, f"{p}:{line}"))
    if not rows:
        raise LMForgeError(f"{p} holds no examples below its header; add rows of {text_key}<TAB>{label_key}")
    return rows


def label_names(rows) -> list[str]:
    """Sorted distinct labels; at least two."""
    names = sorted({label for _, label, _ in rows})
    if len(names) < 2:
        raise LMForgeError(f"the training file has only the label {names}; a classifier needs two or more")
    return names


def encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids with the trunk's special tokens around them, cut to max_len tokens."""
    special = Special.from_tokenizer(tokenizer)
    room = max_len - special.room
    return [special.wrap(ids[:room]) for ids in tokenizer.encode_batch(texts)]


def make_examples(rows, tokenizer, labels: list[str], max_len: int) -> list[dict]:
    index = {name: i for i, name in enumerate(labels)}
    for text, label, where in rows:
        if label not in index:
            raise LMForgeError(f"{where}: label {label!r} is not one of the model's labels {labels}; "
                               "fix the label or add examples of it to the training file")
    ids = encode(tokenizer, [t for t, _, _ in rows], max_len)
    return [{"ids": i, "label": index[label], "text": text} for i, (text, label, _) in zip(ids, rows)]


# --------------------------------------------------------------------------------------------- metrics


def classification_scores(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows = gold label, columns = predicted label)."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(n))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    total = max(len(gold), 1)
    return {"accuracy": sum(confusion[i][i] for i in range(n)) / total, "macro_f1": sum(f1s) / n,
            "per_class": per_class, "confusion": confusion, "labels": labels, "examples": len(gold)}


def format_scores(scores: dict[str, Any]) -> str:
    lines = [f"accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} ({scores['examples']} examples)",
             f"{'label':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, s in scores["per_class"].items():
        lines.append(f"{name:<16}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>9}")
    return "\n".join(lines)


def plot_confusion(scores: dict[str, Any], path: str | Path, title: str = "confusion matrix") -> Path:
    """PNG of the confusion matrix, counts in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, m = scores["labels"], scores["confusion"]
    size = 2.5 + 0.6 * len(labels)
    fig = Figure(figsize=(size + 1, size), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max(max(r) for r in m) or 1
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------- the task


@torch.no_grad()
def predict_ids(model, examples: list[dict], pad: int, batch_size: int = 64) -> torch.Tensor:
    """Probabilities [N, n_labels], in the order of ``examples`` (batched by length for speed)."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
    out = torch.empty(len(examples), model.classifier.out_features)
    for s in range(0, len(order), batch_size):
        rows = order[s: s + batch_size]
        ids, mask = pad_batch([examples[i]["ids"] for i in rows], pad)
        out[rows] = F.softmax(model(ids.to(device), mask.to(device)).float(), -1).cpu()
    return out


def build_classifier(trunk, cfg: Config) -> SequenceClassifier:
    return SequenceClassifier(trunk, len(cfg.task.labels), cfg.task.pooling, dropout=cfg.task.head_dropout)


class Sentiment(HeadObjective):
    """A label per text (TSV text/label): cross-entropy of the label; accuracy and macro-F1."""

    def head(self, trunk, cfg: Config):
        return build_classifier(trunk, cfg)

    train_file_help = "TSV with columns text and label"

    def read_file(self, path: str) -> list:
        task = self.run.cfg.task
        return read_labelled(path, task.source_key, task.target_key)

    def fill_labels(self, cfg: Config) -> None:
        cfg.task.labels = label_names(self.train_rows)

    def examples(self, tokenizer):
        cfg = self.run.cfg
        task = cfg.task
        self.pad = Special.from_tokenizer(tokenizer).pad
        max_len = min(task.max_source_len, cfg.model.block_size)
        train = make_examples(self.train_rows, tokenizer, task.labels, max_len)
        valid = make_examples(self.valid_rows, tokenizer, task.labels, max_len) if self.valid_rows else None
        self.run.say(f"labels: {', '.join(task.labels)}; train {len(train):,}, valid {len(valid or []):,}")
        return train, valid

    def collate(self, examples: list[dict]) -> dict:
        ids, mask = pad_batch([e["ids"] for e in examples], self.pad)
        return {"ids": ids, "mask": mask, "labels": torch.tensor([e["label"] for e in examples]),
                "examples": examples, "count": len(examples)}

    def loss(self, model, batch) -> torch.Tensor:
        batch = to_device(batch, self.run.device)
        return F.cross_entropy(model(batch["ids"], batch["mask"]).float(), batch["labels"], reduction="sum")

    def scores(self, model, valid: list[dict]) -> dict[str, Any]:
        probs = predict_ids(model, valid, self.pad)
        return classification_scores([e["label"] for e in valid], probs.argmax(-1).tolist(), self.run.cfg.task.labels)

    def final_report(self, model, summary: dict[str, Any]) -> None:
        import time

        run, task = self.run, self.run.cfg.task
        start = time.perf_counter()
        probs = predict_ids(model, self.valid, self.pad)
        seconds = time.perf_counter() - start
        scores = classification_scores([e["label"] for e in self.valid], probs.argmax(-1).tolist(), task.labels)
        scores["examples_per_second"] = len(self.valid) / max(seconds, 1e-9)
        summary["valid"] = scores
        run.say(format_scores(scores))
        try:
            summary["confusion_png"] = str(plot_confusion(scores, run.out_dir / "confusion.png",
                                                          f"{Path(task.valid_file).name}: confusion matrix"))
        except Exception as e:  # a missing plot must not lose a finished run
            run.say(f"could not draw the confusion matrix: {e}")


# -------------------------------------------------------------------------------------------- inference


class Classifier:
    """A trained classifier: texts in, (label, {label: probability}) out."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.model, self.cfg, self.tokenizer = load_head_checkpoint(path, NAME, device)
        self.labels = self.cfg.task.labels
        self.max_len = min(self.cfg.task.max_source_len, self.cfg.model.block_size)

    def __call__(self, texts: list[str], batch_size: int = 64) -> list[tuple[str, dict[str, float]]]:
        for i, t in enumerate(texts):
            if not t.strip():
                raise LMForgeError(f"input {i + 1} is empty; give a non-empty text")
        examples = [{"ids": ids} for ids in encode(self.tokenizer, texts, self.max_len)]
        probs = predict_ids(self.model, examples, Special.from_tokenizer(self.tokenizer).pad, batch_size)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append((self.labels[best], dict(zip(self.labels, row))))
        return out


def print_predictions(texts: list[str], results, file=None, as_json: bool = False) -> None:
    import json

    file = file or sys.stdout

    for text, (label, probs) in zip(texts, results):
        if as_json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}), file=file)
        else:
            shown = " ".join(f"{k}={v:.3f}" for k, v in probs.items())
            print(f"{label}\t{shown}\t{text}", file=file)
