"""The decoding engine behind ``lmforge serve``: one model worker thread, many concurrent requests.

Continuous batching over the KV cache. The worker owns one batch cache (``KVCache``: per-layer
keys/values [B, n_kv, capacity, head_dim] with ONE shared ``length``). Rows are left-padded so that
every row's newest token sits in the last filled column; an attention mask [B, length] marks the
real slots and each row carries its own positions (0 at its first real token), exactly as
``lmforge.generate.generate`` lays out a batch. Each step of the worker:

1. rows whose request was cancelled leave the batch (their rows are dropped from the cache
   tensors with ``index_select``, and leading columns that no row uses any more are trimmed);
2. the running rows feed the token chosen last step (one batched forward, T = 1);
3. requests waiting in the queue join: their prompts are prefilled together (left-padded, one
   forward) into a fresh cache, which is spliced into the batch cache below the running rows (the
   batch is padded on the left when a prompt is longer than the current length);
4. one token is chosen per row with ``lmforge.generate.next_tokens`` (each request with its own
   settings and its own ``torch.Generator``) and streamed to the request;
5. rows that finished (end-of-text or a stop id: "stop"; ``max_tokens`` or the model's context:
   "length") leave the batch at once.

Context: a request stops with "length" when prompt + generated tokens reach ``block_size`` (for
every position encoding); the window never slides, so a greedy request gives exactly the tokens of
``generate(model, [prompt], greedy=True, max_new_tokens=N)``, alone or batched with others.

Failures are per request: an exception while prefilling, feeding or sampling fails the
request(s) concerned (their iterators raise ``RuntimeError`` with the message) and the worker goes
on. A failed batched forward is retried row by row, so one bad row cannot take the others down.

Thread safety: ``submit``, ``score``, ``cancel``, ``stats`` and ``shutdown`` may be called from
any thread; the model runs only on the worker thread, under ``torch.inference_mode``. At
interpreter exit, engines still running are stopped (their requests cancelled) before Python
finalises: a daemon thread that is still freeing tensors then would abort the process
("terminate called without an active exception").
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import itertools
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from lmforge.data.padding import pad_batch
from lmforge.generate.sampling import next_tokens

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "TokenEvent"]


@dataclass
class SamplingParams:
    """How one request chooses its tokens (OpenAI's completion parameters)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None  # per-request torch.Generator; same seed + same prompt = same tokens
    logprobs: int | None = None  # also report the top-N alternatives of each generated token
    stop_token_ids: tuple[int, ...] = ()  # besides the engine's end-of-text id


@dataclass
class TokenEvent:
    """One generated token. ``logprob`` is log p(token) under the model's own distribution
    (temperature 1, before penalties and filters); ``top_logprobs`` maps the ``params.logprobs``
    most likely token ids to their log-probabilities (None when not asked for)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


class QueueFull(Exception):
    """The engine's queue already holds ``max_queue`` waiting requests; retry later."""


_request_ids = itertools.count(1)

#: engines whose worker thread was started, for the exit hook below
_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines_at_exit() -> None:
    for engine in list(_live_engines):
        try:
            engine.shutdown(drain=False, timeout=5.0)
        except Exception:
            pass


class Request:
    """A submitted request: iterate it (or ``aiter`` it) for its tokens as they are generated.

    ``finish_reason`` is None while it runs, then "stop" (end-of-text or a stop id; the stop token
    itself is not reported), "length" (``max_tokens`` or the model's context is full),
    "cancelled", or "error" (its iterator and ``result`` then raise ``RuntimeError``).
    """

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None):
        self.id = next(_request_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._engine = engine
        self._generator = generator
        self._events: list[TokenEvent] = []
        self._done = False
        self._cancelled = False
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt={len(self.prompt_ids)} tokens, generated={len(self._events)}, "
                f"finish_reason={self.finish_reason!r})")

    @property
    def done(self) -> bool:
        """True once the request finished (for any reason)."""
        return self._done

    @property
    def token_ids(self) -> list[int]:
        """The tokens generated so far."""
        with self._cond:
            return [e.token_id for e in self._events]

    # -- the worker's side --------------------------------------------------------------------

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a consumer's event loop went away: nothing to tell it
                pass

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            if self._done:
                return
            self._events.append(event)
            self._cond.notify_all()
        self._notify()

    def _finish(self, reason: str, error: str | None = None) -> bool:
        """Mark the request finished; False if it already was."""
        with self._cond:
            if self._done:
                return False
            self.finish_reason, self.error, self._done = reason, error, True
            self._cond.notify_all()
        self._notify()
        return True

    # -- the consumer's side ------------------------------------------------------------------

    def __iter__(self) -> Iterator[TokenEvent]:
        """Blocking: yields each token as it is generated; ends when the request finishes
        (raises ``RuntimeError`` if it failed)."""
        seen = 0
        while True:
            with self._cond:
                while len(self._events) <= seen and not self._done:
                    self._cond.wait()
                new, done, error = self._events[seen:], self._done, self.error
            seen += len(new)
            yield from new
            if done:
                if error is not None:
                    raise RuntimeError(error)
                return

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        """The same as iterating, for asyncio code: ``async for event in request.aiter()``."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def listener() -> None:
            loop.call_soon_threadsafe(wake.set)

        with self._cond:
            self._listeners.append(listener)
        try:
            seen = 0
            while True:
                wake.clear()
                with self._cond:
                    new, done, error = self._events[seen:], self._done, self.error
                seen += len(new)
                for event in new:
                    yield event
                if done:
                    if error is not None:
                        raise RuntimeError(error)
                    return
                if not new:
                    await wake.wait()
        finally:
            with self._cond:
                self._listeners.remove(listener)

    def result(self, timeout: float | None = None) -> list[TokenEvent]:
        """Wait for the request to finish and return all its tokens. Raises ``TimeoutError``
        after ``timeout`` seconds, ``RuntimeError`` if the request failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            if self.error is not None:
                raise RuntimeError(self.error)
            return list(self._events)

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected): a waiting request is dropped at once, a
        running one leaves the batch at the next step; it then finishes with "cancelled"."""
        self._engine._cancel(self)


class _Row:
    """A running request's place in the batch (worker only)."""

    __slots__ = ("req", "n", "pending", "generated", "fed_max", "seen", "outcome")

    def __init__(self, req: Request, block_size: int, seen: torch.Tensor | None):
        self.req = req
        prompt_len = len(req.prompt_ids)
        self.n = prompt_len  # tokens fed so far (= this row's next position)
        self.pending: int | None = None  # chosen last step, fed next step
        self.generated = 0
        # the most tokens this row will ever have fed: it stops when prompt + generated = block_size
        self.fed_max = prompt_len + min(req.params.max_tokens, block_size - prompt_len) - 1
        self.seen = seen  # bool [1, V] for the repetition penalty, else None
        # (finish_reason, error) once the row is done; the request is told after the row left the
        # batch, so that whoever sees it finished also sees its slot free in ``stats``
        self.outcome: tuple[str, str | None] | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None and not self.req._cancelled and not self.req._done


class _ScoreJob:
    def __init__(self, ids: list[int], top: int | None = None):
        self.ids, self.top = ids, top  # top: None = score only, else also the top-N alternatives
        self.finished = threading.Event()
        self.result = None
        self.error: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failure(req: Request, exc: BaseException, during: str) -> str:
    return f"request {req.id} failed while {during}: {_describe(exc)}"


class Engine:
    """Continuous-batching decoder for one decoder-only model (``DecoderLM``), on one worker thread.

    ``eot_id``: end-of-text token id that finishes a request with "stop" (None: no such token).
    ``max_batch``: rows decoded together; ``max_queue``: requests that may wait for a row before
    ``submit`` raises ``QueueFull``. ``device``: where the model runs (moved there if needed).
    """

    def __init__(self, model, eot_id: int | None, max_batch: int = 32, max_queue: int = 256, device="cpu"):
        cfg = getattr(model, "cfg", None)
        if cfg is None or getattr(cfg, "arch", "decoder") != "decoder" or not hasattr(model, "new_cache"):
            raise ValueError("Engine needs a decoder-only language model (lmforge.model.DecoderLM)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, got {max_queue}")
        param = next(model.parameters())
        if param.device != torch.device(device):
            model.to(device)
        model.eval()
        self.model = model
        self.device = next(model.parameters()).device
        self.eot_id = eot_id
        self.block_size = cfg.block_size
        self.vocab_size = cfg.vocab_size
        self.max_batch = max_batch
        self.max_queue = max_queue

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[Request] = deque()
        self._score_jobs: deque[_ScoreJob] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False  # shutdown asked: no new work accepted
        self._drain = True  # while stopping: finish the running and queued requests first
        self._stopped = False
        self._stats = {
            "running": 0, "queued": 0, "steps": 0, "tokens": 0, "prefills": 0, "prompt_tokens": 0,
            "finished": 0, "cancelled": 0, "failed": 0, "scored": 0, "peak_running": 0, "cache_length": 0,
        }
        # The batch (touched by the worker thread only).
        self._rows: list[_Row] = []
        self._cache = None  # KVCache of the running rows, or None when there are none
        self._mask: torch.Tensor | None = None  # bool [B, capacity], True = a real token
        self._length = 0  # filled columns of the cache, shared by all rows

    # ------------------------------------------------------------------------------------------
    # Public API

    @property
    def stats(self) -> dict:
        """A snapshot: running (rows in the batch), queued, steps (decoding steps, each giving one
        token to every running row), tokens (generated), prefills (prefill forwards),
        prompt_tokens, finished, cancelled, failed, scored, peak_running (the largest batch so
        far), cache_length (positions in the batch cache now: the longest running row)."""
        with self._lock:
            return dict(self._stats)

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Start the worker thread (a daemon); returns the engine. Calling it again is a no-op."""
        with self._lock:
            if self._stopping or self._stopped:
                raise RuntimeError("this engine was shut down; create a new Engine")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
                self._thread.start()
                _live_engines.add(self)
        return self

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue a request (thread-safe); it joins the batch at the next step with a free row.

        Raises ``QueueFull`` when ``max_queue`` requests already wait, ``ValueError`` for an
        empty prompt, a prompt with no room for one new token (prompt + 1 > block_size), token ids
        outside the vocabulary or invalid sampling parameters, ``RuntimeError`` after shutdown.
        """
        params = params if params is not None else SamplingParams()
        prompt = self._check_ids(prompt_ids, "prompt", self.block_size - 1)
        self._check_params(params)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            if params.seed is not None:
                generator.manual_seed(int(params.seed))
            else:
                generator.seed()
        req = Request(self, prompt, params, generator)
        with self._lock:
            if self._stopping or self._stopped:
                raise RuntimeError("the engine is shutting down and accepts no new requests")
            if params.max_tokens == 0:  # nothing to generate (e.g. an echo-only completion)
                self._stats["finished"] += 1
                req._finish("length")
                return req
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue}); "
                                "retry later")
            self._queue.append(req)
            self._stats["queued"] = len(self._queue)
            self._cond.notify_all()
        return req

    def score(self, ids: Sequence[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) for each i (None for i = 0): one full forward of ``ids`` (at most
        block_size tokens) on the worker thread, between decoding steps; log_softmax in float64."""
        return self._run_score(_ScoreJob(self._check_ids(ids, "ids", self.block_size)))

    def score_top(self, ids: Sequence[int], n: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """``score(ids)`` and, from the same forward on the worker, the ``n`` likeliest tokens at each
        position ({token id: log-prob}, most likely first; None for i = 0), e.g. for echo with top
        logprobs."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        ids = self._check_ids(ids, "ids", self.block_size)
        return self._run_score(_ScoreJob(ids, top=min(n, self.vocab_size)))

    def _run_score(self, job: _ScoreJob):
        with self._lock:
            if self._stopping or self._stopped:
                raise RuntimeError("the engine is shutting down and accepts no new work")
            if self._thread is None:
                raise RuntimeError("the engine is not running; call start() first")
            self._score_jobs.append(job)
            self._cond.notify_all()
        while not job.finished.wait(0.5):
            if not self.running:
                raise RuntimeError("the engine's worker stopped before scoring")
        if job.error is not None:
            raise RuntimeError(job.error)
        return job.result

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the worker. ``drain``: finish the running and queued requests first (new ones are
        refused meanwhile); otherwise they finish with "cancelled" at once. If draining takes
        longer than ``timeout`` seconds, what is left is cancelled."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            thread = self._thread
            self._cond.notify_all()
            if thread is None:  # never started: nothing will ever run what waits
                waiting = list(self._queue)
                self._queue.clear()
                self._stats["queued"] = 0
                self._stats["cancelled"] += len(waiting)
                self._stopped = True
        if thread is None:
            for req in waiting:
                req._finish("cancelled")
            return
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                self._drain = False
                self._cond.notify_all()
            thread.join(timeout)

    # ------------------------------------------------------------------------------------------
    # Checks

    def _check_ids(self, ids: Sequence[int], what: str, max_len: int) -> list[int]:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must be a list of token ids ({e})") from None
        if not ids:
            raise ValueError(f"the {what} is empty; give at least one token (e.g. the end-of-text token)")
        if len(ids) > max_len:
            room = " and leave room for one new token" if what == "prompt" else ""
            raise ValueError(f"the {what} is {len(ids)} tokens but the model's context is {self.block_size} tokens; "
                             f"shorten it to at most {max_len} tokens{room}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"the {what} holds token id {bad[0]}, outside the model's vocabulary of "
                             f"{self.vocab_size}")
        return ids

    def _check_params(self, p: SamplingParams) -> None:
        if p.max_tokens is None or p.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {p.max_tokens}")
        if p.temperature is None or p.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
        if p.top_k is not None and p.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {p.top_k}; leave it unset to keep every token")
        if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
        if p.repetition_penalty is None or p.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive (1 = off), got {p.repetition_penalty}")
        if p.logprobs is not None and p.logprobs < 0:
            raise ValueError(f"logprobs must not be negative, got {p.logprobs}")

    # ------------------------------------------------------------------------------------------
    # Cancellation (any thread)

    def _cancel(self, req: Request) -> None:
        with self._lock:
            if req._done:
                return
            req._cancelled = True
            try:
                self._queue.remove(req)
            except ValueError:  # running (or being admitted): the worker drops it at the next step
                self._cond.notify_all()
                return
            self._stats["queued"] = len(self._queue)
            self._stats["cancelled"] += 1
        req._finish("cancelled")

    # ------------------------------------------------------------------------------------------
    # The worker

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        finally:
            # Normally empty by now; after an unexpected BaseException nothing may wait forever.
            with self._lock:
                self._stopped = True
                left = [r.req for r in self._rows] + list(self._queue)
                jobs = list(self._score_jobs)
                self._queue.clear()
                self._score_jobs.clear()
                self._stats["queued"] = self._stats["running"] = self._stats["cache_length"] = 0
            self._rows, self._cache, self._mask, self._length = [], None, None, 0
            for req in left:
                req._finish("cancelled")
            for job in jobs:
                job.error = "the engine stopped before scoring"
                job.finished.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._rows or self._queue or self._score_jobs or self._stopping):
                    self._cond.wait()
                abort = self._stopping and not self._drain
                jobs = list(self._score_jobs)
                self._score_jobs.clear()
                joiners: list[Request] = []
                if abort:
                    joiners = list(self._queue)
                    self._queue.clear()
                else:
                    while self._queue and len(self._rows) + len(joiners) < self.max_batch:
                        joiners.append(self._queue.popleft())
                self._stats["queued"] = len(self._queue)
                finished_draining = self._stopping and not (self._rows or joiners)

            for job in jobs:
                self._score(job)
            if abort:
                cancelled = [r.req for r in self._rows] + joiners
                self._rows, self._cache, self._mask, self._length = [], None, None, 0
                self._finish_all(cancelled, "cancelled")
                return
            if finished_draining:
                return
            if not (self._rows or joiners):
                continue
            try:
                self._step(joiners)
            except Exception as e:  # a bug of the engine's own: fail what is running, keep serving
                victims = [r.req for r in self._rows] + joiners
                self._rows, self._cache, self._mask, self._length = [], None, None, 0
                self._fail_all(victims, f"the decoding step failed: {_describe(e)}")
            with self._lock:
                self._stats["running"] = len(self._rows)
                self._stats["cache_length"] = self._length

    def _finish_all(self, reqs: list[Request], reason: str) -> None:
        n = sum(req._finish(reason) for req in reqs)
        with self._lock:
            self._stats["cancelled" if reason == "cancelled" else "finished"] += n

    def _fail_all(self, reqs: list[Request], message: str) -> None:
        n = sum(req._finish("error", message) for req in reqs)
        with self._lock:
            self._stats["failed"] += n

    def _fail(self, req: Request, exc: BaseException, during: str) -> None:
        self._fail_all([req], _failure(req, exc, during))

    def _score(self, job: _ScoreJob) -> None:
        try:
            idx = torch.tensor([job.ids], device=self.device)
            logits = self.model(idx)[0].double()  # [T, V]
            logp = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(job.ids[1:], device=self.device)
            picked = logp[:-1].gather(1, targets[:, None]).squeeze(1).tolist() if len(job.ids) > 1 else []
            job.result = [None] + picked
            if job.top is not None:
                tops: list[dict[int, float] | None] = [None] + [{} for _ in picked]
                if job.top > 0 and picked:
                    values, indices = logp[:-1].topk(job.top, dim=-1)
                    tops = [None] + [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                job.result = (job.result, tops)
            with self._lock:
                self._stats["scored"] += 1
        except Exception as e:
            job.error = f"scoring failed: {_describe(e)}"
        finally:
            job.finished.set()

    # ------------------------------------------------------------------------------------------
    # One decoding step

    def _step(self, joiners: list[Request]) -> None:
        self._compact()  # cancelled rows leave first
        logits_old = self._decode() if self._rows else None
        new_rows, logits_new = self._admit(joiners)
        if not (self._rows or new_rows):
            return
        if new_rows:
            self._rebuild(list(range(len(self._rows))), self._rows + [r for r, _ in new_rows],
                          [part for _, part in new_rows])
            self._rows = self._rows + [r for r, _ in new_rows]
        parts = [t for t in (logits_old, logits_new) if t is not None]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        produced = self._sample(logits)
        with self._lock:
            self._stats["steps"] += 1
            self._stats["tokens"] += produced
            self._stats["peak_running"] = max(self._stats["peak_running"], len(self._rows))
        self._compact()  # finished rows leave at once

    def _decode(self) -> torch.Tensor:
        """Feed every running row its pending token; logits [B, V] (a failed row's are zeros)."""
        rows, L = self._rows, self._length
        if L + 1 > self._cache.max_len:  # not expected (capacity covers every row's limit): grow
            self._rebuild(list(range(len(rows))), rows, [], min_capacity=L + 1)
            L = self._length
        idx = torch.tensor([[r.pending] for r in rows], device=self.device)
        positions = torch.tensor([[r.n] for r in rows], device=self.device)
        self._mask[:, L] = True
        padded = any(r.n < L for r in rows)
        mask = self._mask[:, : L + 1] if padded else None
        self._cache.length = L
        try:
            logits = self.model(idx, attention_mask=mask, positions=positions, cache=self._cache)[:, -1]
        except Exception:
            logits = self._decode_rows(idx, positions, L)
        self._cache.length = self._length = L + 1
        for r in rows:
            r.n += 1
        return logits

    def _decode_rows(self, idx: torch.Tensor, positions: torch.Tensor, L: int) -> torch.Tensor:
        """The batched forward failed: feed the rows one by one (each through a one-row view of the
        batch cache, so their keys/values land in place) and fail the rows that still raise."""
        logits = torch.zeros(len(self._rows), self.vocab_size, device=self.device)
        for i, row in enumerate(self._rows):
            view = copy.copy(self._cache)
            view.k = [k[i:i + 1] for k in self._cache.k]
            view.v = [v[i:i + 1] for v in self._cache.v]
            view.batch_size, view.length = 1, L
            mask = self._mask[i:i + 1, : L + 1] if row.n < L else None
            try:
                logits[i] = self.model(idx[i:i + 1], attention_mask=mask, positions=positions[i:i + 1],
                                       cache=view)[0, -1]
            except Exception as e:
                row.outcome = ("error", _failure(row.req, e, "decoding"))
        return logits

    def _prefill(self, prompts: list[list[int]]):
        """Left-padded prompts through the model into a fresh cache of their width:
        (last logits [J, V], cache, mask [J, W])."""
        idx, mask = pad_batch(prompts, 0, left=True)
        idx, mask = idx.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = self.model.new_cache(len(prompts), idx.size(1))
        unpadded = all(len(p) == idx.size(1) for p in prompts)
        logits = self.model(idx, attention_mask=None if unpadded else mask, positions=positions, cache=cache,
                            last_only=True)[:, -1]
        with self._lock:
            self._stats["prefills"] += 1
            self._stats["prompt_tokens"] += sum(len(p) for p in prompts)
        return logits, cache, mask

    def _admit(self, joiners: list[Request]):
        """Prefill the joining requests (together; one by one if that fails). Returns
        ([(row, (cache, mask))...], logits [J, V] or None) for those that succeeded."""
        live = []
        for req in joiners:
            if req._cancelled:
                self._finish_all([req], "cancelled")
            else:
                live.append(req)
        if not live:
            return [], None
        try:
            groups = [(live, self._prefill([r.prompt_ids for r in live]))]
        except Exception as e:
            if len(live) == 1:
                self._fail(live[0], e, "prefilling its prompt")
                return [], None
            groups = []
            for req in live:
                try:
                    groups.append(([req], self._prefill([req.prompt_ids])))
                except Exception as e1:
                    self._fail(req, e1, "prefilling its prompt")
        new_rows, logits = [], []
        for reqs, (group_logits, cache, mask) in groups:
            for j, req in enumerate(reqs):
                seen = None
                if req.params.repetition_penalty != 1.0:
                    seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
                    seen[0, torch.tensor(req.prompt_ids, device=self.device)] = True
                row = _Row(req, self.block_size, seen)
                if len(reqs) == 1:
                    part = (cache, mask)
                else:  # one row of the group's cache (a view: _rebuild copies it)
                    part = (_rows_view(cache, j), mask[j:j + 1])
                new_rows.append((row, part))
            logits.append(group_logits)
        if not new_rows:
            return [], None
        return new_rows, logits[0] if len(logits) == 1 else torch.cat(logits)

    def _sample(self, logits: torch.Tensor) -> int:
        """Choose each active row's next token, stream it, decide whether the row is finished.
        Returns the number of tokens streamed."""
        rows = self._rows
        logits = logits.float()
        chosen: dict[int, int] = {}
        # Greedy rows go together (one argmax per repetition penalty); sampled rows one by one,
        # each with its request's generator.
        greedy: dict[float, list[int]] = {}
        for i, row in enumerate(rows):
            if row.active and row.req.params.temperature == 0:
                greedy.setdefault(float(row.req.params.repetition_penalty), []).append(i)
        for penalty, members in greedy.items():
            try:
                sel = torch.tensor(members, device=self.device)
                seen = torch.cat([rows[i].seen for i in members]) if penalty != 1.0 else None
                tokens = next_tokens(logits.index_select(0, sel), temperature=0.0, repetition_penalty=penalty,
                                     seen=seen).tolist()
                chosen.update(zip(members, tokens))
            except Exception:
                pass  # retried row by row below, so that only the failing rows fail
        for i, row in enumerate(rows):
            if not row.active or i in chosen:
                continue
            p = row.req.params
            try:
                chosen[i] = int(next_tokens(logits[i:i + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                            repetition_penalty=p.repetition_penalty, seen=row.seen,
                                            generator=row.req._generator)[0])
            except Exception as e:
                row.outcome = ("error", _failure(row.req, e, "choosing a token"))
        if not chosen:
            return 0

        order = sorted(chosen)
        sel = torch.tensor(order, device=self.device)
        token_t = torch.tensor([chosen[i] for i in order], device=self.device)
        logp = torch.log_softmax(logits.index_select(0, sel), dim=-1)
        picked = logp.gather(1, token_t[:, None]).squeeze(1).tolist()
        n_top = max((rows[i].req.params.logprobs or 0 for i in order), default=0)
        n_top = min(n_top, self.vocab_size)
        top_values = top_ids = [[] for _ in order]
        if n_top:
            top_values, top_ids = logp.topk(n_top, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()

        produced = 0
        for k, i in enumerate(order):
            row, token = rows[i], chosen[i]
            p = row.req.params
            row.pending = token
            row.generated += 1
            if row.seen is not None:
                row.seen[0, token] = True
            if token == self.eot_id or token in p.stop_token_ids:
                row.outcome = ("stop", None)
                continue
            top = None
            if p.logprobs is not None:
                top = {int(t): float(v) for t, v in zip(top_ids[k][: p.logprobs], top_values[k][: p.logprobs])}
            row.req._push(TokenEvent(token, float(picked[k]), top))
            produced += 1
            if row.generated >= p.max_tokens or len(row.req.prompt_ids) + row.generated >= self.block_size:
                row.outcome = ("length", None)
        return produced

    # ------------------------------------------------------------------------------------------
    # The batch cache

    def _compact(self) -> None:
        """Drop the rows that finished, failed or were cancelled, then tell their requests."""
        if not self._rows:
            return
        keep = [i for i, r in enumerate(self._rows) if r.active]
        if len(keep) == len(self._rows):
            return
        leaving = [r for r in self._rows if not r.active]
        kept_rows = [self._rows[i] for i in keep]
        self._rebuild(keep, kept_rows, [])
        self._rows = kept_rows
        with self._lock:
            self._stats["running"] = len(self._rows)
            self._stats["cache_length"] = self._length
        for row in leaving:
            reason, error = row.outcome or ("cancelled", None)
            if reason == "error":
                self._fail_all([row.req], error)
            else:
                self._finish_all([row.req], reason)

    def _rebuild(self, keep: list[int], rows_after: list[_Row], parts: list[tuple], min_capacity: int = 0) -> None:
        """Make the batch cache hold the old rows ``keep`` (in that order) followed by the rows of
        ``parts`` ((cache, mask [J, W]) of newly prefilled requests), right-aligned in a shared
        length: the longest row's fed tokens (leading columns no row uses are trimmed; shorter rows
        are left-padded). The capacity covers the most any row will ever feed."""
        if not rows_after:
            self._cache, self._mask, self._length = None, None, 0
            return
        old, old_mask, L = self._cache, self._mask, self._length
        new_len = max(r.n for r in rows_after)
        capacity = max(new_len, min_capacity, max(r.fed_max for r in rows_after))
        cache = self.model.new_cache(len(rows_after), capacity)
        mask = torch.zeros(len(rows_after), capacity, dtype=torch.bool, device=self.device)
        b = 0
        if keep and old is not None:
            width = min(L, new_len)
            if keep == list(range(old.k[0].size(0))):
                pick = lambda t: t[:, :, L - width: L]  # noqa: E731
            else:
                index = torch.tensor(keep, device=self.device)
                pick = lambda t: t[:, :, L - width: L].index_select(0, index)  # noqa: E731
            for layer in range(len(cache.k)):
                cache.k[layer][: len(keep), :, new_len - width: new_len] = pick(old.k[layer])
                cache.v[layer][: len(keep), :, new_len - width: new_len] = pick(old.v[layer])
            mask[: len(keep), new_len - width: new_len] = old_mask[keep, L - width: L]
            b = len(keep)
        for part_cache, part_mask in parts:
            J, W = part_mask.shape
            for layer in range(len(cache.k)):
                cache.k[layer][b: b + J, :, new_len - W: new_len] = part_cache.k[layer][:, :, :W]
                cache.v[layer][b: b + J, :, new_len - W: new_len] = part_cache.v[layer][:, :, :W]
            mask[b: b + J, new_len - W: new_len] = part_mask
            b += J
        cache.length = new_len
        self._cache, self._mask, self._length = cache, mask, new_len


def _rows_view(cache, j: int):
    """Row j of a KVCache, as a one-row KVCache sharing its storage."""
    view = copy.copy(cache)
    view.k = [k[j:j + 1] for k in cache.k]
    view.v = [v[j:j + 1] for v in cache.v]
    view.batch_size = 1
    return view
