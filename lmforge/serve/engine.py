"""The decoding engine behind ``lmforge serve``: one model worker thread, many concurrent requests.

Continuous batching over the KV cache: the worker owns one ``Batch`` (``lmforge.serve.batch``: the
running rows, left-padded in one shared KV cache, as ``lmforge.generate.generate`` lays out a
batch). The request-side types (``SamplingParams``, ``Request``, ``TokenEvent``, ``QueueFull``)
live in ``lmforge.serve.requests`` and are importable from here. Each step of the worker:

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

import atexit
import threading
import weakref
from collections import deque
from typing import Sequence

import torch

from lmforge.generate.sampling import next_tokens
from lmforge.serve.batch import Batch, Row, rows_view
from lmforge.serve.requests import (QueueFull, Request, SamplingParams, ScoreJob, TokenEvent, check_ids,
                                    check_params, describe_error, failure_message)

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "TokenEvent"]

#: engines whose worker thread was started, for the exit hook below
_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines_at_exit() -> None:
    for engine in list(_live_engines):
        try:
            engine.shutdown(drain=False, timeout=5.0)
        except Exception:
            pass


class Engine:
    """Continuous-batching decoder for one decoder-only model (``DecoderLM``), on one worker thread.

    ``eot_id``: end-of-text token id that finishes a request with "stop" (None: no such token).
    ``max_batch``: rows decoded together; ``max_queue``: requests that may wait for a row before
    ``submit`` raises ``QueueFull``. ``device``: where the model runs (moved there if needed).
    """

    def __init__(self, model, eot_id: int | None, max_batch: int = 32, max_queue: int = 256, device="cpu",
                 vocab_limit: int | None = None):
        #: ids at or above this (rows of a model vocabulary padded beyond its tokenizer) are never chosen
        self.vocab_limit = vocab_limit
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
        self._score_jobs: deque[ScoreJob] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False  # shutdown asked: no new work accepted
        self._drain = True  # while stopping: finish the running and queued requests first
        self._stopped = False
        self._stats = {
            "running": 0, "queued": 0, "steps": 0, "tokens": 0, "prefills": 0, "prompt_tokens": 0,
            "finished": 0, "cancelled": 0, "failed": 0, "scored": 0, "peak_running": 0, "cache_length": 0,
        }
        self._batch = Batch(model, self.device, self.vocab_size)  # touched by the worker thread only

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
        check_params(params)
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
        return self._run_score(ScoreJob(self._check_ids(ids, "ids", self.block_size)))

    def score_top(self, ids: Sequence[int], n: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """``score(ids)`` and, from the same forward on the worker, the ``n`` likeliest tokens at each
        position ({token id: log-prob}, most likely first; None for i = 0), e.g. for echo with top
        logprobs."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        ids = self._check_ids(ids, "ids", self.block_size)
        return self._run_score(ScoreJob(ids, top=min(n, self.vocab_size)))

    def _run_score(self, job: ScoreJob):
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
        return check_ids(ids, what, max_len, block_size=self.block_size, vocab_size=self.vocab_size)

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
                left = self._batch.clear() + list(self._queue)
                jobs = list(self._score_jobs)
                self._queue.clear()
                self._score_jobs.clear()
                self._stats["queued"] = self._stats["running"] = self._stats["cache_length"] = 0
            for req in left:
                req._finish("cancelled")
            for job in jobs:
                job.error = "the engine stopped before scoring"
                job.finished.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._batch.rows or self._queue or self._score_jobs or self._stopping):
                    self._cond.wait()
                abort = self._stopping and not self._drain
                jobs = list(self._score_jobs)
                self._score_jobs.clear()
                joiners: list[Request] = []
                if abort:
                    joiners = list(self._queue)
                    self._queue.clear()
                else:
                    while self._queue and len(self._batch.rows) + len(joiners) < self.max_batch:
                        joiners.append(self._queue.popleft())
                self._stats["queued"] = len(self._queue)
                finished_draining = self._stopping and not (self._batch.rows or joiners)

            for job in jobs:
                self._score(job)
            if abort:
                cancelled = self._batch.clear() + joiners
                self._finish_all(cancelled, "cancelled")
                return
            if finished_draining:
                return
            if not (self._batch.rows or joiners):
                continue
            try:
                self._step(joiners)
            except Exception as e:  # a bug of the engine's own: fail what is running, keep serving
                victims = self._batch.clear() + joiners
                self._fail_all(victims, f"the decoding step failed: {describe_error(e)}")
            with self._lock:
                self._stats["running"] = len(self._batch.rows)
                self._stats["cache_length"] = self._batch.length

    def _finish_all(self, reqs: list[Request], reason: str) -> None:
        n = sum(req._finish(reason) for req in reqs)
        with self._lock:
            self._stats["cancelled" if reason == "cancelled" else "finished"] += n

    def _fail_all(self, reqs: list[Request], message: str) -> None:
        n = sum(req._finish("error", message) for req in reqs)
        with self._lock:
            self._stats["failed"] += n

    def _fail(self, req: Request, exc: BaseException, during: str) -> None:
        self._fail_all([req], failure_message(req, exc, during))

    def _score(self, job: ScoreJob) -> None:
        try:
            job.result = job.compute(self.model, self.device)
            with self._lock:
                self._stats["scored"] += 1
        except Exception as e:
            job.error = f"scoring failed: {describe_error(e)}"
        finally:
            job.finished.set()

    # ------------------------------------------------------------------------------------------
    # One decoding step

    def _step(self, joiners: list[Request]) -> None:
        self._compact()  # cancelled rows leave first
        logits_old = self._batch.decode() if self._batch.rows else None
        new_rows, logits_new = self._admit(joiners)
        if not (self._batch.rows or new_rows):
            return
        if new_rows:
            self._batch.join(new_rows)
        parts = [t for t in (logits_old, logits_new) if t is not None]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        produced = self._sample(logits)
        with self._lock:
            self._stats["steps"] += 1
            self._stats["tokens"] += produced
            self._stats["peak_running"] = max(self._stats["peak_running"], len(self._batch.rows))
        self._compact()  # finished rows leave at once

    def _prefill(self, prompts: list[list[int]]):
        """``Batch.prefill``, counted in the stats."""
        logits, cache, mask = self._batch.prefill(prompts)
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
                row = Row(req, self.block_size, self.vocab_size, self.device)
                if len(reqs) == 1:
                    part = (cache, mask)
                else:  # one row of the group's cache (a view: the batch copies it)
                    part = (rows_view(cache, j), mask[j:j + 1])
                new_rows.append((row, part))
            logits.append(group_logits)
        if not new_rows:
            return [], None
        return new_rows, logits[0] if len(logits) == 1 else torch.cat(logits)

    def _sample(self, logits: torch.Tensor) -> int:
        """Choose each active row's next token, then record it in the batch (``Batch.record``: stream
        it, decide whether the row is finished). Returns the number of tokens streamed."""
        rows = self._batch.rows
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
                                     seen=seen, vocab_limit=self.vocab_limit).tolist()
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
                                            generator=row.req._generator, vocab_limit=self.vocab_limit)[0])
            except Exception as e:
                row.outcome = ("error", failure_message(row.req, e, "choosing a token"))
        if not chosen:
            return 0
        return self._batch.record(logits, chosen, self.eot_id, self.block_size)

    # ------------------------------------------------------------------------------------------
    # Rows leaving the batch

    def _compact(self) -> None:
        """Drop the rows that finished, failed or were cancelled, then tell their requests."""
        leaving = self._batch.leave()
        if not leaving:
            return
        with self._lock:
            self._stats["running"] = len(self._batch.rows)
            self._stats["cache_length"] = self._batch.length
        for row in leaving:
            reason, error = row.outcome or ("cancelled", None)
            if reason == "error":
                self._fail_all([row.req], error)
            else:
                self._finish_all([row.req], reason)
