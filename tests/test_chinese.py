"""Chinese text: a ~9,500-character vocabulary, full-width punctuation and traditional/simplified text
round-trip through the tokenizer and prepare; rare characters as bytes (data.min_char_count); a
validation corpus of its own (data.val_corpus); OpenCC conversion (data.convert); the tang-poetry
recipe on ../shared/data/zh when present."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data.shards import TokenDataset, prepare
from lmforge.errors import LMForgeError
from lmforge.recipes import load_config
from lmforge.tokenizer import Tokenizer

ZH = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh"
REPO = Path(__file__).resolve().parents[1]

FULL_WIDTH = "，。、；：？！「」『』（）《》〈〉【】…—～·"
TRADITIONAL = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
SIMPLIFIED = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
HAN = "".join(chr(0x4E00 + i) for i in range(9500))  # 9,500 distinct CJK Unified Ideographs


def poems(n: int, seed: int = 0) -> list[str]:
    """Synthetic 'poems' over the 9,500 characters: a title line, an author line, four verses."""
    rng = np.random.default_rng(seed)

    def line(k: int) -> str:
        return "".join(HAN[i] for i in rng.integers(0, len(HAN), k))

    return [f"{line(4)}\n{line(3)}\n" + "\n".join(f"{line(5)}，{line(5)}。" for _ in range(4)) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_large_alphabet_full_width_and_both_scripts_round_trip(tmp_path):
    from transformers import PreTrainedTokenizerFast

    text = HAN + FULL_WIDTH + TRADITIONAL + SIMPLIFIED + "\n"
    tok = Tokenizer.train([text], "char")
    assert tok.vocab_size == 1 + 256 + len(set(text))  # end-of-text, 256 bytes, ~9,500 characters
    sample = "".join(poems(20)) + FULL_WIDTH + TRADITIONAL + SIMPLIFIED
    ids = tok.encode(sample)
    assert len(ids) == len(sample)  # one token per character, punctuation included
    assert tok.decode(ids) == sample
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(sample) == ids and hf.decode(ids) == sample
    unseen = "𠀀鿿ㄅ"  # outside the training text: spelled as UTF-8 bytes, still exact
    assert tok.decode(tok.encode(unseen)) == unseen and len(tok.encode(unseen)) == len(unseen.encode("utf-8"))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_jsonl_poems_round_trips(tmp_path, kind):
    texts = poems(60) + [TRADITIONAL, SIMPLIFIED, FULL_WIDTH]
    cfg = DataConfig(corpus=[str(write_jsonl(tmp_path / "p.jsonl", texts))], tokenizer=kind, vocab_size=600,
                     val_fraction=0.1, data_dir=str(tmp_path / "data"))
    meta = prepare(cfg, progress=False)
    tok = Tokenizer.load(tmp_path / "data")
    ids = np.concatenate([TokenDataset(tmp_path / "data", s).window(0, meta[s]["tokens"]) for s in ("train", "val")])
    docs = tok.decode(ids.tolist()).split("<|endoftext|>")
    assert docs == texts + [""]


def test_min_char_count_spells_rare_characters_as_bytes(tmp_path):
    common, rare = "春風花月山水", "鸞鳳"
    texts = [common * 5, rare + common, "月" + rare[0]]
    cfg = DataConfig(corpus=[str(write_jsonl(tmp_path / "p.jsonl", texts))], min_char_count=3,
                     val_fraction=0.2, data_dir=str(tmp_path / "data"))
    meta = prepare(cfg, progress=False)
    tok = Tokenizer.load(tmp_path / "data")
    assert tok.vocab_size == 1 + 256 + len(common)  # 鸞 (2 times) and 鳳 (once) are left out
    assert tok.encode("鸞") == [tok.token_to_id(f"<0x{b:02X}>") for b in "鸞".encode("utf-8")]
    ids = np.concatenate([TokenDataset(tmp_path / "data", s).window(0, meta[s]["tokens"]) for s in ("train", "val")])
    assert tok.decode(ids.tolist()).split("<|endoftext|>") == texts + [""]
    with pytest.raises(LMForgeError, match="byte_fallback"):
        DataConfig(min_char_count=2, byte_fallback=False)


def test_val_corpus_is_the_validation_split(tmp_path):
    train, valid = poems(30, seed=1), poems(5, seed=2) + ["龘"]
    cfg = DataConfig(corpus=[str(write_jsonl(tmp_path / "t.jsonl", train))],
                     val_corpus=[str(write_jsonl(tmp_path / "v.jsonl", valid))], data_dir=str(tmp_path / "data"))
    meta = prepare(cfg, progress=False)
    tok = Tokenizer.load(tmp_path / "data")
    assert tok.token_to_id("龘") is None  # the tokenizer learns from the training text only
    for split, texts in (("train", train), ("val", valid)):
        ds = TokenDataset(tmp_path / "data", split)
        assert tok.decode(ds.window(0, len(ds)).tolist()).split("<|endoftext|>") == texts + [""]
        assert meta[split]["chars"] == sum(map(len, texts))
    # a changed validation file is noticed: the prepared data is refused, not reused
    write_jsonl(tmp_path / "v.jsonl", valid[:2])
    from lmforge.data.shards import check_fingerprint

    with pytest.raises(LMForgeError, match="validation files"):
        check_fingerprint(cfg, meta)


def test_convert_t2s_with_opencc(tmp_path):
    opencc = pytest.importorskip("opencc")
    texts = [TRADITIONAL, "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。"]
    cfg = DataConfig(corpus=[str(write_jsonl(tmp_path / "p.jsonl", texts))], convert="t2s", val_fraction=0.3,
                     data_dir=str(tmp_path / "data"))
    meta = prepare(cfg, progress=False)
    tok = Tokenizer.load(tmp_path / "data")
    ids = np.concatenate([TokenDataset(tmp_path / "data", s).window(0, meta[s]["tokens"]) for s in ("train", "val")])
    expected = [opencc.OpenCC("t2s").convert(t) for t in texts]
    assert tok.decode(ids.tolist()).split("<|endoftext|>") == expected + [""]
    assert expected[0] == SIMPLIFIED
    assert tok.token_to_id("舉") is None and tok.token_to_id("举") is not None
    from lmforge.evaluate import text_dataset  # `lmforge eval --file` converts its text the same way

    converted = text_dataset(tmp_path / "p.jsonl", tok, "t2s").tokens.tolist()
    assert converted == [tok.eot_id] + tok.encode(expected[0]) + [tok.eot_id] + tok.encode(expected[1])


def test_convert_without_opencc_names_the_extra(monkeypatch):
    from lmforge.data.sources import converter

    monkeypatch.setitem(sys.modules, "opencc", None)  # as if not installed
    with pytest.raises(LMForgeError, match=r"pip install 'lmforge\[zh\]'"):
        converter("t2s")
    assert converter(None) is None and converter("") is None  # no conversion needs no package


def test_convert_unknown_configuration():
    pytest.importorskip("opencc")
    from lmforge.data.sources import converter

    with pytest.raises(LMForgeError, match="not an OpenCC configuration"):
        converter("x2y")


def test_recipe_without_the_data_fails_with_one_line(tmp_path):
    cfg = load_config("tang-poetry")
    assert cfg.data.corpus == ["../shared/data/zh/tang.train.jsonl"]
    assert cfg.data.val_corpus == ["../shared/data/zh/tang.valid.jsonl"]
    assert load_config("tang-poetry-bpe").data.tokenizer == "bpe"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "prepare", "-c", "tang-poetry"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "../shared/data/zh/tang.train.jsonl" in lines[0] and "does not exist" in lines[0]


def test_generate_stops_after_lines_and_at_strings(tmp_path, monkeypatch, capsys):
    """`lmforge generate --max-lines/--stop` on a tiny model of verses: the printed text is the unlimited
    text cut at the N-th line break or before the first stop string, streamed or not (in this process:
    the command line as a user types it, without a new interpreter per call)."""
    from lmforge.cli import main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "p.jsonl", [TRADITIONAL + "\n" + SIMPLIFIED] * 40)
    main(["train", "--data.corpus=p.jsonl", "--data.data_dir=data", "--train.out_dir=run",
          "--data.special_tokens=[]", "--data.byte_fallback=false", "--model.n_layer=1", "--model.n_head=2",
          "--model.d_model=32", "--model.block_size=32", "--train.batch_size=4", "--train.max_steps=4",
          "--train.warmup_steps=1", "--train.eval_batches=1", "--train.progress=false", "--train.tensorboard=false", "-q"])
    capsys.readouterr()

    def generate(*extra: str) -> str:
        main(["generate", "run", "-p", "床前明月光", "-n", "300", "-t", "2.0", "--seed", "0", *extra])
        return capsys.readouterr().out

    full = generate("--no-stream")
    assert full.count("\n") > 4 and "。" in full
    for streamed in ([], ["--no-stream"]):
        assert generate("--max-lines", "3", *streamed) == "\n".join(full.split("\n")[:3]) + "\n"
        assert generate("--stop", "\\n", "--stop", "。", *streamed) == full[:min(full.find("\n"), full.find("。"))] + "\n"
    with pytest.raises(SystemExit) as exit_info:
        generate("--max-lines", "0")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().count("\n") == 0 and "max_lines" in err


@pytest.mark.skipif(not (ZH / "tang.valid.jsonl").is_file(), reason="needs ../shared/data/zh")
def test_tang_poems_round_trip():
    """The real corpus: ~9,500 distinct characters, traditional, with full-width punctuation; every poem
    of the validation file and 5,000 of the training file round-trip, as they are and in simplified."""
    read = lambda name: [json.loads(x)["text"] for x in (ZH / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    train, valid = read("tang.train.jsonl"), read("tang.valid.jsonl")
    assert len(train) == 54393 and len(valid) == 1178
    tok = Tokenizer.train(train, "char")
    assert 9000 < tok.vocab_size - 257 < 10000
    assert all(tok.token_to_id(c) is not None for c in "，。")
    sample = valid + train[:5000]
    assert [tok.decode(ids) for ids in tok.encode_batch(sample)] == sample
    opencc = pytest.importorskip("opencc")
    simplified = [opencc.OpenCC("t2s").convert(t) for t in valid]
    assert simplified != valid
    assert [tok.decode(ids) for ids in tok.encode_batch(simplified)] == simplified  # unseen ones as bytes
