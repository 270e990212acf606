"""The training loop: token-normalised gradient accumulation, exact resume, metrics, refusals."""

import json
import os
import time
import socket
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.config import Config, DataConfig, ModelConfig, TrainConfig
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM
from lmforge.train import checkpoint as ck
from lmforge.tasks.lm import train, window_count, window_loss
from lmforge.train.optim import lr_at
from lmforge.train.trainer import accumulate_gradients
from lmforge.train.plot import plot_run

WORDS = ("the king hath sent for thee my lord and we shall go to france tomorrow "
         "o romeo wherefore art thou romeo deny thy father and refuse thy name").split()


def write_corpus(path: Path, n_words: int = 1500) -> Path:
    """A few kilobytes of word salad; a fixed LCG picks the words, so every run sees the same text."""
    state, words = 12345, []
    for i in range(n_words):
        state = (1103515245 * state + 12345) % 2**31
        words.append(WORDS[state % len(WORDS)] + ("\n" if i % 11 == 10 else ""))
    path.write_text(" ".join(words), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "corpus.txt")
    return root


def make_cfg(corpus_dir: Path, out_dir: Path, **train) -> Config:
    kw = dict(out_dir=str(out_dir), seed=123, batch_size=4, grad_accum=2, max_steps=6, lr=1e-2, min_lr=1e-3,
              warmup_steps=2, decay_steps=6, eval_interval=3, eval_batches=2, ckpt_interval=0, log_interval=1,
              tensorboard=False, progress=False, device="cpu", dtype="float32", muon_ns_dtype="float32")
    kw.update(train)
    return Config(
        model=ModelConfig(block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.1),
        data=DataConfig(corpus=[str(corpus_dir / "corpus.txt")], data_dir=str(corpus_dir / "data"),
                        special_tokens=[], byte_fallback=False),
        train=TrainConfig(**kw),
    )


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- gradient accumulation

def reference_step_loss(model, x, y):
    """Mean token loss over every target of the step, written out in float64."""
    logp = torch.log_softmax(model(x).double(), dim=-1)
    mask = y != -100
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_two_micro_batches_of_4_equal_one_batch_of_8():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, d_model=32)).double()
    x = torch.randint(0, 40, (8, 12))
    y = torch.randint(0, 40, (8, 12))
    y[0, 2:] = -100  # padding: the first micro-batch has far fewer targets than the second
    y[1, :7] = -100
    y[3, 5] = -100
    assert (y[:4] != -100).sum() != (y[4:] != -100).sum()

    big_loss = accumulate_gradients(model, [(x, y)], window_loss, window_count)
    big = grads(model)
    acc_loss = accumulate_gradients(model, [(x[:4], y[:4]), (x[4:], y[4:])], window_loss, window_count)
    acc = grads(model)
    ref_loss = reference_step_loss(model, x, y)
    ref_loss.backward()
    ref = grads(model)

    assert big_loss.item() == pytest.approx(ref_loss.item(), rel=1e-7)
    assert acc_loss.item() == pytest.approx(ref_loss.item(), rel=1e-7)
    for name in ref:  # the model returns float32 logits, so agreement is to float32 rounding
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(big[name], ref[name], rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(acc[name], ref[name], rtol=1e-5, atol=1e-6 * scale)

    # The common mistake, averaging each micro-batch's mean, gives a different gradient here.
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        (F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), ignore_index=-100) / 2).backward()
    naive = grads(model)
    assert not torch.allclose(naive["tok_emb.weight"], ref["tok_emb.weight"], rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_exact(corpus_dir, tmp_path, optimizer):
    full = train(make_cfg(corpus_dir, tmp_path / "full", optimizer=optimizer))
    assert full["steps"] == 6

    # Interrupted run: the time budget stops it after the first step, then two resumes finish it.
    parts = tmp_path / "parts"
    first = train(make_cfg(corpus_dir, parts, max_minutes=1e-9, optimizer=optimizer))
    assert first["steps"] == 1 and first["stopped_early"]
    assert train(make_cfg(corpus_dir, parts, max_steps=4, optimizer=optimizer), resume=True)["steps"] == 4
    last = train(make_cfg(corpus_dir, parts, optimizer=optimizer), resume=True)
    assert last["steps"] == 6 and not last["stopped_early"]

    a = load_file(Path(full["checkpoint"]) / "model.safetensors")
    b = load_file(Path(last["checkpoint"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = ck.load_train_state(full["checkpoint"])["optimizer"]["state"]
    opt_b = ck.load_train_state(last["checkpoint"])["optimizer"]["state"]
    for i in opt_a:
        for key in opt_a[i]:
            assert torch.equal(opt_a[i][key], opt_b[i][key])

    ma, mb = read_metrics(tmp_path / "full"), read_metrics(parts)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert [r["lr"] for r in ma] == [r["lr"] for r in mb]
    val_a = {r["step"]: r["val_loss"] for r in ma if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in mb if "val_loss" in r}
    assert set(val_a) == {3, 6} and val_a[3] == val_b[3] and val_a[6] == val_b[6]
    assert full["train_loss"] == last["train_loss"] and full["val_loss"] == last["val_loss"]


def test_minutes_schedule_ends_decayed_when_the_budget_is_spent(corpus_dir, tmp_path):
    cfg = make_cfg(corpus_dir, tmp_path / "timed", max_steps=100_000, max_minutes=0.1, schedule="minutes",
                   decay_steps=None, eval_interval=0, optimizer="adamw")
    summary = train(cfg)
    assert summary["steps"] < 100_000 and not summary["stopped_early"]  # the planned end, not an interruption
    records = read_metrics(tmp_path / "timed")
    assert records[-1]["elapsed"] >= 6.0 and len(records) >= 3  # the budget was spent
    # Each step's rate is the cosine at the clock read right after the step before it, which lies between
    # the times recorded for the two steps before it: whatever the machine's speed, the rate follows the clock
    # down to min_lr at the end of the budget.
    for earlier, before, rec in zip(records, records[1:], records[2:]):
        step = before["step"]
        assert lr_at(step, cfg.train, before["elapsed"]) <= rec["lr"] <= lr_at(step, cfg.train, earlier["elapsed"])
    assert lr_at(records[-1]["step"], cfg.train, records[-1]["elapsed"]) == pytest.approx(1e-3)
    after_warmup = [r["lr"] for r in records if r["step"] > 2]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    again = train(cfg, resume=True)  # the budget counts across sessions: a finished run stays finished
    assert again["steps"] == summary["steps"]


def test_run_outputs(corpus_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(make_cfg(corpus_dir, out, max_steps=4, eval_interval=2, ckpt_interval=1, tensorboard=True))
    assert summary["steps"] == 4 and summary["tokens_per_second"] > 0 and summary["wall_time"] > 0
    assert summary["num_params"] == DecoderLM(ck.read_config(summary["checkpoint"]).model).num_params()
    assert math.isclose(summary["val_perplexity"], math.exp(summary["val_loss"]), rel_tol=1e-9)

    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_second", "elapsed"} <= r.keys()
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert math.isclose(r["val_perplexity"], math.exp(r["val_loss"]), rel_tol=1e-9)
    assert records[-1]["val_loss"] == summary["val_loss"]
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(records, records[1:]))

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert Path(summary["checkpoint"]) == root / "step_000004" == ck.latest_checkpoint(out)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The checkpoint's config has the vocabulary size taken from the data, and loads for generation.
    model, cfg, tokenizer = ck.load_model(out)
    meta = json.loads((Path(cfg.data.data_dir) / "meta.json").read_text())
    assert cfg.model.vocab_size == meta["vocab_size"] == tokenizer.vocab_size

    # init_from: the same weights, so the same validation loss before any step is taken.
    again = train(make_cfg(corpus_dir, tmp_path / "init", max_steps=0, init_from=str(out)))
    assert again["steps"] == 0 and again["val_loss"] == summary["val_loss"]


def test_plot_run_writes_png(tmp_path):
    with pytest.raises(LMForgeError, match="metrics.jsonl"):
        plot_run(tmp_path)
    lines = [{"step": s, "loss": 4.0 / s, "lr": 1e-3} for s in range(1, 11)]
    lines[4]["val_loss"] = 1.5
    lines[9]["val_loss"] = 1.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 11, "lo')
    png = plot_run(tmp_path)
    assert png == tmp_path / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200


# ------------------------------------------------------------------------------------------- refusals

def test_refusals_leave_the_run_untouched(corpus_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LMForgeError, match="no checkpoint to resume"):
        train(make_cfg(corpus_dir, out, max_steps=2), resume=True)
    train(make_cfg(corpus_dir, out, max_steps=2))
    before = snapshot(out)

    with pytest.raises(LMForgeError, match="already holds checkpoints"):
        train(make_cfg(corpus_dir, out, max_steps=2))

    bigger = make_cfg(corpus_dir, out, max_steps=4)
    bigger.model.n_layer = 3
    with pytest.raises(LMForgeError) as e:
        train(bigger, resume=True)
    assert "n_layer: 2 in the checkpoint, 3 in the config" in str(e.value) and "\n" not in str(e.value)

    wrong_vocab = make_cfg(corpus_dir, out, max_steps=4)
    wrong_vocab.model.vocab_size = 7
    with pytest.raises(LMForgeError, match="vocab_size=7"):
        train(wrong_vocab, resume=True)
    assert snapshot(out) == before

    latest = ck.latest_checkpoint(out)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    before = snapshot(out)
    with pytest.raises(LMForgeError, match="corrupt or truncated"):
        train(make_cfg(corpus_dir, out, max_steps=4), resume=True)
    (latest / "train_state.json").write_text("{")
    with pytest.raises(LMForgeError, match="not valid JSON"):
        train(make_cfg(corpus_dir, out, max_steps=4), resume=True)
    before["checkpoints/step_000002/train_state.json"] = b"{"
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------- accumulation and memory

class SavedTensorMeter:
    """Bytes of the tensors autograd keeps for backward passes, now and at the peak: each saved
    tensor counts from the moment it is saved until its graph is freed."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, tensor):
        meter, size = self, tensor.numel() * tensor.element_size()

        class Held:
            def __init__(self):
                self.tensor = tensor
                meter.now += size
                meter.peak = max(meter.peak, meter.now)

            def __del__(self):
                meter.now -= size

        return Held()

    @staticmethod
    def unpack(held):
        return held.tensor


def test_gradient_accumulation_bounds_memory():
    """grad_accum=4 micro-batches of a quarter of the batch keep about a quarter of the activations
    alive at once: each micro-batch's graph is freed by its own backward pass."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, d_model=32))
    x, y = torch.randint(0, 64, (32, 64)), torch.randint(0, 64, (32, 64))
    peaks = {}
    for accum in (1, 4):
        meter = SavedTensorMeter()
        micro = list(zip(x.chunk(accum), y.chunk(accum)))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            accumulate_gradients(model, micro, window_loss, window_count)
        assert meter.now == 0  # every graph was freed
        peaks[accum] = meter.peak
        model.zero_grad(set_to_none=True)
    assert peaks[4] < 0.35 * peaks[1], peaks


# ---------------------------------------------------------------------------------- locks and stale data

def test_a_run_directory_in_use_is_refused_and_a_dead_holders_lock_taken_over(corpus_dir, tmp_path):
    import subprocess
    import sys

    from lmforge.lock import LOCK, DirectoryLock

    out = tmp_path / "run"
    with DirectoryLock(out, "training run"):  # this process plays the other trainer
        (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
        with pytest.raises(LMForgeError, match=rf"in use by another training run \(pid {os.getppid()}") as e:
            train(make_cfg(corpus_dir, out, max_steps=2))
        assert "\n" not in str(e.value)
    assert not out.exists()  # the refused run left nothing behind
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert train(make_cfg(corpus_dir, out, max_steps=2))["steps"] == 2  # a stale lock is taken over
    assert not (out / LOCK).exists()


def test_a_waiter_outlives_a_holder_that_removes_the_directory_it_made(tmp_path):
    """Two runs started together on a data directory neither has made: the first makes it, holds
    the lock, writes nothing and removes both; the second, waiting, makes the directory again and
    takes the lock (it used to stop with "cannot write ... (No such file or directory)")."""
    import subprocess
    import sys

    from lmforge.lock import LOCK, DirectoryLock

    data = tmp_path / "data"
    holder = DirectoryLock(data, "tokenizer training").acquire()
    assert holder.created_directory
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lmforge.lock import DirectoryLock; print('ready', flush=True); "
         "DirectoryLock(sys.argv[1], 'tokenizer training', wait=True, poll=0.05).acquire(); print('held')", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiter.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # it finds the directory there and the lock taken, and waits
    assert waiter.poll() is None, waiter.communicate()
    holder.release()
    assert not data.exists()  # the holder left no trace
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.split() == ["held"], err
    assert (data / LOCK).is_file()  # the directory made again, with the waiter's lock in it


def test_data_prepared_from_another_corpus_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = make_cfg(tmp_path, tmp_path / "run", max_steps=1)
    train(cfg)
    corpus.write_text(corpus.read_text() + " and more words than before", encoding="utf-8")
    again = make_cfg(tmp_path, tmp_path / "run2", max_steps=1)
    with pytest.raises(LMForgeError, match="holds data prepared from other inputs .the corpus files"):
        train(again)
    gone = make_cfg(tmp_path, tmp_path / "run3", max_steps=1)
    gone.data.corpus = [str(tmp_path / "no-such-file.txt")]
    with pytest.raises(LMForgeError, match="no-such-file.txt"):
        train(gone)
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


# ----------------------------------------------------------------------------------------- automatic dtype

def test_faster_dtype_keeps_the_first_unless_another_is_clearly_faster():
    import time as _time

    from lmforge.hardware import faster_dtype

    cost = {torch.float32: 0.004, torch.bfloat16: 0.001}
    assert faster_dtype(lambda d: _time.sleep(cost[d]), (torch.float32, torch.bfloat16)) == torch.bfloat16
    cost = {torch.float32: 0.002, torch.bfloat16: 0.002}  # a tie is no reason to change
    assert faster_dtype(lambda d: _time.sleep(cost[d]), (torch.float32, torch.bfloat16)) == torch.float32


def test_measuring_the_dtype_leaves_no_trace(corpus_dir, tmp_path, monkeypatch):
    """The probe runs real forward and backward passes in both dtypes (draws dropout masks, a batch):
    the run that follows is bitwise the float32 run, and the checkpoint records the choice."""
    from lmforge import hardware

    calls = []

    def measure_then_keep_float32(step, dtypes, **_):
        for d in dtypes:
            step(d)
            calls.append(d)
        return torch.float32

    monkeypatch.setattr(hardware, "cpu_bf16_is_faster", lambda: True)
    monkeypatch.setattr(hardware, "faster_dtype", measure_then_keep_float32)
    auto = train(make_cfg(corpus_dir, tmp_path / "auto", dtype="auto", ckpt_interval=6))
    assert calls == [torch.float32, torch.bfloat16] and auto["dtype"] == "float32"
    plain = train(make_cfg(corpus_dir, tmp_path / "plain", dtype="float32"))
    assert [r["loss"] for r in read_metrics(tmp_path / "auto")] == [r["loss"] for r in read_metrics(tmp_path / "plain")]
    state = json.loads((ck.latest_checkpoint(tmp_path / "auto") / "train_state.json").read_text())
    assert state["dtype"] == "float32" and plain["dtype"] == "float32"
