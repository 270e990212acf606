"""Semantic role labelling on a document split of the Universal PropBank English-EWT dev file:
argument F1 with gold predicates and end to end (predicted predicates), predicate and sense
scores, for trunks fine-tuned from an lmforge encoder pre-trained here and from the imported
all-MiniLM-L6-v2; training and inference throughput on CPU.

    .venv/bin/python benchmarks/srl.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, print_table, write_result  # noqa: E402
from task_trunks import BENCH, lmforge_trunk, minilm_trunk  # noqa: E402


def split(path: Path) -> tuple[Path, Path, dict]:
    from lmforge.tasks.srl_data import read_conllu, split_by_document, write_conllu

    out = BENCH / "srl-data"
    out.mkdir(parents=True, exist_ok=True)
    train, valid = split_by_document(read_conllu(path))
    write_conllu(train, out / "train.conllu")
    write_conllu(valid, out / "valid.conllu")
    count = lambda ss: {"sentences": len(ss), "predicates": sum(len(s.predicates) for s in ss)}  # noqa: E731
    return out / "train.conllu", out / "valid.conllu", {"train": count(train), "valid": count(valid)}


def finetune(name: str, trunk: Path, args, train: Path, valid: Path, extra: list[str]) -> dict:
    from lmforge.recipes import load_config
    from lmforge.tasks.registry import finetune

    out = BENCH / f"srl-{name}-{args.tuning}-{args.steps}-{args.minutes:g}m-{args.dtype}"
    overrides = [f"--train.out_dir={out}", f"--train.init_from={trunk}", f"--train.max_steps={args.steps}",
                 f"--train.max_minutes={args.minutes}", f"--task.tuning={args.tuning}", "--train.progress=false",
                 "--train.eval_interval=0", f"--train.warmup_steps={max(args.steps // 10, 1)}",
                 f"--task.max_source_len={args.max_len}", f"--train.dtype={args.dtype}", *extra, *([f"--train.lr={args.lr}"] if args.lr else [])]
    cfg = load_config("srl-tiny", overrides, base={"task": {"name": "srl"}})
    cfg.task.train_file, cfg.task.valid_file = str(train), str(valid)
    if (out / "report.json").is_file():
        s = json.loads((out / "report.json").read_text())
    else:
        s = finetune(cfg)
    v, full = s["valid"], s["valid_scores"]
    return {"trunk": name, "dtype": s.get("dtype"), "tuning": args.tuning, "steps": s["steps"],
            "f1_gold_pred": v["f1_gold_predicates"], "f1_end_to_end": v["f1_end_to_end"],
            "predicate_f1": v["predicate_f1"], "sense_f1": v["sense_f1_gold_predicates"],
            "conll2009_f1_e2e": full["end_to_end"]["conll2009"]["f1"],
            "train_ex_s": s["examples_per_second"], "infer_sent_s": v["sentences_per_second_end_to_end"],
            "train_seconds": s["train_seconds"], "per_label_gold_pred": full["gold_predicates"]["per_label"],
            "run": str(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 32 sentence-predicate pairs)")
    p.add_argument("--minutes", type=float, default=6.0, help="time limit of each fine-tuning run")
    p.add_argument("--pretrain-steps", type=int, default=400, help="MLM steps of the lmforge encoder")
    p.add_argument("--pretrain-minutes", type=float, default=6.0)
    p.add_argument("--tuning", default="full", choices=["full", "frozen", "lora"])
    p.add_argument("--max-len", type=int, default=96, help="tokens per sentence")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning peak learning rate (default: per trunk)")
    p.add_argument("--trunks", default="lmforge,minilm")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="train.dtype of the fine-tuning (auto: bf16 where this CPU runs it faster)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    src = SHARED_DATA / "srl" / "en_ewt-up-dev.conllu"
    if not src.is_file():
        raise SystemExit(f"{src} not found: the benchmark reads ../shared/data")
    train, valid, sizes = split(src)
    rows, info = [], {"split": sizes}
    for name in args.trunks.split(","):
        print(f"--- {name}", file=sys.stderr, flush=True)
        if name == "lmforge":
            trunk, info["lmforge_pretrain"] = lmforge_trunk(args.pretrain_steps, args.pretrain_minutes)
            rows.append(finetune("lmforge-mlm", trunk, args, train, valid, ["--train.lr=5e-4"]))
        elif name == "minilm":
            trunk, info["minilm"] = minilm_trunk()
            rows.append(finetune("minilm", trunk, args, train, valid, ["--train.lr=1e-4"]))
    from lmforge.hardware import cpu_bf16_is_faster

    print(f"this CPU {'has' if cpu_bf16_is_faster() else 'has no'} bf16 units faster than float32")
    print_table(rows, ["trunk", "dtype", "tuning", "steps", "f1_gold_pred", "f1_end_to_end", "predicate_f1", "sense_f1",
                       "train_ex_s", "infer_sent_s", "train_seconds"])
    path = write_result(f"srl-{args.tuning}", {"rows": rows, "trunks": info, "budget": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
