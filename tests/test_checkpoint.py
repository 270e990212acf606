"""Checkpoints: exact round trip, atomic writes that survive SIGKILL, clear errors for damaged input."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lmforge.config import Config, DataConfig, ModelConfig, TrainConfig
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ck
from lmforge.train.checkpoint import latest_checkpoint, load_model, load_train_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer.\n"


def make_setup(tmp_path: Path, tie: bool = True):
    data_dir = tmp_path / "data"
    tok = Tokenizer.train([TEXT], kind="char", byte_fallback=False)
    tok.save(data_dir)
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16,
                          tie_embeddings=tie, bias=True),
        data=DataConfig(data_dir=str(data_dir)),
        train=TrainConfig(out_dir=str(tmp_path / "run")),
    )
    torch.manual_seed(0)
    return cfg, DecoderLM(cfg.model), tok


def trained_optimizer(model: DecoderLM) -> torch.optim.AdamW:
    """An optimizer with real state (moments, step counts) after two updates."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, model.cfg.vocab_size, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and "; " in message, message  # one line: the problem; the fix
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, tie):
    cfg, model, tok = make_setup(tmp_path, tie)
    opt = trained_optimizer(model)
    path = save_checkpoint(cfg.train.out_dir, model, cfg, step=7, optimizer=opt,
                           sampler_state={"position": 123}, metrics={"loss": 1.5})
    assert path == Path(cfg.train.out_dir) / "checkpoints" / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "config.json", "tokenizer.json", "train_state.pt", "train_state.json"])
    assert latest_checkpoint(cfg.train.out_dir) == path

    with safe_open(path / "model.safetensors", "pt") as f:  # a tied head is stored once
        stored = set(f.keys())
    assert stored == set(ck.unique_state_dict(model))
    assert ("lm_head.weight" in stored) == (not tie) and "tok_emb.weight" in stored

    loaded, cfg2, tok2 = load_model(cfg.train.out_dir)
    assert cfg2 == cfg and tok2.vocab_size == tok.vocab_size and not loaded.training
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie

    state = load_train_state(path)
    assert state["step"] == 7 and state["sampler"] == {"position": 123} and state["metrics"] == {"loss": 1.5}
    saved_opt = opt.state_dict()
    for key, value in saved_opt["state"].items():
        for name, tensor in value.items():
            assert torch.equal(state["optimizer"]["state"][key][name], tensor)


def test_rng_states_restore_every_generator(tmp_path):
    cfg, model, _ = make_setup(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.rand(5), np.random.rand(3), random.random(), np.random.randn()  # leaves a cached gaussian
    path = save_checkpoint(cfg.train.out_dir, model, cfg, step=1, optimizer=trained_optimizer(model))
    draws = lambda: (torch.rand(4), torch.randn(2), random.random(), np.random.rand(3), np.random.randn())
    first = draws()
    draws()
    ck.restore_rng_state(load_train_state(path)["rng"])
    again = draws()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] == again[2] and np.array_equal(first[3], again[3]) and first[4] == again[4]


def test_keeps_last_two_and_finds_latest(tmp_path):
    cfg, model, _ = make_setup(tmp_path)
    run = Path(cfg.train.out_dir)
    for step in (1, 2, 3):
        save_checkpoint(run, model, cfg, step=step)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert latest_checkpoint(run) == root / "step_000003"
    assert latest_checkpoint(root) == root / "step_000003"  # the checkpoints folder itself
    assert latest_checkpoint(root / "step_000002") == root / "step_000002"  # a checkpoint itself
    (root / "latest").write_text("step_000099\n")  # stale pointer: fall back to the newest by step
    assert latest_checkpoint(run) == root / "step_000003"
    (root / "latest").unlink()
    assert latest_checkpoint(run) == root / "step_000003"
    save_checkpoint(run, model, cfg, step=3)  # saving the same step again replaces it
    assert latest_checkpoint(run) == root / "step_000003"


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def saved(tmp_path):
    cfg, model, _ = make_setup(tmp_path)
    path = save_checkpoint(cfg.train.out_dir, model, cfg, step=5, optimizer=trained_optimizer(model))
    return cfg, path


def test_missing_paths(tmp_path):
    with pytest.raises(LMForgeError) as e:
        load_model(tmp_path / "nowhere")
    assert_one_line_error(e, "does not exist")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(LMForgeError) as e:
        load_model(tmp_path / "empty_run")
    assert_one_line_error(e, "no checkpoint")


@pytest.mark.parametrize("filename", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file(saved, filename):
    _, path = saved
    (path / filename).unlink()
    with pytest.raises(LMForgeError) as e:
        load_model(path)
    assert_one_line_error(e, filename)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(saved, damage):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(LMForgeError) as e:
        load_model(path)
    assert_one_line_error(e, "model.safetensors", "corrupt")


@pytest.mark.parametrize("content", ['{"model": {"n_layer": 1', "[1, 2]", '{"model": {"n_layers": 2}}', "{}"])
def test_bad_config_json(saved, content):
    _, path = saved
    (path / "config.json").write_text(content)
    with pytest.raises(LMForgeError) as e:
        load_model(path)
    assert_one_line_error(e, "config.json")


def test_tokenizer_vocab_mismatch(saved):
    _, path = saved
    Tokenizer.train(["only a few letters"], kind="char", byte_fallback=False).save(path / "tokenizer.json")
    with pytest.raises(LMForgeError) as e:
        load_model(path)
    assert_one_line_error(e, "tokenizer.json", "vocabulary")


def test_weights_of_another_shape(saved):
    cfg, path = saved
    raw = json.loads((path / "config.json").read_text())
    raw["model"]["d_model"] = 32
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LMForgeError) as e:
        load_model(path)
    assert_one_line_error(e, "shape")


def test_corrupt_or_missing_train_state(saved):
    _, path = saved
    info = path / "train_state.json"
    good_info = info.read_text()
    info.write_text("{not json")
    with pytest.raises(LMForgeError) as e:
        load_train_state(path)
    assert_one_line_error(e, "train_state.json", "not valid JSON")
    info.write_text(good_info.replace('"step": 5', '"step": 4'))
    with pytest.raises(LMForgeError) as e:
        load_train_state(path)
    assert_one_line_error(e, "step 5", "step 4")
    info.write_text(good_info)
    pt = path / "train_state.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(LMForgeError) as e:
        load_train_state(path)
    assert_one_line_error(e, "train_state.pt", "corrupt")
    pt.unlink()
    with pytest.raises(LMForgeError) as e:
        load_train_state(path)
    assert_one_line_error(e, "train_state.pt", "init_from")


# ---------------------------------------------------------------------------------- crash while saving

CHILD = textwrap.dedent("""
    import os, random, sys, time
    import torch
    from lmforge.config import Config, DataConfig, ModelConfig
    from lmforge.model import DecoderLM
    from lmforge.train import checkpoint as ck

    run, data_dir, vocab, mode, seed = sys.argv[1:6]
    random.seed(int(seed))
    cfg = Config(model=ModelConfig(vocab_size=int(vocab), block_size=16, n_layer=1, n_head=2, d_model=16),
                 data=DataConfig(data_dir=data_dir))
    model = DecoderLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    real_save_file, real_fsync = ck.save_file, ck._fsync_file
    saves = 0

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if mode == "stall" and saves >= 2:  # the second save stops half-way through the weights
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            print("STALLED", flush=True)
            time.sleep(120)

    def fsync_file(path):  # widen every phase of the write so random kills land all over it
        time.sleep(random.uniform(0, 0.01))
        real_fsync(path)

    ck.save_file, ck._fsync_file = save_file, fsync_file
    while True:
        saves += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(saves)  # every weight tells which save it came from
        ck.save_checkpoint(run, model, cfg, step=saves, optimizer=opt, sampler_state={"save": saves})
        print(f"SAVED {saves}", flush=True)
""")


def run_and_kill(tmp_path, mode, seed, kill_after):
    cfg, _, tok = make_setup(tmp_path)
    run = tmp_path / f"run_{mode}_{seed}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run), cfg.data.data_dir, str(tok.vocab_size), mode, str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            line = proc.stdout.readline().strip()
            assert line, f"child ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "child too slow"
            if line == kill_after:
                break
        if mode == "random":
            time.sleep(random.Random(seed).uniform(0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return run, cfg


def assert_consistent_checkpoint(run, min_save):
    path = latest_checkpoint(run)
    model, _, _ = load_model(run)
    values = {float(v) for p in model.parameters() for v in p.detach().flatten().unique()}
    assert len(values) == 1  # every tensor from the same save, none half-written
    save = int(values.pop())
    assert save >= min_save
    state = load_train_state(path)
    assert state["step"] == save and state["sampler"] == {"save": save}
    return path


def test_kill_during_weights_write_keeps_previous(tmp_path):
    run, cfg = run_and_kill(tmp_path, "stall", seed=0, kill_after="STALLED")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    assert leftovers  # the half-written checkpoint was really there when the process died
    path = assert_consistent_checkpoint(run, min_save=1)
    assert path.name == "step_000001"
    # The next save clears the debris and moves on.
    model = DecoderLM(cfg.model)
    save_checkpoint(run, model, cfg, step=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_random_moment_keeps_a_loadable_checkpoint(tmp_path, seed):
    run, _ = run_and_kill(tmp_path, "random", seed=seed, kill_after="SAVED 2")
    assert_consistent_checkpoint(run, min_save=2)
