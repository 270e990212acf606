"""Facts about the machine a run uses: which device, which dtype is fastest on it, its peak FLOP/s, MFU.

Read by training (``lmforge.train``) and by ``lmforge plan``; nothing here builds a model.

* The device: ``auto`` is a CUDA GPU, else Apple's MPS, else the CPU.
* The dtype: ``auto`` is bf16 on GPUs that have it, and on CPUs whose bf16 matmul is measured
  faster than float32 (AVX512-BF16 or AMX units) where the trainer then measures its own step in
  both (``faster_dtype``); float32 elsewhere. The choice is recorded in a run's checkpoints, so a
  resumed run keeps it even on a machine that would choose otherwise.
* Peak FLOP/s: GPUs from the vendors' data sheets (``PEAK_FLOPS``; a GPU not in the table gets no
  MFU rather than a guess), CPUs from a matmul measured in the process (``measure_cpu_peak``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time

import torch

from lmforge.errors import LMForgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------- device and dtype

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown train.device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"train.device={name} but no CUDA GPU is available; use --train.device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LMForgeError(f"train.device={name} but MPS is not available; use --train.device=cpu")
    return device


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(n: int = 512, repeats: int = 5) -> bool:
    """Time one matmul in each dtype: CPUs with AMX or AVX512-BF16 units win in bf16, others lose badly."""
    g = torch.Generator().manual_seed(0)  # never the global generator: training's random streams stay untouched
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        a @ b
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        timings[dtype] = best
    return timings[torch.bfloat16] * 1.5 < timings[torch.float32]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast).

    auto = bf16 on CUDA GPUs that have it, and on CPUs whose bf16 matmuls are measurably
    faster than float32 (AMX, AVX512-BF16); float32 elsewhere.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_bf16_is_faster():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise LMForgeError(f"unknown train.dtype {name!r}; use auto, float32, bfloat16 or float16")
    if name == "float16" and device.type != "cuda":
        raise LMForgeError(f"train.dtype=float16 needs a CUDA GPU (device is {device}); use bfloat16 or float32")
    return DTYPES[name]


def faster_dtype(step, dtypes: tuple, repeats: int = 2, margin: float = 0.9):
    """The first of ``dtypes`` unless another runs ``step(dtype)`` in under ``margin`` of its time
    (best of ``repeats`` after one warm-up call each): a measured choice, not a guess. The choices
    may be any labels ``step`` understands (``few_rows_by_columns`` times two BLAS calls)."""
    best: dict = {}
    for dtype in dtypes:
        step(dtype)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step(dtype)
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    fastest = min(dtypes, key=best.__getitem__)
    return fastest if best[fastest] < margin * best[dtypes[0]] else dtypes[0]


@functools.lru_cache(maxsize=None)
def few_rows_by_columns(threads: int, megabytes: int = 128, repeats: int = 3, margin: float = 0.9) -> tuple[bool, bool]:
    """Whether a float32 product of 1 and of 2-4 rows runs faster as (W xᵀ)ᵀ than as ``F.linear``'s
    x Wᵀ, measured once per process and thread count on ``megabytes`` of weights (more than a
    CPU's last-level cache: decoding streams every weight from memory once per token).

    The two give the same numbers (in another summation order). Some BLAS builds stream W for few
    rows at a third of the memory bandwidth with the one call and near it with the other; which
    one depends on the library and the CPU, so it is timed, not assumed."""
    d_in, d_out = 768, 2048
    weights = [torch.full((d_out, d_in), 0.01) for _ in range(max(1, megabytes * 2 ** 20 // (4 * d_in * d_out)))]
    faster = []
    for rows in (1, 4):
        x = torch.full((rows, d_in), 0.5)
        padded = x.expand(2, d_in).contiguous() if rows == 1 else x
        routes = {"linear": lambda: [torch.nn.functional.linear(x, w) for w in weights],
                  "columns": lambda: [torch.mm(w, padded.t()) for w in weights]}
        faster.append(faster_dtype(lambda route: routes[route](), tuple(routes), repeats, margin) == "columns")
    return faster[0], faster[1]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` in ``dtype``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------- peak FLOP/s

#: Dense peak FLOP/s per accelerator from the vendors' data sheets (no sparsity), by the name
#: torch.cuda.get_device_name reports; the first matching key wins, so the specific come first.
#: float32 is the TF32 tensor-core figure, because lmforge enables TF32 for float32 matmuls on CUDA.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},   # SXM
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},   # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},   # SXM and PCIe
}

#: memory per GPU in bytes, for ``lmforge plan``
GPU_MEMORY: dict[str, float] = {
    "H100 PCIe": 80e9, "H100 NVL": 94e9, "H100": 80e9, "H200 NVL": 141e9, "H200": 141e9, "A100": 80e9,
}


def table_peak(device_name: str, dtype: torch.dtype | str) -> float | None:
    """The table's peak for a device name and dtype; None for a device not in the table."""
    key = dtype if isinstance(dtype, str) else dtype_name(dtype)
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return peaks.get(key)
    return None


@functools.lru_cache(maxsize=None)
def measure_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n x n matmul in this process, with its torch threads: the CPU 'peak'."""
    g = torch.Generator().manual_seed(0)  # never the global generator: training's random streams stay untouched
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def peak_flops(device: torch.device, dtype: torch.dtype, world_size: int = 1) -> tuple[float | None, str]:
    """Peak FLOP/s of the whole run (all ``world_size`` processes) and where the figure comes from.

    GPUs: the table above times the world size, or None for a GPU not in it (no MFU rather
    than a guess). CPU: a matmul measured now on every rank at once (so ranks sharing cores
    share the figure too), summed over ranks; with several processes every rank must call this.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, dtype)
        if peak is None:
            return None, f"{name} is not in the peak FLOP/s table"
        return peak * world_size, f"{name}, {dtype_name(dtype)} data sheet"
    if device.type != "cpu":
        return None, f"no peak FLOP/s known for {device.type}"
    total = torch.tensor([0.0], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # measure together: the figure is the cores' shared throughput
        total += measure_cpu_peak(dtype)
        dist.all_reduce(total)
    else:
        total += measure_cpu_peak(dtype)
    return float(total.item()), f"matmul measured on CPU, {dtype_name(dtype)}"


def mfu(tokens_per_second: float, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (None without a peak)."""
    if not peak or not flops_per_token or not math.isfinite(tokens_per_second):
        return None
    return tokens_per_second * flops_per_token / peak
