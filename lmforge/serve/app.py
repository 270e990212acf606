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

This module is the app (routes, error handlers, lifespan) and :func:`serve`; the request models and
errors are in :mod:`lmforge.serve.protocol`, the checkpoint in :mod:`lmforge.serve.backend`, the
language-model endpoints in :mod:`lmforge.serve.lm_service` (with the chat template) and the task
endpoints in :mod:`lmforge.serve.task_service`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmforge.serve.backend import Backend
from lmforge.serve.lm_service import LMService
from lmforge.serve.protocol import (APIError, ChatRequest, CompletionRequest, Gate, TextsRequest, error_response,
                                    validation_message)
from lmforge.serve.task_service import TaskService

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20


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
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 413: "request_too_large"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

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
