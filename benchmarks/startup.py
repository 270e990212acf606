"""Start-up: whole-process wall time of `lmforge --help` (target: under 0.5 s).

Each command is run ``--runs`` times as a fresh process, in turn (a busy machine slows all alike),
after one warm-up run that fills the file cache; the median is reported, next to the bare
interpreter's start (``python -c pass``) as the floor no command can go below. The modules
`lmforge --help` imports are listed with their cumulative import time (``python -X importtime``).

    python benchmarks/startup.py [--runs 11]

Prints a table and writes benchmarks/results/startup.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, print_table, write_result

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "lmforge --help": [sys.executable, "-m", "lmforge", "--help"],
    "lmforge train --help": [sys.executable, "-m", "lmforge", "train", "--help"],
}


def wall(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def slowest_imports(env: dict, top: int = 8) -> list[dict]:
    """The modules `lmforge --help` imports that take longest, cumulative microseconds."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmforge", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append({"module": name.strip(), "cumulative_ms": int(cumulative) / 1000})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="runs per command (median reported)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's lmforge
    for command in COMMANDS.values():
        wall(command, env)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(wall(command, env))
    rows = [{"command": name, "median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
             "max_s": round(max(t), 3)} for name, t in times.items()]
    print_table(rows, ["command", "median_s", "min_s", "max_s"])
    imports = slowest_imports(env)
    print()
    print_table(imports, ["module", "cumulative_ms"])
    path = write_result("startup", {"runs": args.runs, "statistic": "median of whole processes, interleaved",
                                    "results": rows, "slowest_imports": imports})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
