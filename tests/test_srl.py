"""SRL: CoNLL-U Plus reading/writing (byte-exact on the demo file), refusals with file:line, the
document split, the scorer on a hand-made pair, and `finetune srl` / `lmforge srl` on a toy task."""

import json
import random
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import Config, ModelConfig
from lmforge.errors import LMForgeError
from lmforge.model.encoder import EncoderModel
from lmforge.tasks.srl import Encoder, Labeller, evaluate_sentences, load_labeller, sense_lexicon, split_words
from lmforge.tasks.srl_data import read_conllu, score, split_by_document, write_conllu
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = DATA / "srl" / "en_ewt-up-dev.conllu"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def row(i, word, sense="_", *args):
    return "\t".join([str(i), word, word.lower(), "X", "X", "_", "0", "dep", "_", "_", sense, *args])


GOLD = "\n".join([
    "# sent_id = d1-0001",
    row(1, "Bush", "_", "ARG0", "_"),
    row(2, "nominated", "nominate.01", "V", "_"),
    row(3, "judges", "_", "ARG1", "ARG0"),
    row(4, "to", "_", "_", "_"),
    row(5, "replace", "replace.01", "ARGM-PRP", "V"),
    row(6, "jurists", "_", "_", "ARG1"),
    "",
    "# sent_id = d2-0001",
    "# propbank = no-up",
    "\t".join(["1", "Hi", "hi", "X", "X", "_", "0", "root", "_", "_", "", ""]),
    "",
    "# sent_id = d2-0002",
    row(1, "Rain", "_", "ARG1"),
    row(2, "fell", "fall.01", "V"),
    "",
]) + "\n"

# columns in sentence order: nominated, to (a spurious predicate), replace. One wrong label
# (judges ARG2), a wrong sense (nominate.02), jurists' ARG1 put under "to" instead of "replace"
PRED = "\n".join([
    "# sent_id = d1-0001",
    row(1, "Bush", "_", "ARG0", "_", "_"),
    row(2, "nominated", "nominate.02", "V", "_", "_"),
    row(3, "judges", "_", "ARG2", "_", "ARG0"),
    row(4, "to", "to.01", "_", "V", "_"),
    row(5, "replace", "replace.01", "ARGM-PRP", "_", "V"),
    row(6, "jurists", "_", "_", "ARG1", "_"),
    "",
    "# sent_id = d2-0001",
    "# propbank = no-up",
    "\t".join(["1", "Hi", "hi", "X", "X", "_", "0", "root", "_", "_", "", ""]),
    "",
    "# sent_id = d2-0002",
    row(1, "Rain", "_", "ARG1"),
    row(2, "fell", "fall.01", "V"),
    "",
]) + "\n"


def test_scorer_known_numbers(tmp_path):
    (tmp_path / "g.conllu").write_text(GOLD)
    (tmp_path / "p.conllu").write_text(PRED)
    s = score(read_conllu(tmp_path / "g.conllu"), read_conllu(tmp_path / "p.conllu"))
    # gold arguments: (1,ARG0) (3,ARG1) (5,ARGM-PRP) | (3,ARG0) (6,ARG1) | (1,ARG1) = 6
    # predicted: (1,ARG0) (3,ARG2) (5,ARGM-PRP) | "to": (6,ARG1) | (3,ARG0) | (1,ARG1) = 6; correct 4
    a = s["arguments"]
    assert (a["correct"], a["predicted"], a["gold"]) == (4, 6, 6)
    assert a["f1"] == pytest.approx(4 / 6)
    p = s["predicates"]
    assert (p["correct"], p["predicted"], p["gold"]) == (3, 4, 3)
    assert s["senses"]["correct"] == 2
    c = s["conll2009"]
    assert (c["correct"], c["predicted"], c["gold"]) == (6, 10, 9)
    assert s["per_label"]["ARG1"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4,
                                                   "correct": 1, "predicted": 2, "gold": 3})
    assert s["per_label"]["ARG2"]["precision"] == 0.0


def test_round_trip_and_refusals(tmp_path):
    path = tmp_path / "g.conllu"
    path.write_text(GOLD)
    sents = read_conllu(path)
    assert write_conllu(sents) == GOLD
    assert [len(s.predicates) for s in sents] == [2, 0, 1]
    assert not sents[1].annotated
    bad = GOLD.replace(row(3, "judges", "_", "ARG1", "ARG0"), row(3, "judges", "_", "ARG1"))
    (tmp_path / "bad.conllu").write_text(bad)
    with pytest.raises(LMForgeError, match=r"bad\.conllu:4: 1 argument columns but the sentence has 2 predicates"):
        read_conllu(tmp_path / "bad.conllu")
    (tmp_path / "short.conllu").write_text("1\tword\tword\n\n")
    with pytest.raises(LMForgeError, match=r"short\.conllu:1: 3 tab-separated columns"):
        read_conllu(tmp_path / "short.conllu")


@pytest.mark.skipif(not DEMO.is_file(), reason="needs ../shared/data")
def test_demo_file_round_trips_byte_for_byte():
    sents = read_conllu(DEMO)
    assert write_conllu(sents).encode("utf-8") == DEMO.read_bytes()
    assert len(sents) == 2002
    assert sum(len(s.predicates) for s in sents) == 4977
    assert sum(not s.annotated for s in sents) == 28
    train, valid = split_by_document(sents)
    assert len(train) + len(valid) == 2002
    assert not {s.sent_id.rsplit("-", 1)[0] for s in train} & {s.sent_id.rsplit("-", 1)[0] for s in valid}
    assert split_by_document(sents)[1] == valid  # deterministic
    assert 0.1 < len(valid) / len(sents) < 0.3


def toy_conllu(n, seed):
    rng = random.Random(seed)
    nouns, verbs = "cat dog man girl bird".split(), "saw ate chased liked".split()
    out = []
    for i in range(n):
        words = [rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns)]
        if rng.random() < 0.5:
            words.append("today")
        out.append(f"# sent_id = doc{i % 5}-{i:04d}")
        for j, w in enumerate(words):
            sense = f"{w}.0{2 if w == 'saw' else 1}" if j == 1 else "_"
            label = {0: "ARG0", 1: "V", 3: "ARG1", 4: "ARGM-TMP"}.get(j, "_")
            out.append(row(j + 1, w, sense, label))
        out.append("")
    return "\n".join(out) + "\n"


def test_finetune_and_label_end_to_end(tmp_path, capsys):
    (tmp_path / "train.conllu").write_text(toy_conllu(150, 0))
    (tmp_path / "valid.conllu").write_text(toy_conllu(30, 1))
    tok = Tokenizer.train([toy_conllu(50, 2)], kind="char")
    tok.save(tmp_path / "tokenizer.json")
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32, arch="encoder")
    save_checkpoint(tmp_path / "trunk", EncoderModel(cfg.model), cfg, step=0, tokenizer_path=tmp_path / "tokenizer.json")
    run = tmp_path / "run"
    main(["finetune", "srl", "--train", str(tmp_path / "train.conllu"), "--valid", str(tmp_path / "valid.conllu"),
          "--init-from", str(tmp_path / "trunk"), "-q", f"--train.out_dir={run}", "--train.max_steps=80",
          "--train.lr=3e-3", "--train.warmup_steps=5", "--train.eval_interval=0"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid"]["f1_gold_predicates"] > 0.9, summary
    assert summary["valid"]["f1_end_to_end"] > 0.9, summary
    assert (run / "valid.pred.conllu").is_file()
    out = tmp_path / "out.conllu"
    main(["srl", str(run), "dog saw the cat today", "-o", str(out)])
    text = capsys.readouterr().out
    assert "saw (saw.02): ARG0 dog | ARG1 cat | ARGM-TMP today" in text
    (pred,) = read_conllu(out)
    assert pred.words == ["dog", "saw", "the", "cat", "today"] and pred.senses == ["saw.02"]
    main(["srl", str(run), "--conllu", str(tmp_path / "valid.conllu"), "-o", str(tmp_path / "v.conllu")])
    assert "predicted predicates:" in capsys.readouterr().out
    # a test file with a role training never had: its arguments are scored as misses, and counted
    unseen = toy_conllu(30, 5).replace("ARGM-TMP", "ARGM-LOC")
    (tmp_path / "unseen.conllu").write_text(unseen)
    n_loc = unseen.count("ARGM-LOC")
    main(["srl", str(run), "--conllu", str(tmp_path / "unseen.conllu")])
    text = capsys.readouterr().out
    assert f"note: {n_loc} gold arguments carry labels the model was not trained with, scored as misses: " \
           f"ARGM-LOC x{n_loc}" in text
    labeller, _ = load_labeller(run)
    gold = read_conllu(tmp_path / "unseen.conllu")
    result = evaluate_sentences(labeller, gold)["gold_predicates"]
    n_gold = sum(1 for s in gold for col in s.arguments() for label in col if label not in ("_", "V"))
    assert result["arguments"]["gold"] == n_gold and result["per_label"]["ARGM-LOC"]["correct"] == 0
    assert result["arguments"]["recall"] <= 1 - n_loc / n_gold + 1e-9


def test_sense_lexicon_and_choice(tmp_path):
    (tmp_path / "gold.conllu").write_text(GOLD)
    sents = read_conllu(tmp_path / "gold.conllu")
    lexicon = sense_lexicon(sents)
    assert all(len(e.split()) >= 2 for e in lexicon)
    entries = {e.split()[0]: e.split()[1:] for e in lexicon}
    for s in sents:
        for p, sense in zip(s.predicates, s.senses):
            assert sense in entries[s.lemmas[p]]
    enc = Encoder(Tokenizer.train(["a b"], kind="char"), ["_"], ["01", "02", "03"], 16)
    lab = Labeller(None, enc, sense_lexicon=["run run.02 run.01", "go go.01"])
    assert lab.sense("go", torch.tensor([0.0, 5.0, 0.0])) == "go.01"           # one sense seen: that one
    assert lab.sense("run", torch.tensor([0.0, 1.0, 0.0])) == "run.02"         # the head's pick among run's
    assert lab.sense("run", torch.tensor([2.0, 1.0, 0.0])) == "run.01"
    assert lab.sense("run", None) == "run.02"                                  # no head: most frequent
    assert lab.sense("fly", torch.tensor([0.0, 0.0, 9.0])) == "fly.01"         # new lemma: .01


def test_split_words():
    assert split_words("I don't like New-York, do you?") == ["I", "do", "n't", "like", "New-York", ",", "do", "you", "?"]
