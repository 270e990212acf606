"""Completions and chat for a language-model checkpoint, on the continuous-batching engine.

Chat messages become one prompt: with the tokenizer's Jinja ``chat_template`` when the checkpoint's
tokenizer_config.json has one (an imported model), else this plain template, which the model is asked
to continue after ``Assistant:`` (``"\\nUser:"`` is then an implicit stop string)::

    System: <content>
    User: <content>
    Assistant: <content>
    User: <content>
    Assistant:
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from lmforge.serve.backend import Backend
from lmforge.serve.choice import Choice, chat_logprobs, completion_logprobs, token_text
from lmforge.serve.protocol import (APIError, ChatMessage, ChatRequest, CompletionRequest, Sampling,
                                    event_stream)

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"
GONE = Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _until_disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


class LMService:
    """Completions and chat for a language-model checkpoint, on top of the engine."""

    def __init__(self, backend: Backend):
        self.b = backend

    def encode(self, prompt) -> tuple[list[int], str]:
        tok = self.b.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt) or ([tok.eot_id] if tok.eot_id is not None else [])
            text = prompt
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {tok.vocab_size})",
                               param="prompt")
            text = tok.decode(ids)
        if not ids:
            raise APIError(400, "the prompt is empty and the tokenizer has no end-of-text token; give a prompt",
                           param="prompt")
        if len(ids) > self.b.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context is {self.b.context} "
                                f"tokens; shorten the prompt", param="prompt", code="context_length_exceeded")
        return ids, text

    def limit(self, max_tokens: int | None, n_prompt: int) -> int:
        room = self.b.max_tokens_limit or self.b.context
        if max_tokens is None:
            return max(min(room, self.b.context - n_prompt), 0)
        if max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {room}",
                           param="max_tokens")
        return max_tokens

    def params(self, r: Sampling, max_tokens: int, index: int, logprobs: int | None):
        from lmforge.serve.engine import SamplingParams

        top_k = r.top_k if r.top_k and r.top_k > 0 else None
        seed = None if r.seed is None else r.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if r.temperature is None else r.temperature,
                              top_p=r.top_p, top_k=top_k, repetition_penalty=r.repetition_penalty or 1.0, seed=seed,
                              logprobs=logprobs)

    def submit(self, prompts: list[list[int]], texts: list[str], r: Sampling, max_tokens: list[int],
               logprobs: int | None, stops: list[str], echo: bool = False) -> list[Choice]:
        from lmforge.serve.engine import QueueFull

        if not self.b.engine.running:  # never hang a request on an engine that is not there
            raise APIError(503, "the decoding engine is not running; restart the server", type="server_error",
                           code="engine_stopped")
        choices: list[Choice] = []
        try:
            for p, (ids, text) in enumerate(zip(prompts, texts)):
                for j in range(r.n):
                    req = (self.b.engine.submit(ids, self.params(r, max_tokens[p], j, logprobs))
                           if max_tokens[p] > 0 else None)
                    choices.append(Choice(self.b, req, stops, text if echo else ""))
        except QueueFull:
            for c in choices:
                c.cancel()
            raise APIError(429, "the server's queue is full; retry shortly", type="server_busy",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except (ValueError, RuntimeError) as e:  # a prompt without room for a token; shutting down
            for c in choices:
                c.cancel()
            if isinstance(e, RuntimeError):
                raise APIError(503, str(e), type="server_error", code="shutting_down") from None
            raise APIError(400, str(e), param="prompt") from None
        return choices

    async def prompt_logprobs(self, ids: list[int], top: int) -> tuple[list, list]:
        """log p(ids[i] | ids[:i]) and the ``top`` likeliest tokens at each position, from one
        scoring forward on the engine's worker (no model work outside it)."""
        lps, tops = await asyncio.to_thread(self.b.engine.score_top, ids, top)
        return list(lps), tops

    async def collect(self, http: Request, choices: list[Choice]) -> bool:
        """Run the choices to the end; False if the client went away first (they are then cancelled)."""
        work = asyncio.ensure_future(asyncio.gather(*(c.run() for c in choices)))
        watch = asyncio.ensure_future(_until_disconnect(http))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                try:
                    await work
                except asyncio.CancelledError:
                    pass
                return False
            work.result()
            return True
        finally:
            watch.cancel()
            for c in choices:
                c.cancel()

    async def merged(self, choices: list[Choice]):
        """(index, piece) pairs as any choice produces them, then (index, None) when it ends."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, c: Choice):
            try:
                async for piece in c.pieces():
                    if piece:
                        await queue.put((i, piece, None))
                await queue.put((i, None, None))
            except Exception as e:  # reported in the stream
                await queue.put((i, None, e))

        tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
        try:
            for _ in range(len(choices)):
                while True:
                    i, piece, err = await queue.get()
                    if err is not None:
                        raise err
                    yield i, piece
                    if piece is None:
                        break
        finally:  # the end, an error, or the client went away: free every slot
            for t in tasks:
                t.cancel()
            for c in choices:
                c.cancel()

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        prompt = sum(len(p) for p in prompts)
        completion = sum(len(c.events) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---------------------------------------------------------------- /v1/completions
    async def completion(self, r: CompletionRequest, http: Request):
        raw = r.prompt
        if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)):
            raw = [raw]
        if not raw:
            raise APIError(400, "the prompt is empty; give a string, a list of strings or of token ids", param="prompt")
        prompts, texts = map(list, zip(*(self.encode(p) for p in raw)))
        maxes = [self.limit(r.max_tokens, len(p)) for p in prompts]
        choices = self.submit(prompts, texts, r, maxes, r.logprobs, _stops(r.stop), echo=r.echo)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.b.id}
        if r.stream:
            return event_stream(self._completion_chunks(head, r, prompts, choices))
        if not await self.collect(http, choices):
            return GONE
        out = []
        for i, c in enumerate(choices):
            lp = None
            if r.logprobs is not None:
                lp = await self.logprobs(c, prompts[i // r.n] if r.echo else None, r.logprobs, 0, c.kept)
            out.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**head, "choices": out, "usage": self.usage(prompts, choices)}

    async def logprobs(self, c: Choice, prompt: list[int] | None, top: int, lo: int, hi: int) -> dict:
        """The legacy ``logprobs`` object of events lo:hi of a choice, after the prompt's tokens if given."""
        events = c.events[lo:hi]
        ids, lps = [e.token_id for e in events], [e.logprob for e in events]
        tops, offsets = [e.top_logprobs or {} for e in events], c.offsets[lo:hi]
        if prompt is not None:
            plps, ptops = await self.prompt_logprobs(prompt, top)
            starts, at = [], 0
            for i in prompt:
                starts.append(at)
                at += len(token_text(self.b.tokenizer, i))
            ids, lps, tops, offsets = prompt + ids, plps + lps, ptops + tops, starts + offsets
        return completion_logprobs(self.b.tokenizer, ids, lps, tops, offsets)

    async def _completion_chunks(self, head: dict, r: CompletionRequest, prompts, choices: list[Choice]):
        sent = [0] * len(choices)
        if r.echo:
            for i, c in enumerate(choices):
                lp = None if r.logprobs is None else await self.logprobs(c, prompts[i // r.n], r.logprobs, 0, 0)
                yield {**head, "choices": [{"index": i, "text": c.text[:c.start], "logprobs": lp,
                                            "finish_reason": None}]}
        async for i, piece in self.merged(choices):
            c, lp = choices[i], None
            if r.logprobs is not None:
                end = c.kept if piece is None else len(c.events)
                lp, sent[i] = await self.logprobs(c, None, r.logprobs, sent[i], end), end
            yield {**head, "choices": [{"index": i, "text": piece or "", "logprobs": lp,
                                        "finish_reason": None if piece is not None else c.finish_reason}]}
        if (r.stream_options or {}).get("include_usage"):
            yield {**head, "choices": [], "usage": self.usage(prompts, choices)}

    # ---------------------------------------------------------------- /v1/chat/completions
    def render(self, messages: list[ChatMessage]) -> str:
        if self.b.template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            template, specials = self.b.template
            try:
                return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
                    messages=[{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True,
                    **specials)
            except Exception as e:  # a template that raises (e.g. on an unsupported role) is the request's fault
                raise APIError(400, f"the model's chat template refused the messages: {e}", param="messages") from None
        lines = []
        for m in messages:
            if m.role not in PLAIN_ROLES:
                raise APIError(400, f"unknown role {m.role!r}; use system, user or assistant", param="messages")
            lines.append(f"{PLAIN_ROLES[m.role]}: {m.text()}")
        return "\n".join(lines) + "\nAssistant:"

    async def chat(self, r: ChatRequest, http: Request):
        ids, text = self.encode(self.render(r.messages))
        max_tokens = self.limit(r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens,
                                len(ids))
        stops = _stops(r.stop) + ([] if self.b.template is not None else [PLAIN_STOP])
        choices = self.submit([ids], [text], r, [max_tokens], (r.top_logprobs or 0) if r.logprobs else None, stops)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.b.id}
        if r.stream:
            return event_stream(self._chat_chunks({**head, "object": "chat.completion.chunk"}, r, [ids], choices))
        if not await self.collect(http, choices):
            return GONE
        return {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text.lstrip(), "refusal": None},
             "logprobs": chat_logprobs(self.b.tokenizer, c.events[:c.kept]) if r.logprobs else None,
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)], "usage": self.usage([ids], choices)}

    async def _chat_chunks(self, head: dict, r: ChatRequest, prompts, choices: list[Choice]):
        sent, begun = [0] * len(choices), [False] * len(choices)
        for i in range(len(choices)):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]}
        async for i, piece in self.merged(choices):
            c, lp = choices[i], None
            if r.logprobs:
                end = c.kept if piece is None else len(c.events)
                lp, sent[i] = chat_logprobs(self.b.tokenizer, c.events[sent[i]:end]), end
            if piece is None:
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": lp, "finish_reason": c.finish_reason}]}
                continue
            piece = piece if begun[i] else piece.lstrip()  # as the whole answer: no leading whitespace
            begun[i] = begun[i] or bool(piece)
            if piece or lp:
                yield {**head, "choices": [{"index": i, "delta": {"content": piece}, "logprobs": lp,
                                            "finish_reason": None}]}
        if (r.stream_options or {}).get("include_usage"):
            yield {**head, "choices": [], "usage": self.usage(prompts, choices)}


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])

