"""``run_dir/loss.png``: train and validation loss against the optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LMForgeError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LMForgeError(f"{path} not found; pass the train.out_dir of a run that has logged metrics")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def plot_run(run_dir: str | Path) -> Path:
    """Draw the loss curves of a run into ``run_dir/loss.png`` and return its path."""
    # The Agg canvas directly, not pyplot: no GUI backend, no global state, safe in any thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise LMForgeError(f"{run_dir / 'metrics.jsonl'} holds no loss values yet; train for a few steps first")

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(run_dir.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    return out


def plot_metric(run_dir: str | Path, key: str) -> Path:
    """``run_dir/<metric>.png``: a validation metric (``val_<metric>`` in metrics.jsonl) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
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
