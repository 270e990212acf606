"""`lmforge average`: the mean of several checkpoints of one model, written as a checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import Config, DataConfig, ModelConfig, TaskConfig, TrainConfig
from lmforge.errors import LMForgeError
from lmforge.model import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.train.average import average_checkpoints
from lmforge.train.checkpoint import latest_checkpoint, load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question.\n"


def runs(tmp_path: Path, n: int, **model) -> list[Path]:
    """n checkpoints of one small model with different random weights (the last tied, as trained)."""
    tok = Tokenizer.train([TEXT], kind="char", byte_fallback=False)
    tok.save(tmp_path / "data")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16,
                                   bias=True, **model),
                 data=DataConfig(data_dir=str(tmp_path / "data")), train=TrainConfig())
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(save_checkpoint(tmp_path / f"run{i}", DecoderLM(cfg.model), cfg, step=10 * (i + 1)))
    return out


def test_the_average_is_the_mean_of_every_weight_and_loads_as_a_model(tmp_path):
    ckpts = runs(tmp_path, 3)
    # run directories and checkpoint directories both name a checkpoint
    out = average_checkpoints([tmp_path / "run0", ckpts[1], ckpts[2]], tmp_path / "avg")
    assert out == latest_checkpoint(tmp_path / "avg") and out.name == "step_000030"  # the newest step
    mean = load_file(out / "model.safetensors")
    members = [load_file(c / "model.safetensors") for c in ckpts]
    assert set(mean) == set(members[0])
    for name, tensor in mean.items():
        expected = sum(m[name].double() for m in members) / 3  # written out in float64
        assert tensor.dtype == members[0][name].dtype
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-7)
    model, cfg, tok = load_model(tmp_path / "avg")
    assert isinstance(model, DecoderLM) and tok.vocab_size == cfg.model.vocab_size
    assert (out / "tokenizer.json").read_bytes() == (ckpts[0] / "tokenizer.json").read_bytes()
    assert not (out / "train_state.pt").exists()  # weights only: nothing to resume


def test_what_cannot_be_averaged_is_refused_with_one_line(tmp_path):
    a, b = runs(tmp_path / "a", 2)
    wide = runs(tmp_path / "w", 1, d_ff=32)[0]
    other_tok = runs(tmp_path / "t", 1)[0]
    (other_tok / "tokenizer.json").write_text((other_tok / "tokenizer.json").read_text().replace('"T"', '"Q"'))
    cases = [([a], "at least two"), ([a, a], "named twice"), ([a, wide], "model.d_ff=32"),
             ([a, other_tok], "another tokenizer")]
    for paths, words in cases:
        with pytest.raises(LMForgeError, match=words) as e:
            average_checkpoints(paths, tmp_path / "avg")
        assert "\n" not in str(e.value) and "; " in str(e.value)
    average_checkpoints([a, b], tmp_path / "avg")
    with pytest.raises(LMForgeError, match="already holds checkpoints"):  # never over an earlier result
        average_checkpoints([a, b], tmp_path / "avg")


def test_lora_checkpoints_are_refused(tmp_path):
    tok = Tokenizer.train([TEXT], kind="char", byte_fallback=False)
    tok.save(tmp_path / "data")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16),
                 data=DataConfig(data_dir=str(tmp_path / "data")), task=TaskConfig(name="sentiment", tuning="lora"))
    ckpts = [save_checkpoint(tmp_path / f"r{i}", DecoderLM(cfg.model), cfg, step=1) for i in range(2)]
    with pytest.raises(LMForgeError, match="lora-merge"):
        average_checkpoints(ckpts, tmp_path / "avg")


def test_the_command_line_prints_the_checkpoint_or_one_line(tmp_path):
    a, b = runs(tmp_path, 2)
    ok = subprocess.run([sys.executable, "-m", "lmforge", "average", str(a), str(b), str(tmp_path / "avg")],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(latest_checkpoint(tmp_path / "avg"))
    bad = subprocess.run([sys.executable, "-m", "lmforge", "average", str(a), str(tmp_path / "avg2")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "at least two" in bad.stderr
