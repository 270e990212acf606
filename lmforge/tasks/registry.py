"""The one task registry: name -> objective, default recipe, metrics, and the command that uses its checkpoints.

Adding a task means one new file (its objective, a subclass of
:class:`lmforge.train.objective.Objective`) and one row here; ``lmforge finetune``, the inference
commands and ``lmforge eval`` read this table. Objectives are imported only when used, so reading
the table costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    #: "module:Class" of the objective
    objective: str
    #: the recipe ``lmforge finetune NAME`` uses without -c
    recipe: str
    #: scores reported on validation and test files; the first is logged and drawn during training
    metrics: tuple[str, ...]
    #: the command that puts a checkpoint of this task to work
    command: str
    #: default TSV columns / JSON keys of the input and the output
    source_key: str = "source"
    target_key: str = "target"

    def make_objective(self):
        module, cls = self.objective.split(":")
        return getattr(importlib.import_module(module), cls)()

    def defaults(self) -> dict:
        """Recipe values every recipe of this task starts from."""
        return {"task": {"name": self.name, "source_key": self.source_key, "target_key": self.target_key,
                         "metric": self.metrics[0]}}


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("lm", "lmforge.tasks.lm:LanguageModel", "shakespeare-char", ("perplexity",), "generate"),
    TaskSpec("translation", "lmforge.tasks.seq2seq:SequenceToSequence", "translation-bible", ("bleu", "chrf", "names"),
             "translate"),
    TaskSpec("summarization", "lmforge.tasks.seq2seq:SequenceToSequence", "summarization-bbc",
             ("rouge1", "rouge2", "rougeL"), "summarize", "document", "summary"),
    TaskSpec("sentiment", "lmforge.tasks.sentiment:Sentiment", "sentiment-tiny", ("macro_f1", "accuracy"), "classify",
             "text", "label"),
    TaskSpec("srl", "lmforge.tasks.srl:SemanticRoles", "srl-tiny", ("f1",), "srl", "text", "label"),
)}

#: tasks trained with ``lmforge finetune`` (the language model trains with ``lmforge train``)
FINETUNE_TASKS = tuple(name for name in TASKS if name != "lm")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise LMForgeError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def finetune(cfg, resume: bool = False) -> dict:
    """Train ``cfg.task.name``'s objective with the one trainer; returns the run's summary."""
    from lmforge.train.trainer import fit

    return fit(cfg, get_task(cfg.task.name).make_objective(), resume)
