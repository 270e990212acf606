"""The training loop, one for every objective: maximum likelihood with exact resume, on one process or many.

One optimizer step = ``train.grad_accum`` micro-batches on each of the W processes. The loss of
a step is the sum of the item losses of all of them (target tokens, or examples) divided by their
number, so accumulating micro-batches or adding processes gives exactly the gradient of one big
batch, even when micro-batches hold different numbers of items. Each micro-batch's share is
back-propagated at once, so memory holds one micro-batch's activations at a time.

Everything random in a step (data, masks, dropout) comes from generators whose state goes into
the checkpoint, with the dtype chosen for the run, so ``fit(cfg, objective, resume=True)``
continues bit for bit on CPU. What is trained, on which examples, and how it is scored comes from
the :class:`~lmforge.train.objective.Objective`; this file knows no task.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from lmforge import hardware
from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train import distributed as dist_io
from lmforge.train import sharded as sharded_io
from lmforge.train.distributed import World, all_reduce_sum, gradient_sync
from lmforge.lock import DirectoryLock
from lmforge.train.objective import Objective, Run, say_stderr, seed_everything
from lmforge.train.optim import build_optimizer, load_optimizer_state, lr_at, newton_schulz_dtype, set_lr


# ------------------------------------------------------------------------------------------------ the loss

def accumulate_gradients(
    model: nn.Module, micro_batches: list, loss: Callable[[nn.Module, Any], torch.Tensor],
    count: Callable[[Any], int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    grad_scaler: Any = None, world: World | None = None,
) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss (detached).

    Each micro-batch contributes (its summed loss) / (items of the whole step), so the summed
    gradients equal those of the mean loss over all items of the step: the same as one batch
    holding every micro-batch. Its graph is freed by its own backward pass.

    With several processes (``world``, ``model`` wrapped by DDP or FSDP) the items are those of
    every rank (one all-reduce of the count), gradients are reduced only after the last
    micro-batch, and the loss is scaled by the world size because DDP and FSDP average the ranks'
    gradients where the global mean needs their sum. The returned loss is this rank's share:
    summed over ranks it is the step's loss.
    """
    device = torch.device(device)
    counts = [count(b) for b in micro_batches]  # counted on the CPU: no sync
    ranks = world.world_size if world is not None else 1
    if ranks > 1:
        denominator = all_reduce_sum(torch.tensor([float(sum(counts))], device=device), world).clamp(min=1.0)
    else:
        denominator = max(sum(counts), 1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with hardware.autocast(device, dtype):
                summed = loss(model, batch)
            if counts[i] == 0:  # a rank without rows this time still runs its part of the collective
                summed = summed * 0.0
            share = summed.float() / denominator
            scaled = share * ranks if ranks > 1 else share
            (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
        total += share.detach().reshape(())
    return total


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


# ------------------------------------------------------------------------------------------- the trainer

def _load_state(resume_from: Path, world: World) -> tuple[dict, bool]:
    sharded = ckpt_io.is_sharded(resume_from)
    state = (sharded_io.load_sharded_train_state(resume_from, world.rank) if sharded
             else ckpt_io.load_train_state(resume_from))
    return state, sharded


def _named_checkpoint(out_dir: Path, name: str | int) -> Path:
    """The checkpoint of this run that ``--resume CKPT`` names: a step number or a checkpoint directory."""
    steps = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    have = ", ".join(str(step) for step, _ in steps)
    if str(name).isdigit():
        found = [path for step, path in steps if step == int(name)]
        if not found:
            raise LMForgeError(f"{out_dir} has no checkpoint of step {name}; it has steps {have}")
        return found[0]
    path = Path(name)
    if not any(path.resolve() == p.resolve() for _, p in steps):
        raise LMForgeError(f"{name} is not a checkpoint of the run in {out_dir} (steps {have}); --resume continues "
                           "this run, give a step number, or start from other weights with --train.init_from")
    return path


def _run_dtype(tcfg, device: torch.device, world: World, state: dict | None, objective: Objective,
               model: nn.Module) -> torch.dtype:
    """train.dtype; auto is taken from the checkpoint a run resumes, else chosen by measuring.

    On a CPU whose bf16 matmuls beat float32 (AVX512-BF16, AMX), a bf16 step of a small model can
    still be slower than a float32 one (autocast's casts cost more than the matmuls save), so auto
    times this model's own forward and backward pass on a micro-batch in both dtypes and takes
    bf16 only when it is clearly faster. The probe leaves no trace: the sampler is rewound, the
    random streams restored and the gradients dropped.
    """
    if tcfg.dtype == "auto" and state is not None and state.get("dtype") in hardware.DTYPES:
        return hardware.DTYPES[state["dtype"]]  # the run keeps the dtype it started with
    dtype = hardware.resolve_dtype(tcfg.dtype, device)
    if tcfg.dtype == "auto" and device.type == "cpu":
        if dtype == torch.bfloat16:
            position, rng = objective.state_dict(), ckpt_io.capture_rng_state()
            batch = objective.next_batch(0, 0)
            objective.load_state_dict(position)
            model.to(device).train()

            def step(candidate: torch.dtype) -> None:
                with hardware.autocast(device, candidate):
                    objective.loss(model, batch).float().backward()
                model.zero_grad(set_to_none=True)

            dtype = hardware.faster_dtype(step, (torch.float32, torch.bfloat16))
            ckpt_io.restore_rng_state(rng)
        if world.distributed:  # a timing: every rank must agree
            dtype = torch.float32 if dist_io.any_rank(dtype == torch.float32, world, device) else dtype
    return dtype


def fit(cfg: Config, objective: Objective, resume: bool | str | int = False) -> dict[str, Any]:
    """Train ``objective``'s model with ``cfg``'s settings; returns a summary of the run.

    ``resume=True`` continues from the latest checkpoint in ``cfg.train.out_dir`` exactly where
    it stopped (same weights, optimizer, schedule, data stream, RNG and dtype); a step number or a
    checkpoint directory of that run continues from that one instead. Otherwise
    ``out_dir`` must hold no checkpoints, and ``train.init_from`` may name a checkpoint whose
    weights (not optimizer) start the run.

    Under ``torchrun`` every process runs this function: see :mod:`lmforge.train.distributed`.
    A micro-batch is global (``train.batch_size`` windows or examples, or ``task.batch_tokens``
    tokens, in all): each of W processes takes its part, so a recipe means the same run at any
    world size, and a checkpoint resumes at any world size with the same data order. A worker
    that torchrun restarted after a failure resumes by itself.

    Returns ``steps``, ``train_loss`` (last step), the last evaluation's ``val_*`` metrics,
    ``<unit>_per_second`` (median over logging intervals, all processes together), ``mfu``,
    ``wall_time``, ``num_params``, ``world_size``, ``strategy``, ``dtype``, ``stopped_early``,
    ``checkpoint`` and what the objective's final report adds.
    """
    cfg = copy.deepcopy(cfg)
    world, device = dist_io.setup(hardware.resolve_device(cfg.train.device))
    lock = DirectoryLock(cfg.train.out_dir, "training run") if world.is_main else None
    try:
        if lock is not None:  # one trainer per run directory
            lock.acquire()
        return _fit(cfg, objective, resume, world, device)
    finally:
        if lock is not None:
            lock.release()
        dist_io.shutdown(world)


def _fit(cfg: Config, objective: Objective, resume: bool | str | int, world: World,
         device: torch.device) -> dict[str, Any]:
    tcfg = cfg.train
    is_main = world.is_main  # only the main process logs and writes files
    say = say_stderr if is_main else (lambda *_: None)
    if device.type == "cuda":  # TF32 matmuls for the float32 parts: ~free accuracy-wise, much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(tcfg.out_dir)

    # Every check on earlier checkpoints happens before anything is written.
    existing = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    if not resume and existing and dist_io.restarted_by_torchrun():
        resume = True
        say("restarted by torchrun: resuming from the latest checkpoint")
    resume_from, state, sharded = None, None, False
    if resume:
        if not existing:
            raise LMForgeError(f"no checkpoint to resume in {out_dir}; start without --resume")
        resume_from = ckpt_io.latest_checkpoint(out_dir) if resume is True else _named_checkpoint(out_dir, resume)
        state, sharded = _load_state(resume_from, world)
    elif existing:
        raise LMForgeError(f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it "
                           "or choose another train.out_dir")
    run = Run(cfg=cfg, world=world, device=device, dtype=torch.float32, out_dir=out_dir, resume_from=resume_from,
              say=say)
    objective.setup(run)

    seed_everything(tcfg.seed)  # the same on every rank: every replica starts from the same weights
    model = objective.build_model()
    if resume_from is not None and not sharded:
        ckpt_io.load_weights(model, resume_from)
    amp_dtype = run.dtype = _run_dtype(tcfg, device, world, state, objective, model)
    strategy = dist_io.resolve_strategy(tcfg, cfg.model, world, device)
    eval_copy = None
    if strategy == "fsdp" and not objective.evaluates_sharded and is_main:
        eval_copy = copy.deepcopy(model)  # the main rank evaluates a whole model, gathered from the shards
    step_model = dist_io.parallelize(model, tcfg, world, device, strategy, amp_dtype,
                                     find_unused_parameters=objective.find_unused_parameters)
    compute_dtype = run.dtype = dist_io.autocast_dtype(tcfg, strategy, amp_dtype)
    if world.distributed:
        torch.manual_seed(tcfg.seed + world.rank)  # but each rank its own dropout masks
    optimizer = build_optimizer(model, tcfg, device, set(run.fresh))
    grad_scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            if sharded:
                sharded_io.load_sharded_checkpoint(resume_from, model, optimizer)
            elif world.distributed:
                sharded_io.load_full_optimizer_state(model, optimizer, state["optimizer"])
            else:
                load_optimizer_state(optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise LMForgeError(
                f"the optimizer state in {resume_from} does not fit this model ({str(e).splitlines()[0]}); "
                "resume from another checkpoint or start a new run"
            ) from None
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)  # the recipe's settings (decay, betas, Muon's momentum and rate...) apply on resume
        if grad_scaler is not None and state.get("grad_scaler"):
            grad_scaler.load_state_dict(state["grad_scaler"])
        objective.load_state_dict(state["sampler"])
        start_step = int(state["step"])
        elapsed_before = float(state["metrics"].get("elapsed", 0.0))
    # Muon's Newton-Schulz dtype: the one the run started with (None: a checkpoint from before the
    # choice existed, whose default it keeps), else chosen now (a timing: all ranks must agree)
    if state is not None:
        ns_dtype = state.get("muon_ns_dtype")
    else:
        ns_dtype = newton_schulz_dtype(optimizer, tcfg, device)
        if world.distributed and ns_dtype is not None:
            ns_dtype = "float32" if dist_io.any_rank(ns_dtype == "float32", world, device) else ns_dtype
    for group in optimizer.param_groups:
        if group.get("muon"):
            group["ns_dtype"] = ns_dtype

    num_params = sum(p.numel() for p in model.parameters())
    flops_per_item = objective.flops_per_item(model)
    peak, peak_source = (hardware.peak_flops(device, amp_dtype, world.world_size) if flops_per_item
                         else (None, "no FLOP count for this objective"))
    tokenizer_path = objective.tokenizer_path
    if is_main:
        placement = f"{world.world_size} processes, {strategy}" if world.distributed else f"device {device}"
        say(f"{objective.describe(model)}; {placement}, {hardware.dtype_name(amp_dtype)}")
        if flops_per_item:
            say(f"MFU against {peak / 1e12:,.3g} TFLOP/s ({peak_source})" if peak else f"no MFU: {peak_source}")
        if resume_from:
            say(f"resuming from {resume_from} at step {start_step}")
    log = MetricsLog(out_dir, start_step, tcfg.tensorboard) if is_main else None

    def whole_model() -> nn.Module | None:
        """The model to evaluate on the main rank (None elsewhere): gathered from FSDP's shards."""
        if strategy != "fsdp":
            return model if is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if eval_copy is None:
            return None
        eval_copy.load_state_dict(full, strict=False)
        return eval_copy.to(device)

    def run_eval() -> dict[str, float]:
        if objective.evaluates_sharded:
            return objective.evaluate(model)
        target = whole_model()
        result = [objective.evaluate(target) if target is not None else None]
        if world.distributed:  # the others wait for the main rank's scores
            import torch.distributed as dist

            dist.broadcast_object_list(result, src=0)
        return result[0]

    # Restore the random streams last, right before the first step draws from them.
    if state is not None and state.get("rng") is not None:
        ckpt_io.restore_rng_state(state["rng"])

    bar = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (tcfg.progress and is_main))
    model.train()
    t_start = time.perf_counter()
    t_last, steps_since_log = t_start, 0
    # summed on the device: reading a loss back waits for the device, so it happens at log steps only
    loss_since_log = torch.zeros((), dtype=torch.float64, device=device)
    items_since_log = 0
    speeds: list[float] = []
    utilisations: list[float] = []
    record: dict[str, Any] = {}
    last_loss = None
    val: dict[str, float] | None = None
    checkpoint_path = resume_from
    stopped_early = False
    step = start_step
    first_step_time = None
    per_second = f"{objective.unit}_per_second"
    trainable = [p for p in model.parameters() if p.requires_grad]
    budget = tcfg.max_minutes * 60
    clock = elapsed_before  # seconds trained (the main rank's clock under torchrun)
    while step < tcfg.max_steps and not (tcfg.schedule == "minutes" and clock >= budget):
        lr = lr_at(step, tcfg, clock)
        set_lr(optimizer, lr)
        micro_batches = [objective.next_batch(step, i) for i in range(tcfg.grad_accum)]
        loss = accumulate_gradients(step_model, micro_batches, objective.loss, objective.count, device,
                                    compute_dtype, grad_scaler, world=world if world.distributed else None)
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if first_step_time is None:
            first_step_time = time.time()  # how long start-up took, for whoever launched the process
        bar.update(1)
        steps_since_log += 1
        items_since_log += sum(objective.throughput(b) for b in micro_batches)
        loss_since_log += loss.detach()

        if budget > 0:  # the same clock on every rank: the same learning rate, and they stop together
            clock = dist_io.main_rank_value(elapsed_before + time.perf_counter() - t_start, world, device)
        # a minutes schedule spends its budget over all sessions of the run; otherwise each session gets max_minutes
        out_of_time = budget > 0 and (clock if tcfg.schedule == "minutes" else clock - elapsed_before) > budget
        last = step == tcfg.max_steps or out_of_time
        do_eval = last or (tcfg.eval_interval > 0 and step % tcfg.eval_interval == 0)
        do_ckpt = last or (tcfg.ckpt_interval > 0 and step % tcfg.ckpt_interval == 0)
        if last or do_eval or do_ckpt or (tcfg.log_interval > 0 and step % tcfg.log_interval == 0):
            sums = torch.stack([loss_since_log, torch.tensor(float(items_since_log), dtype=torch.float64,
                                                              device=device), loss.detach().double()])
            if world.distributed:  # each rank holds its share of the loss and of the items: add them up
                sums = all_reduce_sum(sums, world)
            sums = sums.tolist()
            last_loss = float(sums[2])
            now = time.perf_counter()
            speed = float(sums[1]) / max(now - t_last, 1e-9)
            speeds.append(speed)
            record = {"step": step, "loss": float(sums[0]) / steps_since_log, "lr": lr,
                      "grad_norm": dist_io.scalar(grad_norm), per_second: speed,
                      "elapsed": elapsed_before + now - t_start}
            if objective.epoch() is not None:
                record["epoch"] = objective.epoch()
            # float16's GradScaler skips steps with infinite gradients by design; anything else non-finite stops the run
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record[k]) and (k == "loss" or not grad_scaler)]
            if bad:
                raise LMForgeError(
                    f"the training {bad[0].replace('_', ' ')} became {record[bad[0]]} at step {step} (lr {lr:g}); nothing was saved "
                    f"after step {start_step if checkpoint_path is None else checkpoint_path.name}: lower train.lr "
                    "or raise train.warmup_steps, and resume from the last good checkpoint")
            utilisation = hardware.mfu(speed, flops_per_item, peak)
            if utilisation is not None:
                record["mfu"] = utilisation
                utilisations.append(utilisation)
            if do_eval:
                val = run_eval()
                record.update(val)
            record["time"] = time.time()  # wall clock when the record (and its evaluation) was done
            if log is not None:
                log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", per_second.split("_")[0][:3] + "/s": f"{speed:,.0f}"}
            if utilisation is not None:
                postfix["mfu"] = f"{100 * utilisation:.1f}%"
            if tcfg.schedule == "minutes" and clock > elapsed_before:  # the steps the time budget will hold
                bar.total = min(tcfg.max_steps, max(step, round(start_step + (step - start_step)
                                                                * (budget - elapsed_before) / (clock - elapsed_before))))
            bar.set_postfix(postfix, refresh=False)
            if do_eval and val:
                say(f"step {step}: train loss {record['loss']:.4f}, "
                    + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()
                                if isinstance(v, float)))
            steps_since_log, items_since_log = 0, 0
            loss_since_log.zero_()
        if do_ckpt:
            extra = {"dtype": hardware.dtype_name(amp_dtype), "muon_ns_dtype": ns_dtype}
            if world.distributed:
                checkpoint_path = sharded_io.save_sharded_checkpoint(
                    out_dir, model, cfg, step=step, optimizer=optimizer, rank=world.rank,
                    world_size=world.world_size, sampler_state=objective.state_dict(), metrics=record,
                    grad_scaler=grad_scaler, tokenizer_path=tokenizer_path, extra=extra)
            elif is_main:
                checkpoint_path = ckpt_io.save_checkpoint(
                    out_dir, model, cfg, step=step, optimizer=optimizer, grad_scaler=grad_scaler,
                    sampler_state=objective.state_dict(), metrics=record, tokenizer_path=tokenizer_path,
                    extra=extra)
        if steps_since_log == 0:
            t_last = time.perf_counter()  # evaluation and saving do not count against the speed
        if out_of_time:
            if tcfg.schedule == "minutes":  # the planned end: the learning rate has decayed
                say(f"the {tcfg.max_minutes:g}-minute budget is spent at step {step}")
            else:
                stopped_early = step < tcfg.max_steps
                say(f"stopping after {tcfg.max_minutes:g} minutes at step {step}; resume with --resume")
            break
    bar.close()

    if val is None:  # nothing was trained (already at max_steps): still report where the model stands
        val = run_eval()
    wall_time = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "task": cfg.task.name, "steps": step, "train_loss": last_loss, **(val or {}),
        per_second: statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(utilisations) if utilisations else None,
        "wall_time": wall_time, "train_seconds": wall_time, "num_params": num_params, "world_size": world.world_size, "strategy": strategy,
        "dtype": hardware.dtype_name(amp_dtype), "stopped_early": stopped_early,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None, "first_step_time": first_step_time,
    }
    final = whole_model()
    if log is not None:
        log.close()
        if final is not None:
            final.eval()
            objective.finish(final, summary)
        if step > start_step:
            from lmforge.train.plot import plot_run

            try:
                plot_run(out_dir)
            except Exception as e:  # a missing plot must not lose a finished run
                say(f"could not draw {out_dir / 'loss.png'}: {e}")
    return summary
