"""Tokenization throughput of ``lmforge prepare`` (MB of UTF-8 text per second), char and bpe.

For each tokenizer kind three numbers are measured on the same corpus (default: the bundled
Shakespeare plays), each the median of ``--runs`` runs after one warm-up:

* ``prepare_cold``: the whole ``prepare`` into an empty directory (tokenizer training included);
* ``prepare_warm``: ``prepare`` again with the tokenizer kept (read, tokenize, write shards);
* ``encode``: ``Tokenizer.encode_arrays`` alone over the pieces ``prepare`` feeds it.

    python benchmarks/tokenize.py [--runs 3] [--corpus shakespeare] [--vocab-size 2048]

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
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from common import print_table, write_result  # noqa: E402

from lmforge.config import DataConfig  # noqa: E402
from lmforge.data import prepare  # noqa: E402
from lmforge.data.shards import PIECE_BYTES  # noqa: E402
from lmforge.data.sources import iter_pieces  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, runs: int) -> float:
    fn()  # warm-up: caches, thread pools, first-touch page faults
    return statistics.median(timed(fn) for _ in range(runs))


def bench_kind(kind: str, corpus: list[str], vocab_size: int, runs: int, workdir: Path) -> dict:
    data_dir = workdir / kind
    cfg = DataConfig(corpus=corpus, tokenizer=kind, vocab_size=vocab_size, data_dir=str(data_dir))

    def cold():
        shutil.rmtree(data_dir, ignore_errors=True)
        prepare(cfg, progress=False)

    cold_s = median_time(cold, runs)
    meta = prepare(cfg, progress=False)
    warm_s = median_time(lambda: prepare(cfg, progress=False), runs)
    tokenizer = Tokenizer.load(data_dir)
    pieces = [text for _, text, _ in iter_pieces(corpus, PIECE_BYTES)]
    encode_s = median_time(lambda: tokenizer.encode_arrays(pieces), runs)
    mb = meta["bytes"] / 1e6
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    return {
        "tokenizer": kind, "vocab_size": meta["vocab_size"], "MB": round(mb, 3), "tokens": tokens,
        "bytes_per_token": round(meta["bytes"] / tokens, 3),
        "prepare_cold_s": round(cold_s, 3), "prepare_warm_s": round(warm_s, 3), "encode_s": round(encode_s, 3),
        "prepare_cold_MB_s": round(mb / cold_s, 2), "prepare_warm_MB_s": round(mb / warm_s, 2),
        "encode_MB_s": round(mb / encode_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"], help="corpus entries, as data.corpus")
    parser.add_argument("--vocab-size", type=int, default=2048, help="bpe vocabulary size")
    parser.add_argument("--kinds", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_kind(kind, args.corpus, args.vocab_size, args.runs, Path(tmp)) for kind in args.kinds]
    print_table(rows, ["tokenizer", "vocab_size", "MB", "tokens", "prepare_cold_MB_s", "prepare_warm_MB_s",
                       "encode_MB_s"])
    path = write_result("tokenize", {"corpus": args.corpus, "runs": args.runs, "statistic": "median after 1 warm-up",
                                     "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
