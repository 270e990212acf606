"""Serving throughput and latency: `lmforge serve` under 1, 4, 16 and 64 concurrent clients.

The server runs as its own process (``python -m lmforge serve RUN``), as it would in use; the
clients are threads of this process, each with the official ``openai`` client, streaming, so
that the time to the first token (TTFT) is seen. At each level of concurrency C, N = max(C,
--requests) requests (prompts taken in turn from a fixed list, sampling at temperature 1 with a
seed per request, ``--max-tokens`` each) run C at a time; then the same N requests run one after
another (one client), the baseline that continuous batching is measured against.

Reported per level and mode: generated tokens (the server's own ``usage`` counts), wall seconds,
aggregate generated tokens/s, the speed-up of the concurrent run over the sequential one, TTFT
p50/p95 (ms) and request latency p50/p95 (s). The clients share the machine with the server: on a
few cores their work (the openai client parsing one SSE event per token) takes CPU time from the
server, so the concurrent figures there are a lower bound on what the server alone sustains.

    python benchmarks/serve.py [RUN] [--clients 1 4 16 64] [--requests 16] [--max-tokens 64] [--threads N]

Without RUN, a small character-level model is trained first on the bundled Shakespeare (the
default recipe, ``--train-steps`` steps) into a temporary directory. Prints a table and writes
benchmarks/results/serve.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_table, write_result  # noqa: E402

COLUMNS = ["clients", "mode", "requests", "tokens", "seconds", "tok_s", "speedup", "ttft_p50_ms", "ttft_p95_ms",
           "latency_p50_s", "latency_p95_s"]
PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\nWe are ", "KING RICHARD III:\nNow is the ",
           "HAMLET:\nTo be, or not ", "MENENIUS:\nWhat work's, my ", "LADY MACBETH:\n", "Second Servant:\nWhy, "]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def train_default(out: Path, steps: int, threads: int) -> Path:
    run = out / "serve-bench"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lmforge", "train", f"--train.out_dir={run}", f"--train.max_steps={steps}",
           f"--train.ckpt_interval={steps}", "--train.eval_interval=0", "--train.progress=false",
           "--train.tensorboard=false", "--train.max_minutes=10"]
    print(f"training a small model ({steps} steps of the default recipe) into {run} ...", flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return run


def start_server(run: Path, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--max-queue", str(max(args.clients) * 4),
                             "--device", args.device], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("the server did not start within 120 s")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def one_request(client, model: str, i: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                       temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"tokens": tokens, "ttft": (first or end) - start, "latency": end - start}


def measure(client, model: str, clients: int, n: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, model, i, max_tokens), range(n)))
    seconds = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [1000 * r["ttft"] for r in results]
    latency = [r["latency"] for r in results]
    return {"requests": n, "tokens": tokens, "seconds": round(seconds, 3), "tok_s": tokens / seconds,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="run or checkpoint directory of a language model "
                                                        "(default: train a small one first)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="requests per level, at least the level's clients")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens asked for per request")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--train-steps", type=int, default=150, help="steps of the default model when no RUN is given")
    args = p.parse_args()

    import openai

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else train_default(Path(tmp), args.train_steps, args.threads or 2)
        proc, url = start_server(run, args)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
            info = client.models.list().data[0]
            model = info.id
            measure(client, model, min(4, max(args.clients)), 8, 16)  # warm-up: first calls, batched shapes
            rows = []
            for clients in args.clients:
                n = max(clients, args.requests)
                together = measure(client, model, clients, n, args.max_tokens)
                alone = measure(client, model, 1, n, args.max_tokens)
                together["speedup"] = together["tok_s"] / alone["tok_s"]
                for mode, row in (("concurrent", together), ("sequential", alone)):
                    rows.append({"clients": clients, "mode": mode, **row})
                print_table(rows[-2:], COLUMNS)
                print(flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print_table(rows, COLUMNS)
    path = write_result("serve", {"model": {"id": model, "checkpoint": str(run), "context": info.max_model_len
                                            if hasattr(info, "max_model_len") else None},
                                  "rows": rows, "settings": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
