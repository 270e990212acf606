"""The serving engine (lmforge.serve.engine): continuous batching over the KV cache must give each
request exactly the tokens it would get alone, whenever it joins or leaves the batch."""

import asyncio
import copy
import threading
import time

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.model import DecoderLM
from lmforge.serve import engine as engine_module
from lmforge.serve.engine import Engine, QueueFull, SamplingParams, TokenEvent

V = 40
BLOCK = 64


def make_model(pos="learned", dtype=torch.float64, init_std=0.3, block_size=BLOCK):
    """Random weights; float64 and a wide init spread keep argmax margins far above rounding, so
    batched and solo decoding pick the same tokens on any CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      pos_encoding=pos, init_std=init_std)
    return DecoderLM(cfg).to(dtype).eval()


def solo(model, prompt, n, **kw):
    return generate(model, [prompt], greedy=True, max_new_tokens=n, **kw)[0]


def ids(req, timeout=30):
    return [e.token_id for e in req.result(timeout)]


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def slow_down(monkeypatch, model, seconds=0.002):
    """Make every forward take a little while, so that requests overlap in time."""
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)


class Gate:
    """Holds the worker at the start of the model's n-th forward call (n in ``stops``) until
    ``open(n)``; ``reached(n)`` waits until the worker is held there."""

    def __init__(self, monkeypatch, model, *stops):
        self.calls = 0
        self.stops = {n: (threading.Event(), threading.Event()) for n in stops}
        forward = model.forward

        def gated(*args, **kwargs):
            self.calls += 1
            if self.calls in self.stops:
                arrived, released = self.stops[self.calls]
                arrived.set()
                assert released.wait(10)
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", gated)

    def reached(self, n):
        return self.stops[n][0].wait(10)

    def open(self, n):
        self.stops[n][1].set()


@pytest.fixture
def engines():
    made = []

    def make(model, eot_id=None, start=True, **kw):
        eng = Engine(model, eot_id, **kw)
        made.append(eng)
        return eng.start() if start else eng

    yield make
    for eng in made:
        eng.shutdown(drain=False, timeout=10)


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


# ----------------------------------------------------------------------------------------------
# Greedy decoding equals generate()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_greedy_alone_equals_generate(engines, pos):
    model = make_model(pos)
    prompt = torch.randint(0, V, (5,)).tolist()
    eng = engines(model)
    req = eng.submit(prompt, greedy(30))
    events = req.result(30)
    assert [e.token_id for e in events] == solo(model, prompt, 30)
    assert req.finish_reason == "length"
    assert all(isinstance(e, TokenEvent) and e.logprob <= 0 and e.top_logprobs is None for e in events)


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_staggered_requests_equal_their_solo_outputs(engines, monkeypatch, pos):
    """8 prompts of different lengths, arriving in three waves while earlier ones are mid-generation,
    with different max_tokens (rows leave at different steps) and fewer rows than requests."""
    model = make_model(pos)
    torch.manual_seed(1)
    lengths = (1, 9, 3, 17, 6, 30, 2, 12)
    max_tokens = (30, 12, 25, 8, 40, 20, 33, 15)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in lengths]
    expected = [solo(model, p, n) for p, n in zip(prompts, max_tokens)]

    slow_down(monkeypatch, model)
    eng = engines(model, max_batch=5, start=False)
    reqs = [eng.submit(prompts[i], greedy(max_tokens[i])) for i in range(3)]
    eng.start()
    wait_for(lambda: len(reqs[0].token_ids) >= 4)
    reqs += [eng.submit(prompts[i], greedy(max_tokens[i])) for i in range(3, 6)]
    wait_for(lambda: len(reqs[4].token_ids) >= 3)
    reqs += [eng.submit(prompts[i], greedy(max_tokens[i])) for i in range(6, 8)]

    assert [ids(r) for r in reqs] == expected
    assert all(r.finish_reason == "length" for r in reqs)
    stats = eng.stats
    assert stats["peak_running"] >= 3 and stats["running"] == 0 and stats["queued"] == 0
    assert stats["tokens"] == sum(max_tokens) and stats["finished"] == 8
    assert stats["steps"] < sum(max_tokens)


def test_batching_takes_far_fewer_steps(engines):
    model = make_model()
    torch.manual_seed(2)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 8, 1, 5, 12, 2, 7, 4)]
    eng = engines(model, max_batch=8, start=False)
    reqs = [eng.submit(p, greedy(32)) for p in prompts]
    eng.start()
    assert [ids(r) for r in reqs] == [solo(model, p, 32) for p in prompts]
    stats = eng.stats
    assert stats["tokens"] == 8 * 32
    assert stats["steps"] <= 40 < 8 * 32  # all 8 rows decode together: 32 steps
    assert stats["peak_running"] == 8 and stats["prefills"] == 1


def test_rows_leave_at_once_and_the_cache_is_trimmed(engines, monkeypatch):
    model = make_model()
    long_prompt, short_prompt = list(range(1, 31)), [2, 3]
    expected = [solo(model, long_prompt, 3), solo(model, short_prompt, 20)]
    # forward 1: both prompts prefilled (30 columns); 2, 3: decoding, then the long row is done
    gate = Gate(monkeypatch, model, 5)
    eng = engines(model, start=False)
    reqs = [eng.submit(long_prompt, greedy(3)), eng.submit(short_prompt, greedy(20))]
    eng.start()
    assert gate.reached(5)
    assert reqs[0].finish_reason == "length" and not reqs[1].done
    stats = eng.stats
    # the short row alone: 2 prompt tokens + 3 fed tokens, the long row's 28 extra columns gone
    assert stats["running"] == 1 and stats["cache_length"] == 5
    gate.open(5)
    assert [ids(r) for r in reqs] == expected
    assert eng.stats["cache_length"] == 0


def test_repetition_penalty_greedy_equals_generate(engines):
    model = make_model()
    prompts = [[1, 2, 3, 4, 5], [7, 7]]
    eng = engines(model, start=False)
    reqs = [eng.submit(p, greedy(20, repetition_penalty=1.3)) for p in prompts]
    plain = eng.submit(prompts[0], greedy(20))
    eng.start()
    assert [ids(r) for r in reqs] == [solo(model, p, 20, repetition_penalty=1.3) for p in prompts]
    assert ids(plain) == solo(model, prompts[0], 20)


# ----------------------------------------------------------------------------------------------
# Finishing


def test_finish_reasons(engines):
    model = make_model()
    prompt = [3, 1, 4, 1, 5]
    reference = solo(model, prompt, 20)
    # an end-of-text id that greedy decoding produces at some step k (for the first time)
    k = next(i for i, t in enumerate(reference) if i >= 2 and t not in reference[:i])
    eot = reference[k]

    eng = engines(model, eot_id=eot)
    req = eng.submit(prompt, greedy(20))
    assert ids(req) == reference[:k] and req.finish_reason == "stop"

    eng2 = engines(model, eot_id=None)
    req = eng2.submit(prompt, greedy(20, stop_token_ids=(eot,)))
    assert ids(req) == reference[:k] and req.finish_reason == "stop"
    req = eng2.submit(prompt, greedy(k))
    assert ids(req) == reference[:k] and req.finish_reason == "length"

    # the context: prompt + generated tokens stop at block_size
    long_prompt = torch.randint(0, V, (BLOCK - 4,)).tolist()
    req = eng2.submit(long_prompt, greedy(100))
    assert ids(req) == solo(model, long_prompt, 4) and req.finish_reason == "length"
    req = eng2.submit(torch.randint(0, V, (BLOCK - 1,)).tolist(), greedy(100))
    assert len(ids(req)) == 1 and req.finish_reason == "length"

    req = eng2.submit(prompt, greedy(0))
    assert req.result(1) == [] and req.finish_reason == "length"


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_submit_rejects_bad_requests(engines, pos):
    eng = engines(make_model(pos), start=False)
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], greedy(4))
    with pytest.raises(ValueError, match="context"):
        eng.submit([1] * BLOCK, greedy(4))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.submit([1, V], greedy(4))
    with pytest.raises(ValueError, match="temperature"):
        eng.submit([1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        eng.submit([1], SamplingParams(top_p=0))
    eng.submit([1] * (BLOCK - 1), greedy(4))  # the longest prompt that leaves room for one token


def test_queue_full(engines):
    eng = engines(make_model(), max_queue=2, start=False)
    first = [eng.submit([1, 2], greedy(3)), eng.submit([3], greedy(3))]
    assert eng.stats["queued"] == 2
    with pytest.raises(QueueFull):
        eng.submit([4], greedy(3))
    eng.start()
    for req in first:
        assert len(req.result(10)) == 3
    eng.submit([4], greedy(3)).result(10)  # room again


def test_cancel_frees_the_slot_and_others_finish(engines, monkeypatch):
    model = make_model()
    expected = {tuple(p): solo(model, p, n) for p, n in (([5, 6, 7], 3), ([1, 2], 25), ([9, 9, 9], 10))}
    gate = Gate(monkeypatch, model, 4, 5)  # forward 1: both prompts prefilled; 2, 3, 4...: decoding
    eng = engines(model, max_batch=2, start=False)
    victim = eng.submit([5, 6, 7], greedy(60))
    other = eng.submit([1, 2], greedy(25))
    waiting = eng.submit([9, 9, 9], greedy(10))  # no free row: waits in the queue
    eng.start()

    assert gate.reached(4)  # the worker is inside its 4th forward: 3 tokens each so far
    assert victim.token_ids == expected[(5, 6, 7)]
    assert eng.stats["running"] == 2 and eng.stats["queued"] == 1
    victim.cancel()
    assert not victim.done  # a running request leaves at the next step
    gate.open(4)
    assert gate.reached(5)  # the next step: `other` decodes, `waiting` is about to join
    assert victim.finish_reason == "cancelled" and victim.token_ids == expected[(5, 6, 7)]
    stats = eng.stats
    assert stats["running"] == 1 and stats["queued"] == 0 and stats["cancelled"] == 1
    gate.open(5)

    assert ids(other) == expected[(1, 2)] and other.finish_reason == "length"
    assert ids(waiting) == expected[(9, 9, 9)]  # it took the freed row
    wait_for(lambda: eng.stats["running"] == 0)
    assert eng.stats["cancelled"] == 1 and eng.stats["finished"] == 2


def test_cancel_a_waiting_request(engines):
    eng = engines(make_model(), start=False)
    req = eng.submit([1, 2, 3], greedy(5))
    req.cancel()
    assert req.finish_reason == "cancelled" and req.result(1) == []
    assert eng.stats["queued"] == 0 and eng.stats["cancelled"] == 1
    req.cancel()  # a second cancel is harmless
    eng.start()
    assert len(eng.submit([1], greedy(3)).result(10)) == 3


# ----------------------------------------------------------------------------------------------
# Sampling, log-probabilities, scoring


def test_seeded_sampling_is_reproducible(engines, monkeypatch):
    model = make_model()
    prompt = [2, 7, 1, 8]
    params = SamplingParams(max_tokens=30, temperature=1.3, top_k=20, top_p=0.95, seed=123)
    eng = engines(model)
    alone = ids(eng.submit(prompt, params))
    assert ids(eng.submit(prompt, params)) == alone
    # the same draws as generate() with a generator seeded alike
    generator = torch.Generator().manual_seed(123)
    assert alone == generate(model, [prompt], max_new_tokens=30, temperature=1.3, top_k=20, top_p=0.95,
                             generator=generator)[0]

    # the same request batched with others that join and leave around it
    slow_down(monkeypatch, model, 0.001)
    others = [eng.submit([1, 2, 3], SamplingParams(max_tokens=10, temperature=1.0, seed=5)),
              eng.submit([4] * 9, greedy(20))]
    req = eng.submit(prompt, params)
    others.append(eng.submit([6, 6], SamplingParams(max_tokens=40, temperature=0.7, seed=9)))
    assert ids(req) == alone
    for r in others:
        r.result(30)

    different = {tuple(ids(eng.submit(prompt, SamplingParams(max_tokens=30, temperature=1.3, seed=s))))
                 for s in range(4)}
    assert len(different) > 1
    unseeded = SamplingParams(max_tokens=5, temperature=1.0)
    assert len(ids(eng.submit(prompt, unseeded))) == 5


def test_logprobs_and_top_logprobs(engines):
    model = make_model()
    prompt = [4, 8, 15, 16]
    eng = engines(model)
    events = eng.submit(prompt, greedy(12, logprobs=3)).result(30)
    tokens = [e.token_id for e in events]
    # the model's own distribution at each step, from one full forward in float64
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1: -1]
    for step, event in enumerate(events):
        assert event.logprob == pytest.approx(logp[step, event.token_id].item(), abs=1e-4)
        assert len(event.top_logprobs) == 3
        assert max(event.top_logprobs, key=event.top_logprobs.get) == event.token_id  # greedy = top-1
        values, top_ids = logp[step].topk(3)
        assert list(event.top_logprobs) == top_ids.tolist()
        assert list(event.top_logprobs.values()) == pytest.approx(values.tolist(), abs=1e-4)
    scored = eng.score(prompt + tokens)
    assert scored[len(prompt):] == pytest.approx([e.logprob for e in events], abs=1e-4)

    # score_top: the same log-probs and, from the same forward, the alternatives at each position
    lps, tops = eng.score_top(prompt + tokens, 3)
    assert lps == scored and tops[0] is None and len(tops) == len(lps)
    for step, event in enumerate(events):
        top = tops[len(prompt) + step]
        assert list(top) == list(event.top_logprobs)
        assert list(top.values()) == pytest.approx(list(event.top_logprobs.values()), abs=1e-4)
    assert eng.score_top([1, 2], 0) == (eng.score([1, 2]), [None, {}])

    # logprobs=0: the chosen token's log-prob only, no alternatives
    events = eng.submit(prompt, greedy(3, logprobs=0)).result(30)
    assert [e.top_logprobs for e in events] == [{}, {}, {}]


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_score_matches_float64_forward(engines, pos):
    model = make_model(pos, dtype=torch.float32, init_std=0.02)
    reference = copy.deepcopy(model).double()
    torch.manual_seed(3)
    sequence = torch.randint(0, V, (BLOCK,)).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([sequence]))[0].double(), dim=-1)
    expected = [None] + [logp[i - 1, sequence[i]].item() for i in range(1, len(sequence))]

    eng = engines(model)
    busy = [eng.submit([1, 2, 3], greedy(40)) for _ in range(3)]  # scoring is serialised with decoding
    got = eng.score(sequence)
    assert got[0] is None and len(got) == len(sequence)
    assert max(abs(a - b) for a, b in zip(got[1:], expected[1:])) < 1e-5
    assert eng.score(sequence[:1]) == [None]
    with pytest.raises(ValueError):
        eng.score([])
    with pytest.raises(ValueError):
        eng.score([1] * (BLOCK + 1))
    for r in busy:
        assert len(r.result(30)) == 40
    assert eng.stats["scored"] == 2


def test_aiter_streams_tokens(engines):
    model = make_model()
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4]]
    eng = engines(model)

    async def collect(req):
        return [event.token_id async for event in req.aiter()]

    async def main():
        reqs = [eng.submit(p, greedy(15)) for p in prompts]
        return await asyncio.gather(*(collect(r) for r in reqs))

    assert asyncio.run(main()) == [solo(model, p, 15) for p in prompts]


def test_iterating_streams_while_generating(engines, monkeypatch):
    model = make_model()
    expected = solo(model, [1, 2], 20)
    gate = Gate(monkeypatch, model, 2)
    eng = engines(model)
    req = eng.submit([1, 2], greedy(20))
    first = next(iter(req))
    assert not req.done and first.token_id == expected[0]  # streamed before the request finished
    gate.open(2)
    assert [e.token_id for e in req] == expected  # a new iteration starts over


# ----------------------------------------------------------------------------------------------
# Failures stay with their request


POISON = V - 1


def test_prefill_error_fails_only_that_request(engines, monkeypatch):
    model = make_model()
    forward = model.forward

    def forward_rejecting_poison(idx, *args, **kwargs):
        if idx.size(1) > 1 and (idx == POISON).any():
            raise ValueError("poisoned prompt")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_rejecting_poison)
    prompts = [[1, 2, 3], [5, 6], [7, 8, 9, 10]]
    eng = engines(model, start=False)
    good = [eng.submit(p, greedy(10)) for p in prompts[:2]]
    bad = eng.submit([1, POISON, 2], greedy(10))  # prefilled in one batch with the others
    good.append(eng.submit(prompts[2], greedy(10)))
    eng.start()

    with pytest.raises(RuntimeError, match="poisoned prompt"):
        for _ in bad:
            pass
    with pytest.raises(RuntimeError, match="poisoned prompt"):
        bad.result(10)
    assert bad.finish_reason == "error"
    assert [ids(r) for r in good] == [solo(model, p, 10) for p in prompts]
    assert ids(eng.submit([2, 3], greedy(5))) == solo(model, [2, 3], 5)  # the worker lives on
    assert eng.stats["failed"] == 1


def test_sampling_error_fails_only_that_request(engines, monkeypatch):
    model = make_model()
    real = engine_module.next_tokens

    def next_tokens(logits, **kw):
        if kw.get("top_k") == 7:
            raise RuntimeError("bad sampler")
        return real(logits, **kw)

    monkeypatch.setattr(engine_module, "next_tokens", next_tokens)
    slow_down(monkeypatch, model, 0.001)
    eng = engines(model)
    good = eng.submit([1, 2, 3], greedy(20))
    wait_for(lambda: len(good.token_ids) >= 2)
    bad = eng.submit([4, 5], SamplingParams(max_tokens=10, top_k=7, seed=0))
    with pytest.raises(RuntimeError, match="bad sampler"):
        bad.result(10)
    assert ids(good) == solo(model, [1, 2, 3], 20)


def test_a_failed_batched_step_is_retried_row_by_row(engines, monkeypatch):
    model = make_model()
    forward = model.forward
    calls = {"decode": 0}

    def flaky(idx, *args, **kwargs):
        if idx.size(1) == 1 and idx.size(0) > 1:
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("transient failure")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    eng = engines(model, start=False)
    reqs = [eng.submit(p, greedy(12)) for p in prompts]
    eng.start()
    assert [ids(r) for r in reqs] == [solo(model, p, 12) for p in prompts]
    assert calls["decode"] > 3


# ----------------------------------------------------------------------------------------------
# Shutdown


def test_shutdown_drains(engines):
    model = make_model()
    eng = engines(model, max_batch=2)
    reqs = [eng.submit([i + 1], greedy(8)) for i in range(4)]
    eng.shutdown(drain=True, timeout=30)
    assert [ids(r, 1) for r in reqs] == [solo(model, [i + 1], 8) for i in range(4)]
    assert not eng.running
    with pytest.raises(RuntimeError):
        eng.submit([1], greedy(2))


def test_shutdown_without_drain_cancels(engines, monkeypatch):
    model = make_model()
    slow_down(monkeypatch, model, 0.01)
    eng = engines(model, max_batch=1)
    running = eng.submit([1, 2], greedy(60))
    queued = eng.submit([3], greedy(60))
    wait_for(lambda: len(running.token_ids) >= 1)
    eng.shutdown(drain=False, timeout=10)
    assert running.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert len(running.result(1)) < 60 and queued.result(1) == []
    assert not eng.running


def test_model_runs_on_the_worker_thread_only(engines, monkeypatch):
    model = make_model()
    forward = model.forward
    threads = set()

    def recording(*args, **kwargs):
        threads.add((threading.current_thread().name, torch.is_inference_mode_enabled()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    n_threads = torch.get_num_threads()
    eng = engines(model)
    eng.submit([1, 2], greedy(4)).result(10)
    eng.score([1, 2, 3])
    assert threads == {("lmforge-engine", True)}
    assert torch.get_num_threads() == n_threads
