"""The wire format of ``lmforge serve``: OpenAI's request bodies (pydantic models), its error shape
``{"error": {"message", "type", "param", "code"}}``, the gate in front of the app (API key, body
size) and server-sent events."""

from __future__ import annotations

import hmac
import json
from typing import Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

# ------------------------------------------------------------------------------------------ requests

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server has no use for
    model: Optional[str] = None


class Sampling(Body):
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


class CompletionRequest(Sampling):
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


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TextsRequest(Body):
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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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


# ------------------------------------------------------------------------------------------ streams

def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
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

