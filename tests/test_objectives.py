"""Every objective through the one trainer: masked LM, translation (both designs), sentiment and SRL.

For each: two processes under a real ``torchrun`` (Gloo on this machine's loopback), with DDP and
with FSDP2, train the same 20-step run as one process (every logged loss to 1e-6 relative, the final
weights to 1e-6), and
a run of N steps equals k steps + ``--resume`` bit for bit, the dtype chosen automatically included.
The language model has the same checks in test_distributed.py and test_train.py.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import Config, ModelConfig
from lmforge.model.encoder import EncoderModel
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red green blue cat dog sun moon tree house bird fish star".split()
STEPS = 20
COMMON = [f"--train.max_steps={STEPS}", f"--train.decay_steps={STEPS}", "--train.warmup_steps=2", "--train.eval_interval=10", "--train.ckpt_interval=10",
          "--train.log_interval=1", "--train.progress=false", "--train.tensorboard=false", "--train.device=cpu",
          "--train.grad_accum=2", "--model.dropout=0.0", "--train.seed=3"]
LOSS_TOL = 1e-6  # relative: a loss of ~6 agrees to a few float32 roundings
WEIGHT_TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sentiment_rows(n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["text\tlabel"]
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = [rng.choice(WORDS) for _ in range(3)] + [rng.choice(["good", "great"] if label == "positive"
                                                                    else ["bad", "dull"])]
        rng.shuffle(words)
        lines.append(" ".join(words) + "\t" + label)
    return "\n".join(lines) + "\n"


def conllu(n: int, seed: int) -> str:
    rng = random.Random(seed)
    nouns, verbs = "cat dog man girl bird".split(), "saw ate chased liked".split()
    out = []
    for i in range(n):
        words = [rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns)] + (["today"] if rng.random() < .5 else [])
        out.append(f"# sent_id = doc{i % 5}-{i:04d}")
        for j, w in enumerate(words):
            sense = f"{w}.0{2 if w == 'saw' else 1}" if j == 1 else "_"
            label = {0: "ARG0", 1: "V", 3: "ARG1", 4: "ARGM-TMP"}.get(j, "_")
            cols = [str(j + 1), w, w, "X", "X", "_", "0", "dep", "_", "_", sense, label]
            out.append("\t".join(cols))
        out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    rng = random.Random(0)
    rows = ["source\ttarget"]
    for _ in range(40):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rows.append(" ".join(words) + "\t" + " ".join(reversed(words)))
    (root / "train.tsv").write_text("\n".join(rows[:33]) + "\n")
    (root / "valid.tsv").write_text("\n".join(rows[:1] + rows[33:]) + "\n")
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)) + "\n")
    (root / "sent_train.tsv").write_text(sentiment_rows(40, 0))
    (root / "sent_valid.tsv").write_text(sentiment_rows(10, 1))
    (root / "srl_train.conllu").write_text(conllu(24, 0))
    (root / "srl_valid.conllu").write_text(conllu(6, 1))
    tok = Tokenizer.train([sentiment_rows(100, 2), conllu(20, 3)], kind="char")
    tok.save(root / "tokenizer.json")
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32, arch="encoder")
    torch.manual_seed(0)
    save_checkpoint(root / "trunk", EncoderModel(cfg.model), cfg, step=0, tokenizer_path=root / "tokenizer.json")
    return root


#: name -> the lmforge command line of a run (out_dir added per run)
RUNS = {
    "mlm": ["train", "-c", "encoder-tiny", "--data.corpus=corpus.txt", "--data.data_dir=mlmdata",
            "--data.tokenizer=char", "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2",
            "--model.block_size=16", "--train.batch_size=4", "--train.eval_batches=2"],
    "translation": ["finetune", "translation", "--train", "train.tsv", "--valid", "valid.tsv", "--model.n_layer=1",
                    "--model.n_encoder_layer=1", "--model.n_head=2", "--model.d_model=32", "--model.d_ff=64",
                    "--data.vocab_size=300", "--data.data_dir=mtdata", "--task.batch_tokens=160",
                    "--task.max_source_len=16", "--task.max_target_len=16", "--task.eval_samples=4",
                    "--task.beam_size=2", "--train.schedule=steps"],  # the recipe's decay follows the clock
    "translation-decoder": ["finetune", "translation", "-c", "translation-bible-decoder", "--train", "train.tsv",
                            "--valid", "valid.tsv", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32",
                            "--model.d_ff=64", "--data.vocab_size=300", "--data.data_dir=mtdata-dec",
                            "--task.batch_tokens=160", "--task.max_source_len=16", "--task.max_target_len=16",
                            "--task.eval_samples=4", "--task.beam_size=1", "--model.block_size=64"],
    "sentiment": ["finetune", "sentiment", "--train", "sent_train.tsv", "--valid", "sent_valid.tsv",
                  "--init-from", "trunk", "--train.batch_size=6", "--task.head_dropout=0"],
    "srl": ["finetune", "srl", "--train", "srl_train.conllu", "--valid", "srl_valid.conllu", "--init-from", "trunk",
            "--train.batch_size=5", "--task.head_dropout=0"],
}


def in_process(root: Path, args: list[str]) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(args)
    finally:
        os.chdir(cwd)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def torchrun(root: Path, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lmforge", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def references(root):
    """One process, float32: the run each multi-process run must equal."""
    for name, args in RUNS.items():
        in_process(root, args + COMMON + ["--train.dtype=float32", f"--train.out_dir=ref-{name}", "-q"])
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_the_same_run_as_one(references, name, capsys):
    root = references
    ref = metrics(root / f"ref-{name}")
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    ref_w = weights(root / f"ref-{name}")
    for strategy in ("ddp", "fsdp"):
        out = f"{strategy}-{name}"
        torchrun(root, RUNS[name] + COMMON + ["--train.dtype=float32", f"--train.strategy={strategy}",
                                              f"--train.out_dir={out}", "-q"])
        got = metrics(root / out)
        assert [r["step"] for r in got] == [r["step"] for r in ref], strategy  # every step once
        for mine, theirs in zip(got, ref):
            assert math.isclose(mine["loss"], theirs["loss"], rel_tol=LOSS_TOL, abs_tol=LOSS_TOL), (strategy, mine, theirs)
            assert mine["lr"] == theirs["lr"]
            if "val_loss" in theirs:
                assert math.isclose(mine["val_loss"], theirs["val_loss"], rel_tol=LOSS_TOL, abs_tol=LOSS_TOL), \
                    (strategy, mine, theirs)
        w = weights(root / out)
        assert w.keys() == ref_w.keys()
        for key in w:
            torch.testing.assert_close(w[key], ref_w[key], rtol=0, atol=WEIGHT_TOL, msg=f"{strategy} {name} {key}")
        report = root / out / "report.json"
        if name != "mlm":  # the main process wrote the task's final report with the whole model
            assert json.loads(report.read_text())["world_size"] == 2


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_is_bitwise_exact_with_the_dtype_chosen_automatically(references, name):
    """k steps with train.dtype=auto, then --resume (which keeps the recorded dtype without measuring
    again) == N steps in that dtype."""
    root = references
    half = COMMON + ["--train.dtype=auto", f"--train.out_dir=half-{name}", "-q"]
    in_process(root, RUNS[name] + half[:-3] + [f"--train.max_steps={STEPS // 2}"] + half[-3:])
    chosen = json.loads((latest_checkpoint(root / f"half-{name}") / "train_state.json").read_text())["dtype"]
    assert chosen in ("float32", "bfloat16")
    in_process(root, RUNS[name] + half + ["--resume"])
    in_process(root, RUNS[name] + COMMON + [f"--train.dtype={chosen}", f"--train.out_dir=whole-{name}", "-q"])
    whole, split = metrics(root / f"whole-{name}"), metrics(root / f"half-{name}")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]
    a, b = weights(root / f"whole-{name}"), weights(root / f"half-{name}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((latest_checkpoint(root / f"half-{name}") / "train_state.json").read_text())
    assert resumed["dtype"] == chosen
