"""Headline generation on BBC news: the encoder-decoder against the lead baseline, ROUGE-1/2/L.

    python benchmarks/summarization.py [--minutes 8] [--size small|recipe] [--threads 1] [--lead 8 10]

The model is recipe summarization-bbc (3 + 3 blocks, the first 256 tokens of each article, joint
BPE of 4,096 tokens trained into data/bbc-headlines; --size small, the default, fits it to a few
minutes of CPU: 128 wide instead of 256, batches of 2,048 tokens, peak learning rate 3e-3, no
dropout), trained on
../shared/data/summarization/bbc_headlines.train.jsonl (1,645 articles) for --minutes, with the
schedule fitted to the budget as in benchmarks/translation.py. Its headlines for the 206
validation articles (greedy and beam search, no repeated bigrams) are scored with rouge-score
(F-measure, Porter stemmer, mean over articles) against the lead baseline: the first N words of
each article as its headline (N = 8 and 10 by default; reference headlines average 5 words).

Prints a table, writes benchmarks/results/summarization.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, print_table, write_result  # noqa: E402
from translation import fit_schedule  # noqa: E402

RECIPE = "summarization-bbc"
#: small: settings for a few minutes of CPU (as in translation.py); recipe: the recipe unchanged
SIZES = {"small": ["--model.d_model=128", "--model.d_ff=512", "--task.batch_tokens=2048", "--train.lr=3e-3",
                   "--train.warmup_steps=30", "--model.dropout=0"], "recipe": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget (default: 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: settings for a few CPU minutes (default); recipe: the recipe unchanged")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see translation.py)")
    parser.add_argument("--beam", type=int, default=4, help="beam size compared with greedy (default: 4)")
    parser.add_argument("--lead", type=int, nargs="+", default=[8, 10], help="lead baseline lengths in words")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-summarization"), help="run directory")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. --task.max_source_len=128")
    args, extra = parser.parse_known_args()
    import torch

    from lmforge.config import load_config
    from lmforge.tasks.data import read_examples
    from lmforge.tasks.model import Decoding, load_task_model
    from lmforge.tasks.summarization import lead_baseline
    from lmforge.tasks.trainer import TaskData, finetune, score_examples

    data = SHARED_DATA / "summarization"
    if not data.is_dir():
        sys.exit(f"{data} not found; this benchmark needs the shared BBC data")
    torch.set_num_threads(args.threads)

    pairs, _ = read_examples(data / "bbc_headlines.valid.jsonl", "document", "summary")
    documents, references = [d for d, _ in pairs], [s for _, s in pairs]
    rows = [{"system": f"lead-{n}", **lead_baseline(documents, references, n)} for n in args.lead]

    shutil.rmtree(Path(args.work) / RECIPE, ignore_errors=True)  # a fresh run each time
    cfg = load_config(RECIPE, [f"--train.out_dir={Path(args.work) / RECIPE}", "--train.progress=false",
                               "--train.tensorboard=false", "--train.ckpt_interval=0", "--train.device=cpu",
                               "--train.dtype=float32", *SIZES[args.size], *args.overrides, *extra])
    cfg.task.train_file = str(data / "bbc_headlines.train.jsonl")
    cfg.task.valid_file = str(data / "bbc_headlines.valid.jsonl")
    cfg.task.beam_size = args.beam
    seconds = fit_schedule(cfg, args.minutes)
    cfg.train.eval_interval = max(1, cfg.train.decay_steps // 4)  # a few points for rougeL.png
    cfg.task.eval_samples = 50
    print(f"{RECIPE}: {seconds:.2f} s per step -> cosine over {cfg.train.decay_steps} steps, "
          f"{args.minutes} minutes of training", flush=True)
    summary = finetune(cfg)

    task_model = load_task_model(summary["checkpoint"])
    valid = TaskData.load(cfg.task.valid_file, task_model.tokenizer, task_model.fmt, task_model.cfg)
    greedy, _, greedy_speed = score_examples(task_model, valid.texts, valid.sources,
                                             Decoding.from_task(task_model.cfg.task, beam_size=1))
    rows.append({"system": "seq2seq greedy", **greedy, "documents_per_second": greedy_speed})
    rows.append({"system": f"seq2seq beam {args.beam}", **summary["valid"]["scores"],
                 "documents_per_second": summary["valid"]["sentences_per_second"]})
    print_table(rows, ["system", "rouge1", "rouge2", "rougeL", "documents_per_second"])
    path = write_result("summarization", {
        "minutes": args.minutes, "size": args.size, "threads": args.threads, "valid_articles": len(pairs),
        "results": rows,
        "model": {"params": summary["num_params"], "steps": summary["steps"],
                  "train_minutes": summary["train_seconds"] / 60, "seconds_per_step_calibrated": seconds,
                  "train_tokens_per_second": summary["tokens_per_second"], "val_nll": summary["val_nll"],
                  "train_lengths": summary["train_lengths"], "run_dir": cfg.train.out_dir},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
