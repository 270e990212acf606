"""The tang-poetry recipe: train it, then measure validation loss per character on the held-apart poems.

    python benchmarks/tang_poetry.py [--recipe tang-poetry|tang-poetry-bpe] [--out-dir runs/tang-poetry]
                                     [--minutes 10] [--train.key=value ...]

1. ``lmforge prepare`` (timed apart: it is not training) and ``lmforge train`` of the recipe, in a
   child process, with its own schedule and ``train.max_minutes`` (``--minutes`` overrides it).
2. The final checkpoint is scored on the whole validation split (../shared/data/zh/tang.valid.jsonl,
   1,178 poems): sequential windows, every token after the first predicted once (``lmforge eval``).
3. Loss per character = the summed loss of all those tokens / the characters they spell, each poem's
   end counting as one character (the end-of-text token). For the char tokenizer a rare character
   spelled as 3 byte tokens is one character; for BPE a token may hold several characters. Reported
   in nats and in bits (nats / ln 2) per character; target: at most 4.4 nats within 10 minutes on
   2 CPU cores.

The machine's load average is recorded: on shared cores the same recipe runs fewer steps in its
minutes. Prints a table, writes benchmarks/results/tang_poetry[-bpe].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, print_table, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))  # this checkout's lmforge, as the child processes (run from ROOT) use

TARGET_NATS_PER_CHAR = 4.4


def lmforge(*args: str) -> float:
    """Run ``lmforge ARGS`` from the repository root (the recipes' ../shared/data paths are relative to it)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT)
    if proc.returncode:
        sys.exit(f"error: lmforge {' '.join(args)} failed (exit {proc.returncode})")
    return time.perf_counter() - start


def score(run_dir: Path) -> dict:
    """Loss of the run's final checkpoint on the whole validation split, per token and per character."""
    import torch

    from lmforge.data.shards import load_meta
    from lmforge.evaluate import evaluate_checkpoint
    from lmforge.train.checkpoint import load_model

    model, cfg, tokenizer = load_model(str(run_dir))
    data_dir = ROOT / cfg.data.data_dir
    cfg.data.data_dir = str(data_dir)
    with torch.inference_mode():
        result = evaluate_checkpoint(model, cfg, tokenizer, split="val", batch_size=32)
    meta = load_meta(data_dir)
    documents = sum(1 for _ in open(ROOT / cfg.data.val_corpus[0], encoding="utf-8") if _.strip())
    chars = meta["val"]["chars"] + documents - 1  # each poem's end is one; the first character is not predicted
    nats = result["loss"] * result["tokens"] / chars
    return {"val_tokens_scored": result["tokens"], "val_chars": chars, "val_nats_per_token": result["loss"],
            "val_nats_per_char": nats, "val_bits_per_char": nats / math.log(2),
            "params": sum(p.numel() for p in model.parameters()), "vocab_size": tokenizer.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tang-poetry", choices=["tang-poetry", "tang-poetry-bpe"])
    parser.add_argument("--out-dir", default=None, help="run directory (default: the recipe's train.out_dir)")
    parser.add_argument("--minutes", type=float, default=None, help="train.max_minutes (default: the recipe's)")
    args, overrides = parser.parse_known_args()
    if not (SHARED_DATA / "zh" / "tang.train.jsonl").is_file():
        sys.exit(f"error: {SHARED_DATA / 'zh'} holds no tang.train.jsonl; this benchmark needs ../shared/data/zh")
    from lmforge.recipes import load_config

    cfg = load_config(args.recipe, overrides)
    out_dir = Path(args.out_dir or cfg.train.out_dir)
    if (ROOT / out_dir / "checkpoints").exists():
        sys.exit(f"error: {out_dir} already holds a run; remove it or pass --out-dir")
    common = ["-c", args.recipe, *overrides]
    prepare_s = lmforge("prepare", *common, "--quiet")
    load_before = os.getloadavg()
    minutes = [f"--train.max_minutes={args.minutes}"] if args.minutes is not None else []
    train_s = lmforge("train", *common, f"--train.out_dir={out_dir}", "--train.progress=false", *minutes)
    cpu_s = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
    records = [json.loads(x) for x in (ROOT / out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in records if "step" in r)
    train_time = max(r["elapsed"] for r in records if "elapsed" in r)
    tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    row = {"recipe": args.recipe, "steps": steps, "tokens_trained": tokens, "train_time_s": train_time,
           "tokens_per_second": tokens / train_time, "prepare_s": prepare_s, "train_wall_s": train_s,
           "cpu_s_all_children": cpu_s, "load_average_before": load_before[0],
           "load_average_after": os.getloadavg()[0], "cores": os.cpu_count(), **score(ROOT / out_dir)}
    row["target_met"] = row["val_nats_per_char"] <= TARGET_NATS_PER_CHAR and train_time <= 600
    print_table([row], ["recipe", "steps", "train_time_s", "tokens_per_second", "val_nats_per_token",
                        "val_nats_per_char", "val_bits_per_char", "load_average_after"])
    print(f"\ntarget: <= {TARGET_NATS_PER_CHAR} nats ({TARGET_NATS_PER_CHAR / math.log(2):.2f} bits) per character "
          f"within 600 s of training: {'met' if row['target_met'] else 'not met'}")
    name = "tang_poetry" + ("_bpe" if args.recipe.endswith("bpe") else "")
    print(f"wrote {write_result(name, {'target_nats_per_char': TARGET_NATS_PER_CHAR, 'result': row})}")


if __name__ == "__main__":
    main()
