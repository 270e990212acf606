"""`lmforge serve`: the OpenAI-compatible server, driven by real clients (the official `openai`
package, httpx, a headless Chromium) against tiny checkpoints trained here; no mocks.

Each server runs in this process (uvicorn in a thread, on a free loopback port), except one
started as `lmforge serve` in a subprocess to check SIGTERM and the API key from the environment.
"""

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.generate import generate_text  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.train.checkpoint import load_model  # noqa: E402

LM_ARGS = ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=48", "--model.block_size=96",
           "--train.batch_size=4", "--train.max_steps=40", "--train.lr=1e-2", "--train.warmup_steps=5",
           "--train.eval_interval=0", "--train.eval_batches=1", "--train.ckpt_interval=40", "--train.progress=false",
           "--train.tensorboard=false", "--train.dtype=float32"]
get, post, stream = (functools.partial(f, timeout=60) for f in (httpx.get, httpx.post, httpx.stream))
CORPUS = "the quick brown fox jumps over the lazy dog.\npack my box with five dozen liquor jugs.\n" * 200


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine, the event loop and the clients share 2 cores
    yield
    torch.set_num_threads(before)


def quiet_main(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


@contextlib.contextmanager
def running(checkpoint, **settings):
    """A server for ``checkpoint`` on a free loopback port, in a thread; stopped (gracefully) after."""
    app = create_app(checkpoint, **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    assert app.state.backend.engine is None or app.state.backend.engine.running
    client = openai.OpenAI(base_url=url + "/v1", api_key=settings.get("api_key") or "none", max_retries=0,
                           timeout=60)
    try:
        yield SimpleNamespace(url=url, app=app, client=client, backend=app.state.backend)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    quiet_main(["train", f"--data.corpus={root / 'corpus.txt'}", f"--data.data_dir={root / 'data'}",
                f"--train.out_dir={root / 'tiny-lm'}", *LM_ARGS])
    model, cfg, tokenizer = load_model(root / "tiny-lm")
    return SimpleNamespace(run=root / "tiny-lm", model=model, tokenizer=tokenizer, root=root)


@pytest.fixture(scope="module")
def server(lm):
    with running(lm.run) as s:
        yield s


def greedy(lm, prompt: str, n: int) -> str:
    return generate_text(lm.model, lm.tokenizer, [prompt], max_new_tokens=n, greedy=True)[0]


# ------------------------------------------------------------------------------------------ language model

def test_models_health_and_info(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny-lm"]
    assert models.data[0].owned_by == "lmforge" and models.data[0].object == "model"
    assert get(server.url + "/health").json()["status"] == "ok"
    info = get(server.url + "/info").json()
    assert info["task"] == "lm" and info["context_length"] == 96 and info["auth"] is False


def test_greedy_completion_equals_lmforge_generate(server, lm):
    for prompt in ("the", "pack my box", "over the lazy"):
        expected = greedy(lm, prompt, 24)
        r = server.client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=24, temperature=0)
        choice = r.choices[0]
        assert r.object == "text_completion" and r.model == "tiny-lm"
        assert choice.text == expected
        assert r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
        assert r.usage.completion_tokens == len(lm.tokenizer.encode(expected))  # char tokenizer: one per character
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert choice.finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")
    cli = quiet_main(["generate", lm.run, "-p", "the", "-n", "24", "--greedy", "--no-stream"])
    assert cli == "the" + greedy(lm, "the", 24) + "\n"
    assert len(set(greedy(lm, "the", 24))) > 3  # the model says something, not one repeated character


def test_stop_strings_and_finish_reasons(server, lm):
    full = greedy(lm, "the", 40)
    stop = full[10:13]
    cut = full[:full.index(stop)]
    r = server.client.completions.create(model="tiny-lm", prompt="the", max_tokens=40, temperature=0,
                                         stop=[stop, "never appears"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    stream = server.client.completions.create(model="tiny-lm", prompt="the", max_tokens=40, temperature=0,
                                              stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    r = server.client.completions.create(model="tiny-lm", prompt="the", max_tokens=5, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:5], "length")


def test_stream_deltas_join_to_the_same_text(server):
    sampled = {"temperature": 1.0, "seed": 7, "top_p": 0.9, "extra_body": {"top_k": 20, "repetition_penalty": 1.2}}
    for settings in ({"temperature": 0}, sampled):
        whole = server.client.completions.create(model="tiny-lm", prompt="the quick", max_tokens=30, **settings)
        stream = server.client.completions.create(model="tiny-lm", prompt="the quick", max_tokens=30, stream=True,
                                                  stream_options={"include_usage": True}, **settings)
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_sixteen_concurrent_clients_each_get_their_own_text(server, lm):
    words = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs".split()
    jobs = [(f"{w} ", seed) for seed, w in enumerate(words)]
    expected = [generate_text(lm.model, lm.tokenizer, [p], max_new_tokens=20, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed))[0] for p, seed in jobs]
    before = server.backend.engine.stats["peak_running"]

    def ask(job):
        prompt, seed = job
        return server.client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=20, temperature=1.0,
                                                seed=seed).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == expected
    assert len(set(got)) > 8
    assert server.backend.engine.stats["peak_running"] > max(before, 1)  # they were decoded together


def test_echo_with_logprobs_scores_the_prompt(server, lm):
    prompt = "the quick brown fox jumps"
    r = server.client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(prompt)))
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0].double(), dim=-1)
    own = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(own, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:], 1):  # the likeliest token, as lm-eval's greedy check reads it
        (token, value), = top.items()
        assert value == pytest.approx(logp[i - 1].max().item(), abs=1e-4)
        assert (token == lp.tokens[i]) == (value == lp.token_logprobs[i])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    r = server.client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                         temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + greedy(lm, prompt, 3) and len(lp.tokens) == len(ids) + 3
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])


def test_chat_completion_plain_template(server, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick brown"}]
    r = server.client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=20, temperature=0)
    prompt = "System: Be brief.\nUser: the quick brown\nAssistant:"
    raw = greedy(lm, prompt, 20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == raw.split("\nUser:")[0].lstrip()
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    chunks = list(server.client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=20,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_with_the_tokenizers_own_template(lm, tmp_path):
    ckpt = tmp_path / "templated"
    shutil.copytree(next((lm.run / "checkpoints").glob("step_*")), ckpt)
    template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    with running(ckpt) as s:
        r = s.client.chat.completions.create(model="templated", messages=[{"role": "user", "content": "the fox"}],
                                             max_tokens=12, temperature=0)
    assert r.choices[0].message.content == greedy(lm, "[user] the fox\n[assistant]", 12).lstrip()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="the")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-lm", prompt="the " * 40)  # 160 tokens, context 96
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-lm", prompt="the", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-lm", messages=[{"role": "wizard", "content": "hi"}])
    bad = post(server.url + "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    big = post(server.url + "/v1/completions", json={"model": "tiny-lm", "prompt": "x" * (1 << 20)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert get(server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert c.completions.create(model="tiny-lm", prompt="the", max_tokens=4).usage.completion_tokens >= 1


def test_disconnect_during_streaming_cancels_the_request(server):
    engine = server.backend.engine
    before = engine.stats["cancelled"]
    with stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny-lm", "prompt": "t", "max_tokens": 94, "stream": True}) as response:
        next(response.iter_lines())  # the first chunk: the request is decoding
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before or engine.stats["running"]:
        assert time.monotonic() < deadline, engine.stats
        time.sleep(0.02)


def test_api_key_and_queue_full(lm):
    with running(lm.run, api_key="sesame", max_batch=1, max_queue=1) as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="open", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert get(s.url + "/v1/models").status_code == 401
        assert get(s.url + "/health").status_code == 200
        assert s.client.models.list().data[0].id == "tiny-lm"
        auth = {"Authorization": "Bearer sesame"}
        body = {"model": "tiny-lm", "prompt": "t", "max_tokens": 90}
        with stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, headers=auth) as first:
            next(first.iter_lines())  # it holds the only row of the batch
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda _: post(s.url + "/v1/completions", json=body, headers=auth),
                                        range(6)))
        busy = [a for a in answers if a.status_code == 429]
        assert busy and all(a.status_code == 200 for a in answers if a not in busy)
        assert busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["code"] == "queue_full"


def test_cli_serve_sigterm_drains_and_key_from_environment(lm, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LMFORGE_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(lm.run), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert get(url + "/v1/models").status_code == 401
        body = {"model": "tiny-lm", "prompt": "the", "max_tokens": 60, "temperature": 0, "stream": True}
        with stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k3y"}) as response:
            lines = response.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the answer still finishes
            events = [first] + [ln for ln in lines if ln]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert text == greedy(lm, "the", 60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--api-key" in proc.stdout and "127.0.0.1" in proc.stdout
    probe = "import sys, lmforge.cli; print(sorted({'torch', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ task checkpoints

MT_ARGS = ["--model.n_layer=1", "--model.n_encoder_layer=1", "--model.n_head=2", "--model.d_model=32",
           "--model.d_ff=64", "--data.vocab_size=300", "--task.batch_tokens=512", "--task.max_source_len=24",
           "--task.max_target_len=24", "--task.eval_samples=4", "--task.beam_size=2", "--train.max_steps=6",
           "--train.warmup_steps=2", "--train.eval_interval=0", "--train.ckpt_interval=6", "--train.progress=false",
           "--train.tensorboard=false", "--train.device=cpu", "--train.dtype=float32"]


def test_translation_checkpoint_answers_completions_as_lmforge_translate(tmp_path):
    words = "red green blue cat dog sun moon tree house bird fish star".split()
    triples = zip(words, words[3:] + words, words[7:] + words)
    rows = ["source\ttarget"] + [f"{a} {b} {c}\t{c} {b} {a}" for a, b, c in triples]
    (tmp_path / "train.tsv").write_text("\n".join(rows * 4) + "\n", encoding="utf-8")
    run = tmp_path / "mt"
    quiet_main(["finetune", "translation", "--train", tmp_path / "train.tsv", "--valid", "",  # not the recipe's file
                f"--data.data_dir={tmp_path / 'data'}", f"--train.out_dir={run}", *MT_ARGS])
    sources = ["red cat", "blue dog sun"]
    beam = quiet_main(["translate", run, *sources]).splitlines()
    greedy_cli = quiet_main(["translate", run, *sources, "--greedy"]).splitlines()
    with running(run) as s:
        assert get(s.url + "/info").json()["task"] == "translation"
        r = s.client.completions.create(model="mt", prompt=sources)
        assert [c.text for c in r.choices] == beam
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        r = s.client.completions.create(model="mt", prompt=sources[0], extra_body={"beam_size": 1})
        assert r.choices[0].text == greedy_cli[0]
        with pytest.raises(openai.BadRequestError):
            s.client.chat.completions.create(model="mt", messages=[{"role": "user", "content": "red"}])


def test_sentiment_and_srl_checkpoints(tmp_path):
    from lmforge.config import Config, ModelConfig
    from lmforge.model.encoder import EncoderModel
    from lmforge.tasks.sentiment import Classifier
    from lmforge.tasks.srl import describe, load_labeller, sentence_from_text
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    films = "text\tlabel\n" + "the film was great\tpositive\na dull plot\tnegative\nit was a film\tneutral\n" * 10
    roles = []
    for i, (a, verb, b) in enumerate([("dog", "saw", "cat"), ("girl", "liked", "bird"), ("man", "ate", "fish")] * 6):
        roles += [f"# sent_id = doc{i % 3}-{i:04d}"]
        for j, (word, label) in enumerate([(a, "ARG0"), (verb, "V"), ("the", "_"), (b, "ARG1")]):
            columns = [word, word, "X", "X", "_", "0", "dep", "_", "_", f"{verb}.01" if j == 1 else "_", label]
            roles.append("\t".join([str(j + 1), *columns]))
        roles.append("")
    (tmp_path / "s.tsv").write_text(films, encoding="utf-8")
    (tmp_path / "r.conllu").write_text("\n".join(roles) + "\n", encoding="utf-8")
    tok = Tokenizer.train([films, "\n".join(roles), "today"], kind="char")
    tok.save(tmp_path / "tokenizer.json")
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=32, arch="encoder")
    save_checkpoint(tmp_path / "trunk", EncoderModel(cfg.model), cfg, step=0,
                    tokenizer_path=tmp_path / "tokenizer.json")
    common = ["--init-from", tmp_path / "trunk", "-q", "--train.max_steps=4", "--train.eval_interval=0"]
    quiet_main(["finetune", "sentiment", "--train", tmp_path / "s.tsv", f"--train.out_dir={tmp_path / 'sent'}",
                *common])
    quiet_main(["finetune", "srl", "--train", tmp_path / "r.conllu", f"--train.out_dir={tmp_path / 'roles'}", *common])

    texts = ["the film was great", "a dull plot"]
    with running(tmp_path / "sent") as s:
        r = post(s.url + "/v1/classify", json={"model": "sent", "input": texts})
        assert r.status_code == 200, r.text
        cli = [json.loads(line) for line in quiet_main(["classify", tmp_path / "sent", *texts, "--json"]).splitlines()]
        for got, want in zip(r.json()["data"], cli):
            assert got["text"] == want["text"] and got["label"] == want["label"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        one = post(s.url + "/v1/classify", json={"input": "great"}).json()["data"]
        assert len(one) == 1 and one[0]["label"] == Classifier(tmp_path / "sent")(["great"])[0][0]
        assert post(s.url + "/v1/classify", json={"input": [""]}).status_code == 400
        assert post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 400
    sentences = ["dog saw the cat today", "the girl liked the bird"]
    with running(tmp_path / "roles") as s:
        r = post(s.url + "/v1/srl", json={"input": sentences})
        assert r.status_code == 200, r.text
        labeller, _ = load_labeller(tmp_path / "roles")
        want = labeller.label([sentence_from_text(t, i + 1) for i, t in enumerate(sentences)])
        data = r.json()["data"]
        assert [d["description"] for d in data] == [describe(w) for w in want]
        assert [[p["sense"] for p in d["predicates"]] for d in data] == [w.senses for w in want]
        assert data[0]["words"] == ["dog", "saw", "the", "cat", "today"]


# ------------------------------------------------------------------------------------------ the playground

def test_playground_in_a_headless_browser(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    page_html = get(server.url + "/").text
    assert "/static/app.js" in page_html and "http" not in page_html.split("<body>")[1].replace("http-equiv", "")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-lm')")
            assert not page.is_visible("#key-row") and not page.is_visible("#task-controls")  # no key, a language model
            page.fill("#prompt", "the quick")
            page.fill("#max-tokens", "60")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.includes('finish')", timeout=20000)
            output = page.inner_text("#output")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert output == "the quick" + server.client.completions.create(
        model="tiny-lm", prompt="the quick", max_tokens=60, temperature=0).choices[0].text
    assert shot.stat().st_size > 10_000
