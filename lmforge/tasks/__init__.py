"""Objectives for the one trainer, and putting their checkpoints to work.

``registry`` lists every task (name -> objective, recipe, metrics, command). One file per
objective: ``lm`` (next token), ``mlm`` (masked tokens), ``seq2seq`` (translation, summarization),
``sentiment`` (text classification), ``srl`` (semantic role labelling); ``head`` holds what the
two head tasks share. Helpers: ``data`` (reading, lengths, token batches), ``format`` (model
inputs, loss), ``metrics``, ``model`` (task checkpoints: texts in, outputs out), ``translation``,
``summarization``.
"""

from lmforge.tasks.registry import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "get_task"]
