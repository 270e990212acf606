"""Time to nanoGPT's loss on tinyshakespeare: the reference recipe and the fast recipe, whole processes.

    python benchmarks/train_shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--only reference|fast]
                                           [--runs 1] [--nanogpt PATH/TO/nanoGPT] [--float32] [--avx2]

1. reference: nanoGPT's shakespeare_char CPU line (its README: 4 layers x 4 heads x 128, block 64,
   batch 12, AdamW 1e-3, cosine to 1e-4 over 2000 steps, no dropout) as the lmforge recipe
   tinyshakespeare-reference; with ``--nanogpt DIR`` also nanoGPT's own ``train.py`` from a
   checkout, run with that command line (``--device=cpu --compile=False --eval_iters=20 ...``).
2. fast: the recipe tinyshakespeare-fast: the same data, split and validation measurement, and
   whatever lmforge offers. With ``--float32`` also "fast-float32": the same recipe with every
   measured dtype choice pinned to float32 (Muon's Newton-Schulz included), which is what a CPU
   without bf16 units runs.
3. ``--avx2`` runs every process (nanoGPT's too) as on a CPU with AVX2 and neither AVX-512 nor bf16
   units: PyTorch's kernels, oneDNN and MKL are each limited to AVX2 (``AVX2_ONLY``), so bf16
   matmuls fall back to slow code and every measured choice (the dtype probe, Muon's
   Newton-Schulz dtype) decides as it would there.

Each run is a whole process, timed from the moment it is started (``python -m lmforge train``,
imports, data checks, the dtype probe and all evaluations included) to the end of the first
evaluation at or below TARGET_VAL_LOSS (nanoGPT's CPU line at step 2000 on this machine), and to
its exit. Validation loss, for all: mean over 20 random batches of 12 windows of 64 characters of
the last 10% of the text. The data is prepared before the clock starts (nanoGPT's prepare.py too).
Also timed: ``lmforge --help`` and ``lmforge train`` from process start to the end of its first
optimizer step. Medians over ``--runs`` runs, the recipes taking turns. Prints a table and
writes benchmarks/results/train_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, print_table, write_result  # noqa: E402

TARGET_VAL_LOSS = 1.8857  # nanoGPT's shakespeare_char CPU line at step 2000, on this machine
RECIPES = {"reference": "tinyshakespeare-reference", "fast": "tinyshakespeare-fast"}
EVAL = ["--train.eval_batches=20", "--train.eval_batch_size=12", "--model.block_size=64"]
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
LMFORGE = [sys.executable, "-m", "lmforge"]
#: the instruction-set limits of a CPU with AVX2 only, for PyTorch's own kernels, oneDNN and MKL
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


#: the fast recipe as it runs on a CPU without bf16 units (measured choices pinned to float32)
VARIANTS = {"fast-float32": ("fast", ["--train.muon_ns_dtype=float32", "--train.dtype=float32"])}


def lmforge_args(name: str, data: str, workdir: str, run: str) -> list[str]:
    recipe, extra = VARIANTS.get(name, (name, []))
    return ["-c", RECIPES[recipe], f"--data.corpus={data}", f"--data.data_dir={workdir}/data-{recipe}",
            f"--train.out_dir={workdir}/{run}", "--train.tensorboard=false", "--train.ckpt_interval=0", *EVAL, *extra]


def run_lmforge(name: str, data: str, workdir: str, index: int) -> dict:
    """One whole `lmforge train` process: wall times from its start, and what it logged."""
    run = f"run-{name}-{index}"
    start = time.time()
    proc = subprocess.run([*LMFORGE, "train", *lmforge_args(name, data, workdir, run), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT)
    end = time.time()
    if proc.returncode:
        sys.exit(f"error: {name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    records = [json.loads(x) for x in Path(workdir, run, "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    reached = next((r for r in vals if r["val_loss"] <= TARGET_VAL_LOSS), None)
    speeds = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    return {"steps": summary["steps"], "dtype": summary["dtype"], "final_val_loss": summary["val_loss"],
            "tokens_per_second": statistics.median(speeds),
            "step_to_target": reached["step"] if reached else None,
            "to_target_s": reached["time"] - start if reached else None,
            "first_step_s": summary["first_step_time"] - start, "wall_s": end - start,
            "val_curve": [(r["step"], round(r["time"] - start, 2), round(r["val_loss"], 4)) for r in vals]}


def run_nanogpt(repo: Path, data: str) -> dict:
    """nanoGPT's train.py, its README's CPU line; the val losses are read from its output as they come."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "train.py", *NANOGPT_ARGS], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    vals, first_step = [], None
    for line in proc.stdout:
        if first_step is None and re.match(r"iter 0: loss", line):
            first_step = time.time() - start
        m = re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line)
        if m:
            vals.append((int(m.group(1)), round(time.time() - start, 2), float(m.group(2))))
    if proc.wait():
        sys.exit("error: nanoGPT's train.py failed; run it by hand in its directory to see why")
    end = time.time()
    reached = next((v for v in vals if v[2] <= TARGET_VAL_LOSS), None)
    return {"steps": vals[-1][0] if vals else None, "dtype": "float32", "final_val_loss": vals[-1][2] if vals else None,
            "tokens_per_second": None, "step_to_target": reached[0] if reached else None,
            "to_target_s": reached[1] if reached else None, "first_step_s": first_step, "wall_s": end - start,
            "val_curve": vals}


def help_seconds(runs: int = 5) -> float:
    """Median wall time of a whole `lmforge --help` process."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*LMFORGE, "--help"], capture_output=True, check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare_nanogpt(repo: Path, data: str) -> None:
    target = repo / "data" / "shakespeare_char"
    shutil.copy(data, target / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=target, check=True, capture_output=True)


def median_row(name: str, runs: list[dict]) -> dict:
    row = dict(runs[0])
    for key in ("tokens_per_second", "to_target_s", "first_step_s", "wall_s", "final_val_loss", "step_to_target"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if len(values) == len(runs) else None
    row["runs"] = runs
    return {"name": name, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare.txt"), help="tinyshakespeare.txt")
    parser.add_argument("--only", choices=list(RECIPES), help="run one lmforge recipe")
    parser.add_argument("--runs", type=int, default=1, help="runs of each (median reported; they take turns)")
    parser.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: also run its train.py")
    parser.add_argument("--float32", action="store_true",
                        help="also run the fast recipe with every dtype choice pinned to float32, as a CPU "
                             "without bf16 units runs it")
    parser.add_argument("--avx2", action="store_true",
                        help="run every process with PyTorch, oneDNN and MKL limited to AVX2 (no AVX-512, no bf16 units)")
    args = parser.parse_args()
    if args.avx2:
        os.environ.update(AVX2_ONLY)  # inherited by every process started below
    data = str(Path(args.data).resolve())
    if not Path(data).is_file():
        sys.exit(f"error: {args.data} not found; pass --data PATH to tinyshakespeare.txt")
    if args.nanogpt and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: {args.nanogpt} holds no train.py; pass the directory of a nanoGPT checkout")
    names = ([args.only] if args.only else list(RECIPES)) + (["fast-float32"] if args.float32 else [])

    results: dict[str, list[dict]] = {n: [] for n in (["nanoGPT"] if args.nanogpt else []) + names}
    with tempfile.TemporaryDirectory() as workdir:
        env_note = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", *AVX2_ONLY)}
        # each recipe's data is prepared once, before any clock starts, as nanoGPT's prepare.py
        for recipe in dict.fromkeys(VARIANTS.get(n, (n,))[0] for n in names):
            subprocess.run([*LMFORGE, "prepare", *lmforge_args(recipe, data, workdir, "prep")[:4]],
                           check=True, capture_output=True, cwd=ROOT)
        if args.nanogpt:
            prepare_nanogpt(args.nanogpt, data)
        help_s = help_seconds()
        for i in range(args.runs):
            for name in results:
                print(f"run {i + 1}/{args.runs}: {name} ...", flush=True)
                out = run_nanogpt(args.nanogpt, data) if name == "nanoGPT" else run_lmforge(name, data, workdir, i)
                results[name].append(out)
    rows = [median_row(name, runs) for name, runs in results.items()]
    base = next((r for r in rows if r["name"] == "nanoGPT"), None) or next(
        (r for r in rows if r["name"] == "reference"), None)
    for r in rows:
        if base and r["to_target_s"]:
            r["to_target_vs_base_wall"] = r["to_target_s"] / base["wall_s"]

    print(f"\ntarget val loss {TARGET_VAL_LOSS}; times are whole processes from their start, in seconds; "
          f"`lmforge --help`: {help_s:.2f} s (median of 5)")
    print_table(rows, ["name", "steps", "dtype", "tokens_per_second", "first_step_s", "step_to_target",
                       "to_target_s", "wall_s", "final_val_loss", "to_target_vs_base_wall"])
    if base:
        for r in rows:
            if r is not base and r.get("to_target_vs_base_wall"):
                print(f"{r['name']}: {TARGET_VAL_LOSS} reached {r['to_target_s']:.1f} s after its start: "
                      f"{r['to_target_vs_base_wall']:.2f} x {base['name']}'s whole run ({base['wall_s']:.1f} s)")
    path = write_result("train_shakespeare", {"target_val_loss": TARGET_VAL_LOSS, "help_seconds": help_s,
                                              "environment": env_note, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
