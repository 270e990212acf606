"""Distributed training throughput: the trainer at 1 and 2 processes on CPU, and a synthetic step on GPUs.

    python benchmarks/distributed.py [cpu] [--steps 100]     # shakespeare-char through `lmforge train`
    python benchmarks/distributed.py step --preset gpt2-124m --dtype bfloat16 --compile --flash
    torchrun --nproc_per_node=1 benchmarks/distributed.py step --preset llama-1b --strategy fsdp --ac

cpu: the default recipe (shakespeare-char: 4 layers x 128, block 128, global batch 16) for --steps
steps, without evaluation or checkpoints until the end, four ways: one process with one thread and
with all cores, and two processes under torchrun (cores / 2 threads each) with DDP and with FSDP. The global batch is the
same, so each run does the same work; on a 2-core machine two processes cannot be faster than
one: this measures the price of the communication, not scaling. tokens/s is the trainer's own
figure (median over logging intervals, all ranks together) and MFU is against the CPU matmul
peak the trainer measures at start-up.

step: forward, backward and AdamW on random tokens for a model preset, with the same pieces the
trainer uses (parallelize: compile, activation checkpointing, DDP / FSDP2; token-normalised
accumulate_gradients). Reports tokens/s, MFU against the peak table, and on CUDA the peak memory
next to `lmforge plan`'s estimate. --flash forces PyTorch's flash-attention SDPA kernel (it
fails if that kernel cannot run). Runs alone or under torchrun; FSDP works at one process too.

Prints a table and writes benchmarks/results/distributed.json (cpu) or distributed_step_<name>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_table, write_result  # noqa: E402

RECIPE = "shakespeare-char"


# ------------------------------------------------------------------------------------------------ cpu

def _train(workdir: Path, name: str, steps: int, nproc: int, strategy: str, threads: int | None = None) -> dict:
    overrides = [f"--data.data_dir={workdir / 'data'}", f"--train.out_dir={workdir / name}",
                 f"--train.max_steps={steps}", "--train.eval_interval=0", "--train.eval_batches=4",
                 "--train.ckpt_interval=0", "--train.log_interval=10", "--train.max_minutes=0",
                 "--train.progress=false", "--train.tensorboard=false", "--train.device=cpu",
                 f"--train.strategy={strategy}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    env["OMP_NUM_THREADS"] = str(threads)
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", "train", "-c", RECIPE, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lmforge", "train", "-c", RECIPE, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    records = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "run": name, "processes": nproc, "threads_per_process": threads, "strategy": summary["strategy"],
        "steps": summary["steps"],
        "tokens_per_second": summary["tokens_per_second"], "mfu": summary["mfu"],
        "train_time_s": records[-1]["elapsed"], "wall_time_s": wall,
        "final_train_loss": summary["train_loss"], "val_loss": summary["val_loss"],
    }


def cpu_benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="lmforge-dist-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "lmforge", "prepare", "-c", RECIPE, "-q",
                        f"--data.data_dir={workdir / 'data'}"], cwd=workdir, env=env, check=True,
                       capture_output=True)
        load_before = os.getloadavg()
        rows = [_train(workdir, "1 process, 1 thread", args.steps, 1, "auto", threads=1),
                _train(workdir, "2 processes, ddp", args.steps, 2, "ddp"),
                _train(workdir, "2 processes, fsdp", args.steps, 2, "fsdp")]
        if (os.cpu_count() or 1) > 1:
            rows.insert(1, _train(workdir, f"1 process, {os.cpu_count()} threads", args.steps, 1, "auto"))
        load_after = os.getloadavg()
    base = rows[0]["tokens_per_second"]
    for r in rows:
        r["relative_speed"] = r["tokens_per_second"] / base
    print_table(rows, ["run", "steps", "tokens_per_second", "relative_speed", "mfu", "train_time_s", "wall_time_s",
                       "final_train_loss"])
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}: other jobs share these cores")
    result = {"recipe": RECIPE, "steps": args.steps, "load_average_before": load_before,
              "load_average_after": load_after, "runs": rows}
    print(f"wrote {write_result('distributed', result)}")


# ----------------------------------------------------------------------------------------------- step

def step_benchmark(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from lmforge.config import ModelConfig, TrainConfig

    from lmforge.recipes import build_section, parse_overrides
    from lmforge.model import DecoderLM
    from lmforge.plan import estimate_memory
    from lmforge.train import distributed as D
    from lmforge.hardware import mfu as model_flops_utilisation
    from lmforge.hardware import peak_flops, resolve_device, resolve_dtype
    from lmforge.tasks.lm import window_count, window_loss
    from lmforge.train.trainer import accumulate_gradients
    from lmforge.train.optim import build_optimizer

    world, device = D.setup(resolve_device(args.device))
    if args.strategy == "fsdp" and not dist.is_initialized():  # FSDP on one process still needs a group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        world.owns_group = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model_keys = parse_overrides(overrides).get("model", {})
    mcfg = build_section(ModelConfig, {"preset": args.preset, **model_keys}, "model")
    if mcfg.vocab_size < 1:
        sys.exit("error: this preset has no vocabulary size; pass --model.vocab_size=N")
    tcfg = TrainConfig(compile=args.compile, activation_checkpointing=args.ac, strategy=args.strategy,
                       dtype=args.dtype, mixed_precision=args.mixed_precision, device=args.device)
    amp_dtype = resolve_dtype(args.dtype, device)
    strategy = args.strategy if (world.distributed or args.strategy == "fsdp") else "none"
    torch.manual_seed(0)
    model = DecoderLM(mcfg)
    step_model = D.parallelize(model, tcfg, world, device, strategy, amp_dtype)
    compute_dtype = D.autocast_dtype(tcfg, strategy, amp_dtype)
    optimizer = build_optimizer(model, tcfg, device)
    T, B = mcfg.block_size, args.micro_batch
    gen = torch.Generator(device=device).manual_seed(world.rank)
    micro = [(torch.randint(0, mcfg.vocab_size, (B, T), device=device, generator=gen),
              torch.randint(0, mcfg.vocab_size, (B, T), device=device, generator=gen)) for _ in range(args.grad_accum)]
    kernel = contextlib.nullcontext()
    if args.flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    def step() -> None:
        with kernel:
            accumulate_gradients(step_model, micro, window_loss, window_count, device, compute_dtype,
                                 world=world if world.distributed else None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        D.barrier(world)

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compilation happens here
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    tokens = args.steps * B * T * args.grad_accum * world.world_size
    tok_s = tokens / elapsed
    peak, source = peak_flops(device, amp_dtype, world.world_size)
    mfu = model_flops_utilisation(tok_s, model.flops_per_token(T), peak)
    row = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": world.world_size, "strategy": strategy, "dtype": str(amp_dtype).removeprefix("torch."),
        "mixed_precision": args.mixed_precision if strategy == "fsdp" else "autocast",
        "compile": args.compile, "activation_checkpointing": args.ac, "flash": args.flash,
        "micro_batch": B, "grad_accum": args.grad_accum, "block_size": T, "params": model.num_params(),
        "ms_per_step": 1000 * elapsed / args.steps, "tokens_per_second": tok_s, "mfu": mfu, "peak_source": source,
        "warmup_s": warmup_s,
    }
    if device.type == "cuda":
        compute_bytes = 4 if amp_dtype == torch.float32 else 2
        est = estimate_memory(mcfg, "ddp" if strategy == "none" else strategy, world.world_size, B, args.ac,
                              compute_bytes, strategy == "fsdp" and args.mixed_precision == "fsdp")
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["plan_estimate_gb"] = est["total"] / 1e9
    D.shutdown(world)
    if world.is_main:
        print_table([row], [k for k in row if k not in ("peak_source", "device")])
        print(f"device: {row['device']}; MFU against {source}")
        name = args.name or f"{args.preset}_{strategy}{'_ac' if args.ac else ''}"
        print(f"wrote {write_result(f'distributed_step_{name}', row)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    p = sub.add_parser("cpu", help="shakespeare-char through the trainer at 1 and 2 processes")
    p.add_argument("--steps", type=int, default=100)
    p = sub.add_parser("step", help="synthetic-token training step of a preset (GPU or CPU, alone or under torchrun)")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                   help="with one process, ddp means no wrapper; fsdp shards over a group of one")
    p.add_argument("--mixed-precision", default="autocast", choices=["autocast", "fsdp"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--flash", action="store_true", help="force the flash-attention SDPA kernel")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--name", default=None, help="result file suffix")
    args, rest = parser.parse_known_args()
    if args.mode == "step":
        step_benchmark(args, rest)
    else:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.mode is None:
            args.steps = 100
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
