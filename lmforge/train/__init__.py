"""Training: optimizer and schedule, checkpoints, the loop, plots."""

from lmforge.train.checkpoint import latest_checkpoint, load_model, save_checkpoint
from lmforge.train.loop import evaluate, train
from lmforge.train.optim import build_optimizer, lr_at, param_groups
from lmforge.train.plot import plot_run

__all__ = [
    "build_optimizer", "evaluate", "latest_checkpoint", "load_model", "lr_at", "param_groups", "plot_run",
    "save_checkpoint", "train",
]
