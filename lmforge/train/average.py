"""``lmforge average``: one checkpoint whose weights are the mean of several of the same model.

Two uses. The last checkpoints of one run: averaging them smooths the noise of the final steps
(a schedule that already cools down leaves little to gain: docs/tutorial-translation.md). Runs
fine-tuned from the same pretrained weights with different seeds (a "model soup"): their
weights stay close enough that the average is itself a working model, at the cost of one
model rather than running them all and averaging their outputs (measured against both in
docs/tutorial-sentiment.md). Runs whose fresh layers start from different random weights do
not share a start and cannot be averaged this way.

The mean is taken in float64 and stored in each weight's own dtype. Checkpoints must share the
model settings, the tokenizer, the task's labels and every weight's name and shape; LoRA
checkpoints are refused, since the mean of adapters A and B is not the mean of their updates
B A (merge them first with ``lmforge lora-merge``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt_io

#: task settings that decide what the weights mean; the rest (files, decoding) may differ
_TASK_KEYS = ("name", "labels", "senses", "source_prefix", "decoder_start", "pooling", "tuning")


def average_checkpoints(paths: list[str | Path], out_dir: str | Path) -> Path:
    """Write the mean of the checkpoints that ``paths`` name (run or checkpoint directories) as a new
    checkpoint in ``out_dir``, with the first one's config and tokenizer. Returns its directory."""
    if len(paths) < 2:
        raise LMForgeError("averaging needs at least two checkpoints; give two or more run or checkpoint directories")
    ckpts = [ckpt_io.latest_checkpoint(p) for p in paths]
    if len({c.resolve() for c in ckpts}) < len(ckpts):
        raise LMForgeError("the same checkpoint is named twice; give each one once")
    out = Path(out_dir)
    if ckpt_io.step_dirs(out / ckpt_io.CHECKPOINTS):
        raise LMForgeError(f"{out} already holds checkpoints; give a new directory")
    cfg = ckpt_io.read_config(ckpts[0])
    first = cfg.to_dict()
    if cfg.task.tuning == "lora":
        raise LMForgeError(f"{ckpts[0]} holds LoRA adapters, whose mean is not the mean of their updates; "
                           "merge each run first with `lmforge lora-merge`, then average the merged ones")
    tokenizer = ckpt_io.require_file(ckpts[0], ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for ckpt in ckpts:
        _check_same_model(ckpt, first, tokenizer, ckpts[0])
        weights = ckpt_io.read_weights(ckpt)
        if total and set(weights) != set(total):
            diff = sorted(set(weights) ^ set(total))
            raise LMForgeError(f"{ckpt} holds other weights than {ckpts[0]} ({', '.join(diff[:3])}); "
                               "average only checkpoints of the same model")
        for name, tensor in weights.items():
            if name in total and tensor.shape != total[name].shape:
                raise LMForgeError(f"{ckpt}: weight {name!r} has shape {tuple(tensor.shape)}, not "
                                   f"{tuple(total[name].shape)} as in {ckpts[0]}; average only checkpoints of the same model")
            dtypes.setdefault(name, tensor.dtype)
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    mean = {name: (t / len(ckpts)).to(dtypes[name]).contiguous() for name, t in total.items()}
    infos = [ckpt_io.read_json(c / ckpt_io.STATE_JSON) if (c / ckpt_io.STATE_JSON).is_file() else {} for c in ckpts]
    step = max(int(info.get("step", 0)) for info in infos)  # the newest: the average of a run's last steps
    return ckpt_io.save_checkpoint(out, mean, cfg, step=step, tokenizer_path=tokenizer,
                                   extra={"averaged_from": [str(c) for c in ckpts], **ckpt_io.run_choices(infos[0])})


def _check_same_model(ckpt: Path, first: dict, tokenizer: Path, first_ckpt: Path) -> None:
    cfg = ckpt_io.read_config(ckpt).to_dict()
    for key in sorted(set(cfg["model"]) | set(first["model"])):
        if cfg["model"].get(key) != first["model"].get(key):
            raise LMForgeError(f"{ckpt} has model.{key}={cfg['model'].get(key)!r} but {first_ckpt} has "
                               f"{first['model'].get(key)!r}; average only checkpoints of the same model")
    for key in _TASK_KEYS:
        if cfg["task"].get(key) != first["task"].get(key):
            raise LMForgeError(f"{ckpt} has task.{key}={cfg['task'].get(key)!r} but {first_ckpt} has "
                               f"{first['task'].get(key)!r}; average only checkpoints of the same task")
    other = ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    if other.read_bytes() != tokenizer.read_bytes():
        raise LMForgeError(f"{ckpt} has another tokenizer than {first_ckpt}; average only checkpoints of the same "
                           "model (trained on the same data directory or from the same pretrained model)")
