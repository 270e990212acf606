"""Translation, summarization, sentiment and SRL checkpoints behind ``lmforge serve``: one request
at a time in the backend's worker thread (no batching across requests)."""

from __future__ import annotations

import time
import uuid

from fastapi import Request

from lmforge.errors import LMForgeError
from lmforge.serve.backend import Backend
from lmforge.serve.protocol import APIError, CompletionRequest, TextsRequest, event_stream


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
        from lmforge.tasks.model import output_limit

        tm = self.b.model
        sources, _ = tm.encode_sources(texts)
        outputs = tm.decode_ids(sources, decoding)
        return [(len(s), len(o), text, "length" if len(o) + 1 >= output_limit(tm.model.cfg, len(s), decoding) else "stop")
                for s, o, text in zip(sources, outputs, tm.output_texts(texts, outputs))]

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

