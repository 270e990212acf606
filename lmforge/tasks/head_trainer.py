"""Fine-tuning a trunk with a task head (sentiment, srl): building, checkpoints, the training loop.

The sequence-to-sequence trainer (``tasks.trainer``) batches by token count and decodes for its
metric; a head task batches whole examples (``train.batch_size`` per micro-batch) and scores by
arg-max, so it has this shorter loop over the same pieces: AdamW groups and the warmup + cosine
schedule (``train.optim``), device and precision (``train.loop``), atomic checkpoints with exact
resume (``train.checkpoint``), ``metrics.jsonl`` / TensorBoard (``MetricsLog``) and ``loss.png``.

A task is described by a :class:`HeadTask`: how to build its model on a trunk, turn examples
into a batch, compute the loss of a batch (a sum and a count, so a step's mean is over all its
tokens or examples), and score the validation set. The trunk comes from ``train.init_from``: an
lmforge language model, an lmforge encoder (``lmforge pretrain-encoder``) or an imported
Hugging Face BERT (``lmforge import``). ``task.tuning`` picks full fine-tuning, a frozen trunk,
or LoRA adapters (:mod:`lmforge.model.lora`).

A task checkpoint holds the whole model (trunk + head, adapters under their own names), the
Config (trunk shape in ``model``, label names and tuning in ``task``) and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.model.lora import apply_lora, count_trainable, set_trainable
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.loop import MetricsLog, autocast, resolve_device, resolve_dtype
from lmforge.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class HeadTask:
    """What the loop needs to know about a task."""

    #: (trunk, cfg) -> model with a ``trunk`` attribute
    build: Callable[[nn.Module, Config], nn.Module]
    #: (examples) -> batch (a dict of tensors)
    collate: Callable[[list], dict]
    #: (model, batch) -> (summed loss, number of items it sums over)
    loss: Callable[[nn.Module, dict], tuple[torch.Tensor, int]]
    #: (model, examples) -> metrics; the first key is the one drawn and reported
    evaluate: Callable[[nn.Module, list], dict[str, Any]]


def build_trunk(mcfg) -> nn.Module:
    from lmforge.model.decoder import DecoderLM
    from lmforge.model.encoder import EncoderModel

    if mcfg.arch == "encoder":
        return EncoderModel(mcfg)
    if mcfg.arch == "decoder":
        return DecoderLM(mcfg)
    raise LMForgeError(f"a {mcfg.arch} model cannot be the trunk of a task head; start from a decoder language "
                       "model or an encoder (lmforge pretrain-encoder, or `lmforge import` of a BERT)")


def build_task_model(task: HeadTask, cfg: Config, trunk: nn.Module | None = None) -> nn.Module:
    """The task's model on ``trunk`` (a new one of shape cfg.model when None), adapters added for tuning=lora."""
    trunk = trunk if trunk is not None else build_trunk(cfg.model)
    if cfg.task.tuning == "lora":
        apply_lora(trunk, cfg.task.lora_rank, cfg.task.lora_alpha, cfg.task.lora_dropout)
    model = task.build(trunk, cfg)
    set_trainable(model, cfg.task.tuning, trunk)
    return model


def load_task_checkpoint(path: str | Path, task: HeadTask, expect: str, device: str = "cpu"):
    """(model in eval mode, Config, Tokenizer) of a checkpoint from ``lmforge finetune <expect>``."""
    from lmforge.tokenizer import Tokenizer

    ckpt = ckpt_io.latest_checkpoint(path)
    cfg = ckpt_io.read_config(ckpt)
    if cfg.task.name != expect:
        raise LMForgeError(f"{ckpt} is a {cfg.task.name} checkpoint, not {expect}; "
                           f"give one trained with `lmforge finetune {expect}`")
    tokenizer = Tokenizer.load(ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it"))
    model = build_task_model(task, cfg)
    ckpt_io.load_weights(model, ckpt)
    model.to(device).eval()
    return model, cfg, tokenizer


def start_trunk(cfg: Config, say: Callable[[str], None]):
    """(trunk with its weights, Config with the trunk's shape, tokenizer path) from train.init_from."""
    if not cfg.train.init_from:
        raise LMForgeError("no trunk to fine-tune; pass --init-from CKPT: an lmforge language model (`lmforge train`), "
                           "an encoder (`lmforge pretrain-encoder`) or an imported BERT (`lmforge import`)")
    ckpt = ckpt_io.latest_checkpoint(cfg.train.init_from)
    saved = ckpt_io.read_config(ckpt)
    if saved.task.name not in ("lm",):
        raise LMForgeError(f"{ckpt} is a {saved.task.name} checkpoint; start from a language model or an encoder")
    trunk = build_trunk(saved.model)
    ckpt_io.load_weights(trunk, ckpt)
    cfg.model = copy.copy(saved.model)
    say(f"trunk: {saved.model.arch} from {ckpt} ({sum(p.numel() for p in trunk.parameters()):,} parameters)")
    return trunk, ckpt / ckpt_io.TOKENIZER


class ExampleSampler:
    """Examples in a new random order each epoch (seeded); state = (epoch, position) for exact resume."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise LMForgeError("no training examples; check the training file")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def next_batch(self) -> list[int]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        rows = self._order[self.pos: self.pos + self.batch_size]
        self.pos += len(rows)
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_head(cfg: Config, task: HeadTask, model: nn.Module, train_examples: list, valid_examples: list | None,
               tokenizer_path: Path, resume_state: dict | None = None,
               say: Callable[[str], None] = lambda m: tqdm.write(m, file=sys.stderr)) -> dict[str, Any]:
    """Optimise ``model`` on the examples; checkpoints and logs go to train.out_dir. Returns a summary."""
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    amp_dtype = resolve_dtype(tcfg.dtype, device)
    out_dir = Path(tcfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own_tokenizer = out_dir / ckpt_io.TOKENIZER  # the run's copy: the checkpoint it came from may be pruned
    if Path(tokenizer_path).resolve() != own_tokenizer.resolve():
        shutil.copyfile(tokenizer_path, own_tokenizer)
    tokenizer_path = own_tokenizer
    sampler = ExampleSampler(len(train_examples), tcfg.batch_size, tcfg.seed)
    model.to(device)
    optimizer = build_optimizer(model, tcfg, device)
    start_step, elapsed_before = 0, 0.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        sampler.load_state_dict(resume_state["sampler"])
        start_step = int(resume_state["step"])
        elapsed_before = float(resume_state["metrics"].get("elapsed", 0.0))
        ckpt_io.restore_rng_state(resume_state["rng"])
    trainable, total = count_trainable(model)
    say(f"{cfg.task.name} ({cfg.task.tuning}): {trainable:,} of {total:,} parameters train; "
        f"{len(train_examples):,} training examples, batch {tcfg.batch_size} x {tcfg.grad_accum}; device {device}")
    log = MetricsLog(out_dir, start_step, tcfg.tensorboard)
    params = [p for p in model.parameters() if p.requires_grad]

    def run_eval() -> dict[str, Any]:
        if not valid_examples:
            return {}
        model.eval()
        try:
            with torch.no_grad(), autocast(device, amp_dtype):
                return task.evaluate(model, valid_examples)
        finally:
            model.train()

    bar = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not tcfg.progress)
    model.train()
    t_start = t_last = time.perf_counter()
    examples_since, loss_since, steps_since = 0, 0.0, 0
    step, val, record, ckpt_path, speeds = start_step, {}, {}, None, []
    while step < tcfg.max_steps:
        lr = lr_at(step, tcfg)
        set_lr(optimizer, lr)
        batches = [task.collate([train_examples[i] for i in sampler.next_batch()]) for _ in range(tcfg.grad_accum)]
        outs = []
        for batch in batches:  # each batch's summed loss over the step's count: the step's mean
            with autocast(device, amp_dtype):
                outs.append(task.loss(model, _to(batch, device)))
        count = max(sum(n for _, n in outs), 1)
        loss = sum(s for s, _ in outs) / count
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        steps_since += 1
        loss_since += loss.item()
        examples_since += sum(len(b["examples"]) for b in batches)
        out_of_time = tcfg.max_minutes > 0 and time.perf_counter() - t_start > tcfg.max_minutes * 60
        last = step == tcfg.max_steps or out_of_time
        do_eval = last or (tcfg.eval_interval > 0 and step % tcfg.eval_interval == 0)
        do_ckpt = last or (tcfg.ckpt_interval > 0 and step % tcfg.ckpt_interval == 0)
        if last or do_eval or do_ckpt or (tcfg.log_interval > 0 and step % tcfg.log_interval == 0):
            now = time.perf_counter()
            speed = examples_since / max(now - t_last, 1e-9)
            speeds.append(speed)
            record = {"step": step, "loss": loss_since / steps_since, "lr": lr, "grad_norm": float(grad_norm),
                      "examples_per_second": speed, "epoch": sampler.epoch, "elapsed": elapsed_before + now - t_start}
            if do_eval:
                val = {f"val_{k}": v for k, v in run_eval().items() if isinstance(v, (int, float))}
                record.update(val)
                if val:
                    say(f"step {step}: train loss {record['loss']:.4f}, "
                        + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in val.items()))
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{speed:,.0f}", refresh=False)
            examples_since, loss_since, steps_since = 0, 0.0, 0
            t_last = time.perf_counter()
        if do_ckpt:
            ckpt_path = ckpt_io.save_checkpoint(out_dir, model, cfg, step=step, optimizer=optimizer,
                                                sampler_state=sampler.state_dict(), metrics=record,
                                                tokenizer_path=tokenizer_path)
            t_last = time.perf_counter()
        if out_of_time:
            say(f"stopping after {tcfg.max_minutes} minutes at step {step}; resume with --resume")
            break
    bar.close()
    log.close()
    summary = {"task": cfg.task.name, "tuning": cfg.task.tuning, "steps": step,
               "train_loss": record.get("loss"), "trainable_params": trainable, "params": total,
               "train_examples_per_second": float(np.median(speeds)) if speeds else None,
               "train_seconds": time.perf_counter() - t_start, "checkpoint": str(ckpt_path) if ckpt_path else None}
    if step > start_step:
        from lmforge.train.plot import plot_run

        try:
            plot_run(out_dir)
        except Exception as e:  # a missing plot must not lose a finished run
            say(f"could not draw the loss plot in {out_dir}: {e}")
    return summary


def prepare_run(cfg: Config, task_name: str, resume: bool, say: Callable[[str], None]):
    """Checks before anything is written: (trunk or None, tokenizer path, resume state or None, resume ckpt)."""
    out_dir = Path(cfg.train.out_dir)
    existing = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    if resume:
        if not existing:
            raise LMForgeError(f"no checkpoint to resume in {out_dir}; start without --resume")
        ckpt = ckpt_io.latest_checkpoint(out_dir)
        saved = ckpt_io.read_config(ckpt)
        if saved.task.name != task_name:
            raise LMForgeError(f"{ckpt} is a {saved.task.name} run, not {task_name}; use another train.out_dir")
        cfg.model, cfg.task.labels, cfg.task.senses = saved.model, saved.task.labels, saved.task.senses
        cfg.task.tuning = saved.task.tuning
        return None, ckpt / ckpt_io.TOKENIZER, ckpt_io.load_train_state(ckpt), ckpt
    if existing:
        raise LMForgeError(f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it "
                           "or choose another train.out_dir")
    trunk, tok = start_trunk(cfg, say)
    return trunk, tok, None, None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_report(out_dir: str | Path, report: dict) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _head_builder(name: str):
    if name == "sentiment":
        from lmforge.tasks.sentiment import _DeferredTask

        return _DeferredTask()
    if name == "srl":
        from lmforge.tasks.srl import _build

        return HeadTask(build=_build, collate=None, loss=None, evaluate=None)  # type: ignore[arg-type]
    raise LMForgeError(f"a {name} checkpoint has no task head; give a checkpoint from `lmforge finetune sentiment|srl`")


def merge_lora_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Fold the LoRA adapters of a task checkpoint into its weights: a plain checkpoint (tuning=full)
    in out_dir with the same outputs. Returns the new checkpoint directory."""
    from lmforge.model.lora import merge_lora

    ckpt = ckpt_io.latest_checkpoint(path)
    cfg = ckpt_io.read_config(ckpt)
    if cfg.task.tuning != "lora":
        raise LMForgeError(f"{ckpt} was trained with task.tuning={cfg.task.tuning}, it has no adapters to merge")
    out = Path(out_dir)
    if ckpt_io.step_dirs(out / ckpt_io.CHECKPOINTS):
        raise LMForgeError(f"{out} already holds checkpoints; give a new directory")
    model = build_task_model(_head_builder(cfg.task.name), cfg)
    ckpt_io.load_weights(model, ckpt)
    merge_lora(model)
    cfg = copy.deepcopy(cfg)
    cfg.task.tuning = "full"
    step = int(ckpt.name.removeprefix("step_")) if ckpt.name.startswith("step_") else 0
    return ckpt_io.save_checkpoint(out, model, cfg, step=step, tokenizer_path=ckpt / ckpt_io.TOKENIZER)
