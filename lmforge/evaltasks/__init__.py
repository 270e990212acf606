"""Task definitions for ``lmforge eval --tasks`` (lm-evaluation-harness YAMLs) that read local files only.

Each task reads the file given with ``--data TASK=FILE`` (or ``--data FILE`` for every task of this
package that is asked for); lm-evaluation-harness hands the files to the loaders in ``loaders.py``
through its task metadata (key :data:`DATA_KEY`). Nothing is downloaded: the loaders build the
dataset in memory with ``datasets.Dataset.from_list``.
"""

from __future__ import annotations

from pathlib import Path

#: this folder, given to lm-eval's TaskManager as an include path
TASK_DIR = Path(__file__).resolve().parent

#: the metadata key under which ``lmforge eval`` passes {task name: data file}
DATA_KEY = "lmforge_data"

#: the tasks of this package and the file each reads
TASKS = {
    "lmforge_choice": 'JSONL, one question a line: {"question": ..., "choices": [...], "label": INDEX}',
    "lmforge_cloze": "text (one passage a line) or JSONL (\"text\"); the last word of each passage is predicted",
    "lmforge_perplexity": "text (one document) or JSONL (one document a line, \"text\"); rolling log-likelihood",
}
