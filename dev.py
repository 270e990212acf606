#!/usr/bin/env python3
"""Set up and run lmforge from a fresh clone with only Python (3.10+) and pip.

    python3 dev.py demo   # install, train the default recipe (~5 min on 2 CPU cores), print generated text
    python3 dev.py test   # install, run the test suite

Installs into ./.venv: torch 2.13.0 (CPU build) first and explicitly, then lmforge
in editable mode with its test extras. Later calls skip the install when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = os.environ.get("LMFORGE_TORCH", "torch==2.13.0")


def run(*cmd: object) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code:
        sys.exit(code)


def install() -> None:
    if not PY.exists():
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".lmforge-installed"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", TORCH)
    run(PY, "-m", "pip", "install", "--quiet", "-e", ".[test]")
    stamp.write_text(key)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "demo"
    extra = sys.argv[2:]
    install()
    if what == "demo":
        out_dir = "runs/demo-" + time.strftime("%Y%m%d-%H%M%S")  # a new run each time, never overwriting one
        run(BIN / "lmforge", "train", f"--train.out_dir={out_dir}", *extra)
        run(BIN / "lmforge", "generate", out_dir, "--prompt", "ROMEO:", "--max-new-tokens", "400")
    elif what == "test":
        run(PY, "-m", "pytest", "-q", *extra)
    elif what == "install":
        pass
    else:
        sys.exit(f"unknown command {what!r}; use: python3 dev.py demo | test | install")


if __name__ == "__main__":
    main()
