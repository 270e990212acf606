"""Tokenization throughput of ``lmforge prepare`` (MB of UTF-8 text per second), char and bpe.

For each tokenizer kind these numbers are measured on the same corpus (default: the bundled
Shakespeare plays), each the median of ``--runs`` runs after one warm-up:

* ``prepare_cold``: the whole ``prepare`` into an empty directory (tokenizer training included);
* ``prepare_warm``: ``prepare`` again with the tokenizer kept (read, tokenize, write shards);
* ``encode``: ``Tokenizer.encode_stream`` alone over the pieces ``prepare`` feeds it;
* ``train`` (bpe): training the tokenizer alone on those pieces.

Byte-level BPE is measured twice, runs interleaved: through tiktoken (``lmforge.fast_bpe``, the
``bpe`` row) and through the ``tokenizers`` pipeline that is used without it (``bpe-tokenizers``),
so the ratio of the two is read from one run even on a busy machine.

``--synthetic-gb N`` also writes an N GB mixed-script corpus, prepares it in a separate ``lmforge
prepare`` process with the bundled corpus's BPE tokenizer (progress bar on a terminal) and reports
its MB/s and peak resident memory.

    python benchmarks/tokenize.py [--runs 5] [--corpus shakespeare] [--vocab-size 2048] [--synthetic-gb 1]

Prints a table and writes benchmarks/results/tokenize.json (command, commit, machine, date).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script shares its name with the standard library's ``tokenize`` module. Python puts the
# script's folder first on sys.path, which would shadow it; move the folder to the end instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE.parent), str(HERE)]

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

from common import print_table, write_result  # noqa: E402

from lmforge.config import DataConfig  # noqa: E402
from lmforge.data import prepare  # noqa: E402
from lmforge.data.shards import PIECE_BYTES  # noqa: E402
from lmforge.data.sources import iter_pieces  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def median_times(fns: dict, runs: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds of each function, their runs interleaved (a busy machine slows
    all alike). CPU seconds hardly depend on what else runs: MB per CPU-second times the cores is
    what a quiet machine reaches when every core encodes."""
    for fn in fns.values():
        fn()  # warm-up: caches, thread pools, first-touch page faults
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return ({name: statistics.median(w for w, _ in t) for name, t in times.items()},
            {name: statistics.median(c for _, c in t) for name, t in times.items()})


def without_fast_bpe():
    """The byte-level BPE path lmforge takes when tiktoken is not installed."""
    return mock.patch.object(Tokenizer, "_fast_encoder", lambda self: None)


def bench_kind(kind: str, corpus: list[str], vocab_size: int, runs: int, workdir: Path) -> list[dict]:
    data_dir = workdir / kind
    cfg = DataConfig(corpus=corpus, tokenizer=kind, vocab_size=vocab_size, data_dir=str(data_dir))

    def cold():
        shutil.rmtree(data_dir, ignore_errors=True)
        prepare(cfg, progress=False)

    meta = prepare(cfg, progress=False)
    tokenizer = Tokenizer.load(data_dir)
    pieces = [text for _, text, _ in iter_pieces(corpus, PIECE_BYTES)]
    ways = {kind: lambda fn: fn()}
    if kind == "bpe":
        ways["bpe-tokenizers"] = lambda fn: _call_without_fast_bpe(fn)
    fns = {}
    for way, call in ways.items():
        fns[(way, "prepare_cold")] = lambda call=call: call(cold)
        fns[(way, "prepare_warm")] = lambda call=call: call(lambda: prepare(cfg, progress=False))
        fns[(way, "encode")] = lambda call=call: call(lambda: sum(1 for _ in tokenizer.encode_stream(pieces)))
    if kind == "bpe":
        fns[(kind, "train")] = lambda: Tokenizer.train(pieces, "bpe", vocab_size=vocab_size)
    seconds, cpu_seconds = median_times(fns, runs)
    mb = meta["bytes"] / 1e6
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    rows = []
    for way in ways:
        row = {"tokenizer": way, "vocab_size": meta["vocab_size"], "MB": round(mb, 3), "tokens": tokens,
               "bytes_per_token": round(meta["bytes"] / tokens, 3)}
        for what in ("prepare_cold", "prepare_warm", "encode", "train"):
            if (way, what) in seconds:
                row[f"{what}_s"] = round(seconds[(way, what)], 3)
                row[f"{what}_MB_s"] = round(mb / seconds[(way, what)], 2)
                row[f"{what}_MB_per_cpu_s"] = round(mb / cpu_seconds[(way, what)], 2)
        rows.append(row)
    if kind == "bpe":
        for what in ("prepare_warm", "encode"):
            rows[0][f"{what}_speedup"] = round(seconds[("bpe-tokenizers", what)] / seconds[("bpe", what)], 2)
    return rows


def _call_without_fast_bpe(fn):
    with without_fast_bpe():
        return fn()


MIXED = ("Ünïcödé café naïve Ωμέγα русский текст עברית العربية हिन्दी 한국어 日本語の文章 中文文本 "
         "🙂👍🏽 it's 12,345.67 -- done.\n")


def bench_synthetic(gb: float, corpus: list[str], tokenizer_dir: Path, workdir: Path) -> dict:
    """Prepare an ``gb`` GB corpus in a separate process: MB/s, and peak RSS of that process."""
    text = "".join(t for _, t, _ in iter_pieces(corpus, PIECE_BYTES))
    lines = text.splitlines(keepends=True)
    block = "".join(line + (MIXED if i % 50 == 0 else "") for i, line in enumerate(lines)).encode("utf-8")
    path = workdir / "synthetic.txt"
    target = int(gb * 1e9)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            chunk = block[: target - written]
            chunk = chunk[: chunk.rfind(b"\n") + 1] or chunk  # whole lines: valid UTF-8
            f.write(chunk)
            written += len(chunk)
    data_dir = workdir / "synthetic"
    data_dir.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", data_dir / "tokenizer.json")  # a tokenizer brought along
    command = [sys.executable, "-m", "lmforge", "prepare", f"--data.corpus={path}", f"--data.data_dir={data_dir}",
               "--data.tokenizer=bpe"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=HERE.parent)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"tokenizer": "bpe (synthetic)", "MB": round(written / 1e6, 1), "prepare_warm_s": round(seconds, 1),
            "prepare_warm_MB_s": round(written / 1e6 / seconds, 2), "peak_rss_MB": round(peak_kb / 1024, 1),
            "note": "one whole `lmforge prepare` process (start-up and the counting pass included)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"], help="corpus entries, as data.corpus")
    parser.add_argument("--vocab-size", type=int, default=2048, help="bpe vocabulary size")
    parser.add_argument("--kinds", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    parser.add_argument("--synthetic-gb", type=float, default=0,
                        help="also prepare a synthetic corpus of this many GB (bpe; a separate process)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for kind in args.kinds for row in bench_kind(kind, args.corpus, args.vocab_size, args.runs, Path(tmp))]
        if args.synthetic_gb:
            if "bpe" not in args.kinds:
                bench_kind("bpe", args.corpus, args.vocab_size, 1, Path(tmp))
            rows.append(bench_synthetic(args.synthetic_gb, args.corpus, Path(tmp) / "bpe", Path(tmp)))
    print_table(rows, ["tokenizer", "vocab_size", "MB", "tokens", "prepare_cold_MB_s", "prepare_warm_MB_s",
                       "encode_MB_s", "prepare_warm_MB_per_cpu_s", "train_s",
                       "prepare_warm_speedup", "encode_speedup", "peak_rss_MB"])
    path = write_result("tokenize", {"corpus": args.corpus, "runs": args.runs,
                                     "statistic": "median after 1 warm-up, runs interleaved", "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
