"""Generation speed: lmforge's ``generate`` against transformers' ``generate()`` on the same weights.

GPT-2 124M with random weights (seeded) is built in transformers and converted to lmforge with
``lmforge.interop.from_transformers``, so both sides run identical numbers. Greedy decoding,
KV cache on both sides, a prompt of ``--prompt-len`` random tokens per row, ``--new-tokens``
new tokens (no early stop), batch sizes ``--batches``. Within a batch size the sides take turns
run by run (so a busy machine slows them alike); each reports the median tokens/s over
``--runs`` runs after one warm-up. ``same_tokens`` says whether its greedy tokens equal
transformers' float32 tokens, ``same_prefix`` how many of the first tokens agree on average.
Against the memory-bandwidth bound: a decoding step reads every weight once (``weights_MB``) and
gives one token per row, so at the measured copy bandwidth (a 512 MB tensor copy, bytes read +
written) no decoder can beat ``bound_tok_s`` = batch x bandwidth / weight bytes; ``of_bound_%``
is lmforge's tokens/s as a share of it.

Sides: transformers and lmforge in float32; both in bfloat16 only where a quick matmul probe
finds bf16 faster than float32 (CPUs without AMX/AVX512-BF16 run bf16 matmuls several times
slower); and lmforge with ``quantize_int8`` (int8 weights, dynamic int8 activations), its
fastest mode on such CPUs. transformers has no equivalent for GPT-2's Conv1D layers, so the
int8 row is compared with transformers' fastest dtype.

    python benchmarks/generate.py [--runs 3] [--batches 1 8] [--new-tokens 128] [--threads N]

Prints a table and writes benchmarks/results/generate.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import print_table, write_result  # noqa: E402

from lmforge.generate import generate, quantize_int8  # noqa: E402
from lmforge.interop import from_transformers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_seconds(dtype: torch.dtype, n: int = 768, rows: int = 8, repeats: int = 20) -> float:
    """Best time of a [rows, n] x [n, 4n] matmul: the shape of a decoding step's feed-forward."""
    a, b = torch.randn(rows, n, dtype=dtype), torch.randn(n, 4 * n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a tensor copy moves (read + written) on this machine, best of ``repeats``:
    the memory bandwidth a decoding step, which reads every weight once, can hope for."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model) -> int:
    """Bytes of the weights one decoding step reads: every parameter and buffer once (a tied
    embedding counts once; int8 weights are buffers)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build_models(seed: int):
    import transformers

    config = transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, from_transformers(hf).eval()


def run_lmforge(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, greedy=True)
    return time.perf_counter() - start, out


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.size(1):].tolist()


def common_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    lengths = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        lengths.append(n)
    return statistics.mean(lengths)


def measure(sides: dict, batch: int, prompt_len: int, new_tokens: int, runs: int, seed: int) -> dict:
    """sides: name -> (run function, model). Returns name -> (median tokens/s, run times, tokens)."""
    gen = torch.Generator().manual_seed(seed + batch)
    prompts = torch.randint(0, 50257, (batch, prompt_len), generator=gen).tolist()
    for run, model in sides.values():  # warm-up: allocator, thread pools, first-touch pages
        run(model, prompts, 4)
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens = {}
    for _ in range(runs):
        for name, (run, model) in sides.items():
            t, tokens[name] = run(model, prompts, new_tokens)
            times[name].append(t)
    return {name: (batch * new_tokens / statistics.median(ts), ts, tokens[name]) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side and setting (median reported)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=list(DTYPES),
                        help="dtypes besides float32 to run when they are faster than float32 here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    probe = {name: matmul_seconds(DTYPES[name]) for name in ["float32", *args.dtypes]}
    dtypes = ["float32"] + [d for d in args.dtypes if probe[d] < probe["float32"]]
    fastest = min(dtypes, key=lambda d: probe[d])
    print("matmul probe (8x768 @ 768x3072, best of 20): "
          + ", ".join(f"{d} {s * 1e3:.3f} ms" for d, s in probe.items())
          + f"; fastest float dtype here: {fastest}")

    bandwidth = copy_bandwidth()
    print(f"memory copy bandwidth (512 MB, read + written, best of 5): {bandwidth / 1e9:.1f} GB/s")
    hf, ours = build_models(args.seed)
    models = {}
    for name in dtypes:
        models[("transformers", name)] = copy.deepcopy(hf).to(DTYPES[name])
        models[("lmforge", name)] = copy.deepcopy(ours).to(DTYPES[name])
    models[("lmforge", "int8")] = quantize_int8(ours)
    read = {mode: weight_bytes(m) for (lib, mode), m in models.items() if lib == "lmforge"}
    del hf, ours
    sides = {f"{lib} {mode}": (run_lmforge if lib == "lmforge" else run_transformers, m)
             for (lib, mode), m in models.items()}
    columns = ["batch", "lmforge", "lmforge_tok_s", "transformers", "transformers_tok_s", "speedup", "same_tokens",
               "same_prefix", "weights_MB", "bound_tok_s", "of_bound_%"]
    rows = []
    for batch in args.batches:
        measured = measure(sides, batch, args.prompt_len, args.new_tokens, args.runs, args.seed)
        reference = measured["transformers float32"][2]
        for mode in [*dtypes, "int8"]:
            theirs = f"transformers {mode if mode in dtypes else fastest}"
            ours_tps, ours_runs, ours_tokens = measured[f"lmforge {mode}"]
            their_tps, their_runs, _ = measured[theirs]
            rows.append({
                "batch": batch, "lmforge": mode, "lmforge_tok_s": round(ours_tps, 2),
                "transformers": theirs.split()[1], "transformers_tok_s": round(their_tps, 2),
                "speedup": round(ours_tps / their_tps, 2), "same_tokens": ours_tokens == reference,
                "same_prefix": round(common_prefix(ours_tokens, reference), 1),
                # the memory-bandwidth bound: each step reads the weights once and gives `batch` tokens
                "weights_MB": round(read[mode] / 1e6, 1),
                "bound_tok_s": round(batch * bandwidth / read[mode], 1),
                "of_bound_%": round(100 * ours_tps * read[mode] / (batch * bandwidth), 1),
                "lmforge_runs_s": [round(t, 3) for t in ours_runs],
                "transformers_runs_s": [round(t, 3) for t in their_runs],
            })
        print_table(rows[-len(dtypes) - 1:], columns)
    print()
    print_table(rows, columns)
    path = write_result("generate", {
        "model": f"GPT-2 124M (random init, seed {args.seed}), converted with lmforge.interop.from_transformers",
        "setup": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "greedy": True, "kv_cache": True,
                  "runs": args.runs, "statistic": "median tokens/s after 1 warm-up, sides alternating run by run",
                  "threads": torch.get_num_threads()},
        "matmul_probe_ms": {d: round(s * 1e3, 4) for d, s in probe.items()},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fastest_float_dtype": fastest,
        "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
