"""``lmforge finetune``: train either design on (source, target) pairs, scored by the task's metric.

The language-model loop draws fixed-size windows from token shards; a task draws batches of
whole examples by token count, and its loss covers target tokens only, so it has its own loop.
The pieces are the language model's: AdamW groups and the warmup + cosine schedule
(``train.optim``), device and precision (``train.loop``), atomic checkpoints with exact resume
(``train.checkpoint``), ``metrics.jsonl`` / TensorBoard (``MetricsLog``) and ``loss.png``.

One optimizer step = ``train.grad_accum`` batches of up to ``task.batch_tokens`` tokens; the loss
is the label-smoothed cross-entropy summed over all target tokens of the step and divided by
their number. At each evaluation the validation loss is computed on every example and the
task's metric on ``task.eval_samples`` decoded examples; the run ends with a report of the whole
validation set decoded with the task's beam settings (``report.json``, ``valid.hyp.txt``).
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.tasks import metrics as task_metrics
from lmforge.tasks.data import LengthReport, ReadReport, TokenBatcher, limit_lengths, read_examples, sorted_batches
from lmforge.tasks.format import Batch, SpecialIds, TaskFormat, sequence_loss, task_special_tokens
from lmforge.tasks.model import (SEQ2SEQ_TASKS, Decoding, TaskModel, build_model, decode_ids, warm_start,
                                 warm_start_config, warm_start_state)
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.loop import MetricsLog, autocast, resolve_device, resolve_dtype
from lmforge.train.optim import build_optimizer, lr_at, set_lr

TOKENIZER_SPEC = "task_tokenizer.json"
#: model settings that may differ on resume without changing any weight
_FREE_MODEL_KEYS = ("preset", "dropout", "init_std")


def task_metric_names(task: str) -> tuple[str, ...]:
    from lmforge.tasks import TASKS

    return TASKS[task].METRICS


# ------------------------------------------------------------------------------------------------ data


@dataclass
class TaskData:
    """The examples of one file, tokenized and cut to the task's limits."""

    texts: list[tuple[str, str]]
    sources: list[list[int]]  # tokens of the source text (no special tokens)
    targets: list[list[int]]
    lengths: np.ndarray  # padded-size parts per example (see TaskFormat.lengths)
    read: ReadReport
    limits: LengthReport

    @classmethod
    def load(cls, path: str, tokenizer, fmt: TaskFormat, cfg: Config) -> "TaskData":
        task = cfg.task
        pairs, read = read_examples(path, task.source_key, task.target_key)
        src_ids = tokenizer.encode_batch([s for s, _ in pairs])
        tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
        sources, targets, index, limits = limit_lengths(
            src_ids, tgt_ids, task.max_source_len - fmt.source_room, task.max_target_len - 1, task.overlong,
            (task.max_source_len, task.max_target_len))
        lengths = np.array(fmt.lengths(sources, targets), dtype=np.int64)
        return cls([pairs[i] for i in index], sources, targets, lengths, read, limits)

    def batch(self, fmt: TaskFormat, rows: list[int]) -> Batch:
        return fmt.collate([self.sources[i] for i in rows], [self.targets[i] for i in rows])

    def real_tokens(self, rows: list[int]) -> int:
        return int(self.lengths[rows].sum())


def resolve_tokenizer(cfg: Config, start_from: Path | None, say: Callable[[str], None]):
    """The tokenizer of a run: the checkpoint's when starting from one, task.tokenizer_file when
    given, else a joint tokenizer trained on both sides of the training file into data.data_dir
    (reused while the file and the settings stay the same)."""
    from lmforge.tokenizer import Tokenizer

    if start_from is not None:
        return Tokenizer.load(ckpt_io.require_file(start_from, ckpt_io.TOKENIZER, "copy its tokenizer.json into it"))
    task, data = cfg.task, cfg.data
    if task.tokenizer_file:
        return Tokenizer.load(task.tokenizer_file)
    data_dir = Path(data.data_dir)
    train_file = Path(task.train_file)
    spec = {"kind": data.tokenizer, "vocab_size": data.vocab_size, "byte_fallback": data.byte_fallback,
            "special_tokens": task_special_tokens(data.special_tokens, task.source_prefix),
            "train_file": str(train_file.resolve()), "bytes": train_file.stat().st_size,
            "keys": [task.source_key, task.target_key]}
    spec_path, tok_path = data_dir / TOKENIZER_SPEC, data_dir / ckpt_io.TOKENIZER
    if tok_path.is_file() and spec_path.is_file():
        try:
            if json.loads(spec_path.read_text(encoding="utf-8")) == spec:
                say(f"tokenizer: reusing {tok_path}")
                return Tokenizer.load(tok_path)
        except json.JSONDecodeError:
            pass
    pairs, _ = read_examples(task.train_file, task.source_key, task.target_key)  # bad data fails before any output
    say(f"tokenizer: training a joint {data.tokenizer} tokenizer on both sides of {train_file} into {tok_path}")
    tokenizer = Tokenizer.train((text for pair in pairs for text in pair), kind=data.tokenizer,
                                vocab_size=data.vocab_size, special_tokens=spec["special_tokens"],
                                byte_fallback=data.byte_fallback)
    tokenizer.save(tok_path)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return tokenizer


def _check_positions(mcfg: ModelConfig, cfg: Config) -> None:
    if mcfg.pos_encoding == "rotary":
        return
    task = cfg.task
    if mcfg.arch == "seq2seq":
        need = max(task.max_source_len, task.max_target_len)
        what = "max(task.max_source_len, task.max_target_len)"
    else:
        need = task.max_source_len + task.max_target_len - 1
        what = "task.max_source_len + task.max_target_len - 1"
    if need > mcfg.block_size:
        raise LMForgeError(f"{what} = {need} tokens do not fit in model.block_size={mcfg.block_size} positions; "
                           f"raise model.block_size or lower the task's length limits")


# ------------------------------------------------------------------------------------------------ loss


def accumulate_task_gradients(model: nn.Module, batches: list[Batch], device: torch.device, dtype: torch.dtype,
                              label_smoothing: float, grad_scaler: Any = None) -> torch.Tensor:
    """Forward and backward over one step's batches; each contributes its summed token losses
    divided by the target tokens of the whole step, so the gradient is that of the mean over the step."""
    denominator = max(sum(b.n_targets for b in batches), 1)
    total = torch.zeros((), device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, dtype):
            logits = batch.logits(model)
        loss = sequence_loss(logits, batch.labels, label_smoothing) / denominator
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        total += loss.detach()
    return total


@torch.no_grad()
def validation_loss(model: nn.Module, data: TaskData, fmt: TaskFormat, batch_tokens: int, device: torch.device,
                    dtype: torch.dtype, label_smoothing: float) -> dict[str, float]:
    """Label-smoothed loss (comparable to the training loss) and plain NLL / perplexity per target token."""
    was_training = model.training
    model.eval()
    smoothed = nll = 0.0
    targets = 0
    try:
        for rows in sorted_batches(data.lengths, batch_tokens):
            batch = data.batch(fmt, rows).to(device)
            with autocast(device, dtype):
                logits = batch.logits(model)
            smoothed += sequence_loss(logits, batch.labels, label_smoothing).item()
            nll += sequence_loss(logits, batch.labels, 0.0).item()
            targets += batch.n_targets
    finally:
        model.train(was_training)
    return {"loss": smoothed / targets, "nll": nll / targets, "perplexity": math.exp(min(nll / targets, 700.0))}


def score_examples(task_model: TaskModel, texts: list[tuple[str, str]], sources: list[list[int]],
                   decoding: Decoding, batch_size: int = 32) -> tuple[dict[str, float], list[str], float]:
    """Decode tokenized sources and score them against the reference texts: (scores, hypotheses,
    sentences per second)."""
    fmt = task_model.fmt
    start = time.perf_counter()
    outputs = decode_ids(task_model.model, fmt, [fmt.source(s) for s in sources], decoding, batch_size)
    seconds = time.perf_counter() - start
    hyps = [task_model.tokenizer.decode(o).strip() for o in outputs]
    scores = task_metrics.score(task_metric_names(task_model.cfg.task.name), hyps, [t for _, t in texts])
    return scores, hyps, len(hyps) / max(seconds, 1e-9)


def evaluate_file(task_model: TaskModel, path: str, decoding: Decoding, batch_size: int = 32,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Decode every example of a TSV/JSONL test file and score it; returns scores and hypotheses."""
    cfg = task_model.cfg
    data = TaskData.load(path, task_model.tokenizer, task_model.fmt, cfg)
    say(data.read.summary())
    if data.limits.summary():
        say(f"note: {data.limits.summary()}")
    scores, hyps, speed = score_examples(task_model, data.texts, data.sources, decoding, batch_size)
    return {"file": str(path), "examples": len(hyps), "scores": scores, "sentences_per_second": speed,
            "decoding": vars(decoding), "read": _read_dict(data.read), "lengths": data.limits.as_dict(),
            "hypotheses": hyps}


def _read_dict(report: ReadReport) -> dict:
    return {"rows": report.rows, "kept": report.kept, "skipped": dict(report.skipped)}


def plot_metric(run_dir: Path, key: str) -> Path:
    """``run_dir/<metric>.png``: a validation metric against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmforge.train.plot import read_metrics

    points = [(r["step"], r[key]) for r in read_metrics(run_dir) if r.get(key) is not None]
    if not points:
        raise LMForgeError(f"{run_dir / 'metrics.jsonl'} holds no {key} values yet; evaluate at least once")
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(key.removeprefix("val_"))
    ax.set_title(f"{run_dir.name}: validation {key.removeprefix('val_')}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = run_dir / f"{key.removeprefix('val_')}.png"
    fig.savefig(out)
    return out


# ----------------------------------------------------------------------------------------------- train


def _say(message: str) -> None:
    """Logs go to stderr, so that stdout holds only the summary the CLI prints."""
    tqdm.write(message, file=sys.stderr)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resumable(ckpt: Path, cfg: Config) -> None:
    saved = ckpt_io.read_config(ckpt)
    diffs = [f"model.{f.name}: {getattr(saved.model, f.name)!r} in the checkpoint, {getattr(cfg.model, f.name)!r} now"
             for f in fields(ModelConfig)
             if f.name not in _FREE_MODEL_KEYS and getattr(saved.model, f.name) != getattr(cfg.model, f.name)]
    if saved.task.name != cfg.task.name:
        diffs.insert(0, f"task {saved.task.name!r} in the checkpoint, {cfg.task.name!r} now")
    if diffs:
        raise LMForgeError(f"cannot resume from {ckpt}: {'; '.join(diffs)}; "
                           "use the recipe it was trained with, or a new train.out_dir")


def finetune(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg``'s model on ``cfg.task``'s examples; returns a summary of the run.

    ``resume=True`` continues from the latest checkpoint in train.out_dir exactly where it stopped.
    Otherwise train.out_dir must hold no checkpoint, and train.init_from may name a checkpoint (a
    language model or a task model) whose weights start the run.
    """
    cfg = copy.deepcopy(cfg)
    tcfg, task = cfg.train, cfg.task
    if task.name == "lm":
        raise LMForgeError("task.name is lm; finetune trains translation or summarization "
                           "(`lmforge finetune translation ...`); language models train with `lmforge train`")
    if task.name not in SEQ2SEQ_TASKS:
        raise LMForgeError(f"task.name is {task.name}; this trainer trains translation or summarization")
    if not task.train_file:
        raise LMForgeError("no training examples; pass --train FILE (TSV with a header, or JSONL)")
    say = _say
    device = resolve_device(tcfg.device)
    amp_dtype = resolve_dtype(tcfg.dtype, device)
    out_dir = Path(tcfg.out_dir)

    # Every check on earlier checkpoints happens before anything is written.
    resume_from = init_from = state = None
    existing = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    if resume:
        if not existing:
            raise LMForgeError(f"no checkpoint to resume in {out_dir}; start without --resume")
        resume_from = ckpt_io.latest_checkpoint(out_dir)
        if tcfg.init_from:  # the run's model shape came from that checkpoint, as below
            cfg.model = warm_start_config(ckpt_io.read_config(ckpt_io.latest_checkpoint(tcfg.init_from)).model,
                                          cfg.model)
        cfg.model = replace_vocab(cfg.model, ckpt_io.read_config(resume_from).model.vocab_size)
        _check_resumable(resume_from, cfg)
        state = ckpt_io.load_train_state(resume_from)
    elif existing:
        raise LMForgeError(f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it "
                           "or choose another train.out_dir")
    elif tcfg.init_from:
        init_from = ckpt_io.latest_checkpoint(tcfg.init_from)
        saved = ckpt_io.read_config(init_from)
        cfg.model = warm_start_config(saved.model, cfg.model)
        say(f"model shape from {init_from} (the recipe's model settings other than arch and dropout are unused)")

    tokenizer = resolve_tokenizer(cfg, resume_from or init_from, say)
    if cfg.model.vocab_size == 0:
        cfg.model = replace_vocab(cfg.model, tokenizer.vocab_size)
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise LMForgeError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has "
                           f"{tokenizer.vocab_size} tokens; set --model.vocab_size=0 to take it from the tokenizer")
    mcfg = cfg.model
    _check_positions(mcfg, cfg)
    ids = SpecialIds.from_tokenizer(tokenizer, task.source_prefix, task.decoder_start)
    fmt = TaskFormat(mcfg.arch, ids)

    train_data = TaskData.load(task.train_file, tokenizer, fmt, cfg)
    valid_data = TaskData.load(task.valid_file, tokenizer, fmt, cfg) if task.valid_file else None
    for data in (train_data, valid_data):
        if data is not None:
            say(data.read.summary())
            if data.limits.summary():
                say(f"note: {data.read.path}: {data.limits.summary()}")
    batcher = TokenBatcher(train_data.lengths, task.batch_tokens, seed=tcfg.seed)

    _seed_everything(tcfg.seed)
    model = build_model(mcfg)
    fresh: list[str] = []
    if resume_from:
        ckpt_io.load_weights(model, resume_from)
        if tcfg.init_from and tcfg.fresh_lr_scale != 1.0:  # the same parameter groups as the run had
            fresh = warm_start_state(model, ckpt_io.latest_checkpoint(tcfg.init_from))[1]
    elif init_from:
        account, fresh = warm_start(model, init_from)
        say(f"init: {account}")
    model.to(device)
    optimizer = build_optimizer(model, tcfg, device, set(fresh))
    grad_scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise LMForgeError(f"the optimizer state in {resume_from} does not fit this model "
                               f"({str(e).splitlines()[0]}); resume from another checkpoint or start a new run"
                               ) from None
        if grad_scaler is not None and state.get("grad_scaler"):
            grad_scaler.load_state_dict(state["grad_scaler"])
        batcher.load_state_dict(state["sampler"])
        start_step = int(state["step"])
        elapsed_before = float(state["metrics"].get("elapsed", 0.0))

    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / ckpt_io.TOKENIZER  # the run's own copy: checkpoints it came from may be pruned
    tokenizer.save(tok_path)
    task_model = TaskModel(model, cfg, tokenizer)
    eval_decoding = Decoding.from_task(task, beam_size=task.eval_beam_size)
    metric_key = f"val_{task.metric}"
    num_params = model.num_params()
    say(f"{task.name}, {mcfg.arch}: {num_params:,} parameters; {len(train_data.texts):,} training examples in "
        f"{batcher.batches_per_epoch:,} batches of <= {task.batch_tokens:,} tokens; device {device}, "
        f"{str(amp_dtype).removeprefix('torch.')}")
    log = MetricsLog(out_dir, start_step, tcfg.tensorboard)

    def run_eval() -> dict[str, float]:
        if valid_data is None:
            return {}
        out = validation_loss(model, valid_data, fmt, task.batch_tokens, device, amp_dtype, task.label_smoothing)
        record = {"val_loss": out["loss"], "val_nll": out["nll"], "val_perplexity": out["perplexity"]}
        n = task.eval_samples or len(valid_data.texts)
        scores, _, _ = score_examples(task_model, valid_data.texts[:n], valid_data.sources[:n], eval_decoding)
        record.update({f"val_{k}": v for k, v in scores.items()})
        return record

    if state is not None:
        ckpt_io.restore_rng_state(state["rng"])
    bar = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not tcfg.progress)
    model.train()
    t_start = time.perf_counter()
    t_last, steps_since_log, tokens_since_log = t_start, 0, 0
    loss_since_log = torch.zeros((), device=device)
    speeds: list[float] = []
    record: dict[str, Any] = {}
    val: dict[str, float] = {}
    last_loss = None
    checkpoint_path = resume_from
    stopped_early = False
    step = start_step
    while step < tcfg.max_steps:
        lr = lr_at(step, tcfg)
        set_lr(optimizer, lr)
        rows = [batcher.next_batch() for _ in range(tcfg.grad_accum)]
        batches = [train_data.batch(fmt, r) for r in rows]
        loss = accumulate_task_gradients(model, batches, device, amp_dtype, task.label_smoothing, grad_scaler)
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
        tokens_since_log += sum(train_data.real_tokens(r) for r in rows)

        out_of_time = tcfg.max_minutes > 0 and time.perf_counter() - t_start > tcfg.max_minutes * 60
        last = step == tcfg.max_steps or out_of_time
        do_eval = last or (tcfg.eval_interval > 0 and step % tcfg.eval_interval == 0)
        do_ckpt = last or (tcfg.ckpt_interval > 0 and step % tcfg.ckpt_interval == 0)
        if last or do_eval or do_ckpt or (tcfg.log_interval > 0 and step % tcfg.log_interval == 0):
            last_loss = loss.item()
            now = time.perf_counter()
            speed = tokens_since_log / max(now - t_last, 1e-9)
            speeds.append(speed)
            record = {"step": step, "loss": loss_since_log.item() / steps_since_log, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_second": speed, "epoch": batcher.epoch,
                      "elapsed": elapsed_before + now - t_start}
            if do_eval:
                val = run_eval()
                record.update(val)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{speed:,.0f}", refresh=False)
            if do_eval and val:
                say(f"step {step}: train loss {record['loss']:.4f}, val loss {val['val_loss']:.4f}, "
                    + ", ".join(f"{k.removeprefix('val_')} {v:.2f}" for k, v in val.items()
                                if k not in ("val_loss", "val_nll", "val_perplexity")))
            steps_since_log, tokens_since_log = 0, 0
            loss_since_log = torch.zeros((), device=device)
        if do_ckpt:
            checkpoint_path = ckpt_io.save_checkpoint(
                out_dir, model, cfg, step=step, optimizer=optimizer, grad_scaler=grad_scaler,
                sampler_state=batcher.state_dict(), metrics=record, tokenizer_path=tok_path)
        if steps_since_log == 0:
            t_last = time.perf_counter()
        if out_of_time:
            stopped_early = step < tcfg.max_steps
            say(f"stopping after {tcfg.max_minutes} minutes at step {step}; resume with --resume")
            break
    bar.close()
    log.close()
    train_seconds = time.perf_counter() - t_start

    summary: dict[str, Any] = {
        "task": task.name, "arch": mcfg.arch, "steps": step, "train_loss": last_loss,
        "tokens_per_second": statistics.median(speeds) if speeds else None, "train_seconds": train_seconds,
        "num_params": num_params, "stopped_early": stopped_early,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "train_examples": _read_dict(train_data.read), "train_lengths": train_data.limits.as_dict(),
    }
    if valid_data is not None:
        if not val:
            val = run_eval()
        summary.update({k: v for k, v in val.items()})
        final = Decoding.from_task(task)
        scores, hyps, speed = score_examples(task_model, valid_data.texts, valid_data.sources, final)
        summary["valid"] = {"decoding": vars(final), "examples": len(hyps), "scores": scores,
                            "sentences_per_second": speed, "read": _read_dict(valid_data.read),
                            "lengths": valid_data.limits.as_dict()}
        (out_dir / "valid.hyp.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
        say(f"valid ({len(hyps)} examples, beam {final.beam_size}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if step > start_step:
        from lmforge.train.plot import plot_run

        try:
            plot_run(out_dir)
            if valid_data is not None:
                plot_metric(out_dir, metric_key)
        except Exception as e:  # a missing plot must not lose a finished run
            say(f"could not draw the plots in {out_dir}: {e}")
    return summary


def replace_vocab(mcfg: ModelConfig, vocab_size: int) -> ModelConfig:
    out = copy.copy(mcfg)
    out.vocab_size = vocab_size
    return out
