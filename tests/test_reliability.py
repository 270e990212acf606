"""Bad input and faults: one clear line naming the problem and the fix, a non-zero exit, nothing damaged."""

import errno
import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.recipes import load_config
from lmforge.tasks.lm import train
from lmforge.train import checkpoint as ck

WORDS = "the king hath sent for thee my lord and we shall go to france tomorrow".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    (root / "c.txt").write_text(" ".join(WORDS[i * 7 % len(WORDS)] for i in range(3000)), encoding="utf-8")
    return root


def tiny(root: Path, out: str, *extra: str):
    return load_config(None, [f"--data.corpus={root / 'c.txt'}", f"--data.data_dir={root / 'data'}",
                              "--data.tokenizer=char", f"--train.out_dir={root / out}", "--model.n_layer=1",
                              "--model.d_model=16", "--model.n_head=2", "--model.block_size=16",
                              "--train.batch_size=4", "--train.eval_batches=1", "--train.progress=false",
                              "--train.tensorboard=false", "--train.device=cpu", "--train.dtype=float32",
                              "--train.max_steps=4", "--train.warmup_steps=1", "--train.log_interval=1", *extra])


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("text, words", [
    (b"model: 3\n", "section 'model'"),
    (b"train:\n  - 1\n  - 2\n", "section 'train'"),
    (b"model:\n  n_layer: 2 \xe9\n", "not UTF-8"),
    (b"model: [unclosed\n", "not valid YAML"),
])
def test_recipes_of_the_wrong_shape_or_encoding(tmp_path, capsys, text, words):
    (tmp_path / "r.yaml").write_bytes(text)
    assert words in one_line_error(capsys, ["train", "-c", str(tmp_path / "r.yaml")])


@pytest.mark.parametrize("override, words", [
    ("--train.lr=nan", "train.lr must be a finite number"),
    ("--train.lr=inf", "train.lr must be a finite number"),
    ("--train.seed=-1", "train.seed must be between 0 and 2**32 - 1"),
    ("--train.min_lr=1", "train.min_lr must be between 0 and train.lr"),
    ("--train.decay_steps=10", "must not be below train.warmup_steps"),
    ("--train.beta2=1.5", "train.beta1 and train.beta2"),
])
def test_settings_that_cannot_train(capsys, override, words):
    assert words in one_line_error(capsys, ["train", override, "--train.warmup_steps=50"])


def test_a_non_finite_step_stops_before_anything_is_saved(corpus):
    cfg = tiny(corpus, "nan", "--train.lr=1e4", "--train.warmup_steps=0", "--train.grad_clip=0",
               "--train.ckpt_interval=1", "--train.max_steps=50")
    with pytest.raises(LMForgeError, match=r"the training (loss|grad norm) became (nan|inf) at step \d+") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    for _, ckpt in ck.step_dirs(corpus / "nan" / "checkpoints"):  # every checkpoint written holds finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_a_full_disk_while_checkpointing_names_the_problem_and_keeps_the_last_checkpoint(corpus, monkeypatch):
    train(tiny(corpus, "full", "--train.max_steps=2"))
    before = ck.latest_checkpoint(corpus / "full")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", no_space)
    with pytest.raises(LMForgeError, match="No space left on device.*previous checkpoint is intact") as e:
        train(tiny(corpus, "full", "--train.max_steps=4"), resume=True)
    assert "\n" not in str(e.value)
    assert ck.latest_checkpoint(corpus / "full") == before
    assert not list((corpus / "full" / "checkpoints").glob(".tmp_*"))  # no half-written checkpoint left
    monkeypatch.undo()
    assert train(tiny(corpus, "full", "--train.max_steps=4"), resume=True)["steps"] == 4


def test_changed_muon_settings_apply_on_resume(corpus):
    train(tiny(corpus, "muon", "--train.optimizer=muon", "--train.max_steps=2", "--train.muon_momentum=0.9"))
    state = ck.load_train_state(ck.latest_checkpoint(corpus / "muon"))
    assert {g.get("momentum") for g in state["optimizer"]["param_groups"]} >= {0.9}
    train(tiny(corpus, "muon", "--train.optimizer=muon", "--train.max_steps=3", "--train.muon_momentum=0.8",
               "--train.muon_lr=0.01"), resume=True)
    groups = ck.load_train_state(ck.latest_checkpoint(corpus / "muon"))["optimizer"]["param_groups"]
    muon = [g for g in groups if g.get("muon")]
    assert muon and all(g["momentum"] == 0.8 for g in muon)
    lr = [g for g in groups if not g.get("muon")][0]["lr"]
    assert muon[0]["lr"] == pytest.approx(lr * 0.01 / 1e-3)  # the new muon_lr / lr ratio


@pytest.mark.parametrize("chosen", ["float32", "bfloat16"])
def test_muons_newton_schulz_dtype_is_recorded_and_kept_on_resume(corpus, chosen):
    """train.muon_ns_dtype=auto times Newton-Schulz in both dtypes: the choice goes into every checkpoint
    and a resumed run keeps it, whatever a new timing would say (here the recorded choice is forced
    either way)."""
    out = f"ns-{chosen}"
    train(tiny(corpus, out, "--train.optimizer=muon", "--train.max_steps=2"))
    ckpt = ck.latest_checkpoint(corpus / out)
    record = json.loads((ckpt / ck.STATE_JSON).read_text())
    assert record["muon_ns_dtype"] in ("float32", "bfloat16")
    record["muon_ns_dtype"] = chosen
    (ckpt / ck.STATE_JSON).write_text(json.dumps(record))
    train(tiny(corpus, out, "--train.optimizer=muon", "--train.max_steps=3"), resume=True)
    latest = ck.latest_checkpoint(corpus / out)
    assert json.loads((latest / ck.STATE_JSON).read_text())["muon_ns_dtype"] == chosen
    groups = ck.load_train_state(latest)["optimizer"]["param_groups"]
    assert [g["ns_dtype"] for g in groups if g.get("muon")] == [chosen]
    # A pinned choice is used as it is.
    train(tiny(corpus, f"{out}-pinned", "--train.optimizer=muon", "--train.max_steps=1",
               f"--train.muon_ns_dtype={chosen}"))
    pinned = json.loads((ck.latest_checkpoint(corpus / f"{out}-pinned") / ck.STATE_JSON).read_text())
    assert pinned["muon_ns_dtype"] == chosen


def test_a_task_sampler_keeps_the_runs_seed_on_resume():
    from lmforge.tasks.data import TokenBatcher
    from lmforge.tasks.head import ExampleSampler

    lengths = torch.randint(2, 9, (50, 2)).numpy()
    for make in (lambda seed: TokenBatcher(lengths, 40, seed), lambda seed: ExampleSampler(50, 4, seed),
                 lambda seed: ExampleSampler(50, 4, seed, lengths[:, 0].tolist())):
        a = make(1)
        [a.next_batch() for _ in range(30)]
        b = make(2)  # a resumed run whose recipe now says another seed
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert [a.next_batch() for _ in range(30)] == [b.next_batch() for _ in range(30)]


def test_head_batches_grouped_by_length_cover_every_example_once_and_pad_little():
    import numpy as np

    from lmforge.tasks.head import ExampleSampler

    lengths = np.random.default_rng(0).integers(3, 80, 1000)
    padded = {}
    for grouped in (False, True):
        sampler = ExampleSampler(1000, 32, seed=3, lengths=lengths.tolist() if grouped else None)
        epochs = {0: [], 1: []}
        while sampler.epoch < 2:
            epoch, batch = sampler.epoch, sampler.next_batch()
            if sampler.epoch == epoch:
                epochs[epoch].append(batch)
            else:
                epochs[sampler.epoch].append(batch)
                break
        first = epochs[0]
        assert sorted(i for b in first for i in b) == list(range(1000))  # each example once per epoch
        assert all(len(b) == 32 for b in first[:-1]) or grouped  # grouped: one short batch per bucket
        assert all(1 <= len(b) <= 32 for b in first)
        assert first != [b for b in epochs[1]][:len(first)]  # a new order every epoch
        padded[grouped] = sum(len(b) * lengths[b].max() for b in first)
    assert lengths.sum() / padded[True] > 0.9 > 0.6 > lengths.sum() / padded[False]
    # a run saved before batches were counted ("pos": examples drawn) resumes at the same place
    old, new = ExampleSampler(1000, 32, seed=3), ExampleSampler(1000, 32, seed=3)
    [old.next_batch() for _ in range(40)]
    new.load_state_dict({"epoch": 1, "pos": (40 - 32) * 32, "seed": 3})
    assert [old.next_batch() for _ in range(5)] == [new.next_batch() for _ in range(5)]


def test_conllu_with_repeated_word_ids_is_refused(tmp_path):
    from lmforge.tasks.srl_data import read_conllu

    row = lambda i, w: "\t".join([str(i), w, w, "X", "X", "_", "0", "dep", "_", "_", "_"])  # noqa: E731
    (tmp_path / "d.conllu").write_text("\n".join(["# sent_id = 1", row(1, "a"), row(2, "b"), row(2, "c")]) + "\n")
    with pytest.raises(LMForgeError, match=r"d.conllu:4: word id 2 where 3 was expected"):
        read_conllu(tmp_path / "d.conllu")


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    import os
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from lmforge.config import ModelConfig
    from lmforge.model import DecoderLM
    from lmforge.train.sharded import load_sharded_checkpoint

    model = DecoderLM(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=16))
    optimizer = torch.optim.AdamW(model.parameters())
    good = tmp_path / "good"
    with warnings.catch_warnings():  # one process writing DCP is intended here
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(good / "dcp"), no_dist=True)
    from lmforge.train.sharded import check_dcp_metadata

    check_dcp_metadata(good / "dcp" / ".metadata")  # a real one passes

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "bad"
    (bad / "dcp").mkdir(parents=True)
    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LMForgeError, match=r"refers to (posix|os)\.system.*refusing it") as e:
        load_sharded_checkpoint(bad, model, optimizer)
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_train_state_that_would_run_code_is_refused_as_such(corpus, tmp_path):
    import os

    train(tiny(corpus, "evil", "--train.max_steps=2"))
    ckpt = ck.latest_checkpoint(corpus / "evil")

    class Payload:
        def __reduce__(self):
            return os.getcwd, ()

    torch.save({"step": 2, "optimizer": Payload(), "rng": None}, ckpt / "train_state.pt")
    with pytest.raises(LMForgeError, match=r"refused .*train_state.pt: it holds posix.getcwd.*could run code") as e:
        train(tiny(corpus, "evil", "--train.max_steps=4"), resume=True)
    assert "\n" not in str(e.value)


def lmforge_proc(*args, cwd, stdin: bytes | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, env=env, timeout=300)


def test_resume_from_a_named_checkpoint_and_cli_inputs(corpus):
    """--resume STEP continues from that step exactly; non-UTF-8 standard input is one line; generate
    checks its arguments before it prints the prompt."""
    whole = train(tiny(corpus, "named-whole", "--train.ckpt_interval=2", "--train.max_steps=6"))
    train(tiny(corpus, "named", "--train.ckpt_interval=2", "--train.max_steps=6"))
    with pytest.raises(LMForgeError, match="has no checkpoint of step 3; it has steps 4, 6"):
        train(tiny(corpus, "named", "--train.max_steps=6"), resume="3")
    again = train(tiny(corpus, "named", "--train.ckpt_interval=2", "--train.max_steps=6"), resume="4")
    assert again["steps"] == 6 and again["train_loss"] == whole["train_loss"]
    logged = [json.loads(line)["step"] for line in (corpus / "named" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # the steps after 4 were logged again, once
    with pytest.raises(LMForgeError, match="is not a checkpoint of the run"):
        train(tiny(corpus, "named", "--train.max_steps=6"), resume=str(corpus / "named-whole"))

    run = corpus / "named"
    proc = lmforge_proc("generate", run, "--max-new-tokens", "5", cwd=corpus, stdin=b"KING: caf\xe9\n")
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "standard input (line 1) is not UTF-8" in err[0], err
    proc = lmforge_proc("generate", run, "--prompt", "KING:", "--top-p", "1.5", cwd=corpus)
    assert proc.returncode == 2 and proc.stdout == b"" and b"top_p" in proc.stderr
    proc = lmforge_proc("generate", run, "--prompt", "KING:", "--max-new-tokens", "3", "--greedy", cwd=corpus)
    assert proc.returncode == 0 and proc.stdout.decode().startswith("KING:")


def test_a_directory_that_cannot_be_written_is_one_line(corpus, tmp_path, monkeypatch):
    """A read-only train.out_dir or data.data_dir (simulated: this suite may run as root, whom file
    modes do not stop)."""
    import os

    from lmforge import lock

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", read_only)
    cfg = tiny(corpus, "ro")
    cfg.train.out_dir = str(tmp_path / "ro")
    with pytest.raises(LMForgeError, match=r"cannot write .*ro.*Permission denied.*writable directory") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    cfg = tiny(corpus, "ro2")
    cfg.data.data_dir = str(tmp_path / "data")
    with pytest.raises(LMForgeError, match=r"cannot write .*data.*Permission denied"):
        train(cfg)
