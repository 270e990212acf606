"""End-to-end: the `lmforge` command on a tiny corpus, and one clear line for each bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.d_model=32", "--model.block_size=32",
        "--train.batch_size=4", "--train.max_steps=12", "--train.warmup_steps=2", "--train.eval_interval=6",
        "--train.eval_batches=2", "--train.ckpt_interval=6", "--train.log_interval=3",
        "--train.progress=false", "--train.tensorboard=false"]


def lmforge(*args, cwd, stdin=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clear_error(proc, words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert words.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(("To be, or not to be, that is the question.\n" * 200), encoding="utf-8")
    args = ["train", "--data.corpus=corpus.txt", "--data.data_dir=data", "--train.out_dir=run", *TINY]
    proc = lmforge(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root


def test_train_writes_run_and_plot(trained):
    run = trained / "run"
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    proc = lmforge("plot", "run", cwd=trained)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("loss.png")


def test_generate_eval_and_stdin(trained):
    proc = lmforge("generate", "run", "--prompt", "To be", "-n", "20", "--no-stream", cwd=trained)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be")
    proc = lmforge("generate", "run", "-n", "10", "--lines", "--greedy", cwd=trained, stdin="To\nnot\n")
    assert proc.returncode == 0, proc.stderr
    assert "sample 2/2" in proc.stdout
    fast = lmforge("generate", "run", "-p", "To be", "-n", "12", "--greedy", "--no-stream", "--dtype", "int8",
                   cwd=trained)
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout.startswith("To be") and len(fast.stdout) > len("To be\n")  # closeness: test_interop
    proc = lmforge("eval", "run", cwd=trained)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-4)
    proc = lmforge("eval", "run", "--file", "corpus.txt", cwd=trained)
    assert proc.returncode == 0, proc.stderr


def test_help_everywhere(tmp_path):
    for cmd in ([], ["prepare"], ["train"], ["generate"], ["eval"], ["plot"]):
        proc = lmforge(*cmd, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "usage" in proc.stdout
    assert "train.lr" in lmforge("train", "--help", cwd=tmp_path).stdout



HEAVY = ("torch", "numpy", "tokenizers", "tiktoken", "safetensors", "matplotlib", "yaml", "tqdm", "transformers")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], []])
def test_help_imports_nothing_heavy(argv):
    """`lmforge --help` builds the parser only: none of the heavy libraries is imported for it."""
    root = Path(__file__).resolve().parents[1]
    probe = ("import sys\nfrom lmforge.cli import main\n"
             f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print('imported:', sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert "usage: lmforge" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "imported: []", proc.stderr

def test_bad_corpus_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    base = ["prepare", "--data.data_dir=d"]
    assert_clear_error(lmforge(*base, "--data.corpus=empty.txt", cwd=tmp_path), "empty")
    assert_clear_error(lmforge(*base, "--data.corpus=missing.txt", cwd=tmp_path), "missing.txt")
    assert_clear_error(lmforge(*base, "--data.corpus=binary.bin", cwd=tmp_path), "binary.bin")
    assert_clear_error(lmforge(*base, "--data.corpus=latin1.txt", cwd=tmp_path), "latin1.txt")


def test_failed_prepare_overwrites_nothing(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe bad\n")
    proc = lmforge("prepare", "--data.corpus=latin1.txt", "--data.data_dir=data", cwd=tmp_path)
    assert proc.returncode == 2
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_bad_config_inputs(tmp_path):
    assert_clear_error(lmforge("train", "--model.n_lyer=2", cwd=tmp_path), "unknown config key 'model.n_lyer'")
    assert_clear_error(lmforge("train", "--train.lr=abc", cwd=tmp_path), "train.lr")
    assert_clear_error(lmforge("train", "-c", "nope", cwd=tmp_path), "recipe 'nope' not found")


def test_bad_checkpoint_inputs(trained, tmp_path):
    assert_clear_error(lmforge("generate", tmp_path / "nowhere", cwd=tmp_path), "nowhere")
    # a truncated weights file
    broken = tmp_path / "broken"
    shutil.copytree(trained / "run", broken)
    for st in broken.rglob("model.safetensors"):
        st.write_bytes(st.read_bytes()[:100])
    assert_clear_error(lmforge("generate", broken, cwd=tmp_path), "model.safetensors")
    # a tokenizer from another corpus, with another vocabulary
    other = tmp_path / "other"
    shutil.copytree(trained / "run", other)
    from lmforge.tokenizer import Tokenizer
    tok = Tokenizer.train(["abc"], kind="char", byte_fallback=False, special_tokens=[])
    for tj in other.rglob("tokenizer.json"):
        tok.save(tj)
    assert_clear_error(lmforge("generate", other, cwd=tmp_path), "tokenizer")


def test_prompt_longer_than_context(trained):
    proc = lmforge("generate", "run", "--prompt", "x" * 500, "-n", "5", cwd=trained)
    assert_clear_error(proc, "context")
