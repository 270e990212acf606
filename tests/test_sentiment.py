"""Sentiment: the TSV reader and its messages, the scores, the confusion plot, and
`lmforge finetune sentiment` / `classify` / `lora-merge` end to end on a tiny trunk."""

import json
import random
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model.encoder import EncoderModel
from lmforge.model.decoder import DecoderLM
from lmforge.tasks.sentiment import Classifier, classification_scores, plot_confusion, read_labelled
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def toy_rows(n: int, seed: int) -> str:
    rng = random.Random(seed)
    good, bad = "good great lovely superb".split(), "bad awful dull poor".split()
    filler = "the a film plot was is very".split()
    lines = ["text\tlabel"]
    for _ in range(n):
        label = rng.choice(["positive", "negative", "neutral"])
        words = [rng.choice(filler) for _ in range(3)]
        if label != "neutral":
            words.append(rng.choice(good if label == "positive" else bad))
        rng.shuffle(words)
        lines.append(" ".join(words) + "\t" + label)
    return "\n".join(lines) + "\n"


def make_trunk(tmp: Path, arch: str) -> Path:
    tok = Tokenizer.train([toy_rows(200, 0)], kind="char")
    tok.save(tmp / "tokenizer.json")
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32, arch=arch)
    model = EncoderModel(cfg.model) if arch == "encoder" else DecoderLM(cfg.model)
    save_checkpoint(tmp / "trunk", model, cfg, step=0, tokenizer_path=tmp / "tokenizer.json")
    return tmp / "trunk"


def test_reader_messages(tmp_path):
    ok = read_labelled(write(tmp_path / "a.tsv", "text\tlabel\nfine film\tpositive\n\nbad film\tnegative\n"))
    assert ok == [("fine film", "positive", f"{tmp_path / 'a.tsv'}:2"), ("bad film", "negative", f"{tmp_path / 'a.tsv'}:4")]
    with pytest.raises(LMForgeError, match=r"b\.tsv:3: 3 fields"):
        read_labelled(write(tmp_path / "b.tsv", "text\tlabel\nx\tpositive\ny\tnegative\textra\n"))
    with pytest.raises(LMForgeError, match=r"c\.tsv:2: the text field is empty"):
        read_labelled(write(tmp_path / "c.tsv", "text\tlabel\n \tpositive\n"))
    with pytest.raises(LMForgeError, match=r"no column 'label'"):
        read_labelled(write(tmp_path / "d.tsv", "text\tsentiment\nx\tpositive\n"))
    with pytest.raises(LMForgeError, match="not found"):
        read_labelled(tmp_path / "missing.tsv")


def test_head_only_steps_leave_the_trunk_untouched_then_train_it(tmp_path, capsys):
    from safetensors.torch import load_file

    trunk = make_trunk(tmp_path, "encoder")
    train = write(tmp_path / "train.tsv", toy_rows(100, 1))
    before = load_file(next((trunk / "checkpoints").glob("step_*")) / "model.safetensors")
    after = {}
    for steps in (6, 9):
        run = tmp_path / f"run{steps}"
        main(["finetune", "sentiment", "--train", str(train), "--init-from", str(trunk), "-q",
              f"--train.out_dir={run}", f"--train.max_steps={steps}", "--train.lr=1e-3", "--train.warmup_steps=0",
              "--train.eval_interval=0", "--task.head_only_steps=6", "--task.group_by_length=true"])
        capsys.readouterr()
        after[steps] = load_file(next((run / "checkpoints").glob("step_*")) / "model.safetensors")
    trunk_keys = [k for k in after[6] if k.startswith("trunk.")]
    assert trunk_keys and {k.removeprefix("trunk.") for k in trunk_keys} <= before.keys()
    assert all(torch.equal(after[6][k], before[k.removeprefix("trunk.")]) for k in trunk_keys)
    assert not torch.equal(after[6]["classifier.weight"], after[9]["classifier.weight"])
    assert sum(not torch.equal(after[9][k], before[k.removeprefix("trunk.")]) for k in trunk_keys) > len(trunk_keys) / 2
    with pytest.raises(SystemExit):
        main(["finetune", "sentiment", "--train", str(train), "--init-from", str(trunk), "--task.head_only_steps=-1"])
    assert "error: task.head_only_steps must not be negative (0 = off), got -1\n" == capsys.readouterr().err


def test_scores_known_numbers(tmp_path):
    labels = ["neg", "pos"]
    gold = [0, 0, 0, 1, 1]
    pred = [0, 1, 0, 1, 0]
    s = classification_scores(gold, pred, labels)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == [[2, 1], [1, 1]]
    assert s["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    assert s["per_class"]["neg"]["recall"] == pytest.approx(2 / 3)
    assert s["per_class"]["pos"]["precision"] == pytest.approx(1 / 2)
    assert s["per_class"]["pos"]["f1"] == pytest.approx(1 / 2)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    png = plot_confusion(s, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("arch,tuning", [("decoder", "full"), ("encoder", "lora")])
def test_finetune_classify_end_to_end(tmp_path, capsys, arch, tuning):
    trunk = make_trunk(tmp_path, arch)
    train = write(tmp_path / "train.tsv", toy_rows(300, 1))
    valid = write(tmp_path / "valid.tsv", toy_rows(60, 2))
    run = tmp_path / "run"
    steps, lr = (120, 3e-3) if tuning == "full" else (200, 3e-3)
    main(["finetune", "sentiment", "--train", str(train), "--valid", str(valid), "--init-from", str(trunk), "-q",
          f"--train.out_dir={run}", f"--train.max_steps={steps}", f"--train.lr={lr}", "--train.warmup_steps=10",
          "--train.eval_interval=0", f"--task.tuning={tuning}", "--task.lora_rank=8", "--task.lora_alpha=16"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid"]["accuracy"] > 0.9, summary
    assert (run / "confusion.png").is_file() and (run / "report.json").is_file()
    if tuning == "lora":
        assert summary["trainable_params"] < summary["params"] / 3
    main(["classify", str(run), "the film was great", "a plot is awful", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    if tuning == "lora":
        main(["lora-merge", str(run), str(tmp_path / "merged")])
        capsys.readouterr()
        texts = ["a great film", "very dull", "the film was"]
        before = Classifier(run)(texts)
        after = Classifier(tmp_path / "merged")(texts)
        for (l1, p1), (l2, p2) in zip(before, after):
            assert l1 == l2 and all(abs(p1[k] - p2[k]) < 1e-5 for k in p1)


def test_unknown_label_and_empty_input(tmp_path, capsys):
    trunk = make_trunk(tmp_path, "encoder")
    train = write(tmp_path / "train.tsv", toy_rows(40, 1))
    valid = write(tmp_path / "valid.tsv", "text\tlabel\ngood film\tpositive\nodd film\tmixed\n")
    with pytest.raises(SystemExit):
        main(["finetune", "sentiment", "--train", str(train), "--valid", str(valid), "--init-from", str(trunk), "-q",
              f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=1"])
    err = capsys.readouterr().err
    assert "valid.tsv:3: label 'mixed' is not one of the model's labels" in err
    main(["finetune", "sentiment", "--train", str(train), "--init-from", str(trunk), "-q",
          f"--train.out_dir={tmp_path / 'run2'}", "--train.max_steps=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["classify", str(tmp_path / "run2"), "   "])
    assert "empty" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "sentiment" / "movie.valid.tsv").is_file(), reason="needs ../shared/data")
def test_demo_data_reads():
    rows = read_labelled(DATA / "sentiment" / "movie.valid.tsv")
    assert len(rows) == 1057
    assert {label for _, label, _ in rows} == {"positive", "negative"}


def test_resume_is_exact(tmp_path, capsys):
    from safetensors.torch import load_file

    trunk = make_trunk(tmp_path, "encoder")
    train = write(tmp_path / "train.tsv", toy_rows(60, 1))
    base = ["finetune", "sentiment", "--train", str(train), "--init-from", str(trunk), "-q", "--train.lr=3e-3",
            "--train.ckpt_interval=3", "--train.eval_interval=0", "--train.batch_size=8",
            "--train.dtype=float32"]  # separate runs: a timed dtype choice could differ between them
    main(base + [f"--train.out_dir={tmp_path / 'a'}", "--train.max_steps=6"])
    main(base + [f"--train.out_dir={tmp_path / 'b'}", "--train.max_steps=3"])
    main(base + [f"--train.out_dir={tmp_path / 'b'}", "--train.max_steps=6", "--resume"])
    capsys.readouterr()
    a = load_file(tmp_path / "a" / "checkpoints" / "step_000006" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_lr_scale_speeds_up_the_head_only(tmp_path, capsys):
    """The head (what the trunk's checkpoint does not fill) learns train.fresh_lr_scale times faster:
    after one AdamW step (each entry moves by about the rate) it has moved ~100x the trunk."""
    from safetensors.torch import load_file

    trunk = make_trunk(tmp_path, "encoder")
    from lmforge.train.checkpoint import latest_checkpoint

    start = load_file(latest_checkpoint(trunk) / "model.safetensors")
    train = write(tmp_path / "train.tsv", toy_rows(40, 1))
    moved = {}
    for scale in (1, 100):
        out = tmp_path / f"s{scale}"
        main(["finetune", "sentiment", "--train", str(train), "--init-from", str(trunk), "-q", "--train.lr=1e-5",
              "--train.min_lr=1e-5", "--train.warmup_steps=0", "--train.weight_decay=0", "--train.max_steps=1",
              "--train.eval_interval=0", "--train.batch_size=8", "--train.dtype=float32", "--model.dropout=0",
              f"--train.fresh_lr_scale={scale}", f"--train.out_dir={out}"])
        end = load_file(out / "checkpoints" / "step_000001" / "model.safetensors")
        trunk_moved = max((end["trunk." + k] - v).abs().max().item() for k, v in start.items())
        head_moved = end["classifier.bias"].abs().max().item()  # starts at 0: its size is its update
        moved[scale] = (trunk_moved, head_moved)
    capsys.readouterr()
    (t1, h1), (t100, h100) = moved[1], moved[100]
    assert t1 == pytest.approx(t100, rel=0.5)  # the trunk's rate is the same in both runs
    assert h100 > 20 * h1  # the head's is 100x


def test_several_training_files_are_read_as_one_set(tmp_path, capsys):
    """--train A B trains exactly as one file holding A's rows then B's (a label only B has included)."""
    from safetensors.torch import load_file

    trunk = make_trunk(tmp_path, "encoder")
    rows = toy_rows(60, 1).splitlines()
    header, first, second = rows[0], rows[1:31], rows[31:] + ["the film was so-so\tmixed"]
    a = write(tmp_path / "a.tsv", "\n".join([header] + first) + "\n")
    b = write(tmp_path / "b.tsv", "\n".join([header] + second) + "\n")
    both = write(tmp_path / "both.tsv", "\n".join([header] + first + second) + "\n")
    base = ["finetune", "sentiment", "--init-from", str(trunk), "-q", "--train.lr=3e-3", "--train.max_steps=4",
            "--train.eval_interval=0", "--train.batch_size=8", "--train.dtype=float32"]
    main(base + ["--train", str(a), str(b), f"--train.out_dir={tmp_path / 'two'}"])
    main(base + ["--train", str(both), f"--train.out_dir={tmp_path / 'one'}"])
    capsys.readouterr()
    two = load_file(tmp_path / "two" / "checkpoints" / "step_000004" / "model.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / "step_000004" / "model.safetensors")
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in two)
    labels = json.loads((tmp_path / "two" / "checkpoints" / "step_000004" / "config.json").read_text())["task"]["labels"]
    assert labels == ["mixed", "negative", "neutral", "positive"]
    # a bad row is named by its own file and line
    write(b, "text\tlabel\ngood film\tpositive\n\tnegative\n")
    with pytest.raises(SystemExit):
        main(base + ["--train", str(a), str(b), f"--train.out_dir={tmp_path / 'bad'}"])
    assert "b.tsv:3: the text field is empty" in capsys.readouterr().err
    # translation and summarization read one file, and say so
    with pytest.raises(SystemExit):
        main(["finetune", "translation", "-q", "--train", str(a), str(b), f"--train.out_dir={tmp_path / 'mt'}"])
    assert "translation reads one training file, got 2; join them into one" in capsys.readouterr().err


def sdist_with(tmp: Path, files: dict[str, str]) -> Path:
    """A source package laid out as vaderSentiment 3.3.2's: the rated sets in a tar.gz inside it."""
    import io
    import tarfile

    def tar_gz(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    inner = tar_gz({f"hutto_ICWSM_2014/{n}": text.encode() for n, text in files.items()})
    path = tmp / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner,
                             "vaderSentiment-3.3.2/setup.py": b""}))
    return path


def test_sentiment_data_writes_the_tweets_and_editorials_and_never_reads_the_test_sets(tmp_path, capsys):
    sdist = sdist_with(tmp_path, {
        "tweets_GroundTruth.txt": "1\t2.5\tLove this &amp; that!\r\n2\t-1.2\tSo  tired\tof it\r\n3\t0.0\tmeh\r\n"
                                  "4\t0.3\tLove this &amp; that!\r\n",
        "nytEditorialSnippets_GroundTruth.txt": "1_1\t-0.15\tA grim budget.\n1_2\t0.4\tA fair plan.\n",
        "movieReviewSnippets_GroundTruth.txt": "1\t3.0\tMOVIE TEST SENTENCE\n",
        "amazonReviewSnippets_GroundTruth.txt": "1\t3.0\tPRODUCT TEST SENTENCE\n",
    })
    out = tmp_path / "extra"
    main(["sentiment-data", str(sdist), str(out)])
    assert f"{out / 'tweets.tsv'}: 2 sentences" in capsys.readouterr().out
    assert read_labelled(out / "tweets.tsv") == [("Love this & that!", "positive", f"{out / 'tweets.tsv'}:2"),
                                                  ("So tired of it", "negative", f"{out / 'tweets.tsv'}:3")]
    assert [r[:2] for r in read_labelled(out / "nyt.tsv")] == [("A grim budget.", "negative"), ("A fair plan.", "positive")]
    assert sorted(p.name for p in out.iterdir()) == ["nyt.tsv", "tweets.tsv"]
    assert "TEST SENTENCE" not in (out / "tweets.tsv").read_text() + (out / "nyt.tsv").read_text()
    for bad, message in [(tmp_path / "missing.tar.gz", "not found; download the package first: pip download"),
                         (write(tmp_path / "x.tar.gz", "not a tar"), "is not a readable .tar.gz"),
                         (sdist_with(tmp_path, {"tweets_GroundTruth.txt": "1\t1\tok\n"}),
                          "has no nytEditorialSnippets_GroundTruth.txt")]:
        with pytest.raises(SystemExit) as e:
            main(["sentiment-data", str(bad), str(tmp_path / "out2")])
        assert e.value.code == 2 and message in capsys.readouterr().err
