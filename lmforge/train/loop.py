"""The training loop: maximum likelihood on next tokens, with exact resume.

One optimizer step = ``grad_accum`` micro-batches. The loss of a step is the
cross-entropy summed over every target token of all its micro-batches, divided
by their number, so accumulating micro-batches gives exactly the gradient of
one big batch, even when micro-batches hold different numbers of targets
(``-100`` marks positions without one).

Everything random in a step (data windows, dropout) comes from generators
whose state goes into the checkpoint, so ``train(cfg, resume=True)`` continues
bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train import distributed as dist_io
from lmforge.train.distributed import World, all_reduce_sum, gradient_sync
from lmforge.train.optim import build_optimizer, lr_at, set_lr

IGNORE_INDEX = -100
#: model settings that may change on resume or init_from without changing any weight's shape
_FREE_MODEL_KEYS = ("preset", "dropout", "init_std")


# ------------------------------------------------------------------------------------- device and precision

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown train.device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"train.device={name} but no CUDA GPU is available; use --train.device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LMForgeError(f"train.device={name} but MPS is not available; use --train.device=cpu")
    return device


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(n: int = 512, repeats: int = 5) -> bool:
    """Time one matmul in each dtype: CPUs with AMX or AVX512-BF16 units win in bf16, others lose badly."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        timings[dtype] = best
    return timings[torch.bfloat16] * 1.5 < timings[torch.float32]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast).

    auto = bf16 on CUDA GPUs that have it, and on CPUs whose bf16 matmuls are measurably
    faster than float32 (AMX); float32 elsewhere.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_bf16_is_faster():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise LMForgeError(f"train.dtype=float16 needs a CUDA GPU (device is {device}); use bfloat16 or float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------ the loss

def accumulate_gradients(
    model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, grad_scaler: Any = None,
    world: World | None = None,
) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss (detached).

    Each micro-batch contributes (sum of its token losses) / (target tokens of the
    whole step), so the summed gradients equal those of the mean loss over all
    targets of the step: the same as one batch holding every micro-batch.

    With several processes (``world``, ``model`` wrapped by DDP or FSDP) the target tokens
    are those of every rank (one all-reduce of the count), gradients are reduced only after
    the last micro-batch, and the loss is scaled by the world size because DDP and FSDP
    average the ranks' gradients where the global mean needs their sum. The returned loss is
    this rank's share: summed over ranks it is the step's loss.
    """
    device = torch.device(device)
    n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)  # counted on the CPU: no sync
    ranks = world.world_size if world is not None else 1
    if ranks > 1:
        count = torch.tensor([float(n_targets)], device=device)
        denominator = all_reduce_sum(count, world).clamp(min=1.0)
    else:
        denominator = max(n_targets, 1)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast(device, dtype):
                logits = model(x)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / denominator
            scaled = loss * ranks if ranks > 1 else loss
            (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
        total += loss.detach().to(total.dtype).reshape(())
    return total


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, block_size: int, batch_size: int, n_batches: int | None = None,
    seed: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats per token) and perplexity on ``dataset``.

    With ``seed``: ``n_batches`` random windows, the same ones every call (so
    evaluations during training are comparable); without: sequential windows
    covering the split (or its first ``n_batches`` batches).

    With several processes (``world``) every rank calls this with the same arguments: each
    evaluates its share of the rows of every batch and the sums are added up, so the result is
    the single-process one (up to the order of the additions).
    """
    from lmforge.data.sampler import eval_batches

    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    dtype = dtype or torch.float32
    ranks = world.world_size if world is not None else 1
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for x, y in eval_batches(dataset, block_size, batch_size, n_batches=n_batches, seed=seed):
            if ranks > 1:
                x, y = x.tensor_split(ranks)[world.rank], y.tensor_split(ranks)[world.rank]
                if len(x) == 0:  # fewer rows than ranks: still run a forward (FSDP gathers weights in it)
                    x, y = x.new_zeros((1, block_size)), y.new_full((1, block_size), IGNORE_INDEX)
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            loss_sum += loss.item()
            tokens += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if ranks > 1:
        sums = all_reduce_sum(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device), world)
        loss_sum, tokens = float(sums[0]), int(sums[1])
    if tokens == 0:
        raise LMForgeError("evaluation found no tokens; the split is smaller than one block, lower model.block_size")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


# ----------------------------------------------------------------------------------------------- metrics

class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and, when available, TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        kept = []
        if start_step and self.path.exists():  # drop lines written after the checkpoint we resume from
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= start_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = "val" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key.removeprefix('val_')}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# -------------------------------------------------------------------------------------------- set-up checks

def _prepare_data(cfg: Config, progress: bool, world: World | None = None) -> dict:
    from lmforge.data.shards import load_meta, prepare

    world = world or World()
    meta_path = Path(cfg.data.data_dir) / "meta.json"
    if world.is_main and not meta_path.exists():
        prepare(cfg.data, progress=progress)
    dist_io.barrier(world)
    if not meta_path.exists():
        raise LMForgeError(
            f"{meta_path} is missing on this node (rank {world.rank}); put data.data_dir on a shared file system "
            "or run `lmforge prepare` with the same recipe on every node first"
        )
    meta = load_meta(cfg.data.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise LMForgeError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {cfg.data.data_dir} has "
            f"{meta['vocab_size']} tokens; set --model.vocab_size=0 to take it from the data"
        )
    return meta


def _check_compatible(ckpt: Path, cfg: Config, what: str) -> None:
    """Refuse a checkpoint whose weights cannot be this config's model, or whose tokenizer differs."""
    saved = ckpt_io.read_config(ckpt).model
    diffs = [
        f"{key}: {getattr(saved, key)!r} in the checkpoint, {getattr(cfg.model, key)!r} in the config"
        for key in vars(cfg.model) if key not in _FREE_MODEL_KEYS and getattr(saved, key) != getattr(cfg.model, key)
    ]
    if diffs:
        raise LMForgeError(
            f"cannot {what} {ckpt}: the model shape differs ({'; '.join(diffs)}); "
            f"use the model settings of {ckpt / ckpt_io.CONFIG} or a new train.out_dir"
        )
    ckpt_tok = ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    data_tok = Path(cfg.data.data_dir) / ckpt_io.TOKENIZER
    if not data_tok.is_file():
        raise LMForgeError(f"{data_tok} is missing; rerun `lmforge prepare` for data.data_dir")
    if ckpt_io.read_json(ckpt_tok) != ckpt_io.read_json(data_tok):
        raise LMForgeError(
            f"cannot {what} {ckpt}: its tokenizer differs from {data_tok}; "
            "use the data directory the checkpoint was trained on (data.data_dir)"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ------------------------------------------------------------------------------------------------- train

def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg``'s model on its data; returns a summary of the run.

    ``resume=True`` continues from the latest checkpoint in ``cfg.train.out_dir``
    exactly where it stopped (same weights, optimizer, schedule, data stream and
    RNG). Otherwise ``out_dir`` must hold no checkpoints, and ``init_from`` may
    name a checkpoint whose weights (not optimizer) start the run.

    Under ``torchrun`` every process runs this function: see
    :mod:`lmforge.train.distributed`. ``train.batch_size`` is the global batch (each of W
    processes takes batch_size / W windows), so a recipe means the same run at any world
    size, and a checkpoint resumes at any world size with the same data order. A worker that
    torchrun restarted after a failure (``--max-restarts``) resumes by itself.

    Returns ``steps`` (optimizer steps done in total), ``train_loss`` (loss of the
    last step), ``val_loss`` and ``val_perplexity`` (last evaluation),
    ``tokens_per_second`` (median over logging intervals, all processes together), ``mfu``
    (median model FLOPs utilisation, None without a known peak), ``wall_time`` (seconds,
    this call), ``num_params``, ``world_size``, ``strategy`` (none, ddp or fsdp),
    ``stopped_early`` (the max_minutes budget ran out) and ``checkpoint`` (path of the last
    checkpoint).
    """
    cfg = copy.deepcopy(cfg)
    world, device = dist_io.setup(resolve_device(cfg.train.device))
    try:
        return _train(cfg, resume, world, device)
    finally:
        dist_io.shutdown(world)


def _train(cfg: Config, resume: bool, world: World, device: torch.device) -> dict[str, Any]:
    from lmforge.data.sampler import BlockSampler
    from lmforge.data.shards import TokenDataset
    from lmforge.model import DecoderLM

    tcfg, mcfg = cfg.train, cfg.model
    is_main_process = world.is_main  # only the main process logs and writes files
    say = tqdm.write if is_main_process else (lambda *_: None)
    amp_dtype = resolve_dtype(tcfg.dtype, device)
    if world.distributed and tcfg.dtype == "auto" and device.type == "cpu":  # a timing: every rank must agree
        amp_dtype = torch.float32 if dist_io.any_rank(amp_dtype == torch.float32, world, device) else amp_dtype
    if device.type == "cuda":  # TF32 matmuls for the float32 parts: ~free accuracy-wise, much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(tcfg.out_dir)
    rank_batch = dist_io.per_rank_batch(tcfg.batch_size, world)
    dist_world = world if world.distributed else None

    # Data, and the vocabulary size it implies.
    _prepare_data(cfg, progress=tcfg.progress and is_main_process, world=world)
    train_data = TokenDataset(cfg.data.data_dir, "train")
    val_data = TokenDataset(cfg.data.data_dir, "val")
    for split, ds in (("train", train_data), ("val", val_data)):
        if len(ds) < mcfg.block_size + 1:
            raise LMForgeError(
                f"the {split} split of {cfg.data.data_dir} has {len(ds)} tokens, fewer than model.block_size+1 "
                f"({mcfg.block_size + 1}); use a larger corpus or a smaller model.block_size"
            )
    strategy = dist_io.resolve_strategy(tcfg, mcfg, world, device)

    # Every check on earlier checkpoints happens before anything is written.
    resume_from = init_from = state = None
    sharded = False
    existing = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    if not resume and existing and dist_io.restarted_by_torchrun():
        resume = True
        say("restarted by torchrun: resuming from the latest checkpoint")
    if resume:
        if not existing:
            raise LMForgeError(f"no checkpoint to resume in {out_dir}; start without --resume")
        resume_from = ckpt_io.latest_checkpoint(out_dir)
        _check_compatible(resume_from, cfg, "resume from")
        sharded = ckpt_io.is_sharded(resume_from)
        state = (ckpt_io.load_sharded_train_state(resume_from, world.rank) if sharded
                 else ckpt_io.load_train_state(resume_from))
    else:
        if existing:
            raise LMForgeError(
                f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it "
                "or choose another train.out_dir"
            )
        if tcfg.init_from:
            init_from = ckpt_io.latest_checkpoint(tcfg.init_from)
            _check_compatible(init_from, cfg, "initialise from")

    _seed_everything(tcfg.seed)  # the same on every rank: every replica starts from the same weights
    model = DecoderLM(mcfg)
    if (resume_from and not sharded) or init_from:
        ckpt_io.load_weights(model, resume_from or init_from)
    step_model = dist_io.parallelize(model, tcfg, world, device, strategy, amp_dtype)
    compute_dtype = dist_io.autocast_dtype(tcfg, strategy, amp_dtype)
    if world.distributed:
        torch.manual_seed(tcfg.seed + world.rank)  # but each rank its own dropout masks
    optimizer = build_optimizer(model, tcfg, device)
    grad_scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    sampler = BlockSampler(train_data, mcfg.block_size, rank_batch, seed=tcfg.seed,
                           rank=world.rank, world_size=world.world_size)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        try:
            if sharded:
                ckpt_io.load_sharded_checkpoint(resume_from, model, optimizer)
            elif world.distributed:
                ckpt_io.load_full_optimizer_state(model, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise LMForgeError(
                f"the optimizer state in {resume_from} does not fit this model ({str(e).splitlines()[0]}); "
                "resume from another checkpoint or start a new run"
            ) from None
        for group, decay in zip(optimizer.param_groups, (tcfg.weight_decay, 0.0)):
            group["weight_decay"] = decay  # the config may change these on resume
            group["betas"] = (tcfg.beta1, tcfg.beta2)
        if grad_scaler is not None and state.get("grad_scaler"):
            grad_scaler.load_state_dict(state["grad_scaler"])
        sampler.load_state_dict(state["sampler"])
        start_step = int(state["step"])
        elapsed_before = float(state["metrics"].get("elapsed", 0.0))

    num_params = model.num_params()
    tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum  # all ranks together
    flops_per_token = model.flops_per_token(mcfg.block_size)
    peak, peak_source = dist_io.peak_flops(device, amp_dtype, world)
    if is_main_process:
        placement = (f"{world.world_size} processes, {strategy}, {rank_batch} windows per rank per micro-batch"
                     if world.distributed else f"device {device}")
        say(f"model: {num_params:,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings); "
            f"{placement}, {str(amp_dtype).removeprefix('torch.')}; {tokens_per_step:,} tokens per step")
        say(f"MFU against {peak / 1e12:,.3g} TFLOP/s ({peak_source})" if peak else f"no MFU: {peak_source}")
        if resume_from:
            say(f"resuming from {resume_from} at step {start_step}")
    log = MetricsLog(out_dir, start_step, tcfg.tensorboard) if is_main_process else None

    def run_eval() -> dict[str, float]:
        return evaluate(model, val_data, mcfg.block_size, tcfg.eval_batch_size or tcfg.batch_size,
                        n_batches=tcfg.eval_batches,
                        seed=tcfg.seed, device=device, dtype=compute_dtype, world=dist_world)

    # Restore the random streams last, right before the first step draws from them.
    if state is not None and state.get("rng") is not None:
        ckpt_io.restore_rng_state(state["rng"])

    bar = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (tcfg.progress and is_main_process))
    model.train()
    t_start = time.perf_counter()
    t_last, steps_since_log, loss_since_log = t_start, 0, torch.zeros((), device=device)
    speeds: list[float] = []
    utilisations: list[float] = []
    record: dict[str, Any] = {}
    last_loss = val = None
    checkpoint_path = resume_from
    stopped_early = False
    step = start_step
    while step < tcfg.max_steps:
        lr = lr_at(step, tcfg)
        set_lr(optimizer, lr)
        micro_batches = [sampler.next_batch() for _ in range(tcfg.grad_accum)]
        loss = accumulate_gradients(step_model, micro_batches, device, compute_dtype, grad_scaler, world=dist_world)
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        steps_since_log += 1
        loss_since_log += loss

        out_of_time = tcfg.max_minutes > 0 and time.perf_counter() - t_start > tcfg.max_minutes * 60
        if world.distributed and tcfg.max_minutes > 0:
            out_of_time = dist_io.any_rank(out_of_time, world, device)  # stop together
        last = step == tcfg.max_steps or out_of_time
        do_eval = last or (tcfg.eval_interval > 0 and step % tcfg.eval_interval == 0)
        do_ckpt = last or (tcfg.ckpt_interval > 0 and step % tcfg.ckpt_interval == 0)
        if last or do_eval or do_ckpt or (tcfg.log_interval > 0 and step % tcfg.log_interval == 0):
            if world.distributed:  # each rank holds its share of the loss: add them up
                summed = all_reduce_sum(torch.stack([loss_since_log, loss.reshape(())]), world)
                loss_since_log, loss = summed[0], summed[1]
            last_loss = loss.item()  # waits for the device, so the timing below is true
            now = time.perf_counter()
            speed = steps_since_log * tokens_per_step / max(now - t_last, 1e-9)
            speeds.append(speed)
            record = {
                "step": step, "loss": loss_since_log.item() / steps_since_log, "lr": lr,
                "grad_norm": dist_io.scalar(grad_norm), "tokens_per_second": speed,
                "elapsed": elapsed_before + now - t_start,
            }
            utilisation = dist_io.mfu(speed, flops_per_token, peak)
            if utilisation is not None:
                record["mfu"] = utilisation
                utilisations.append(utilisation)
            if do_eval:
                val = run_eval()
                record.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
            if log is not None:
                log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{speed:,.0f}"}
            if utilisation is not None:
                postfix["mfu"] = f"{100 * utilisation:.1f}%"
            bar.set_postfix(postfix, refresh=False)
            if do_eval:
                say(f"step {step}: train loss {record['loss']:.4f}, val loss {val['loss']:.4f}, "
                    f"val perplexity {val['perplexity']:.2f}")
            steps_since_log, loss_since_log = 0, torch.zeros((), device=device)
        if do_ckpt and world.distributed:
            checkpoint_path = ckpt_io.save_sharded_checkpoint(
                out_dir, model, cfg, step=step, optimizer=optimizer, rank=world.rank, world_size=world.world_size,
                sampler_state=sampler.state_dict(), metrics=record, grad_scaler=grad_scaler,
            )
        elif do_ckpt and is_main_process:
            checkpoint_path = ckpt_io.save_checkpoint(
                out_dir, model, cfg, step=step, optimizer=optimizer, grad_scaler=grad_scaler,
                sampler_state=sampler.state_dict(), metrics=record,
            )
        if steps_since_log == 0:
            t_last = time.perf_counter()  # evaluation and saving do not count against tokens/s
        if out_of_time:
            stopped_early = step < tcfg.max_steps
            say(f"stopping after {tcfg.max_minutes} minutes at step {step}; resume with --resume")
            break
    bar.close()

    if val is None:  # nothing was trained (already at max_steps): still report where the model stands
        val = run_eval()
    wall_time = time.perf_counter() - t_start
    if log is not None:
        log.close()
        if step > start_step:
            from lmforge.train.plot import plot_run

            try:
                plot_run(out_dir)
            except Exception as e:  # a missing plot must not lose a finished run
                say(f"could not draw {out_dir / 'loss.png'}: {e}")
    return {
        "steps": step,
        "train_loss": last_loss,
        "val_loss": val["loss"],
        "val_perplexity": val["perplexity"],
        "tokens_per_second": statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(utilisations) if utilisations else None,
        "wall_time": wall_time,
        "num_params": num_params,
        "world_size": world.world_size,
        "strategy": strategy,
        "stopped_early": stopped_early,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
    }
