"""Training: the one loop (trainer), what it asks of an objective, optimizer and schedule, checkpoints, plots."""

from lmforge.train.checkpoint import latest_checkpoint, load_model, save_checkpoint
from lmforge.train.optim import build_optimizer, lr_at, param_groups
from lmforge.train.plot import plot_run

__all__ = ["build_optimizer", "latest_checkpoint", "load_model", "lr_at", "param_groups", "plot_run", "save_checkpoint"]
