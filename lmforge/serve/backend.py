"""One loaded checkpoint behind ``lmforge serve``: its model (a language model with its decoding
engine, or a task model with a worker thread of its own), id, task and chat template."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.serve.protocol import APIError


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
                                 device=device, vocab_limit=self.tokenizer.vocab_size)  # starts with the app
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

