"""``lmforge eval --tasks``: lm-evaluation-harness on lmforge checkpoints through ``lmforge.lm_eval_adapter``.

The reference is lm-eval's own ``hf`` model (``HFLM``) on the checkpoint exported to the Hugging Face
format by ``lmforge export``: on the same local tasks, every log-likelihood of lmforge's adapter equals
HFLM's within 1e-4 (and so do the greedy flags and the accuracy); its rolling log-likelihood equals
``lmforge eval --file``'s loss on the same text. Nothing is downloaded: the tasks read local files.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lmforge.cli import main  # noqa: E402
from lmforge.evaltasks import TASKS  # noqa: E402
from lmforge.train.checkpoint import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CORPUS = "the quick brown fox jumps over the lazy dog.\npack my box with five dozen liquor jugs.\n" * 200
# GPT-2's shape (learned positions, LayerNorm, tanh-GELU, biases), and Llama's (rotary, RMSNorm, SwiGLU)
GPT2 = ["--model.pos_encoding=learned", "--model.norm=layernorm", "--model.ffn=gelu_tanh", "--model.bias=true"]
LLAMA = ["--model.pos_encoding=rotary", "--model.norm=rmsnorm", "--model.ffn=swiglu", "--model.bias=false"]
TRAIN = ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=48", "--model.block_size=64",
         "--train.batch_size=4", "--train.max_steps=40", "--train.lr=1e-2", "--train.warmup_steps=5",
         "--train.eval_interval=0", "--train.eval_batches=1", "--train.ckpt_interval=40", "--train.progress=false",
         "--train.tensorboard=false", "--train.dtype=float32"]
# The right answer continues the corpus's text; choices of unequal length. The tiny model is barely
# trained: its accuracy is whatever it is, the test is that lm-eval's hf model and lmforge agree.
QUESTIONS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "box"], "label": 0},
    {"question": "jumps over the lazy", "choices": ["jugs", "dog.", "fox"], "label": 1},
    {"question": "pack my", "choices": ["dog", "box", "liquor"], "label": 1},
    {"question": "five dozen liquor", "choices": ["jugs.", "box", "fox"], "label": 0},
    {"question": "the lazy dog. pack my box with", "choices": ["five", "the", "quick brown"], "label": 0},
    {"question": "over the", "choices": ["quick", "lazy", "liquor jugs"], "label": 1},
]
# passages for the cloze task, and a text several windows long (block_size 64) for the perplexity task
PASSAGES = "the quick brown fox\njumps over the lazy dog.\npack my box with five dozen liquor jugs.\nthe lazy dog\n"
TEXT = CORPUS[:700]
# a generate_until task of the user's own (--include-path): a local JSONL through the json builder
GEN_TASK = """\
task: gen_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 20
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_DOCS = [{"prompt": "the quick brown", "answer": " fox jumps over the lazy dog"},
            {"prompt": "pack my box", "answer": " with five dozen liquor jugs"},
            {"prompt": "the lazy", "answer": " dog"}, {"prompt": "five dozen", "answer": " liquor jugs"},
            {"prompt": "over", "answer": " the lazy dog"}]
HUB_TASK = """\
task: hub_task
dataset_path: lmforge-test/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def run_cli(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


def trained(root: Path, shape: list[str]) -> Path:
    """A tiny character-level model of this shape trained for a few steps (root/run), its Hugging Face
    export (root/hf), and the local data files of lmforge's tasks."""
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    run_cli(["train", f"--data.corpus={root / 'corpus.txt'}", f"--data.data_dir={root / 'data'}",
             f"--train.out_dir={root / 'run'}", *TRAIN, *shape])
    run_cli(["export", root / "run", root / "hf"])
    (root / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    (root / "passages.txt").write_text(PASSAGES, encoding="utf-8")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "bad.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question": "x", "choices": ["a"],
                                                                                 "label": 0}) + "\n")
    (root / "gen").mkdir()
    (root / "gen" / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS), encoding="utf-8")
    (root / "gen" / "gen_task.yaml").write_text(GEN_TASK.format(data=json.dumps(str(root / "gen" / "gen.jsonl"))),
                                                encoding="utf-8")
    (root / "hub").mkdir()  # a task whose data is on the Hugging Face Hub: refused, never downloaded
    (root / "hub" / "hub_task.yaml").write_text(HUB_TASK, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """GPT-2-shaped (learned positions: a row of block_size + 1 tokens must not reach the model whole)."""
    root = trained(tmp_path_factory.mktemp("harness"), GPT2)
    assert json.loads((root / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    return root


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, one_thread):
    root = trained(tmp_path_factory.mktemp("harness-llama"), LLAMA)
    assert json.loads((root / "hf" / "config.json").read_text())["model_type"] == "llama"
    return root


def run_both(tiny, tasks, data, limit=None, include_paths=()):
    """The same tasks through lm-eval's hf model and lmforge's adapter: {name: results}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lmforge.lm_eval_adapter import LMForgeLM, evaluate_tasks, go_offline, task_data, task_manager

    model, _, tokenizer = load_model(tiny / "run")
    ours = evaluate_tasks(LMForgeLM(model=model, tokenizer=tokenizer, batch_size=4), tasks, data=data,
                          include_paths=include_paths, limit=limit, bootstrap_iters=0, log_samples=True)
    go_offline()
    hf = HFLM(pretrained=str(tiny / "hf"), device="cpu", batch_size=4, dtype="float32")
    manager = task_manager(list(include_paths), data=task_data(tasks, data))
    theirs = simple_evaluate(model=hf, tasks=tasks, task_manager=manager,
                             limit=limit, bootstrap_iters=0, log_samples=True)
    return ours, theirs


def assert_same_scores(ours, theirs, task):
    mine = {s["doc_id"]: s for s in ours["samples"][task]}
    ref = {s["doc_id"]: s for s in theirs["samples"][task]}
    assert mine.keys() == ref.keys() and mine
    n = 0
    for doc_id, s in ref.items():
        assert mine[doc_id]["arguments"] == s["arguments"]  # the same requests
        for (a,), (b,) in zip(mine[doc_id]["resps"], s["resps"], strict=True):
            a, b = (a, None) if isinstance(a, float) else a, (b, None) if isinstance(b, float) else b
            # within 1e-4; a rolling sum over a long text within hf's float32 rounding of its sum (1e-6 relative)
            assert a[0] == pytest.approx(b[0], abs=1e-4, rel=1e-6), (task, doc_id, s["arguments"])
            assert a[1] == b[1]  # is_greedy (None for rolling log-likelihoods)
            n += 1
    assert n >= len(ref)
    for key, value in theirs["results"][task].items():
        if isinstance(value, float):
            assert ours["results"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)


@pytest.mark.parametrize("shape", ["tiny", "tiny_llama"])
def test_adapter_matches_lm_eval_hf_model(shape, offline, request):
    pytest.importorskip("transformers")
    tiny = request.getfixturevalue(shape)
    tasks = list(TASKS)
    data = [f"lmforge_choice={tiny / 'mc.jsonl'}", f"lmforge_cloze={tiny / 'passages.txt'}",
            f"lmforge_perplexity={tiny / 'text.txt'}"]
    ours, theirs = run_both(tiny, tasks, data)
    for task in tasks:
        assert_same_scores(ours, theirs, task)
    assert len(ours["samples"]["lmforge_choice"]) == len(QUESTIONS)
    assert ours["results"]["lmforge_choice"]["acc,none"] == theirs["results"]["lmforge_choice"]["acc,none"]
    assert ours["results"]["lmforge_cloze"]["acc,none"] == theirs["results"]["lmforge_cloze"]["acc,none"]
    # the cloze task predicts each passage's last word, with the space before it
    args = [tuple(s["arguments"][0]) for s in sorted(ours["samples"]["lmforge_cloze"], key=lambda s: s["doc_id"])]
    assert args[1] == ("jumps over the lazy", " dog.")


@pytest.mark.skipif(not (SHARED / "zh" / "tang.valid.jsonl").is_file(), reason="needs ../shared/data")
def test_adapter_matches_lm_eval_hf_model_on_shared_validation_data(tiny, offline):
    """Longer texts than the context (Chinese poems, byte tokens of a model that never saw them: many
    rolling windows) and Shakespeare lines for the cloze task."""
    pytest.importorskip("transformers")
    tasks = ["lmforge_cloze", "lmforge_perplexity"]
    data = [f"lmforge_cloze={SHARED / 'tinyshakespeare.txt'}", f"lmforge_perplexity={SHARED / 'zh' / 'tang.valid.jsonl'}"]
    ours, theirs = run_both(tiny, tasks, data, limit=6)
    for task in tasks:
        assert_same_scores(ours, theirs, task)


def test_generation_matches_lm_eval_hf_model(tiny, offline):
    """generate_until on a task YAML of the user's (--include-path): lmforge's greedy decoding, cut at the
    first stop string, gives the hf model's texts."""
    pytest.importorskip("transformers")
    ours, theirs = run_both(tiny, ["gen_task"], [], include_paths=[tiny / "gen" / "gen_task.yaml"])
    mine = {s["doc_id"]: s["resps"][0][0] for s in ours["samples"]["gen_task"]}
    ref = {s["doc_id"]: s["resps"][0][0] for s in theirs["samples"]["gen_task"]}
    assert mine == ref and len(mine) == len(GEN_DOCS)
    assert any(text for text in mine.values()) and not any("\n" in t or "." in t for t in mine.values())
    assert ours["results"]["gen_task"]["exact_match,none"] == theirs["results"]["gen_task"]["exact_match,none"]


def test_rolling_loglikelihood_is_lmforge_eval_loss(tiny):
    """loglikelihood_rolling of a text = lmforge eval --file's loss on it: the end-of-text token first,
    every token of the text predicted once, in the same windows."""
    from lm_eval.api.instance import Instance

    from lmforge.lm_eval_adapter import LMForgeLM

    model, cfg, tokenizer = load_model(tiny / "run")
    n_tokens = len(tokenizer.encode(TEXT))
    assert n_tokens > 4 * cfg.model.block_size + 1  # several windows and a tail
    result = json.loads(run_cli(["eval", tiny / "run", "--file", tiny / "text.txt", "--batch-size", "3"]))
    assert result["tokens"] == n_tokens
    lm = LMForgeLM(model=model, tokenizer=tokenizer, batch_size=3)
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True)
    assert -ll / n_tokens == pytest.approx(result["loss"], abs=1e-5)
    assert math.exp(-ll / n_tokens) == pytest.approx(result["perplexity"], rel=1e-4)


def test_cli_prints_the_table_and_writes_json(tiny, offline, capsys):
    out = run_cli(["eval", tiny / "run", "--tasks", "lmforge_choice,lmforge_perplexity",
                   "--data", f"lmforge_choice={tiny / 'mc.jsonl'}", "--data", f"lmforge_perplexity={tiny / 'text.txt'}",
                   "--bootstrap-iters", "0", "--log-samples", "--batch-size", "5"])
    assert "Tasks" in out.splitlines()[0] and "|lmforge_choice" in out and "word_perplexity" in out
    written = sorted((tiny / "run" / "lm-eval").glob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text(encoding="utf-8"))
    acc = results["results"]["lmforge_choice"]["acc,none"]
    assert f"{acc:.4f}" in out
    samples = [json.loads(line) for line in
               (written[0].parent / f"samples_lmforge_choice_{written[0].stem}.jsonl").read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
    assert acc == pytest.approx(sum(s["acc"] for s in samples) / len(samples))
    # the perplexity task on the one-document text is lmforge eval --file's loss on it
    loss = json.loads(run_cli(["eval", tiny / "run", "--file", tiny / "text.txt"]))["loss"]
    bytes_ = len(TEXT.encode("utf-8"))
    tokens = len(load_model(tiny / "run")[2].encode(TEXT))
    bpb = results["results"]["lmforge_perplexity"]["bits_per_byte,none"]
    assert bpb == pytest.approx(loss * tokens / bytes_ / math.log(2), rel=1e-5)
    # --output: a file of the user's choice
    run_cli(["eval", tiny / "run", "--tasks", "lmforge_choice", "--data", tiny / "mc.jsonl", "--limit", "2",
             "--bootstrap-iters", "0", "-o", tiny / "mine.json"])
    assert json.loads((tiny / "mine.json").read_text())["results"]["lmforge_choice"]["sample_len"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "lmforge_chioce"], "unknown task 'lmforge_chioce'; did you mean lmforge_choice"),
    (["--tasks", "lmforge_choice"], "task lmforge_choice reads a local file; pass --data lmforge_choice=FILE"),
    (["--tasks", "lmforge_cloze", "--data", "lmforge_cloze=nowhere.txt"], "nowhere.txt, does not exist"),
    (["--tasks", "lmforge_choice", "--data", "PASSAGES"], "passages.txt:1 is not valid JSON"),
    (["--tasks", "lmforge_choice", "--data", "BAD"], "bad.jsonl:2 is not a question"),
    (["--tasks", "lmforge_choice", "--data", "MC", "--include-path", "no-such-dir"],
     "--include-path no-such-dir does not exist"),
    (["--tasks", "hub_task", "--include-path", "HUB"], "never downloads"),
    (["--tasks", "lmforge_choice", "--file", "x.txt"], "--file measures the loss on a text"),
    (["--tasks", "lmforge_choice", "--data", "MC", "missing-lm-eval"], "needs lm-eval"),
])
def test_errors_are_one_line(tiny, offline, capsys, monkeypatch, argv, message):
    files = {"PASSAGES": tiny / "passages.txt", "MC": tiny / "mc.jsonl", "BAD": tiny / "bad.jsonl", "HUB": tiny / "hub"}
    argv = [str(files.get(a, a)) for a in argv]
    if argv[-1] == "missing-lm-eval":
        argv.pop()
        monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["eval", tiny / "run", *argv, "--bootstrap-iters", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_scoring_batches_agree_with_one_row_forwards(tiny):
    """score_rows pads a batch on the right; each row's scores are those of the row alone."""
    from lmforge.generate.scoring import score_rows

    model, _, tokenizer = load_model(tiny / "run")
    rows = [tokenizer.encode(t) for t in ("the quick brown fox", "pack my box", "a", "over the lazy dog. pack")]
    batched = score_rows(model, rows, top=3)
    for ids, s in zip(rows, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
        expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert s.logprobs == pytest.approx(expected, abs=1e-5)
        assert s.greedy == [logp[i - 1].argmax().item() == ids[i] for i in range(1, len(ids))]
        assert [list(t)[0] for t in s.top] == [logp[i - 1].argmax().item() for i in range(1, len(ids))]
