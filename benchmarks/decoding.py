"""Search settings of a translation or summarization checkpoint, scored on a validation file.

Decodes every example of ``--file`` (TSV/JSONL, as ``lmforge eval``) once per combination of
beam size, length penalty, n-gram blocking and output-length limit, and prints the task's
scores (BLEU/chrF, or ROUGE-1/2/L), the mean output length in words against the references',
and sentences per second. Choose a recipe's decoding settings on validation data this way, never
on test data.

    python benchmarks/decoding.py RUN --file valid.tsv [--beam 4 5] [--length-penalty 0.6 1.0 1.4]
        [--no-repeat 0 3] [--no-repeat-words no yes] [--source-words no yes] [--max-len-b 24] [--batch-size 32]

Prints a table and writes benchmarks/results/decoding.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_table, write_result  # noqa: E402

from lmforge.tasks.model import Decoding, load_task_model  # noqa: E402
from lmforge.tasks.seq2seq import TaskData, evaluate_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--file", required=True, help="validation file (TSV/JSONL with the task's columns)")
    ap.add_argument("--beam", type=int, nargs="+", default=[4])
    ap.add_argument("--length-penalty", type=float, nargs="+", default=[None])
    ap.add_argument("--no-repeat", type=int, nargs="+", default=[None], help="no_repeat_ngram_size values")
    ap.add_argument("--no-repeat-words", choices=["no", "yes"], nargs="+", default=[None],
                    help="task.no_repeat_words values (default: the checkpoint's)")
    ap.add_argument("--source-words", choices=["no", "yes"], nargs="+", default=[None],
                    help="task.source_words values (default: the checkpoint's)")
    ap.add_argument("--max-len-b", type=int, nargs="+", default=[None])
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    task_model = load_task_model(args.checkpoint)
    data = TaskData.load(args.file, task_model.tokenizer, task_model.fmt, task_model.cfg)
    reference_words = statistics.mean(len(t.split()) for _, t in data.texts)
    rows = []
    for beam, penalty, no_repeat, words, source_words, max_len_b in itertools.product(
            args.beam, args.length_penalty, args.no_repeat, args.no_repeat_words, args.source_words, args.max_len_b):
        decoding = Decoding.from_task(task_model.cfg.task, beam_size=beam, length_penalty=penalty,
                                      no_repeat_ngram_size=no_repeat, max_len_b=max_len_b,
                                      no_repeat_words=None if words is None else words == "yes",
                                      source_words=None if source_words is None else source_words == "yes")
        result = evaluate_file(task_model, args.file, decoding, args.batch_size, say=lambda _: None)
        row = {"beam": beam, "length_penalty": decoding.length_penalty,
               "no_repeat": decoding.no_repeat_ngram_size, "no_repeat_words": decoding.no_repeat_words,
               "source_words": decoding.source_words,
               "max_len_b": decoding.max_len_b,
               **{k: round(v, 2) for k, v in result["scores"].items()},
               "words": round(statistics.mean(len(h.split()) for h in result["hypotheses"]), 1),
               "sent_per_s": round(result["sentences_per_second"], 1)}
        rows.append(row)
        print_table([row], list(row))
    print(f"\nreferences: {reference_words:.1f} words on average")
    columns = list(rows[0])
    print_table(rows, columns)
    path = write_result("decoding", {"checkpoint": args.checkpoint, "file": args.file,
                                     "reference_words": reference_words, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
