"""``lmforge serve``: an OpenAI-compatible HTTP server for a checkpoint (FastAPI + uvicorn).

Endpoints (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}``):

- ``GET /health``, ``GET /info`` (model id, task, context length; no key needed), ``GET /`` the playground
- ``GET /v1/models``
- language models: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's wire format,
  streaming as server-sent events), served by the continuous-batching :class:`~lmforge.serve.engine.Engine`
- translation / summarization checkpoints: ``POST /v1/completions`` (the prompt is the source text;
  beam search as the recipe says, overridable with the extra fields ``beam_size`` and
  ``no_repeat_ngram_size``; ``max_tokens`` does not apply: the recipe's max_len_a/b limit the output)
- sentiment checkpoints: ``POST /v1/classify``; SRL checkpoints: ``POST /v1/srl``

With an API key, every /v1/ route wants ``Authorization: Bearer KEY`` (401 otherwise). A body over
1 MiB gets 413, a full engine queue 429 with ``Retry-After``, a prompt longer than the context 400
(code ``context_length_exceeded``). A client that disconnects cancels its request.

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
import hmac
import json
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lmforge.errors import LMForgeError

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20
PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"
GONE = Response(status_code=499)  # nginx's "client closed request": nobody reads it


# ------------------------------------------------------------------------------------------ requests

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server has no use for
    model: Optional[str] = None


class _Sampling(_Body):
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(1.0, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = None  # extra field (vLLM's): 0 or -1 = off
    repetition_penalty: Optional[float] = Field(1.0, gt=0)  # extra field
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = ""
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    beam_size: Optional[int] = Field(None, ge=1)  # translation / summarization checkpoints
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0)


class ChatMessage(BaseModel):
    role: str
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones make sense here
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TextsRequest(_Body):
    input: Union[str, list[str]]


# ------------------------------------------------------------------------------------------ errors

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), (loc[0] if loc else None)


class Gate:
    """ASGI middleware in front of everything: the Bearer key on /v1/ (when one is set), and a body
    over ``limit`` bytes answered 413 (read and dropped, not parsed)."""

    def __init__(self, app, limit: int, api_key: str | None = None):
        self.app, self.limit, self.key = app, limit, api_key

    async def _refuse(self, receive, send, e: APIError, length: int) -> None:
        if length <= 16 * self.limit:
            await self._drain(receive)
        body = json.dumps(error_body(e.message, e.type, e.param, e.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive) -> None:
        """Read and drop the rest of a body (up to 16x the limit): closing a connection with unread
        data resets it, and the client would never see the 413."""
        seen = 0
        while seen <= 16 * self.limit:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        length = int(length) if length.isdigit() else 0
        if self.key is not None and scope["path"].startswith("/v1/") and not self._authorized(headers):
            return await self._refuse(receive, send, APIError(
                401, "Incorrect or missing API key; send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}), length)
        too_large = APIError(413, f"the request body is over the limit of {self.limit} bytes",
                             code="request_too_large")
        if length > self.limit:
            return await self._refuse(receive, send, too_large, length)
        seen = 0

        async def counted():  # a chunked body: count as it comes (FastAPI passes HTTPException through)
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body"):
                        await self._drain(receive)
                    raise HTTPException(413, too_large.message)
            return message

        await self.app(scope, counted, send)


# ------------------------------------------------------------------------------------------ checkpoints

def model_id(path: str | Path) -> str:
    """The run directory's name (for a step directory or checkpoints/, the run above it)."""
    p = Path(path).resolve()
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        p = p.parent
    if p.name == "checkpoints":
        p = p.parent
    return p.name


def _chat_template(ckpt: Path) -> tuple[str, dict] | None:
    """The Jinja chat template of an imported tokenizer (tokenizer_config.json), with its special tokens."""
    config = ckpt / "tokenizer_config.json"
    try:
        settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        template = settings.get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(template, str):
        return None
    specials = {}
    for key in ("bos_token", "eos_token"):
        value = settings.get(key)
        specials[key] = (value.get("content") if isinstance(value, dict) else value) or ""
    return template, specials


class Backend:
    """One loaded checkpoint. Language models decode in the engine's thread; task models in
    one worker thread of their own (no batching across requests)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_batch: int = 32, max_queue: int = 256,
                 max_tokens_limit: int | None = None):
        from lmforge.tasks.model import checkpoint_task
        from lmforge.train import checkpoint as ckpt_io

        self.path = Path(path)
        self.ckpt = ckpt_io.latest_checkpoint(path)
        self.task = checkpoint_task(path)
        self.id = model_id(path)
        self.created = int(self.ckpt.stat().st_mtime)
        self.engine = self.tokenizer = self.template = self.worker = None
        if self.task == "lm":
            from lmforge.serve.engine import Engine
            from lmforge.train.checkpoint import load_model

            self.model, self.cfg, self.tokenizer = load_model(path, device=device)
            if self.cfg.model.arch != "decoder":
                raise LMForgeError(f"{self.ckpt} is a model.arch={self.cfg.model.arch} checkpoint, which cannot "
                                   "generate text; serve a language model or a checkpoint from `lmforge finetune`")
            self.context = self.cfg.model.block_size
            self.template = _chat_template(self.ckpt)
            self.engine = Engine(self.model, self.tokenizer.eot_id, max_batch=max_batch, max_queue=max_queue,
                                 device=device)  # its thread starts with the app
        else:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="lmforge-task")
            if self.task == "sentiment":
                from lmforge.tasks.sentiment import Classifier

                self.model = Classifier(path, device=device)
                self.cfg = self.model.cfg
            elif self.task == "srl":
                from lmforge.tasks.srl import load_labeller

                self.model, self.cfg = load_labeller(path, device=device)
            else:
                from lmforge.tasks.model import load_task_model

                self.model = load_task_model(path, device=device)
                self.cfg, self.tokenizer = self.model.cfg, self.model.tokenizer
            self.context = self.cfg.model.block_size
        self.max_tokens_limit = max_tokens_limit

    def start(self) -> None:
        if self.engine is not None:
            self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(drain=True)
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    def info(self) -> dict:
        endpoints = {"lm": ["/v1/completions", "/v1/chat/completions"], "sentiment": ["/v1/classify"],
                     "srl": ["/v1/srl"]}.get(self.task, ["/v1/completions"])
        return {"model": self.id, "task": self.task, "context_length": self.context, "endpoints": endpoints}

    def check(self, model: str | None, endpoint: str) -> None:
        if model is not None and model != self.id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.id}'",
                           param="model", code="model_not_found")
        if endpoint not in self.info()["endpoints"]:
            raise APIError(400, f"'{self.id}' is a {self.task} checkpoint; it answers "
                                f"{' and '.join(self.info()['endpoints'])}, not {endpoint}",
                           code="unsupported_endpoint")

    async def in_worker(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)
        except LMForgeError as e:
            raise APIError(400, str(e)) from None


# ------------------------------------------------------------------------------------------ generation

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
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """Characters at the end that may begin a stop string: not sent yet."""
        for k in range(min(len(self.text) - self.sent, max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0

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


def _token(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


def completion_logprobs(tokenizer, ids: list[int], lps: list, tops: list, offsets: list[int]) -> dict:
    return {"tokens": [_token(tokenizer, i) for i in ids], "token_logprobs": lps,
            "top_logprobs": [None if t is None else {_token(tokenizer, k): v for k, v in t.items()} for t in tops],
            "text_offset": offsets}


def chat_logprobs(tokenizer, events: list) -> dict:
    def entry(i, lp):
        tok = _token(tokenizer, i)
        return {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": lp}

    return {"content": [{**entry(ev.token_id, ev.logprob),
                         "top_logprobs": [entry(k, v) for k, v in (ev.top_logprobs or {}).items()]}
                        for ev in events], "refusal": None}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


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

    def params(self, r: _Sampling, max_tokens: int, index: int, logprobs: int | None):
        from lmforge.serve.engine import SamplingParams

        top_k = r.top_k if r.top_k and r.top_k > 0 else None
        seed = None if r.seed is None else r.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if r.temperature is None else r.temperature,
                              top_p=r.top_p, top_k=top_k, repetition_penalty=r.repetition_penalty or 1.0, seed=seed,
                              logprobs=logprobs)

    def submit(self, prompts: list[list[int]], texts: list[str], r: _Sampling, max_tokens: list[int],
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
        """log p(ids[i] | ids[:i]) from the engine, and the ``top`` likeliest tokens at each position."""
        lps = await asyncio.to_thread(self.b.engine.score, ids)
        tops: list = [None] + [{} for _ in ids[1:]]
        if top > 0 and len(ids) > 1:
            tops = [None] + await asyncio.to_thread(self._top_alternatives, ids, top)
            for i, t in enumerate(tops[1:], 1):
                if ids[i] in t:  # the very number of token_logprobs (a greedy check compares them)
                    t[ids[i]] = lps[i]
        return list(lps), tops

    def _top_alternatives(self, ids: list[int], top: int) -> list[dict[int, float]]:
        """The engine scores only the given tokens: the alternatives come from one forward here
        (computed as the engine's score, in float64), outside the engine's thread."""
        import torch

        with torch.inference_mode():
            idx = torch.tensor([ids], device=self.b.model.tok_emb.weight.device)
            logp = torch.log_softmax(self.b.model(idx)[0, :-1].double(), dim=-1)
            values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
        return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]

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
                at += len(_token(self.b.tokenizer, i))
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


def event_stream(chunks) -> StreamingResponse:
    """Server-sent events: ``data: {json}`` per chunk, then ``data: [DONE]``; an error ends the stream
    with ``data: {"error": ...}`` (which the openai client raises)."""
    async def body():
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except APIError as e:
            yield sse(error_body(e.message, e.type, e.param, e.code))
        except Exception as e:  # the stream has started: the status can no longer change
            yield sse(error_body(f"internal error: {e}", "server_error"))
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class TaskService:
    """Translation, summarization, sentiment and SRL checkpoints: one request at a time in the worker."""

    def __init__(self, backend: Backend):
        self.b = backend

    @staticmethod
    def texts(value, param: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise APIError(400, f"{param} must be a non-empty text or a list of non-empty texts", param=param)
        return texts

    def _decode(self, texts: list[str], decoding) -> list[tuple[int, int, str, str]]:
        """(source tokens, output tokens, text, finish reason) per text, as ``TaskModel.generate`` decodes."""
        from lmforge.tasks.model import decode_ids, output_limit

        tm = self.b.model
        sources, _ = tm.encode_sources(texts)
        outputs = decode_ids(tm.model, tm.fmt, sources, decoding)
        return [(len(s), len(o), tm.tokenizer.decode(o).strip(),
                 "length" if len(o) + 1 >= output_limit(tm.model.cfg, len(s), decoding) else "stop")
                for s, o in zip(sources, outputs)]

    async def completion(self, r: CompletionRequest, http: Request):
        from lmforge.tasks.model import Decoding

        texts = self.texts(r.prompt, "prompt")
        try:
            decoding = Decoding.from_task(self.b.cfg.task, beam_size=r.beam_size,
                                          no_repeat_ngram_size=r.no_repeat_ngram_size)
        except LMForgeError as e:
            raise APIError(400, str(e)) from None
        results = await self.b.in_worker(self._decode, texts, decoding)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.b.id}
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                   for i, (_, _, text, finish) in enumerate(results)]
        prompt, completion = sum(x[0] for x in results), sum(x[1] for x in results)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if not r.stream:
            return {**head, "choices": choices, "usage": usage}

        async def chunks():
            for c in choices:
                yield {**head, "choices": [{**c, "finish_reason": None}]}
                yield {**head, "choices": [{**c, "text": ""}]}
            if (r.stream_options or {}).get("include_usage"):
                yield {**head, "choices": [], "usage": usage}

        return event_stream(chunks())

    async def classify(self, r: TextsRequest) -> dict:
        texts = self.texts(r.input, "input")
        results = await self.b.in_worker(self.b.model, texts)
        return {"object": "list", "model": self.b.id,
                "data": [{"index": i, "text": t, "label": label, "probabilities": probs}
                         for i, (t, (label, probs)) in enumerate(zip(texts, results))]}

    def _label(self, texts: list[str]) -> list[dict]:
        from lmforge.tasks.srl import describe, sentence_from_text

        sentences = self.b.model.label([sentence_from_text(t, i + 1) for i, t in enumerate(texts)])
        out = []
        for i, (text, s) in enumerate(zip(texts, sentences)):
            words, predicates = s.words, []
            for p, sense, labels in zip(s.predicates, s.senses, s.arguments()):
                arguments = [{"label": label, "index": w, "word": words[w]} for w, label in enumerate(labels)
                             if label not in ("_", "", "V")]
                predicates.append({"index": p, "word": words[p], "sense": sense, "arguments": arguments})
            out.append({"index": i, "text": text, "words": words, "predicates": predicates,
                        "description": describe(s)})
        return out

    async def srl(self, r: TextsRequest) -> dict:
        data = await self.b.in_worker(self._label, self.texts(r.input, "input"))
        return {"object": "list", "model": self.b.id, "data": data}


# ------------------------------------------------------------------------------------------ the app

def create_app(checkpoint: str | Path, *, api_key: str | None = None, device: str = "cpu", max_batch: int = 32,
               max_queue: int = 256, max_tokens_limit: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``checkpoint`` (loaded now; the engine starts with the app's lifespan)."""
    backend = Backend(checkpoint, device=device, max_batch=max_batch, max_queue=max_queue,
                      max_tokens_limit=max_tokens_limit)
    lm = LMService(backend) if backend.task == "lm" else None
    tasks = TaskService(backend) if lm is None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: finish what is queued, then stop
            await asyncio.to_thread(backend.stop)

    app = FastAPI(title="lmforge", summary=f"OpenAI-compatible server for {backend.id} ({backend.task})",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.add_middleware(Gate, limit=max_body_bytes, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 413: "request_too_large"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), code=kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.id}

    @app.get("/info")
    async def info():
        return {**backend.info(), "auth": api_key is not None}

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": backend.id, "object": "model", "created": backend.created,
                                            "owned_by": "lmforge", "task": backend.task,
                                            "max_model_len": backend.context}]}

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest, http: Request):
        backend.check(r.model, "/v1/completions")
        return await (lm or tasks).completion(r, http)

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest, http: Request):
        backend.check(r.model, "/v1/chat/completions")
        return await lm.chat(r, http)

    @app.post("/v1/classify")
    async def classify(r: TextsRequest):
        backend.check(r.model, "/v1/classify")
        return await tasks.classify(r)

    @app.post("/v1/srl")
    async def srl(r: TextsRequest):
        backend.check(r.model, "/v1/srl")
        return await tasks.srl(r)

    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          log_level: str = "info", graceful_seconds: float = 30, **settings) -> None:
    """Load the checkpoint and serve it until SIGINT/SIGTERM; then stop taking connections, let the open
    requests finish (up to ``graceful_seconds``) and drain the engine."""
    import uvicorn

    app = create_app(checkpoint, api_key=api_key, **settings)
    b = app.state.backend
    print(f"serving {b.id} ({b.task}, from {b.ckpt}) at http://{host}:{port}/v1 - playground at http://{host}:{port}/",
          flush=True)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it stopped on once it is done; a drained SIGTERM exits 0
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on",  # no engine: no server
                timeout_graceful_shutdown=graceful_seconds)
