"""Reference recipe vs fast recipe on tinyshakespeare, side by side in one run.

    python benchmarks/train_shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--only reference|fast]

1. reference: nanoGPT's shakespeare_char CPU recipe (configs/tinyshakespeare-reference.yaml):
   65 characters, first 90% train / last 10% val, 4 layers x 4 heads x 128, block 64, batch 12,
   AdamW 1e-3, 100 warmup steps, cosine to 1e-4 over 2000 steps.
2. fast: configs/tinyshakespeare-fast.yaml, the same data, split and val measurement, anything
   lmforge offers (rotary positions, SwiGLU, RMSNorm, the Muon optimizer, a 400-step schedule);
   reported as the wall time to reach the reference's target val loss, evaluations included.

Validation loss, for both: mean over 20 random batches of 12 windows of 64 tokens of the val split.
Each recipe runs in its own process (so peak memory is its own); the matmul peak that model FLOP/s
are compared with is measured in this same run. Prints a table, writes benchmarks/results/train_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, matmul_peak_flops, print_table, write_result  # noqa: E402

TARGET_VAL_LOSS = 1.8857  # nanoGPT's shakespeare_char CPU recipe at step 2000, on this machine
RECIPES = {"reference": "tinyshakespeare-reference", "fast": "tinyshakespeare-fast"}
EVAL = ["--train.eval_batches=20", "--train.eval_batch_size=12", "--model.block_size=64"]


def run_child(name: str, data: str, workdir: str) -> dict:
    """Train one recipe in this process and summarise it (called in a subprocess)."""
    from lmforge.recipes import load_config
    from lmforge.model import DecoderLM
    from lmforge.tasks.lm import train

    overrides = [f"--data.corpus={data}", f"--data.data_dir={workdir}/data-{name}",
                 f"--train.out_dir={workdir}/run-{name}", "--train.progress=false", "--train.tensorboard=false",
                 "--train.ckpt_interval=0", *EVAL]
    cfg = load_config(RECIPES[name], overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in Path(cfg.train.out_dir, "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    reached = next((r for r in vals if r["val_loss"] <= TARGET_VAL_LOSS), None)
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    speeds = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    tok_s = statistics.median(speeds)
    cfg.model.vocab_size = json.loads(Path(cfg.data.data_dir, "meta.json").read_text())["vocab_size"]
    flops_per_token = DecoderLM(cfg.model).flops_per_token(cfg.model.block_size)
    return {
        "recipe": RECIPES[name], "steps": summary["steps"], "tokens_per_step": tokens_per_step,
        "ms_per_step": 1000 * tokens_per_step / tok_s, "tokens_per_second": tok_s,
        "model_flops_per_second": flops_per_token * tok_s, "final_val_loss": summary["val_loss"],
        "time_to_target_s": reached["elapsed"] if reached else None,
        "step_to_target": reached["step"] if reached else None,
        "train_time_s": records[-1]["elapsed"], "wall_time_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_curve": [(r["step"], round(r["elapsed"], 2), round(r["val_loss"], 4)) for r in vals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare.txt"), help="tinyshakespeare.txt")
    parser.add_argument("--only", choices=list(RECIPES), help="run one recipe")
    parser.add_argument("--child", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.data, args.workdir)))
        return
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} not found; pass --data PATH to tinyshakespeare.txt")

    peak_before = matmul_peak_flops()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in ([args.only] if args.only else list(RECIPES)):
            print(f"running {name} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--data", args.data,
                                   "--workdir", workdir], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"error: {name} failed:\n{proc.stderr[-3000:]}")
            rows.append({"name": name, **json.loads(line[len("RESULT "):])})
    peak = max(peak_before, matmul_peak_flops())
    for r in rows:
        r["mfu_vs_measured_matmul_peak"] = r["model_flops_per_second"] / peak
    ref = next((r for r in rows if r["name"] == "reference"), None)
    for r in rows:  # like with like: training time (evaluations included) from the first step
        if ref and r["time_to_target_s"]:
            r["time_to_target_vs_reference_train_time"] = r["time_to_target_s"] / ref["train_time_s"]

    table = [{**r, "MFU %": 100 * r["mfu_vs_measured_matmul_peak"], "peak MB": r["peak_rss_mb"]} for r in rows]
    print(f"\nmatmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s (fp32, 1024^3); "
          f"target val loss {TARGET_VAL_LOSS}")
    print_table(table, ["name", "steps", "ms_per_step", "tokens_per_second", "MFU %", "final_val_loss",
                        "step_to_target", "time_to_target_s", "train_time_s", "wall_time_s", "peak MB"])
    if ref and len(rows) > 1:
        fast = rows[1]
        if fast["time_to_target_s"]:
            print(f"\nfast recipe reaches {TARGET_VAL_LOSS} after {fast['time_to_target_s']:.1f} s of training, "
                  f"{fast['time_to_target_vs_reference_train_time']:.2f} x the reference recipe's training time "
                  f"({ref['train_time_s']:.1f} s for 2000 steps; goal <= 0.33)")
        else:
            print(f"\nfast recipe did not reach {TARGET_VAL_LOSS}")
    path = write_result("train_shakespeare", {"target_val_loss": TARGET_VAL_LOSS, "matmul_peak_flops": peak,
                                              "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
