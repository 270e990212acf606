"""lm-evaluation-harness against `lmforge serve`: lm-eval's own `local-completions` model scores a
small multiple-choice task (a local JSONL dataset and a task YAML written here; nothing is
downloaded) through the server's `/v1/completions` (token-id prompts, `echo`, `logprobs`), and every
log-likelihood it reports equals lmforge's own scoring of the same token ids within 1e-4.

The tokenizer lm-eval needs to split context from continuation is the checkpoint's own, exported to
the Hugging Face format by `lmforge export`.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need its `api` extra: pip install 'lm-eval[api]'")

from test_serve import CORPUS, LM_ARGS, quiet_main, running  # noqa: E402  (the server tests' tiny model and server)

from lmforge.train.checkpoint import load_model  # noqa: E402

# The right answer continues the corpus's text; choices of unequal length (one to eleven tokens). The tiny
# model is barely trained, so its accuracy is whatever it is: the test is that lm-eval and lmforge agree.
DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "box"], "label": 0},
    {"question": "jumps over the lazy", "choices": ["jugs", "dog.", "fox"], "label": 1},
    {"question": "pack my", "choices": ["dog", "box", "liquor"], "label": 1},
    {"question": "five dozen liquor", "choices": ["jugs.", "box", "fox"], "label": 0},
    {"question": "the lazy dog. pack my box with", "choices": ["five", "the", "quick brown"], "label": 0},
    {"question": "the quick brown fox", "choices": ["over", "jumps", "dozen"], "label": 1},
    {"question": "pack my box with five", "choices": ["dozen", "brown", "lazy dog"], "label": 0},
    {"question": "over the", "choices": ["quick", "lazy", "liquor jugs"], "label": 1},
]
TASK_YAML = """\
task: lmforge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_local_completions_matches_lmforge_scoring(tmp_path, offline, monkeypatch):
    import requests

    import lm_eval
    from lm_eval.models import api_models
    from lm_eval.tasks import TaskManager

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine, the event loop and lm-eval share 2 cores
    try:
        # a tiny checkpoint, and its Hugging Face export for lm-eval's tokenizer
        (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
        quiet_main(["train", f"--data.corpus={tmp_path / 'corpus.txt'}", f"--data.data_dir={tmp_path / 'data'}",
                    f"--train.out_dir={tmp_path / 'tiny-lm'}", *LM_ARGS])
        quiet_main(["export", tmp_path / "tiny-lm", tmp_path / "hf"])
        model, cfg, tokenizer = load_model(tmp_path / "tiny-lm")

        # the task: a local JSONL dataset and its YAML
        tasks_dir = tmp_path / "tasks"
        tasks_dir.mkdir()
        data = tasks_dir / "tiny_mc.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
        (tasks_dir / "tiny_mc.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))), encoding="utf-8")
        task_manager = TaskManager(include_path=str(tasks_dir))
        assert "lmforge_tiny_mc" in task_manager.all_tasks

        # every request lm-eval sends, and the server's answer, as they go over the wire
        sent = []
        real_post = requests.post

        def recording_post(url, *args, **kwargs):
            response = real_post(url, *args, **kwargs)
            sent.append((kwargs["json"], response.json() if response.ok else None))
            return response

        monkeypatch.setattr(api_models.requests, "post", recording_post)

        with running(tmp_path / "tiny-lm") as server:
            url = server.url
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"base_url": f"{url}/v1/completions", "model": "tiny-lm", "tokenizer_backend": "huggingface",
                            "tokenizer": str(tmp_path / "hf"), "num_concurrent": 1, "max_retries": 1,
                            "batch_size": 1, "max_length": cfg.model.block_size, "timeout": 60},
                tasks=["lmforge_tiny_mc"], task_manager=task_manager, log_samples=True, num_fewshot=0,
                bootstrap_iters=0, verbosity="WARNING")
    finally:
        torch.set_num_threads(threads)

    n_choices = sum(len(d["choices"]) for d in DOCS)
    assert len(sent) == n_choices  # one request per choice, each answered
    for payload, answer in sent:
        assert answer is not None, payload
        assert payload["model"] == "tiny-lm" and payload["echo"] is True and payload["logprobs"] == 1
        assert len(payload["prompt"]) == 1 and all(isinstance(t, int) for t in payload["prompt"][0])

    # lmforge's own scoring of the very token ids lm-eval sent
    own = {}
    for payload, _ in sent:
        ids = payload["prompt"][0]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
        own[tuple(ids)] = logp

    samples = results["samples"]["lmforge_tiny_mc"]
    assert len(samples) == len(DOCS)
    correct = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        assert sample["target"] == doc["label"]
        lls = []
        for i, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"])):
            context, continuation = args
            assert (context, continuation) == (doc["question"], " " + doc["choices"][i])
            context_ids = tokenizer.encode(context)
            ids = context_ids + tokenizer.encode(continuation)
            assert ids == tokenizer.encode(context + continuation)
            logp = own[tuple(ids)]  # the ids lm-eval sent are lmforge's tokenization of the pair
            expected = sum(logp[j - 1, ids[j]].item() for j in range(len(context_ids), len(ids)))
            (ll, _is_greedy), = resp
            assert ll == pytest.approx(expected, abs=1e-4), (context, continuation)
            lls.append(expected)
        correct.append(max(range(len(lls)), key=lls.__getitem__) == doc["label"])

    own_acc = sum(correct) / len(correct)
    assert results["results"]["lmforge_tiny_mc"]["acc,none"] == pytest.approx(own_acc, abs=1e-12)
