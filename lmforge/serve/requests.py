"""The engine's request-side types: what a client submits and gets back.

``SamplingParams`` (how one request chooses its tokens; ``check_params`` and ``check_ids`` validate
what a client submits),
``TokenEvent`` (one generated token), ``Request`` (a submitted request: its thread-safe stream of
events, consumed blocking or with asyncio), ``ScoreJob`` (one scoring forward the worker runs
between steps), ``QueueFull``, and the messages a failed request finishes with.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence

import torch

from lmforge.generate.scoring import score_rows


class _Cancels(Protocol):
    """What a request needs of its engine: a way to give up its batch slot."""

    def _cancel(self, request: "Request") -> None: ...


__all__ = ["QueueFull", "Request", "SamplingParams", "TokenEvent"]


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


class Request:
    """A submitted request: iterate it (or ``aiter`` it) for its tokens as they are generated.

    ``finish_reason`` is None while it runs, then "stop" (end-of-text or a stop id; the stop token
    itself is not reported), "length" (``max_tokens`` or the model's context is full),
    "cancelled", or "error" (its iterator and ``result`` then raise ``RuntimeError``).
    """

    def __init__(self, engine: _Cancels, prompt_ids: list[int], params: SamplingParams,
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


class ScoreJob:
    """A scoring forward of ``ids`` that a caller waits for (``finished``) while the worker runs it."""

    def __init__(self, ids: list[int], top: int | None = None):
        self.ids, self.top = ids, top  # top: None = score only, else also the top-N alternatives
        self.finished = threading.Event()
        self.result = None
        self.error: str | None = None

    def compute(self, model, device: torch.device):
        """The forward itself (on the worker): log p(ids[i] | ids[:i]) for each i (None for i = 0)
        and, when ``top`` is set, with them the ``top`` likeliest tokens at each position."""
        scores = score_rows(model, [self.ids], top=self.top or 0, device=device)[0]
        if self.top is None:
            return [None] + scores.logprobs
        tops: list[dict[int, float] | None] = [None] + (scores.top if self.top > 0 else [{} for _ in scores.logprobs])
        return [None] + scores.logprobs, tops


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def failure_message(req: Request, exc: BaseException, during: str) -> str:
    return f"request {req.id} failed while {during}: {describe_error(exc)}"


def check_params(p: SamplingParams) -> None:
    """Raise ``ValueError`` for sampling parameters out of range."""
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


def check_ids(ids: Sequence[int], what: str, max_len: int, block_size: int, vocab_size: int) -> list[int]:
    """The token ids of a prompt or a text to score as a list of ints; ``ValueError`` if they are
    empty, longer than ``max_len`` or outside the vocabulary."""
    try:
        ids = [int(t) for t in ids]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a list of token ids ({e})") from None
    if not ids:
        raise ValueError(f"the {what} is empty; give at least one token (e.g. the end-of-text token)")
    if len(ids) > max_len:
        room = " and leave room for one new token" if what == "prompt" else ""
        raise ValueError(f"the {what} is {len(ids)} tokens but the model's context is {block_size} tokens; "
                         f"shorten it to at most {max_len} tokens{room}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the {what} holds token id {bad[0]}, outside the model's vocabulary of "
                         f"{vocab_size}")
    return ids
