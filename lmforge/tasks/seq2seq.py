"""Translation and summarization as an objective: (source, target) pairs, either design, scored by the task's metric.

``lmforge finetune translation|summarization`` trains an encoder-decoder (``model.arch=seq2seq``)
or a decoder-only model on "source <sep> target" (``model.arch=decoder``) with the one trainer
(:func:`lmforge.train.trainer.fit`). A micro-batch holds whole examples of up to
``task.batch_tokens`` padded tokens, drawn by length bucket (:class:`~lmforge.tasks.data.TokenBatcher`);
with several processes each takes a contiguous part of its rows. The loss is the label-smoothed
cross-entropy of the target tokens. At each evaluation the validation loss is computed on every
example and the task's metric on ``task.eval_samples`` decoded examples; the run ends with a
report of the whole validation set decoded with the task's beam settings (``report.json``,
``valid.hyp.txt``, ``<metric>.png``).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lmforge import hardware
from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.lock import DirectoryLock
from lmforge.tasks import metrics as task_metrics
from lmforge.tasks.data import LengthReport, ReadReport, TokenBatcher, limit_lengths, read_examples, sorted_batches
from lmforge.tasks.format import Batch, SpecialIds, TaskFormat, sequence_loss, task_special_tokens
from lmforge.tasks.model import (SEQ2SEQ_TASKS, Decoding, TaskModel, warm_start, warm_start_config,
                                 warm_start_state)
from lmforge.train import checkpoint as ckpt_io
from lmforge.train import distributed as dist_io
from lmforge.train.objective import Objective, Run, check_same_model, rank_share

TOKENIZER_SPEC = "task_tokenizer.json"


def task_metric_names(task: str) -> tuple[str, ...]:
    from lmforge.tasks.registry import TASKS

    return TASKS[task].metrics


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
    made_up: int = 0  # pairs added with made-up names (before the length limits)

    @classmethod
    def load(cls, path: str, tokenizer, fmt: TaskFormat, cfg: Config, made_up_names: int = 0) -> "TaskData":
        """``made_up_names``: copies of each pair that carries names over, with made-up names
        (:func:`~lmforge.tasks.translation.with_made_up_names`; training data only)."""
        task = cfg.task
        pairs, read = read_examples(path, task.source_key, task.target_key)
        n_read = len(pairs)
        if made_up_names:
            from lmforge.tasks.translation import with_made_up_names

            pairs = with_made_up_names(pairs, made_up_names, cfg.train.seed)
        src_ids = tokenizer.encode_batch([s for s, _ in pairs])
        tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
        sources, targets, index, limits = limit_lengths(
            src_ids, tgt_ids, task.max_source_len - fmt.source_room, task.max_target_len - 1, task.overlong,
            (task.max_source_len, task.max_target_len))
        lengths = np.array(fmt.lengths(sources, targets), dtype=np.int64)
        return cls([pairs[i] for i in index], sources, targets, lengths, read, limits, len(pairs) - n_read)

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


def pair_loss(model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed (label-smoothed) cross-entropy of a batch's target tokens (moved to the model's device)."""
    batch = batch.to(next(model.parameters()).device)
    return batch.loss(model, label_smoothing)


def pair_count(batch: Batch) -> int:
    return batch.n_targets


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
            with hardware.autocast(device, dtype):
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
    outputs = task_model.decode_ids([fmt.source(s) for s in sources], decoding, batch_size)
    seconds = time.perf_counter() - start
    hyps = task_model.output_texts([s for s, _ in texts], outputs)
    scores = task_metrics.score(task_metric_names(task_model.cfg.task.name), hyps, [t for _, t in texts],
                                [s for s, _ in texts])
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


def replace_vocab(mcfg: ModelConfig, vocab_size: int) -> ModelConfig:
    out = copy.copy(mcfg)
    out.vocab_size = vocab_size
    return out


# ------------------------------------------------------------------------------------------- objective


class SequenceToSequence(Objective):
    """(source, target) pairs: translation and summarization."""

    def setup(self, run: Run) -> None:
        super().setup(run)
        cfg, say, world = run.cfg, run.say, run.world
        tcfg, task = cfg.train, cfg.task
        self.name = task.name
        if task.name == "lm":
            raise LMForgeError("task.name is lm; finetune trains translation or summarization "
                               "(`lmforge finetune translation ...`); language models train with `lmforge train`")
        if task.name not in SEQ2SEQ_TASKS:
            raise LMForgeError(f"task.name is {task.name}; this objective trains translation or summarization")
        if not task.train_file:
            raise LMForgeError("no training examples; pass --train FILE (TSV with a header, or JSONL)")
        if isinstance(task.train_file, list):
            raise LMForgeError(f"{task.name} reads one training file, got {len(task.train_file)}; "
                               "join them into one (the same columns or keys) and pass that")
        self.init_from = None
        if run.resume_from is not None:
            if tcfg.init_from:  # the run's model shape came from that checkpoint, as below
                cfg.model = warm_start_config(ckpt_io.read_config(ckpt_io.latest_checkpoint(tcfg.init_from)).model,
                                              cfg.model)
            cfg.model = replace_vocab(cfg.model, ckpt_io.read_config(run.resume_from).model.vocab_size)
            check_same_model(run.resume_from, cfg, "resume from")
        elif tcfg.init_from:
            self.init_from = ckpt_io.latest_checkpoint(tcfg.init_from)
            cfg.model = warm_start_config(ckpt_io.read_config(self.init_from).model, cfg.model)
            say(f"model shape from {self.init_from} (the recipe's model settings other than arch and dropout are unused)")

        if world.is_main:  # the main process trains the joint tokenizer (one at a time), the others read it
            with DirectoryLock(cfg.data.data_dir, "tokenizer training", wait=True):
                tokenizer = resolve_tokenizer(cfg, run.resume_from or self.init_from, say)
        dist_io.barrier(world)
        if not world.is_main:
            tokenizer = resolve_tokenizer(cfg, run.resume_from or self.init_from, lambda _: None)
        if cfg.model.vocab_size == 0:
            cfg.model = replace_vocab(cfg.model, tokenizer.vocab_size)
        start = run.resume_from or self.init_from
        self.padded = (start is not None and cfg.model.vocab_size != tokenizer.vocab_size
                       and ckpt_io.padded_vocabulary(start, cfg.model.vocab_size, tokenizer.vocab_size))
        if cfg.model.vocab_size != tokenizer.vocab_size and not self.padded:
            raise LMForgeError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has "
                               f"{tokenizer.vocab_size} tokens; set --model.vocab_size=0 to take it from the tokenizer")
        _check_positions(cfg.model, cfg)
        self.tokenizer = tokenizer
        self.fmt = TaskFormat(cfg.model.arch, SpecialIds.from_tokenizer(tokenizer, task.source_prefix,
                                                                         task.decoder_start))
        self.train_data = TaskData.load(task.train_file, tokenizer, self.fmt, cfg, task.made_up_names)
        self.valid_data = TaskData.load(task.valid_file, tokenizer, self.fmt, cfg) if task.valid_file else None
        for data in (self.train_data, self.valid_data):
            if data is not None:
                say(data.read.summary())
                if data.limits.summary():
                    say(f"note: {data.read.path}: {data.limits.summary()}")
        if task.made_up_names:
            say(f"{self.train_data.made_up:,} more training pairs with made-up names "
                f"(task.made_up_names={task.made_up_names})")
        self.sampler = TokenBatcher(self.train_data.lengths, task.batch_tokens, seed=tcfg.seed)
        if world.is_main:  # the run's own copy: checkpoints it came from may be pruned
            run.out_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(self.tokenizer_path)
            if self.padded:  # beside the tokenizer, so that every checkpoint gets it (ckpt_io.copy_tokenizer)
                shutil.copyfile(start / ckpt_io.VOCABULARY_RECORD, run.out_dir / ckpt_io.VOCABULARY_RECORD)

    @property
    def tokenizer_path(self) -> Path:
        return self.run.out_dir / ckpt_io.TOKENIZER

    def build_model(self) -> nn.Module:
        from lmforge.model import build_model

        run, tcfg = self.run, self.run.cfg.train
        model = build_model(run.cfg.model)
        if run.resume_from is not None and tcfg.init_from and tcfg.fresh_lr_scale != 1.0:
            # the same parameter groups as the run had
            run.fresh = warm_start_state(model, ckpt_io.latest_checkpoint(tcfg.init_from))[1]
        elif self.init_from is not None:
            account, run.fresh = warm_start(model, self.init_from)
            run.say(f"init: {account}")
        self.model = model
        return model

    def describe(self, model: nn.Module) -> str:
        task = self.run.cfg.task
        return (f"{task.name}, {self.run.cfg.model.arch}: {model.num_params():,} parameters; "
                f"{len(self.train_data.texts):,} training examples in {self.sampler.batches_per_epoch:,} batches "
                f"of <= {task.batch_tokens:,} tokens")

    def next_batch(self, step: int, micro: int):
        rows = self.sampler.next_batch()  # the same global batch on every rank
        mine = rank_share(rows, self.run.world)
        if not mine:  # fewer rows than processes: run the first row, counted as nothing
            return self.train_data.batch(self.fmt, rows[:1]), 0, 0
        batch = self.train_data.batch(self.fmt, mine)
        return batch, batch.n_targets, self.train_data.real_tokens(mine)

    def count(self, batch) -> int:
        return batch[1]

    def throughput(self, batch) -> int:
        return batch[2]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return pair_loss(model, batch[0], self.run.cfg.task.label_smoothing)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.valid_data is None:
            return {}
        run, task = self.run, self.run.cfg.task
        out = validation_loss(model, self.valid_data, self.fmt, task.batch_tokens, run.device, run.dtype,
                              task.label_smoothing)
        record = {"val_loss": out["loss"], "val_nll": out["nll"], "val_perplexity": out["perplexity"]}
        n = task.eval_samples or len(self.valid_data.texts)
        scores, _, _ = score_examples(TaskModel(model, run.cfg, self.tokenizer), self.valid_data.texts[:n],
                                      self.valid_data.sources[:n], Decoding.from_task(task, beam_size=task.eval_beam_size))
        record.update({f"val_{k}": v for k, v in scores.items()})
        return record

    def finish(self, model: nn.Module, summary: dict[str, Any]) -> None:
        from lmforge.train.plot import plot_metric

        run, task = self.run, self.run.cfg.task
        summary.update({"arch": run.cfg.model.arch, "train_examples": _read_dict(self.train_data.read),
                        "train_lengths": self.train_data.limits.as_dict()})
        if self.valid_data is not None:
            final = Decoding.from_task(task)
            scores, hyps, speed = score_examples(TaskModel(model, run.cfg, self.tokenizer), self.valid_data.texts,
                                                 self.valid_data.sources, final)
            summary["valid"] = {"decoding": vars(final), "examples": len(hyps), "scores": scores,
                                "sentences_per_second": speed, "read": _read_dict(self.valid_data.read),
                                "lengths": self.valid_data.limits.as_dict()}
            (run.out_dir / "valid.hyp.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hyps),
                                                       encoding="utf-8")
            run.say(f"valid ({len(hyps)} examples, beam {final.beam_size}): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            try:
                plot_metric(run.out_dir, f"val_{task.metric}")
            except Exception as e:  # a missing plot must not lose a finished run
                run.say(f"could not draw the {task.metric} plot in {run.out_dir}: {e}")
        (run.out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def finetune(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg``'s model on ``cfg.task``'s pairs (see :func:`lmforge.train.trainer.fit`)."""
    from lmforge.train.trainer import fit

    return fit(cfg, SequenceToSequence(), resume)
