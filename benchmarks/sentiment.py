"""Sentiment on the movie-review valid split: accuracy and macro-F1 of classifiers fine-tuned from
an lmforge encoder pre-trained here (short MLM run on the bundled plays) and from the imported
all-MiniLM-L6-v2, against the VADER lexicon (PyPI vaderSentiment, benchmark-only) on the same
sentences; training and inference examples per second on CPU.

    .venv/bin/pip install vaderSentiment          # the baseline, not a dependency of lmforge
    .venv/bin/python benchmarks/sentiment.py --steps 300 --pretrain-steps 400
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, print_table, write_result  # noqa: E402
from task_trunks import BENCH, lmforge_trunk, minilm_trunk  # noqa: E402


def vader(valid: Path) -> dict:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from lmforge.tasks.sentiment import classification_scores, read_labelled

    rows = read_labelled(valid)
    labels = sorted({lab for _, lab, _ in rows})
    analyzer = SentimentIntensityAnalyzer()
    start = time.perf_counter()
    pred = ["positive" if analyzer.polarity_scores(t)["compound"] >= 0 else "negative" for t, _, _ in rows]
    seconds = time.perf_counter() - start
    s = classification_scores([labels.index(lab) for _, lab, _ in rows], [labels.index(p) for p in pred], labels)
    return {"trunk": "VADER lexicon (compound >= 0 -> positive)", "accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
            "infer_ex_s": len(rows) / seconds}


def finetune(name: str, trunk: Path, args, train: Path, valid: Path, extra: list[str]) -> dict:
    from lmforge.recipes import load_config
    from lmforge.tasks.registry import finetune

    out = BENCH / f"sentiment-{name}-{args.tuning}-{args.steps}-{args.minutes:g}m-{args.dtype}"
    overrides = [f"--train.out_dir={out}", f"--train.init_from={trunk}", f"--train.max_steps={args.steps}",
                 f"--train.max_minutes={args.minutes}", f"--task.tuning={args.tuning}", "--train.progress=false",
                 "--train.eval_interval=0", f"--train.warmup_steps={max(args.steps // 10, 1)}",
                 f"--task.max_source_len={args.max_len}", f"--train.dtype={args.dtype}", *extra, *([f"--train.lr={args.lr}"] if args.lr else [])]
    cfg = load_config("sentiment-tiny", overrides, base={"task": {"name": "sentiment"}})
    cfg.task.train_file, cfg.task.valid_file = str(train), str(valid)
    if (out / "report.json").is_file():
        import json

        s = json.loads((out / "report.json").read_text())
    else:
        s = finetune(cfg)
    v = s["valid"]
    return {"trunk": name, "dtype": s.get("dtype"), "tuning": args.tuning, "steps": s["steps"], "accuracy": v["accuracy"],
            "macro_f1": v["macro_f1"], "train_ex_s": s["examples_per_second"],
            "infer_ex_s": v["examples_per_second"], "trainable_params": s["trainable_params"],
            "train_seconds": s["train_seconds"], "run": str(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 32)")
    p.add_argument("--minutes", type=float, default=6.0, help="time limit of each fine-tuning run")
    p.add_argument("--pretrain-steps", type=int, default=400, help="MLM steps of the lmforge encoder")
    p.add_argument("--pretrain-minutes", type=float, default=6.0)
    p.add_argument("--tuning", default="full", choices=["full", "frozen", "lora"])
    p.add_argument("--max-len", type=int, default=96, help="tokens per text")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning peak learning rate (default: per trunk)")
    p.add_argument("--trunks", default="vader,lmforge,minilm")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="train.dtype of the fine-tuning (auto: bf16 where this CPU runs it faster)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    train, valid = SHARED_DATA / "sentiment" / "movie.train.tsv", SHARED_DATA / "sentiment" / "movie.valid.tsv"
    if not valid.is_file():
        raise SystemExit(f"{valid} not found: the benchmark reads ../shared/data")
    rows, info = [], {}
    for name in args.trunks.split(","):
        print(f"--- {name}", file=sys.stderr, flush=True)
        if name == "vader":
            rows.append(vader(valid))
        elif name == "lmforge":
            trunk, info["lmforge_pretrain"] = lmforge_trunk(args.pretrain_steps, args.pretrain_minutes)
            rows.append(finetune("lmforge-mlm", trunk, args, train, valid, ["--train.lr=5e-4"]))
        elif name == "minilm":
            trunk, info["minilm"] = minilm_trunk()
            rows.append(finetune("minilm", trunk, args, train, valid, ["--train.lr=5e-5"]))
    from lmforge.hardware import cpu_bf16_is_faster

    print(f"this CPU {'has' if cpu_bf16_is_faster() else 'has no'} bf16 units faster than float32")
    print_table(rows, ["trunk", "dtype", "tuning", "steps", "accuracy", "macro_f1", "train_ex_s", "infer_ex_s", "train_seconds"])
    path = write_result(f"sentiment-{args.tuning}", {"rows": rows, "trunks": info, "budget": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
