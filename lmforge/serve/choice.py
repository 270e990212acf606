"""One continuation of a language-model request: the engine's token events as text pieces (cut
before a stop string), and the logprobs objects of OpenAI's completions and chat formats."""

from __future__ import annotations

from lmforge.generate.stops import find_stop, held_back
from lmforge.serve.backend import Backend


class Choice:
    """One continuation: the engine's token events turned into text pieces, cut before a stop string."""

    def __init__(self, backend: Backend, request, stops: list[str], text: str = ""):
        self.tokenizer, self.request, self.stops = backend.tokenizer, request, [s for s in stops if s]
        self.decoder = self.tokenizer.stream_decoder()
        self.text, self.sent, self.start = text, len(text), len(text)  # echoed prompt text comes first
        self.events: list = []
        self.offsets: list[int] = []
        self.finish_reason: str | None = None if request is not None else "length"
        self.cut = False

    def _cut(self) -> int | None:
        return find_stop(self.text, self.stops, self.sent)

    def _held(self) -> int:
        """Characters at the end that may begin a stop string: not sent yet."""
        return held_back(self.text, self.stops, self.sent)

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    async def pieces(self):
        """Yield the new text as it is decoded (never part of a stop string)."""
        if self.request is None:
            return
        async for ev in self.request.aiter():  # the end-of-text token is never reported
            self.events.append(ev)
            self.offsets.append(len(self.text))
            self.text += self.decoder.push(ev.token_id)
            cut = self._cut()
            if cut is not None:
                self.request.cancel()
                self.finish_reason, self.text, self.cut = "stop", self.text[:cut], True
                yield self._take(cut)
                return
            yield self._take(len(self.text) - self._held())
        self.text += self.decoder.flush()
        cut = self._cut()
        if cut is not None:
            self.text, self.cut = self.text[:cut], True
        self.finish_reason = "stop" if cut is not None else (self.request.finish_reason or "length")
        yield self._take(len(self.text))

    async def run(self) -> "Choice":
        async for _ in self.pieces():
            pass
        return self

    def cancel(self) -> None:
        if self.request is not None and self.finish_reason is None:
            try:
                self.request.cancel()
            except Exception:  # already finished: nothing to free
                pass

    @property
    def kept(self) -> int:
        """How many events have text in the answer (the tokens of a stop string do not)."""
        return sum(at < len(self.text) for at in self.offsets) if self.cut else len(self.events)


def token_text(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


def completion_logprobs(tokenizer, ids: list[int], lps: list, tops: list, offsets: list[int]) -> dict:
    return {"tokens": [token_text(tokenizer, i) for i in ids], "token_logprobs": lps,
            "top_logprobs": [None if t is None else {token_text(tokenizer, k): v for k, v in t.items()} for t in tops],
            "text_offset": offsets}


def chat_logprobs(tokenizer, events: list) -> dict:
    def entry(i, lp):
        tok = token_text(tokenizer, i)
        return {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": lp}

    return {"content": [{**entry(ev.token_id, ev.logprob),
                         "top_logprobs": [entry(k, v) for k, v in (ev.top_logprobs or {}).items()]}
                        for ev in events], "refusal": None}

