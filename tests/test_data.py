"""Corpus sources, token shards (nanoGPT's split, round trips, dtypes) and the block sampler."""

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig
from lmforge.data import (BlockSampler, ShardWriter, TokenDataset, corpus_bytes, eval_batches, iter_documents,
                          load_meta, prepare, token_dtype)
from lmforge.data import shards as shards_module
from lmforge.data.sources import iter_pieces
from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer

TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

POEM = "".join(f"Line {i}: To be, or not to be, that is the question;\n  Whether 'tis nobler {i % 7}\n"
               for i in range(300))
CHINESE = "".join(f"第{i}行：床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" for i in range(200))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cfg_for(tmp_path, corpus, **kw) -> DataConfig:
    return DataConfig(corpus=[str(c) for c in corpus], data_dir=str(tmp_path / "out"), **kw)


def all_tokens(data_dir, split) -> np.ndarray:
    ds = TokenDataset(data_dir, split)
    return ds.window(0, len(ds))


# ---------------------------------------------------------------------- sources
def test_txt_md_jsonl_folder_glob(tmp_path):
    write(tmp_path / "c/b.txt", "bee\n")
    write(tmp_path / "c/a.md", "# kept as is\n")
    write(tmp_path / "c/sub/z.jsonl", json.dumps({"text": "zed", "id": 1}) + "\n\n" + json.dumps({"text": "中文"}) + "\n")
    write(tmp_path / "c/ignored.csv", "x,y\n")
    write(tmp_path / "c/.hidden/secret.txt", "no\n")
    docs = list(iter_documents([str(tmp_path / "c")]))
    assert docs == [(str(tmp_path / "c/a.md"), "# kept as is\n"), (str(tmp_path / "c/b.txt"), "bee\n"),
                    (f"{tmp_path / 'c/sub/z.jsonl'}:1", "zed"), (f"{tmp_path / 'c/sub/z.jsonl'}:3", "中文")]
    assert [t for _, t in iter_documents([str(tmp_path / "c/*.txt"), str(tmp_path / "c/**/*.jsonl")])] == \
           ["bee\n", "zed", "中文"]
    assert corpus_bytes([str(tmp_path / "c/b.txt")]) == 4
    literal = write(tmp_path / "take[1].txt", "brackets\n")  # an existing name is not read as a glob
    assert list(iter_documents([str(literal)])) == [(str(literal), "brackets\n")]


def test_big_file_comes_in_pieces_cut_after_newlines(tmp_path):
    path = write(tmp_path / "big.txt", POEM + "no newline at the end")
    pieces = list(iter_pieces([str(path)], chunk_bytes=500))
    assert len(pieces) > 10
    assert "".join(t for _, t, _ in pieces) == POEM + "no newline at the end"
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    for _, text, _ in pieces[:-1]:
        assert text.endswith("\n") and len(text) <= 500


def test_pieces_of_a_line_without_newlines(tmp_path):
    path = write(tmp_path / "one.txt", "汉字" * 1000)
    pieces = [t for _, t, _ in iter_pieces([str(path)], chunk_bytes=300)]
    assert "".join(pieces) == "汉字" * 1000 and max(map(len, pieces)) <= 300


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert list(iter_documents([str(tmp_path / "bom.txt")])) == [(str(tmp_path / "bom.txt"), "hello\n")]


def test_shakespeare_is_plain_text():
    docs = list(iter_documents(["shakespeare"]))
    names = [name for name, _ in docs]
    assert len(docs) == 38 and names == sorted(names)
    assert "shakespeare/tragedies/macbeth" in names
    text = "".join(t for _, t in docs)
    assert "Fair is foul, and foul is fair" in text
    assert "\nFirst Witch:\nWhen shall we three meet again\n" in text
    assert "\nHAMLET:\n" in text
    for marker in ("**", "  \n", "_", "\\", "\n#", "\n\n\n"):
        assert marker not in text, f"markdown residue {marker!r}"
    assert not any(line.startswith("#") or line != line.rstrip() for line in text.splitlines())
    assert "[Aside]" in text  # escaped brackets are unescaped, not dropped


# ---------------------------------------------------------------------- bad input
def expect_error(match, corpus, **kw):
    with pytest.raises(LMForgeError, match=match) as info:
        list(iter_documents(corpus, **kw))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_inputs(tmp_path):
    expect_error("corpus is empty", [])
    expect_error("does not exist", [str(tmp_path / "missing.txt")])
    expect_error("matches no files", [str(tmp_path / "*.nothing")])
    (tmp_path / "empty_dir").mkdir()
    expect_error("holds no .txt", [str(tmp_path / "empty_dir")])
    (tmp_path / "bin.txt").write_bytes(b"text\x00\x01\x02 binary")
    assert "bin.txt" in expect_error("looks binary", [str(tmp_path / "bin.txt")])
    (tmp_path / "latin1.txt").write_bytes("ok\nfine\ncaf\u00e9\n".encode("latin-1"))
    message = expect_error("not valid UTF-8", [str(tmp_path / "latin1.txt")])
    assert "latin1.txt" in message and "line 3" in message and "convert" in message
    (tmp_path / "late.txt").write_bytes(b"ok\n" * 400 + b"\xff\n")  # error found in a later chunk
    assert "line 401" in expect_error("not valid UTF-8", [str(tmp_path / "late.txt")], chunk_bytes=100)
    write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": broken}\n')
    assert "bad.jsonl:2" in expect_error("invalid JSON", [str(tmp_path / "bad.jsonl")])
    write(tmp_path / "notext.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n')
    assert "notext.jsonl:3" in expect_error('no "text"', [str(tmp_path / "notext.jsonl")])
    write(tmp_path / "list.jsonl", '["text"]\n')
    expect_error('no "text"', [str(tmp_path / "list.jsonl")])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "secret.txt", "hidden\n")
    path.chmod(0)
    expect_error("cannot read", [str(path)])


def test_prepare_refuses_empty_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(LMForgeError, match="contains no text"):
        prepare(cfg_for(tmp_path, [tmp_path / "empty.txt"]), progress=False)
    with pytest.raises(LMForgeError, match="does not exist"):
        prepare(cfg_for(tmp_path, [tmp_path / "nope.txt"]), progress=False)


def test_load_meta_missing(tmp_path):
    with pytest.raises(LMForgeError, match="lmforge prepare"):
        load_meta(tmp_path)


# ---------------------------------------------------------------------- prepare
def test_split_is_nanogpt_cut(tmp_path):
    path = write(tmp_path / "poem.txt", POEM)
    meta = prepare(cfg_for(tmp_path, [path], special_tokens=[], byte_fallback=False), progress=False)
    n = len(POEM)
    stoi = {c: i for i, c in enumerate(sorted(set(POEM)))}  # nanoGPT's shakespeare_char/prepare.py
    train, val = all_tokens(tmp_path / "out", "train"), all_tokens(tmp_path / "out", "val")
    assert train.tolist() == [stoi[c] for c in POEM[:int(n * 0.9)]]
    assert val.tolist() == [stoi[c] for c in POEM[int(n * 0.9):]]
    assert meta["vocab_size"] == len(stoi) and meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    assert meta["train"]["tokens"] == int(n * 0.9) and meta["val"]["tokens"] == n - int(n * 0.9)
    assert load_meta(tmp_path / "out") == meta
    assert (tmp_path / "out/train_000.bin").stat().st_size == 2 * int(n * 0.9)


def test_tinyshakespeare_matches_nanogpt(tmp_path):
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"{TINY_SHAKESPEARE} not present")
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    meta = prepare(cfg_for(tmp_path, [TINY_SHAKESPEARE], special_tokens=[], byte_fallback=False), progress=False)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    n = len(text)
    assert meta["vocab_size"] == 65
    assert meta["train"]["tokens"] == 1_003_854 and meta["val"]["tokens"] == 111_540  # nanoGPT's printed counts
    expected = np.array([stoi[c] for c in text], dtype=np.int64)
    assert np.array_equal(all_tokens(tmp_path / "out", "train"), expected[:int(n * 0.9)])
    assert np.array_equal(all_tokens(tmp_path / "out", "val"), expected[int(n * 0.9):])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_shards_round_trip_with_documents(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(shards_module, "PIECE_BYTES", 700)  # many pieces per document
    monkeypatch.setattr(shards_module, "BATCH_PIECES", 3)
    a, b = write(tmp_path / "a.txt", POEM), write(tmp_path / "b.md", CHINESE)
    c = write(tmp_path / "c.jsonl", json.dumps({"text": "短 doc 🙂"}) + "\n")
    meta = prepare(cfg_for(tmp_path, [a, b, c], tokenizer=kind, vocab_size=300, shard_tokens=1000), progress=False)
    tok = Tokenizer.load(tmp_path / "out")
    eot = tok.eot_id
    texts = [POEM, CHINESE, "短 doc 🙂"]
    full = "".join(texts)
    cut = int(len(full) * 0.9)  # falls inside the Chinese document
    assert len(POEM) < cut < len(POEM) + len(CHINESE)
    expected_train = tok.encode(POEM) + [eot] + tok.encode(CHINESE[:cut - len(POEM)])
    expected_val = tok.encode(CHINESE[cut - len(POEM):]) + [eot] + tok.encode(texts[2]) + [eot]
    train, val = all_tokens(tmp_path / "out", "train"), all_tokens(tmp_path / "out", "val")
    assert train.tolist() == expected_train and val.tolist() == expected_val
    assert tok.decode(train) + tok.decode(val) == POEM + "<|endoftext|>" + CHINESE + "<|endoftext|>" + texts[2] + \
        "<|endoftext|>"
    assert meta["documents"] == 3 and meta["chars"] == len(full)
    assert len(meta["train"]["files"]) == -(-len(expected_train) // 1000)  # shards of 1000 tokens
    assert meta["train"]["files"][:2] == ["train_000.bin", "train_001.bin"]


def test_bpe_shards_identical_with_the_fast_encoder(tmp_path, monkeypatch):
    """Shards written through tiktoken (lmforge.fast_bpe) are byte for byte those of the tokenizers path."""
    pytest.importorskip("tiktoken")
    monkeypatch.setattr(shards_module, "PIECE_BYTES", 900)
    mixed = "".join(f"{i} Ünïcödé café  naïve\t\tΩμέγα 日本語 한국어 🙂👍🏽 it's 12,345.6\n\n  x\u3000y\r\n" for i in range(60))
    corpus = [write(tmp_path / "a.txt", POEM), write(tmp_path / "b.md", CHINESE + mixed),
              write(tmp_path / "c.jsonl", json.dumps({"text": "短 doc 🙂<|endoftext|> tail"}) + "\n")]
    fast = prepare(DataConfig(corpus=[str(c) for c in corpus], data_dir=str(tmp_path / "fast"), tokenizer="bpe",
                              vocab_size=400, shard_tokens=3000), progress=False)
    assert Tokenizer.load(tmp_path / "fast")._fast_encoder() is not None
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow/tokenizer.json").write_bytes((tmp_path / "fast/tokenizer.json").read_bytes())
    monkeypatch.setattr(Tokenizer, "_fast_encoder", lambda self: None)
    slow = prepare(DataConfig(corpus=[str(c) for c in corpus], data_dir=str(tmp_path / "slow"), tokenizer="bpe",
                              vocab_size=400, shard_tokens=3000), progress=False)
    files = fast["train"]["files"] + fast["val"]["files"]
    assert len(files) > 2 and files == slow["train"]["files"] + slow["val"]["files"]
    for name in files:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_tokenizer_reused_or_retrained(tmp_path):
    path = write(tmp_path / "poem.txt", POEM)
    cfg = cfg_for(tmp_path, [path])
    prepare(cfg, progress=False)
    tok_file = tmp_path / "out/tokenizer.json"
    os.utime(tok_file, (1, 1))
    prepare(cfg, progress=False)  # same settings: the tokenizer is kept
    assert tok_file.stat().st_mtime == 1
    meta = prepare(cfg_for(tmp_path, [path], byte_fallback=False), progress=False)  # new settings: retrained
    assert meta["vocab_size"] == 1 + len(set(POEM))
    assert tok_file.stat().st_mtime != 1


def test_user_tokenizer_is_used(tmp_path):
    path = write(tmp_path / "poem.txt", POEM)
    own = Tokenizer.train([POEM + CHINESE], "bpe", vocab_size=320, special_tokens=["<eos>"])
    own.save(tmp_path / "out")
    meta = prepare(cfg_for(tmp_path, [path]), progress=False)  # the config says char; the file wins
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 320 and meta["special_tokens"] == ["<eos>"]
    assert Tokenizer.load(tmp_path / "out").decode(all_tokens(tmp_path / "out", "val"))[-5:] == "<eos>"


def test_bpe_trained_on_a_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "PIECE_BYTES", 500)
    monkeypatch.setattr(shards_module, "BPE_SAMPLE_BYTES", 3000)  # every few pieces only
    path = write(tmp_path / "poem.txt", POEM)
    prepare(cfg_for(tmp_path, [path], tokenizer="bpe", vocab_size=300, special_tokens=[]), progress=False)
    tok = Tokenizer.load(tmp_path / "out")
    out = tok.decode(all_tokens(tmp_path / "out", "train")) + tok.decode(all_tokens(tmp_path / "out", "val"))
    assert out == POEM


def test_prepare_memory_is_bounded(tmp_path, monkeypatch):
    """Python-side peak memory does not grow with the corpus (pieces are streamed)."""
    monkeypatch.setattr(shards_module, "PIECE_BYTES", 1 << 16)
    monkeypatch.setattr(shards_module, "BATCH_PIECES", 4)
    big = write(tmp_path / "big.txt", POEM * 300)  # ~ 25 MB
    tracemalloc.start()
    try:
        meta = prepare(cfg_for(tmp_path, [big], special_tokens=[]), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meta["chars"] == len(POEM) * 300
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB for a {big.stat().st_size / 1e6:.0f} MB corpus"


def test_shakespeare_char(tmp_path):
    meta = prepare(DataConfig(data_dir=str(tmp_path / "out")), progress=False)
    assert meta["corpus"] == ["shakespeare"] and meta["documents"] == 38
    assert 4_000_000 < meta["train"]["tokens"] < 6_000_000
    tok = Tokenizer.load(tmp_path / "out")
    val = all_tokens(tmp_path / "out", "val")
    assert val[-1] == tok.eot_id and "<|endoftext|>" in tok.decode(val)


# ---------------------------------------------------------------------- shard files
def test_dtype_choice():
    assert token_dtype(65) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def write_split(data_dir, split_tokens: dict, vocab_size, shard_tokens):
    dtype = token_dtype(vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": None}
    for split, ids in split_tokens.items():
        writer = ShardWriter(data_dir, split, dtype, shard_tokens)
        for part in np.array_split(ids, 7):
            writer.write(part)
        meta[split] = writer.close()
    (Path(data_dir) / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def test_uint32_shards_and_windows_across_files(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100_000, size=5_000)
    write_split(tmp_path, {"train": ids, "val": ids[:300]}, vocab_size=100_000, shard_tokens=1_234)
    assert sorted(p.name for p in tmp_path.glob("train_*.bin")) == [f"train_00{i}.bin" for i in range(5)]
    raw = np.concatenate([np.fromfile(tmp_path / f"train_00{i}.bin", dtype="<u4") for i in range(5)])
    assert np.array_equal(raw, ids)
    ds = TokenDataset(tmp_path, "train")
    assert len(ds) == 5_000
    for start, length in [(0, 5_000), (1_230, 10), (1_234, 1), (2_000, 2_000), (4_999, 1), (17, 0)]:
        window = ds.window(start, length)
        assert window.dtype == np.int64 and np.array_equal(window, ids[start:start + length])
    with pytest.raises(IndexError):
        ds.window(4_990, 11)


def test_shard_writer_refuses_ids_too_big(tmp_path):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "train", np.uint16, 100).write(np.array([70_000]))


def test_damaged_shards(tmp_path):
    write_split(tmp_path, {"train": np.arange(1000), "val": np.arange(100)}, vocab_size=1000, shard_tokens=400)
    with open(tmp_path / "train_002.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(LMForgeError, match="lmforge prepare"):
        TokenDataset(tmp_path, "train")
    (tmp_path / "val_000.bin").unlink()
    with pytest.raises(LMForgeError, match="missing"):
        TokenDataset(tmp_path, "val")


# ---------------------------------------------------------------------- sampler
@pytest.fixture
def dataset(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50_000, size=3_001)
    write_split(tmp_path, {"train": tokens, "val": tokens[:1_000]}, vocab_size=50_000, shard_tokens=700)
    return TokenDataset(tmp_path, "train"), tokens


def test_windows_are_slices_and_targets_are_shifted(dataset):
    ds, tokens = dataset
    sampler = BlockSampler(ds, block_size=16, batch_size=8, seed=3)
    for step in range(20):
        starts = sampler.starts(step)
        x, y = sampler.next_batch()
        assert x.dtype == torch.long and x.shape == y.shape == (8, 16)
        for row, s in enumerate(starts):
            assert 0 <= s <= len(tokens) - 17
            assert x[row].tolist() == tokens[s:s + 16].tolist()
            assert y[row].tolist() == tokens[s + 1:s + 17].tolist()
    # the numpy PCG64 stream of (seed, step), reproduced independently
    expected = np.random.Generator(np.random.PCG64([3, 5])).integers(0, len(tokens) - 16, size=8)
    assert np.array_equal(sampler.starts(5), expected)


def test_state_restores_the_exact_stream(dataset):
    ds, _ = dataset
    first = BlockSampler(ds, 32, 4, seed=7)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in a checkpoint
    continued = [first.next_batch() for _ in range(5)]
    resumed = BlockSampler(ds, 32, 4, seed=999)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(continued, (resumed.next_batch() for _ in range(5))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    different = BlockSampler(ds, 32, 4, seed=8)
    assert not torch.equal(different.next_batch()[0], BlockSampler(ds, 32, 4, seed=7).next_batch()[0])
    negative = BlockSampler(ds, 32, 4, seed=-5)  # any int is a seed
    assert not torch.equal(negative.next_batch()[0], BlockSampler(ds, 32, 4, seed=5).next_batch()[0])
    with pytest.raises(LMForgeError, match="sampler state"):
        resumed.load_state_dict({"step": 1})


def test_ranks_split_one_global_batch(dataset):
    ds, _ = dataset
    whole = BlockSampler(ds, 8, 6, seed=11).next_batch()[0]
    parts = [BlockSampler(ds, 8, 3, seed=11, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_eval_batches_sequential(dataset):
    ds, tokens = dataset
    block, batch = 100, 7
    batches = list(eval_batches(ds, block, batch))
    n_windows = (len(tokens) - 1) // block  # 30 windows of 101 tokens fit in 3001 tokens
    assert [len(x) for x, _ in batches] == [7, 7, 7, 7, 2] and sum(len(x) for x, _ in batches) == n_windows
    x = torch.cat([x for x, _ in batches]).reshape(-1)
    y = torch.cat([y for _, y in batches]).reshape(-1)
    assert x.tolist() == tokens[:n_windows * block].tolist()  # non-overlapping and in order
    assert y.tolist() == tokens[1:n_windows * block + 1].tolist()
    assert len(list(eval_batches(ds, block, batch, n_batches=2))) == 2


def test_eval_batches_with_seed_repeat(dataset):
    ds, tokens = dataset
    one = list(eval_batches(ds, 50, 4, n_batches=3, seed=5))
    two = list(eval_batches(ds, 50, 4, n_batches=3, seed=5))
    assert len(one) == 3
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(one[0][0], next(eval_batches(ds, 50, 4, n_batches=1, seed=6))[0])


def test_split_too_short(dataset):
    ds, tokens = dataset
    with pytest.raises(LMForgeError, match="block_size"):
        BlockSampler(ds, block_size=3_001, batch_size=1, seed=0)
    with pytest.raises(LMForgeError, match="block_size"):
        next(eval_batches(ds, 3_001, 1))
    x, y = BlockSampler(ds, block_size=3_000, batch_size=2, seed=0).next_batch()  # exactly one window fits
    assert x[1].tolist() == x[0].tolist() == tokens[:3_000].tolist() and y[0].tolist() == tokens[1:].tolist()


def test_eval_batches_sequential_score_the_tail_once():
    from lmforge.evaluate import ArrayDataset

    tokens = np.arange(3051) % 97
    ds = ArrayDataset(tokens)
    seen = []
    for _, y in eval_batches(ds, 100, 7):
        for row in y.tolist():
            seen += [t for t in row if t != -100]
    assert seen == tokens[1:].tolist()  # every token after the first, exactly once, in order
    x, y = list(eval_batches(ds, 100, 7))[-1]  # the tail window's inputs stay tokens
    assert x.tolist()[0] == tokens[-101:-1].tolist()
