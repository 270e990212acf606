"""Attention on the CPU: the written-out formula against ``F.scaled_dot_product_attention``.

``lmforge.model.layers.attend`` writes attention out (two matrix products and a softmax) on the
CPU in bf16 up to ``CPU_BF16_WRITTEN_OUT_MAX`` scores per head, and calls SDPA otherwise. This
measures both routes on the same tensors, runs interleaved, for the shapes the recipes use
(translation and summarization batches, the Shakespeare LM's 256-token windows, decoding one
token against a cache) and longer ones, in bf16 (autocast) and float32, forward and backward
(training) or forward only (decoding). Each cell is the median of ``--repeats`` timed calls
after warm-up; the ratio column is SDPA's time over the written-out one (above 1: written out
is faster), and ``route`` is what ``attend`` takes for that shape.

    python benchmarks/attention.py [--repeats 15] [--threads N]

Prints a table and writes benchmarks/results/attention.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import print_table, write_result  # noqa: E402

from lmforge.model.layers import CPU_BF16_WRITTEN_OUT_MAX, attention_formula  # noqa: E402

#: (what it is, batch, heads, query length, key length, causal, backward)
SHAPES = [
    ("translation batch", 40, 4, 52, 52, True, True),
    ("translation cross-attention", 40, 4, 52, 60, False, True),
    ("summarization encoder", 16, 12, 128, 128, False, True),
    ("Shakespeare LM window", 12, 6, 256, 256, True, True),
    ("long window", 4, 12, 1024, 1024, True, True),
    ("decoding, 8 beams", 8, 4, 1, 60, False, False),
    ("decoding, cache of 512", 1, 12, 1, 512, False, False),
]


def written_out(q, k, v, causal, scale):
    return attention_formula(q, k, v, causal=causal, scale=scale)


def sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def time_route(fn, tensors, dtype, causal, backward, repeats):
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                torch.set_grad_enabled(backward):
            q, k, v = (t.to(dtype) for t in tensors)
            out = fn(q, k, v, causal, q.size(-1) ** -0.5)
        if backward:
            out.float().sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, B, H, T, S, causal, backward in SHAPES:
            gen = torch.Generator().manual_seed(0)
            tensors = [torch.randn(B, H, n, 64, generator=gen, requires_grad=backward) for n in (T, S, S)]
            ms = {}
            for label, fn in (("written_out", written_out), ("sdpa", sdpa)):
                ms[label] = 1e3 * time_route(fn, tensors, dtype, causal, backward, args.repeats)
            route = "written out" if dtype == torch.bfloat16 and T * S <= CPU_BF16_WRITTEN_OUT_MAX else "sdpa"
            rows.append({"shape": name, "dtype": str(dtype).removeprefix("torch."), "B": B, "H": H, "T": T, "S": S,
                         "pass": "fwd+bwd" if backward else "fwd", "written_out_ms": ms["written_out"],
                         "sdpa_ms": ms["sdpa"], "sdpa/written_out": ms["sdpa"] / ms["written_out"], "route": route})
    print_table(rows, ["shape", "dtype", "B", "H", "T", "S", "pass", "written_out_ms", "sdpa_ms",
                       "sdpa/written_out", "route"])
    path = write_result("attention", {"threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
