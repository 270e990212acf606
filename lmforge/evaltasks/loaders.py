"""The datasets of the tasks in this folder, read from the user's local files (``custom_dataset`` in
their YAMLs). lm-evaluation-harness calls each loader with the task's metadata, where ``lmforge
eval`` put the data file of every task under ``lmforge_data``."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.evaltasks import DATA_KEY, TASKS


def _data_file(task: str, metadata: dict) -> Path:
    path = (metadata.get(DATA_KEY) or {}).get(task)
    if not path:
        raise LMForgeError(f"task {task} reads a local file, and none was given; pass --data {task}=FILE "
                           f"({TASKS[task]})")
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"the data file of task {task}, {path}, does not exist; give an existing file "
                           f"({TASKS[task]})")
    return path


def _dataset(task: str, path: Path, docs: list[dict]):
    import datasets

    if not docs:
        raise LMForgeError(f"{path} holds no example for task {task}; give {TASKS[task]}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _documents(path: Path) -> list[str]:
    """The documents of a text file (the whole file) or a JSONL file (its "text" fields), read as
    ``lmforge eval --file`` and the training data read them."""
    from lmforge.data.sources import iter_pieces

    docs, parts = [], []
    for _, text, last in iter_pieces([str(path)]):
        parts.append(text)
        if last:
            docs.append("".join(parts))
            parts = []
    return docs


def choice(**metadata):
    """lmforge_choice: {"question", "choices", "label"} per JSONL line."""
    path = _data_file("lmforge_choice", metadata)
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise LMForgeError(f"{path}:{lineno} is not valid JSON ({e}); give one JSON object a line") from None
        ok = (isinstance(doc, dict) and isinstance(doc.get("question"), str)
              and isinstance(doc.get("choices"), list) and len(doc["choices"]) >= 2
              and all(isinstance(c, str) and c for c in doc["choices"])
              and isinstance(doc.get("label"), int) and not isinstance(doc["label"], bool)
              and 0 <= doc["label"] < len(doc["choices"]))
        if not ok:
            raise LMForgeError(f"{path}:{lineno} is not a question; give {TASKS['lmforge_choice']}, with at least "
                               "two non-empty choices and label the index of the right one")
        docs.append({"question": doc["question"], "choices": doc["choices"], "label": doc["label"]})
    return _dataset("lmforge_choice", path, docs)


def cloze(**metadata):
    """lmforge_cloze: each passage (a line of text, or a JSONL document) cut before its last word; passages
    of one word are skipped."""
    path = _data_file("lmforge_cloze", metadata)
    passages = _documents(path) if path.suffix.lower() == ".jsonl" else path.read_text(
        encoding="utf-8-sig").splitlines()
    docs = []
    for passage in passages:
        passage = passage.strip()
        words = passage.split()
        if len(words) < 2:
            continue
        cut = passage.rindex(words[-1])  # the target keeps the space before it, as lm-eval's LAMBADA does
        cut = len(passage[:cut].rstrip())
        docs.append({"context": passage[:cut], "target": passage[cut:]})
    return _dataset("lmforge_cloze", path, docs)


def perplexity(**metadata):
    """lmforge_perplexity: one document per text file, one per JSONL line."""
    path = _data_file("lmforge_perplexity", metadata)
    return _dataset("lmforge_perplexity", path, [{"text": d} for d in _documents(path) if d])
