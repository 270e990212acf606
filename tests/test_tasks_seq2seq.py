"""Translation and summarization tasks: reading and bad input, lengths, token batches, metrics, the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.tasks import metrics
from lmforge.tasks.data import TokenBatcher, cut_tokens, limit_lengths, read_examples, sorted_batches
from lmforge.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------- reading


def test_tsv_rows_skipped_are_counted_by_reason(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("source\ttarget\nhello\thola\n\nthree\tfields\there\n \tvacío\ncat\tgato\nonly one field\n",
                 encoding="utf-8")
    pairs, report = read_examples(f, "source", "target")
    assert pairs == [("hello", "hola"), ("cat", "gato")]
    assert report.rows == 6 and report.kept == 2
    assert report.skipped == {"empty lines": 1, "ragged rows (not 2 fields)": 2, "with an empty source": 1}
    assert "skipped 4 of 6 rows" in report.summary() and "2 ragged rows" in report.summary()


def test_tsv_missing_column_names_the_column_and_the_fix(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("english\tspanish\nhello\thola\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match="no column 'source'.*'english', 'spanish'.*--task.source_key"):
        read_examples(f, "source", "target")
    pairs, _ = read_examples(f, "english", "spanish")
    assert pairs == [("hello", "hola")]


def test_jsonl_bad_lines_and_missing_keys(tmp_path):
    f = tmp_path / "docs.jsonl"
    lines = [{"document": "A long text.", "summary": "Text"}, "not json", [1, 2], {"document": "No summary"},
             {"document": "Doc", "summary": 3}, {"document": "Two", "summary": "2"}]
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    pairs, report = read_examples(f, "document", "summary")
    assert pairs == [("A long text.", "Text"), ("Two", "2")]
    assert report.skipped == {"lines that are not JSON": 1, "lines that are not JSON objects": 1,
                              "without the key 'summary'": 1, "with a non-text target": 1}
    with pytest.raises(LMForgeError, match="no line of .* has the key 'headline'.*'document', 'summary'"):
        read_examples(f, "document", "headline")


def test_unusable_files_raise_one_clear_error(tmp_path):
    with pytest.raises(LMForgeError, match="not found"):
        read_examples(tmp_path / "missing.tsv", "source", "target")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(LMForgeError, match="empty"):
        read_examples(tmp_path / "empty.tsv", "source", "target")
    (tmp_path / "blank.tsv").write_text("source\ttarget\n\n\n")
    with pytest.raises(LMForgeError, match="no usable example.*2 empty lines"):
        read_examples(tmp_path / "blank.tsv", "source", "target")
    (tmp_path / "latin1.tsv").write_bytes("source\ttarget\ncafé\tcafé\n".encode("latin-1"))
    with pytest.raises(LMForgeError, match="line 2 is not UTF-8"):
        read_examples(tmp_path / "latin1.tsv", "source", "target")


def test_over_long_examples_are_cut_or_skipped_and_reported():
    sources = [[1] * 3, [1] * 8, [1] * 2]
    targets = [[2] * 9, [2] * 2, [2] * 2]
    s, t, index, report = limit_lengths(sources, targets, 5, 6, "truncate", (7, 7))
    assert [len(x) for x in s] == [3, 5, 2] and [len(x) for x in t] == [6, 2, 2] and index == [0, 1, 2]
    assert "1 sources over task.max_source_len=7" in report.summary() and "cut to the limit" in report.summary()
    s, t, index, report = limit_lengths(sources, targets, 5, 6, "skip", (7, 7))
    assert index == [2] and report.skipped == 2 and "2 examples skipped" in report.summary()
    with pytest.raises(LMForgeError, match="every example is longer"):
        limit_lengths(sources[:2], targets[:2], 5, 6, "skip", (7, 7))


def test_cuts_keep_whole_words():
    """A cut that would split a word leaves the whole word out (a source ending in half a word lets
    the summary's source_words rule take the half for a word); a first word longer than the room
    is cut where it has to be; without continuation pieces a cut is a plain cut."""
    C = frozenset({10, 11, 12})
    ids = [5, 1, 10, 11, 2, 3, 12]  # words: 5 | 1 10 11 | 2 | 3 12
    assert cut_tokens(ids, 3, C) == [5] and cut_tokens(ids, 4, C) == [5, 1, 10, 11]
    assert cut_tokens(ids, 6, C) == [5, 1, 10, 11, 2] and cut_tokens(ids, 7, C) == ids
    assert cut_tokens([1, 10, 11, 12], 2, C) == [1, 10] and cut_tokens(ids, 3) == [5, 1, 10]
    tok = Tokenizer.train(["unbelievable things happen", "things"] * 20, kind="bpe", vocab_size=300)
    text = "things unbelievable"
    ids = tok.encode(text)
    first = len(tok.encode("things"))
    assert len(ids) > first + 1  # the second word is several pieces
    for room in range(first, len(ids)):
        assert tok.decode(cut_tokens(ids, room, tok.continuation_ids())).strip() == "things"


# --------------------------------------------------------------------------------------------- batches


def test_token_batches_bound_padding_cover_every_example_and_resume():
    rng = np.random.default_rng(0)
    lengths = np.stack([rng.integers(3, 60, 500), rng.integers(3, 60, 500)], axis=1)
    batcher = TokenBatcher(lengths, batch_tokens=400, seed=1, bucket_size=128)
    epoch = [batcher.next_batch() for _ in range(batcher.batches_per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(500))
    for b in epoch:
        assert len(b) * int(lengths[b].max(axis=0).sum()) <= 400
    padded = sum(len(b) * int(lengths[b].max(axis=0).sum()) for b in epoch)
    assert padded < 1.3 * lengths.sum()  # bucketing keeps padding low
    state = batcher.state_dict()
    ahead = [batcher.next_batch() for _ in range(5)]
    other = TokenBatcher(lengths, batch_tokens=400, seed=1, bucket_size=128)
    other.load_state_dict(state)
    assert [other.next_batch() for _ in range(5)] == ahead
    assert ahead[0] != epoch[0] or ahead[1] != epoch[1]  # a new epoch, shuffled again
    with pytest.raises(LMForgeError, match="task.batch_tokens=100 is smaller than the longest example"):
        TokenBatcher(lengths, batch_tokens=100, seed=1)
    assert sorted(i for b in sorted_batches(lengths, 400) for i in b) == list(range(500))


# --------------------------------------------------------------------------------------------- metrics


HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world", "it is raining today in Paris"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped over", "hello there world", "today it rains in Paris"]


def test_metrics_equal_the_libraries_numbers():
    import sacrebleu
    from rouge_score import rouge_scorer

    assert metrics.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert metrics.chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    got = metrics.rouge(HYPS, REFS)
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert got[kind] == pytest.approx(100 * sum(s[kind].fmeasure for s in scores) / len(scores))
    # fixed numbers, so that a change in how the libraries are called shows up
    # BLEU by hand: n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    by_hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(by_hand)
    assert metrics.chrf(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(72.0848317, abs=1e-6)
    assert metrics.rouge(["the cat sat on a mat"], ["the cat sat on the mat"])["rouge2"] == pytest.approx(60.0)
    assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
    assert metrics.score(["bleu", "rougeL"], HYPS, REFS).keys() == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert metrics.lead_words("One two  three\nfour five", 4) == "One two three four"
    assert metrics.lead_sentence(" Mr. Smith  won. He left! Then") == "Mr."  # a plain rule, abbreviations included
    assert metrics.lead_sentence("Rates rise\nThe Fed said so. More") == "Rates rise"  # a line break ends it
    assert metrics.lead_sentence("No full stop at all") == "No full stop at all"
    with pytest.raises(LMForgeError, match="2 hypotheses but 1 references"):
        metrics.bleu(HYPS[:2], REFS[:1])



def test_names_kept_counts_the_names_a_reference_carries_over_from_its_source():
    sources = ["And Elimelech Naomi's husband died in Beth-lehem-judah", "Then Mordecai went out", "and he said"]
    references = ["Y murió Elimelech, marido de Noemi, en Beth-lehem-judah", "Mardoqueo salió", "y él dijo"]
    # names carried over unchanged: {Elimelech, Beth-lehem-judah} in the first pair ("Noemi" is not in the
    # source, "Y" is the first word), none in the others (Mardoqueo differs from Mordecai)
    hypotheses = ["Y murió Eliseo en Beth-lehem-judah", "Mordecai salió", "y dijo"]
    assert metrics.names_kept(sources, hypotheses, references) == pytest.approx(50.0)
    assert metrics.names_kept(sources, references, references) == pytest.approx(100.0)
    assert metrics.names_kept(sources[1:], hypotheses[1:], references[1:]) is None
    got = metrics.score(["bleu", "chrf", "names"], hypotheses, references, sources)
    assert got["names"] == pytest.approx(50.0) and got.keys() == {"bleu", "chrf", "names"}
    assert "names" not in metrics.score(["bleu", "names"], hypotheses[1:], references[1:], sources[1:])

def test_made_up_names_replace_the_carried_names_alike_in_both_texts():
    from lmforge.tasks.translation import with_made_up_names

    pairs = [("And Elimelech went to Beth-lehem-judah with Naomi", "Y Elimelech fué á Beth-lehem-judah con Noemi"),
             ("Then Elimelech said, Elimelech is here", "Entonces dijo Elimelech: Elimelech está aquí"),
             ("Boaz said", "Boaz dijo"),  # the target's first word: not counted as carried over
             ("and he said", "y él dijo")]
    assert with_made_up_names(pairs, 0) == pairs
    out = with_made_up_names(pairs, 2, seed=1)
    assert out[:4] == pairs and len(out) == 4 + 2 + 2  # two copies of each of the two pairs that carry names
    assert out == with_made_up_names(pairs, 2, seed=1) and out != with_made_up_names(pairs, 2, seed=2)
    known = {w.lower() for s, t in pairs for w in re.findall(r"\w+", s + " " + t)}
    split = re.compile(r"([\w-]+)")
    for k, (orig, copies) in enumerate(((pairs[0], out[4:6]), (pairs[1], out[6:8]))):
        carried = metrics.carried_names(*orig)
        assert carried == ({"Elimelech", "Beth-lehem-judah"} if k == 0 else {"Elimelech"})
        for copy in copies:
            given = {}
            for text, new in zip(orig, copy):  # the same text but for the names, each always the same new one
                a, b = split.split(text), split.split(new)
                assert len(a) == len(b)
                for x, y in zip(a, b):
                    if x in carried:
                        assert given.setdefault(x, y) == y and y[0].isupper() and y.lower() not in known
                    else:
                        assert x == y
            assert given.keys() == carried and len(set(given.values())) == len(carried)
        assert copies[0] != copies[1]
    acronyms = [("The BBC said", "La BBC dijo")]  # no vowel to string a new name from: nothing added
    assert with_made_up_names(acronyms, 3) == acronyms


def test_made_up_names_in_a_run_are_counted_and_negative_refused(runs, tmp_path):
    root, _ = runs
    (root / "names.tsv").write_text("source\ttarget\n" + "".join(
        f"{w} saw Harbona\t{w} vio á Harbona\n" for w in WORDS), encoding="utf-8")
    proc = lmforge("finetune", "translation", "--train", "names.tsv", "--valid", "valid.tsv", "--task.made_up_names=2",
                   f"--train.out_dir={tmp_path / 'names'}", *TINY, "--data.data_dir=names-data", "--train.max_steps=2",
                   "--train.eval_interval=2", "--train.ckpt_interval=2", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "24 more training pairs with made-up names" in proc.stdout + proc.stderr
    assert_clear_error(lmforge("finetune", "translation", "--train", "names.tsv", "--task.made_up_names=-1", cwd=root),
                       "task.made_up_names must not be negative")


# ------------------------------------------------------------------------------------------- end to end

TINY = ["--model.n_layer=1", "--model.n_encoder_layer=1", "--model.n_head=2", "--model.d_model=32",
        "--model.d_ff=64", "--data.vocab_size=300", "--data.data_dir=data", "--task.batch_tokens=512",
        "--task.max_source_len=24", "--task.max_target_len=24", "--task.eval_samples=8", "--task.beam_size=2",
        "--train.max_steps=6", "--train.warmup_steps=2", "--train.eval_interval=3", "--train.ckpt_interval=3",
        "--train.log_interval=1", "--train.progress=false", "--train.tensorboard=false", "--train.device=cpu",
        "--train.dtype=float32"]
WORDS = "red green blue cat dog sun moon tree house bird fish star".split()


def lmforge(*args, cwd, stdin=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clear_error(proc, words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert words.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny translation run (with one bad row in its training file) and a tiny language model."""
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    rows = ["source\ttarget"]
    for _ in range(60):
        words = [WORDS[i] for i in rng.choice(len(WORDS), rng.integers(2, 5), replace=False)]
        rows.append(" ".join(words) + "\t" + " ".join(reversed(words)))
    (root / "train.tsv").write_text("\n".join(rows[:51] + ["a ragged row"] + [""]) + "\n", encoding="utf-8")
    (root / "valid.tsv").write_text("\n".join(rows[:1] + rows[51:]) + "\n", encoding="utf-8")
    proc = lmforge("finetune", "translation", "--train", "train.tsv", "--valid", "valid.tsv",
                   "--train.out_dir=mt", *TINY, cwd=root)
    assert proc.returncode == 0, proc.stderr
    (root / "corpus.txt").write_text("red green blue cat dog\n" * 100, encoding="utf-8")
    proc = lmforge("train", "--data.corpus=corpus.txt", "--data.data_dir=lmdata", "--train.out_dir=lm",
                   "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.block_size=16",
                   "--train.max_steps=2", "--train.batch_size=2", "--train.eval_batches=1", "--train.progress=false",
                   "--train.tensorboard=false", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root, proc


def test_finetune_writes_report_plots_and_counts_skipped_rows(runs):
    root, _ = runs
    run = root / "mt"
    for name in ("metrics.jsonl", "loss.png", "bleu.png", "report.json", "valid.hyp.txt", "tokenizer.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 6 and report["arch"] == "seq2seq"
    assert report["train_examples"]["skipped"] == {"ragged rows (not 2 fields)": 1, "empty lines": 1}
    assert set(report["valid"]["scores"]) == {"bleu", "chrf"} and report["valid"]["decoding"]["beam_size"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bleu" in r] == [3, 6]
    assert len((run / "valid.hyp.txt").read_text().splitlines()) == 10


def test_translate_arguments_stdin_and_eval(runs):
    root, _ = runs
    proc = lmforge("translate", "mt", "red cat", "blue dog sun", "--greedy", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2
    proc = lmforge("translate", "mt", "--batch-size", "2", "-b", "3", cwd=root, stdin="red cat\n\nsun moon\ntree\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3
    proc = lmforge("eval", "mt", "--file", "valid.tsv", "--output", "ev", "--beam-size", "1", cwd=root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["examples"] == 10 and {"bleu", "chrf"} <= result.keys()
    scores = json.loads((root / "ev" / "scores.json").read_text())
    assert scores["decoding"]["beam_size"] == 1 and scores["scores"]["bleu"] == result["bleu"]
    assert len((root / "ev" / "hypotheses.txt").read_text().splitlines()) == 10


def test_resume_continues_exactly(runs, tmp_path):
    """Three steps, then three more with --resume, end with the weights of six steps in one go."""
    from safetensors.torch import load_file

    root, _ = runs
    args = ["finetune", "translation", "--train", root / "train.tsv", "--train.out_dir=r", *TINY,
            "--task.valid_file=null", "--train.ckpt_interval=3"]
    assert lmforge(*args, "--train.max_steps=3", cwd=tmp_path).returncode == 0
    proc = lmforge(*args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = load_file(tmp_path / "r" / "checkpoints" / "step_000006" / "model.safetensors")
    once = load_file(root / "mt" / "checkpoints" / "step_000006" / "model.safetensors")
    # the full run evaluated (no randomness drawn) and used the same tokenizer file
    for name in once:
        torch.testing.assert_close(resumed[name], once[name], rtol=0, atol=0)


def test_warm_started_copy_model_with_faster_fresh_parameters_resumes_exactly(runs, tmp_path):
    """An encoder-decoder with a copy head from the language model, its fresh parameters (cross-attention,
    copy head) at 5x the rate: 3 + 3 steps with --resume end with the weights of 6 steps in one go."""
    from safetensors.torch import load_file

    root, _ = runs
    args = ["finetune", "translation", "--train", root / "train.tsv", "--init-from", root / "lm", *TINY[5:],
            "--task.valid_file=null", "--train.ckpt_interval=3", "--model.copy_attention=true",
            "--train.fresh_lr_scale=5"]
    once = lmforge(*args, "--train.out_dir=once", cwd=tmp_path)
    assert once.returncode == 0, once.stderr
    assert "start fresh" in once.stderr and "copy_head" in once.stderr
    assert lmforge(*args, "--train.out_dir=r", "--train.max_steps=3", cwd=tmp_path).returncode == 0
    proc = lmforge(*args, "--train.out_dir=r", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = load_file(tmp_path / "r" / "checkpoints" / "step_000006" / "model.safetensors")
    whole = load_file(tmp_path / "once" / "checkpoints" / "step_000006" / "model.safetensors")
    assert "copy_head.follow" in whole
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


def test_wrong_kind_of_checkpoint_and_bad_data_are_one_line_errors(runs):
    root, _ = runs
    assert_clear_error(lmforge("summarize", "mt", "valid.tsv", cwd=root), "is a translation checkpoint")
    assert_clear_error(lmforge("translate", "lm", "red", cwd=root), "language-model checkpoint")
    assert_clear_error(lmforge("generate", "mt", "-p", "red", cwd=root), "use `lmforge translate`")
    (root / "nocol.tsv").write_text("english\tspanish\nred\trojo\n", encoding="utf-8")
    assert_clear_error(lmforge("finetune", "translation", "--train", "nocol.tsv", "--train.out_dir=x", *TINY, cwd=root),
                       "no column 'source'")
    assert_clear_error(lmforge("finetune", "translation", "--train", "train.tsv", "--train.out_dir=mt", *TINY,
                               cwd=root), "already holds checkpoints")
    assert_clear_error(lmforge("finetune", "summarization", "--train", "train.tsv", "--train.out_dir=y", *TINY,
                               cwd=root), "no column 'document'")


def test_a_text_where_a_file_belongs_is_a_one_line_error(tmp_path):
    """`lmforge summarize RUN FILE` given the document itself (too long for a file name, which the
    system refuses with an OSError) or a missing file: one line naming it, shortened, and the fix."""
    import argparse

    from lmforge.commands import _task_inputs

    for given in ("Ken Livingstone should stick to his guns. " * 20, str(tmp_path / "missing.txt")):
        with pytest.raises(LMForgeError, match=r"input file '.{1,60}' not found; .*pipe the text into stdin"):
            _task_inputs(argparse.Namespace(file=given, whole=False), None, "document")
    (tmp_path / "doc.txt").write_text("One document.\nAnother.\n")
    assert list(_task_inputs(argparse.Namespace(file=str(tmp_path / "doc.txt"), whole=False), None, "document")) == [
        "One document.", "Another."]


def test_decoder_only_design_from_a_language_model(runs):
    """The decoder-only design starts from the language model's weights and tokenizer, and decodes."""
    root, _ = runs
    args = ["finetune", "translation", "-c", "translation-bible-decoder", "--train", "train.tsv", "--valid",
            "valid.tsv", "--init-from", "lm", "--train.out_dir=dec", *TINY[5:]]
    proc = lmforge(*args, "--task.max_source_len=8", "--task.max_target_len=9", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "all weights from" in proc.stderr and json.loads(proc.stdout)["arch"] == "decoder"
    report = json.loads((root / "dec" / "report.json").read_text())
    assert report["arch"] == "decoder" and report["train_lengths"]["long_sources"] > 0
    proc = lmforge("translate", "dec", "red cat", cwd=root)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------- shared data


@pytest.mark.skipif(not (SHARED / "mt").is_dir(), reason="../shared/data/mt is absent")
def test_reads_the_bible_pairs():
    pairs, report = read_examples(SHARED / "mt" / "bible_en_es.valid.tsv", "source", "target")
    assert report.kept == 211 and not report.skipped
    assert pairs[0][0] and pairs[0][1]


@pytest.mark.skipif(not (SHARED / "summarization").is_dir(), reason="../shared/data/summarization is absent")
def test_reads_the_bbc_articles_and_scores_the_lead_baseline():
    from lmforge.tasks.summarization import lead_baseline

    pairs, report = read_examples(SHARED / "summarization" / "bbc_headlines.valid.jsonl", "document", "summary")
    assert report.kept == 206 and not report.skipped
    scores = lead_baseline([d for d, _ in pairs], [s for _, s in pairs], 8)
    assert 5 < scores["rouge1"] < 60
    from lmforge.tasks.metrics import lead_sentence, rouge

    sentence = lead_baseline([d for d, _ in pairs], [s for _, s in pairs], None)
    assert sentence == rouge([lead_sentence(d) for d, _ in pairs], [s for _, s in pairs])
