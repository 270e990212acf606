"""Several processes under torchrun (CPU, Gloo) against one: DDP, FSDP2, two nodes, resume across world sizes,
a killed rank, gradient accumulation without intermediate all-reduces, and the data split.

Every multi-process run here is a real ``torchrun ... -m lmforge train`` (or a worker script under
torchrun) on this machine's loopback. Reference: one process, in this pytest process, same recipe.
The global batch is ``train.batch_size`` at any world size, so the runs must agree step for step.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.recipes import load_config
from lmforge.data.sampler import BlockSampler
from lmforge.errors import LMForgeError
from lmforge.plan import param_counts
from lmforge.train import checkpoint as ck
from lmforge import hardware
from lmforge.train import distributed as D
from lmforge.tasks.lm import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king hath sent for thee my lord and we shall go to france tomorrow "
         "o romeo wherefore art thou romeo deny thy father and refuse thy name").split()
STEPS = 40  # the reference run's length; most multi-process runs stop at HALF
HALF = 20
LOSS_TOL = 1e-5


def write_corpus(path: Path, n_words: int = 3000) -> None:
    state, words = 12345, []
    for i in range(n_words):
        state = (1103515245 * state + 12345) % 2**31
        words.append(WORDS[state % len(WORDS)] + ("\n" if i % 11 == 10 else ""))
    path.write_text(" ".join(words), encoding="utf-8")


RECIPE = {
    "model": dict(block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.0, pos_encoding="learned"),
    "data": dict(corpus=["corpus.txt"], data_dir="data", special_tokens=[], byte_fallback=False),
    "train": dict(seed=7, batch_size=8, grad_accum=2, max_steps=STEPS, decay_steps=STEPS, lr=1e-2, min_lr=1e-3,
                  warmup_steps=2, eval_interval=10, eval_batches=2, ckpt_interval=10, log_interval=1,
                  tensorboard=False, progress=False, device="cpu", dtype="float32"),
}


def config(root: Path, out_dir: str, *overrides: str):
    cwd = os.getcwd()
    os.chdir(root)  # the recipe's paths are relative, as they are for the torchrun runs
    try:
        return load_config(str(root / "recipe.yaml"), [f"--train.out_dir={out_dir}", *overrides])
    finally:
        os.chdir(cwd)


def train_here(root: Path, out_dir: str, *overrides: str, resume: bool = False) -> dict:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return train(config(root, out_dir, *overrides), resume=resume)
    finally:
        os.chdir(cwd)


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RESTART_COUNT")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def launcher(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def lmforge_train(out_dir: str, *overrides: str, resume: bool = False) -> list[str]:
    return ["-m", "lmforge", "train", "-c", "recipe.yaml", f"--train.out_dir={out_dir}", *overrides,
            *(["--resume"] if resume else [])]


def run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def torchrun(root: Path, out_dir: str, *overrides: str, nproc: int = 2, resume: bool = False):
    return run(launcher("--standalone", f"--nproc_per_node={nproc}") + lmforge_train(out_dir, *overrides,
                                                                                      resume=resume), root)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, reference: list[dict], steps: int, weights: Path | None = None,
                    ref_weights: Path | None = None) -> None:
    got = metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # every step once: none lost, none repeated
    for mine, ref in zip(got, reference):
        assert abs(mine["loss"] - ref["loss"]) < LOSS_TOL, (mine["step"], mine["loss"], ref["loss"])
        assert mine["lr"] == ref["lr"]
        if "val_loss" in ref:
            assert abs(mine["val_loss"] - ref["val_loss"]) < LOSS_TOL
    if weights is not None:
        a, b = load_file(weights / "model.safetensors"), load_file(ref_weights / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The torchrun workers run one thread each (OMP_NUM_THREADS=1); so does the reference, which on a
    busy 2-core machine is also several times faster than two threads fighting for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus, prepared data, and the one-process reference: 20 steps (snapshot kept), then on to 40."""
    root = tmp_path_factory.mktemp("dist")
    write_corpus(root / "corpus.txt")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    first = train_here(root, "ref", f"--train.max_steps={HALF}")
    assert first["steps"] == HALF and first["world_size"] == 1 and first["strategy"] == "none"
    shutil.copytree(root / "ref", root / "ref_half")
    assert train_here(root, "ref", resume=True)["steps"] == STEPS
    return root, metrics(root / "ref")


# ------------------------------------------------------------------------------------ no process needed

def test_sampler_splits_the_global_batch_without_overlap_or_gap(tmp_path):
    class Tokens:
        def __init__(self, n):
            self.data = np.arange(n, dtype=np.int64)

        def __len__(self):
            return len(self.data)

        def window(self, start, length):
            return self.data[start:start + length]

    data = Tokens(10_000)
    single = BlockSampler(data, 8, 12, seed=3)
    ranks = [BlockSampler(data, 8, 12 // w, seed=3, rank=r, world_size=w) for w in (2, 3, 4) for r in range(w)]
    for step in range(5):
        whole = single.starts(step)
        at = 0
        for w in (2, 3, 4):
            parts = [ranks[at + r].starts(step) for r in range(w)]
            at += w
            assert np.array_equal(np.concatenate(parts), whole)  # the same stream, in rank order: no gap
            assert sum(len(p) for p in parts) == len(whole)  # and each window on exactly one rank
    # Resuming the position carries over to another world size (the state is the step count).
    s2 = BlockSampler(data, 8, 6, seed=3, rank=1, world_size=2)
    for _ in range(3):
        s2.next_batch()
    s1 = BlockSampler(data, 8, 12, seed=3)
    s1.load_state_dict(s2.state_dict())
    x1, _ = s1.next_batch()
    x2, _ = s2.next_batch()
    assert torch.equal(x1[6:], x2)


def test_world_and_batch_refusals(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(LMForgeError, match="RANK=5 and WORLD_SIZE=2"):
        D.world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LMForgeError, match="RANK='x'"):
        D.world_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(LMForgeError, match="launch with torchrun, or set MASTER_ADDR"):
        D.setup(torch.device("cpu"))
    with pytest.raises(LMForgeError, match="does not split over 3 processes") as e:
        D.per_rank_batch(8, D.World(rank=0, world_size=3))
    assert "\n" not in str(e.value)
    assert D.per_rank_batch(8, D.World(rank=1, world_size=4)) == 2


def test_peak_table_and_mfu():
    assert hardware.table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert hardware.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert hardware.table_peak("NVIDIA H200", torch.bfloat16) == 989e12
    assert hardware.table_peak("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert hardware.table_peak("Tesla T4", torch.float16) is None  # not in the table: no MFU rather than a guess
    assert hardware.mfu(1000.0, 6e9, None) is None
    assert hardware.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    cpu = hardware.measure_cpu_peak()
    assert 1e8 < cpu < 1e14


def test_bad_strategy_is_one_clear_line(setup):
    root, _ = setup
    with pytest.raises(LMForgeError, match="train.strategy must be one of auto, ddp, fsdp") as e:
        train_here(root, "bad", "--train.strategy=zero3", "--train.max_steps=1")
    assert "\n" not in str(e.value)


def test_reference_run_reports_mfu(setup):
    _, reference = setup
    assert all(0 < r["mfu"] < 1 for r in reference)  # against the CPU matmul peak measured at start-up


# --------------------------------------------------------------------------------------- multi-process

def test_ddp_two_processes_match_one(setup):
    root, reference = setup
    proc = torchrun(root, "ddp", "--train.strategy=ddp", f"--train.max_steps={HALF}")
    assert proc.stdout.count('"steps"') == 1  # only rank 0 prints
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["mfu"] > 0
    assert_same_run(root / "ddp", reference, HALF, ck.latest_checkpoint(root / "ddp"),
                    ck.latest_checkpoint(root / "ref_half"))


def test_fsdp_two_processes_match_one_and_resume_on_one(setup):
    root, reference = setup
    torchrun(root, "fsdp", "--train.strategy=fsdp", f"--train.max_steps={HALF}")
    assert_same_run(root / "fsdp", reference, HALF, ck.latest_checkpoint(root / "fsdp"),
                    ck.latest_checkpoint(root / "ref_half"))
    ckpt = ck.latest_checkpoint(root / "fsdp")
    assert ck.is_sharded(ckpt) and sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt",
                                                                                          "rank_00001.pt"]
    # The consolidated weights load as any checkpoint does (generate, eval, export).
    model, cfg, _ = ck.load_model(ckpt)
    assert model.num_params() == param_counts(cfg.model)["total"]

    # Saved at 2 processes, resumed at 1: the same losses as the uninterrupted reference, to the end.
    shutil.copytree(root / "fsdp", root / "fsdp_to_1")
    resumed = train_here(root, "fsdp_to_1", resume=True)
    assert resumed["steps"] == STEPS and resumed["world_size"] == 1
    assert_same_run(root / "fsdp_to_1", reference, STEPS, ck.latest_checkpoint(root / "fsdp_to_1"),
                    ck.latest_checkpoint(root / "ref"))
    assert not ck.is_sharded(ck.latest_checkpoint(root / "fsdp_to_1"))  # one process writes its usual format


def test_one_process_checkpoint_resumes_on_two(setup):
    root, reference = setup
    shutil.copytree(root / "ref_half", root / "one_to_2")
    torchrun(root, "one_to_2", "--train.strategy=fsdp", resume=True)
    assert_same_run(root / "one_to_2", reference, STEPS, ck.latest_checkpoint(root / "one_to_2"),
                    ck.latest_checkpoint(root / "ref"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one(setup):
    root, reference = setup
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = launcher("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=lmforge-test") + \
            lmforge_train("nodes", "--train.strategy=ddp", f"--train.max_steps={HALF}")
        procs.append(subprocess.Popen(cmd, cwd=root, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert_same_run(root / "nodes", reference, HALF, ck.latest_checkpoint(root / "nodes"),
                    ck.latest_checkpoint(root / "ref_half"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_killed_rank_restarts_from_the_last_checkpoint(setup):
    root, reference = setup
    cmd = launcher("--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2") + \
        lmforge_train("killed", "--train.strategy=ddp")
    agent = subprocess.Popen(cmd, cwd=root, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, killed = root / "killed" / "metrics.jsonl", None
    deadline = time.time() + 200
    while killed is None and time.time() < deadline and agent.poll() is None:
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.exists() else []
        if steps and steps[-1] >= 12:  # past the checkpoint at step 10, well before the end
            rank1 = [pid for pid in _children(agent.pid) if _rank_of(pid) == 1]
            if rank1:
                os.kill(rank1[0], signal.SIGKILL)
                killed = steps[-1]
        time.sleep(0.01)
    out, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-2000:] + err[-4000:]
    assert killed is not None and killed < STEPS, "rank 1 was not killed mid-run"
    assert "restarted by torchrun: resuming" in out + err
    assert "at step 10" in out + err
    assert_same_run(root / "killed", reference, STEPS, ck.latest_checkpoint(root / "killed"),
                    ck.latest_checkpoint(root / "ref"))


WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import DecoderLM
    from lmforge.train import distributed as D
    from lmforge.tasks.lm import window_count, window_loss
    from lmforge.train.trainer import accumulate_gradients

    world, device = D.setup(torch.device("cpu"))
    x, y = torch.load(sys.argv[1], weights_only=True)
    cfg = ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, d_model=32)
    calls = {"n": 0}

    def counting(collective):
        def call(*args, **kwargs):
            calls["n"] += 1
            return collective(*args, **kwargs)
        return call

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # FSDP2's gradient reduction
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))

    def counting_hook(state, bucket):
        calls["n"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    out = {}
    for strategy in ("ddp", "fsdp"):
        for accum in (1, 2):
            torch.manual_seed(0)
            model = DecoderLM(cfg)
            step_model = D.parallelize(model, TrainConfig(strategy=strategy), world, device, strategy, torch.float32)
            if strategy == "ddp":
                step_model.register_comm_hook(None, counting_hook)
            micro = [(x, y)] if accum == 1 else [(x[:4], y[:4]), (x[4:], y[4:])]
            mine = [(xb.tensor_split(world.world_size)[world.rank], yb.tensor_split(world.world_size)[world.rank])
                    for xb, yb in micro]
            calls["n"] = 0
            loss = accumulate_gradients(step_model, mine, window_loss, window_count, world=world)
            dist.all_reduce(loss)
            key = f"{strategy}_{accum}"
            out[key + "_loss"] = loss
            out[key + "_calls"] = torch.tensor(calls["n"])
            for name, p in model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                out[f"{key}/{name}"] = g.clone()
            if strategy == "fsdp":
                out[key + "_local_numel"] = torch.tensor(sum(p.to_local().numel() for p in model.parameters()))
    if world.rank == 0:
        torch.save(out, sys.argv[2])
    D.shutdown(world)
''')


def test_accumulation_without_sync_equals_the_big_batch(tmp_path):
    """2 ranks x 2 micro-batches, gradients reduced once, = one process on the whole batch (DDP and FSDP)."""
    from lmforge.config import ModelConfig
    from lmforge.model import DecoderLM
    from lmforge.tasks.lm import window_count, window_loss
    from lmforge.train.trainer import accumulate_gradients

    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 40, (8, 12), generator=g), torch.randint(0, 40, (8, 12), generator=g)
    y[0, 3:] = -100  # uneven target counts: rank 0 holds far fewer targets than rank 1
    y[2, :9] = -100
    torch.save((x, y), tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    run(launcher("--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"), str(tmp_path / "batch.pt"),
                 str(tmp_path / "out.pt")), tmp_path)
    out = torch.load(tmp_path / "out.pt", weights_only=True)

    cfg = ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    ref_loss = accumulate_gradients(model, [(x, y)], window_loss, window_count)
    ref = {n: p.grad for n, p in model.named_parameters()}
    for strategy in ("ddp", "fsdp"):
        for accum in (1, 2):
            key = f"{strategy}_{accum}"
            assert abs(out[key + "_loss"].item() - ref_loss.item()) < 1e-6, key
            for name, grad in ref.items():
                torch.testing.assert_close(out[f"{key}/{name}"], grad, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")
        # the second micro-batch adds no communication: gradients are reduced once per step
        assert out[f"{strategy}_2_calls"].item() == out[f"{strategy}_1_calls"].item() > 0, strategy
    # FSDP keeps half of every parameter on each of the two ranks (rounded up), as `lmforge plan` assumes.
    total = param_counts(cfg)["total"]
    n_tensors = len(list(model.parameters()))
    assert total / 2 <= out["fsdp_1_local_numel"].item() <= total / 2 + n_tensors
