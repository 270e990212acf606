"""Tasks built on the language model's layers, trainer and tokenizer: translation and summarization.

Each task reads (source, target) examples from TSV or JSONL, trains an encoder-decoder
(``model.arch=seq2seq``) or a decoder-only model on "source <sep> target" (``model.arch=decoder``)
with ``lmforge finetune``, decodes with greedy or beam search, and scores with the standard
metric libraries. Modules: ``data`` (reading, lengths, token batches), ``format`` (model inputs,
loss), ``beam`` (search), ``metrics``, ``model`` (loading, texts in / texts out), ``trainer``,
``translation``, ``summarization``.
"""

from lmforge.tasks import summarization, translation

#: task name -> its module (NAME, RECIPE, SOURCE_KEY, TARGET_KEY, METRICS)
TASKS = {translation.NAME: translation, summarization.NAME: summarization}

__all__ = ["TASKS", "summarization", "translation"]
