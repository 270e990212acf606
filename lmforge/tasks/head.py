"""What the head tasks (sentiment, SRL) share: a pretrained trunk, a small head, examples drawn whole.

The trunk comes from ``train.init_from``: an lmforge language model, an lmforge encoder
(masked-LM pre-training) or an imported Hugging Face BERT (``lmforge import``).
``task.tuning`` picks full fine-tuning, a frozen trunk, or LoRA adapters (:mod:`lmforge.model.lora`).
A micro-batch is ``train.batch_size`` examples (all processes together), in a new random order
each epoch; with several processes each takes a contiguous part of them.

A task checkpoint holds the whole model (trunk + head, adapters under their own names), the
Config (trunk shape in ``model``, label names and tuning in ``task``) and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge import hardware
from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.model.lora import apply_lora, count_trainable, set_trainable
from lmforge.tasks.data import bucketed_batches
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.objective import Objective, Run, check_same_model, rank_share


def build_trunk(mcfg) -> nn.Module:
    from lmforge.model import build_model

    if mcfg.arch not in ("encoder", "decoder"):
        raise LMForgeError(f"a {mcfg.arch} model cannot be the trunk of a task head; start from a decoder language "
                           "model or an encoder (masked-LM pre-training, or `lmforge import` of a BERT)")
    return build_model(mcfg)


def build_head_model(cfg: Config, trunk: nn.Module | None = None) -> nn.Module:
    """The task's model (``cfg.task.name``) on ``trunk`` (a new one of shape cfg.model when None),
    adapters added for tuning=lora."""
    from lmforge.tasks.registry import get_task

    objective = get_task(cfg.task.name).make_objective()
    if not isinstance(objective, HeadObjective):
        raise LMForgeError(f"a {cfg.task.name} checkpoint has no task head; give a checkpoint from "
                           "`lmforge finetune sentiment|srl`")
    trunk = trunk if trunk is not None else build_trunk(cfg.model)
    if cfg.task.tuning == "lora":
        apply_lora(trunk, cfg.task.lora_rank, cfg.task.lora_alpha, cfg.task.lora_dropout)
    model = objective.head(trunk, cfg)
    set_trainable(model, cfg.task.tuning, trunk)
    return model


def load_head_checkpoint(path: str | Path, expect: str, device: str = "cpu"):
    """(model in eval mode, Config, Tokenizer) of a checkpoint from ``lmforge finetune <expect>``."""
    from lmforge.tokenizer import Tokenizer

    ckpt = ckpt_io.latest_checkpoint(path)
    cfg = ckpt_io.read_config(ckpt)
    if cfg.task.name != expect:
        raise LMForgeError(f"{ckpt} is a {cfg.task.name} checkpoint, not {expect}; "
                           f"give one trained with `lmforge finetune {expect}`")
    tokenizer = Tokenizer.load(ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER,
                                                    "copy the tokenizer.json it was trained with into it"))
    model = build_head_model(cfg)
    ckpt_io.load_weights(model, ckpt)
    model.to(device).eval()
    return model, cfg, tokenizer


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
    model = build_head_model(cfg)
    ckpt_io.load_weights(model, ckpt)
    merge_lora(model)
    cfg = copy.deepcopy(cfg)
    cfg.task.tuning = "full"
    step = int(ckpt.name.removeprefix("step_")) if ckpt.name.startswith("step_") else 0
    return ckpt_io.save_checkpoint(out, model, cfg, step=step, tokenizer_path=ckpt / ckpt_io.TOKENIZER)


class ExampleSampler:
    """Batches of ``batch_size`` examples, endless over epochs, seeded; state = (epoch, batches
    drawn) for an exact resume.

    With ``lengths`` (task.group_by_length) each epoch's batches are drawn by length
    (:func:`~lmforge.tasks.data.bucketed_batches`, buckets of 64 batches): random batches of short
    texts pad to their longest, which wastes about half of every step on movie snippets.
    Without, each epoch is one random order cut into consecutive batches.
    """

    BUCKET_BATCHES = 64

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        if n == 0:
            raise LMForgeError("no training examples; check the training file")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.lengths is None:
            order = rng.permutation(self.n).tolist()
            return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        size = self.batch_size
        return bucketed_batches(self.lengths, size * self.BUCKET_BATCHES, rng,
                                lambda bucket: [bucket[i:i + size].tolist() for i in range(0, len(bucket), size)])

    def next_batch(self) -> list[int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        self.index += 1
        return self._batches[self.index - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state.get("seed", self.seed))  # the run's data order
        self.index = int(state["batches"]) if "batches" in state else -(-int(state["pos"]) // self.batch_size)
        self._batches = self._epoch_batches()


def write_report(out_dir: str | Path, report: dict) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


class HeadObjective(Objective):
    """A head on a pretrained trunk. Subclasses read their files (:meth:`read`), turn them into
    examples (:meth:`examples`), and give the head, the collate function, the loss and the scores."""

    unit = "examples"
    find_unused_parameters = True  # a pooler, or a sense head no example of a step reached

    # ---- what a head task gives
    def head(self, trunk: nn.Module, cfg: Config) -> nn.Module:
        raise NotImplementedError

    #: what ``--train`` must give
    train_file_help = "a training file"

    def read_file(self, path: str) -> list:
        """The examples (rows, sentences) of one file; bad data is one clear error."""
        raise NotImplementedError

    def read(self, cfg: Config) -> None:
        """Read task.train_file (one file or several, one training set) and task.valid_file
        (errors before anything is written)."""
        task = cfg.task
        if not task.train_file:
            raise LMForgeError(f"no training examples; pass --train FILE ({self.train_file_help})")
        paths = task.train_file if isinstance(task.train_file, list) else [task.train_file]
        self.train_rows = [row for path in paths for row in self.read_file(path)]
        self.valid_rows = self.read_file(task.valid_file) if task.valid_file else None

    def fill_labels(self, cfg: Config) -> None:
        """Label names from the training data into ``cfg.task`` (a new run only)."""
        raise NotImplementedError

    def examples(self, tokenizer) -> tuple[list, list | None]:
        """(training examples, validation items) for the tokenizer."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        raise NotImplementedError

    def scores(self, model: nn.Module, valid: list) -> dict[str, Any]:
        raise NotImplementedError

    # ---- the objective
    def setup(self, run: Run) -> None:
        from lmforge.tokenizer import Tokenizer

        super().setup(run)
        cfg, say = run.cfg, run.say
        self.name = cfg.task.name
        self.read(cfg)
        self.trunk = None
        if run.resume_from is not None:
            saved = ckpt_io.read_config(run.resume_from)
            if saved.task.name != cfg.task.name:
                raise LMForgeError(f"{run.resume_from} is a {saved.task.name} run, not {cfg.task.name}; "
                                   "use another train.out_dir")
            cfg.model = saved.model
            for key in ("labels", "senses", "sense_lexicon", "tuning"):  # what the new run filled from its data
                setattr(cfg.task, key, getattr(saved.task, key))
            check_same_model(run.resume_from, cfg, "resume from")
            source_tokenizer = run.resume_from / ckpt_io.TOKENIZER
        else:
            if not cfg.train.init_from:
                raise LMForgeError("no trunk to fine-tune; pass --init-from CKPT: an lmforge language model "
                                   "(`lmforge train`), an encoder (masked-LM pre-training) or an imported BERT "
                                   "(`lmforge import`)")
            ckpt = ckpt_io.latest_checkpoint(cfg.train.init_from)
            saved = ckpt_io.read_config(ckpt)
            if saved.task.name != "lm":
                raise LMForgeError(f"{ckpt} is a {saved.task.name} checkpoint; start from a language model or an encoder")
            self.trunk = build_trunk(saved.model)
            ckpt_io.load_weights(self.trunk, ckpt)
            cfg.model = copy.copy(saved.model)
            say(f"trunk: {saved.model.arch} from {ckpt} ({sum(p.numel() for p in self.trunk.parameters()):,} parameters)")
            source_tokenizer = ckpt / ckpt_io.TOKENIZER
            self.fill_labels(cfg)
        self.tokenizer = Tokenizer.load(source_tokenizer)
        self.train_examples, self.valid = self.examples(self.tokenizer)
        lengths = [len(e["ids"]) for e in self.train_examples] if cfg.task.group_by_length else None
        self.sampler = ExampleSampler(len(self.train_examples), cfg.train.batch_size, cfg.train.seed, lengths)
        if run.world.is_main:  # the run's copy: the checkpoint it came from may be pruned
            run.out_dir.mkdir(parents=True, exist_ok=True)
            if source_tokenizer.resolve() != self.tokenizer_path.resolve():
                shutil.copyfile(source_tokenizer, self.tokenizer_path)

    @property
    def tokenizer_path(self) -> Path:
        return self.run.out_dir / ckpt_io.TOKENIZER

    def build_model(self) -> nn.Module:
        model = build_head_model(self.run.cfg, self.trunk)
        # what the trunk's checkpoint does not fill, for train.fresh_lr_scale: the head, LoRA's adapters
        self.run.fresh = [n for n, _ in model.named_parameters() if not n.startswith("trunk.") or ".lora_" in n]
        fresh = set(self.run.fresh)
        self._pretrained = [p for n, p in model.named_parameters() if p.requires_grad and n not in fresh]
        return model

    def describe(self, model: nn.Module) -> str:
        cfg = self.run.cfg
        trainable, total = count_trainable(model)
        return (f"{cfg.task.name} ({cfg.task.tuning}): {trainable:,} of {total:,} parameters train; "
                f"{len(self.train_examples):,} training examples, batch {cfg.train.batch_size} x {cfg.train.grad_accum}")

    def next_batch(self, step: int, micro: int) -> dict:
        # task.head_only_steps: the trunk's weights take no gradient (nothing runs backward through
        # it) until then, so the head first learns on the pretrained features (linear probing, then
        # fine-tuning: a random head's first gradients would otherwise reshape the trunk)
        if self.run.cfg.task.head_only_steps:
            for p in self._pretrained:
                p.requires_grad_(step >= self.run.cfg.task.head_only_steps)
        rows = self.sampler.next_batch()  # the same global batch on every rank
        mine = rank_share(rows, self.run.world)
        batch = self.collate([self.train_examples[i] for i in (mine or rows[:1])])
        if not mine:  # fewer examples than processes: run one, counted as nothing
            batch["count"] = 0
        return batch

    def throughput(self, batch: dict) -> int:
        return len(batch["examples"]) if batch["count"] else 0

    def count(self, batch: dict) -> int:
        return batch["count"]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.valid:
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), hardware.autocast(self.run.device, self.run.dtype):
                out = self.scores(model, self.valid)
        finally:
            model.train(was_training)
        return {f"val_{k}": v for k, v in out.items() if isinstance(v, (int, float))}

    def finish(self, model: nn.Module, summary: dict[str, Any]) -> None:
        trainable, total = count_trainable(model)
        summary.update({"tuning": self.run.cfg.task.tuning, "trainable_params": trainable, "params": total})
        if self.valid:
            self.final_report(model, summary)
        write_report(self.run.out_dir, summary)

    def final_report(self, model: nn.Module, summary: dict[str, Any]) -> None:
        """Score the whole validation set into ``summary['valid']`` and write the task's files."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
