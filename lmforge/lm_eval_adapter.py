"""lmforge checkpoints in EleutherAI's lm-evaluation-harness (``lmforge eval --tasks``).

:class:`LMForgeLM` implements lm-eval's model interface on lmforge's own scoring and decoding:

- ``loglikelihood``: lm-eval tokenizes each (context, continuation) pair (``TemplateLM``: the pair is
  encoded whole and split where the context's own encoding ends; an empty context becomes the
  end-of-text token), then the rows are scored in batches with ``lmforge.generate.scoring.score_rows``,
  longest first. A row longer than the context keeps its last ``block_size + 1`` tokens, as lm-eval's
  ``hf`` model does. ``is_greedy``: every continuation token is the most likely one (among the ids the
  tokenizer can decode).
- ``loglikelihood_rolling``: lm-eval's own windows (``get_rolling_token_windows``, context 1): the text
  preceded by the end-of-text token in non-overlapping windows of ``block_size`` predictions, the last
  window ending at the last token with a full context. Every token of the text is predicted once;
  this is ``lmforge eval --file``'s loss on a one-document file (see ``lmforge.evaluate``).
- ``generate_until``: ``lmforge.generate.generate`` on a batch of prompts (greedy unless the task
  asks for sampling), cut at the first stop string; the context keeps its last ``block_size -
  max_gen_toks`` tokens.

:func:`evaluate_tasks` runs ``lm_eval.simple_evaluate`` with this model on the tasks of
``lmforge/evaltasks`` and the user's include paths. Nothing is downloaded: the Hugging Face libraries
are put offline first, and lm-eval's built-in tasks (which fetch their datasets from the Hub) are
only indexed when asked for, to be read from the local cache.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmforge.errors import LMForgeError
from lmforge.generate.scoring import score_rows

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class _NoMetadataHint(logging.Filter):
    """lm-eval suggests its own ``--metadata`` option for every task with a ``custom_dataset`` (lmforge's
    tasks get their files from ``--data``): drop that hint."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (lm-eval's own handler keeps the stream it
    was made with, which a caller may have replaced and closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


logging.getLogger("lm_eval.api.task").addFilter(_NoMetadataHint())
_lm_eval_logger = logging.getLogger("lm_eval")
if not any(isinstance(h, _StderrHandler) for h in _lm_eval_logger.handlers):
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    _lm_eval_logger.addHandler(_handler)
    _lm_eval_logger.setLevel(logging.WARNING)
    _lm_eval_logger.propagate = False


def go_offline() -> None:
    """Tell the Hugging Face libraries not to reach the network, also those already imported (they read
    the environment once, at import)."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """An lmforge language model as lm-eval's ``LM``: from a checkpoint (a run or checkpoint
    directory), or from a model and its tokenizer already loaded.

    ``batch_size``: rows per forward (lm-eval's "auto" means the default, 16; ``max_batch_size``, which
    lm-eval passes along with it, is not used). ``max_length``: a context shorter than the model's.
    ``seed``: the generator of sampled generations (greedy ones need none)."""

    def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer=None, device: str = "cpu",
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 1234, max_batch_size: int | None = None):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise LMForgeError("give the model: a checkpoint directory, or a model with its tokenizer")
            from lmforge.train.checkpoint import load_model

            model, _, tokenizer = load_model(checkpoint, device=device)
        if getattr(model.cfg, "arch", "decoder") != "decoder":
            raise LMForgeError(f"this checkpoint is a model.arch={model.cfg.arch} model; lm-evaluation-harness "
                               "scores language models, so give a decoder checkpoint")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = str(checkpoint or "lmforge")
        self._device = next(model.parameters()).device
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not supported
        self._max_length = min(int(max_length), model.cfg.block_size) if max_length else model.cfg.block_size
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if self._batch_size < 1:
            raise LMForgeError(f"--batch-size must be at least 1, got {batch_size}")

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eot_id is None:
            raise LMForgeError("this task needs an end-of-text token (to start a text from, as lm-eval does), "
                               "and the checkpoint's tokenizer has none; train one with special tokens")
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each ((context, continuation), context ids,
        continuation ids), scored in batches of rows of similar length."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise LMForgeError(f"a continuation of {len(continuation)} tokens is longer than the model's "
                                   f"context of {self.max_length} tokens; shorten the task's answers")
            rows.append((list(context) + list(continuation))[-(self.max_length + 1):])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm or not rows, desc="log-likelihoods")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scores = score_rows(self.model, [rows[i] for i in chunk], greedy_limit=self.tokenizer.vocab_size,
                                device=self._device)
            for i, s in zip(chunk, scores):
                n = len(requests[i][2])
                answer = (float(sum(s.logprobs[len(s.logprobs) - n:])), all(s.greedy[len(s.greedy) - n:]))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's rolling windows (see the module doc)."""
        windows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (greedy by default) and cut the text at the first of its stop strings."""
        from lmforge.generate import generate

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not requests, desc="generating")
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1] or {})
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
            room = self.max_length - max_new
            if room < 1:
                raise LMForgeError(f"the task asks for {max_new} new tokens but the model's context is "
                                   f"{self.max_length} tokens; lower max_gen_toks (--gen-kwargs max_gen_toks=N)")
            sampling = self._sampling(settings)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.eot_token_id] for i in chunk]
                outputs = generate(self.model, prompts, max_new_tokens=max_new, eot_id=self.tokenizer.eot_id,
                                   vocab_limit=self.tokenizer.vocab_size, **sampling)
                for i, ids in zip(chunk, outputs):
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop, 1)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _sampling(self, settings: dict) -> dict:
        """``generate``'s keywords from lm-eval's generation settings (greedy unless do_sample with a
        positive temperature)."""
        temperature = float(settings.get("temperature", 0.0) or 0.0)
        if not settings.get("do_sample", False) or temperature == 0.0:
            return {"greedy": True}
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        top_k = settings.get("top_k")
        top_p = settings.get("top_p")
        return {"temperature": temperature, "top_k": int(top_k) if top_k else None,
                "top_p": float(top_p) if top_p is not None else None, "generator": generator}


# ---------------------------------------------------------------------------------------- running tasks

def task_data(tasks: list[str], data: list[str]) -> dict[str, str]:
    """{task: file} for the tasks of ``lmforge/evaltasks`` from ``--data TASK=FILE`` / ``--data FILE``
    (the file of every such task asked for); each of them asked for needs one."""
    from lmforge.evaltasks import TASKS

    files: dict[str, str] = {}
    for entry in data:
        name, sep, path = entry.partition("=")
        if sep and name in TASKS:
            files[name] = path
        elif sep and not Path(entry).exists():
            raise LMForgeError(f"--data {entry}: {name!r} is not a task that reads a local file; use --data "
                               f"TASK=FILE with one of {', '.join(TASKS)}, or a task YAML of your own "
                               "(--include-path) with its own data_files")
        else:
            files.update({t: entry for t in tasks if t in TASKS})
    for t in tasks:
        if t in TASKS and t not in files:
            raise LMForgeError(f"task {t} reads a local file; pass --data {t}=FILE ({TASKS[t]})")
    for t, path in files.items():
        if not Path(path).is_file():
            raise LMForgeError(f"the data file of task {t}, {path}, does not exist; give an existing file")
    return {t: str(Path(p).resolve()) for t, p in files.items()}


def task_manager(include_paths: list[str] = (), builtin: bool = False, data: dict[str, str] | None = None):
    """lm-eval's TaskManager over lmforge's tasks and the user's folders of task YAMLs (a YAML file
    stands for its folder); lm-eval's built-in tasks only with ``builtin``."""
    from lm_eval.tasks import TaskManager

    from lmforge.evaltasks import DATA_KEY, TASK_DIR

    paths = [str(TASK_DIR)]
    for p in include_paths:
        path = Path(p)
        if not path.exists():
            raise LMForgeError(f"--include-path {p} does not exist; give a folder of task YAMLs (or a YAML file)")
        paths.append(str((path if path.is_dir() else path.parent).resolve()))
    return TaskManager(include_path=paths, include_defaults=builtin, metadata={DATA_KEY: data or {}})


def check_tasks(manager, tasks: list[str], builtin: bool) -> None:
    import difflib

    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            where = "" if builtin else " (lm-eval's built-in tasks only with --builtin-tasks)"
            raise LMForgeError(f"unknown task {t!r}; {hint}lmforge's tasks are lmforge_choice, lmforge_cloze and "
                               f"lmforge_perplexity, and --include-path DIR adds task YAMLs of your own{where}")


def evaluate_tasks(lm: LMForgeLM, tasks: list[str], *, include_paths: list[str] = (), data: list[str] = (),
                   builtin: bool = False, num_fewshot: int | None = None, limit: float | None = None,
                   gen_kwargs: str | None = None, bootstrap_iters: int = 100000, log_samples: bool = False,
                   seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``tasks``: its results dictionary."""
    go_offline()
    import lm_eval

    if not tasks:
        raise LMForgeError("--tasks is empty; name at least one task, e.g. --tasks lmforge_choice")
    files = task_data(tasks, list(data))
    manager = task_manager(list(include_paths), builtin, files)
    check_tasks(manager, tasks, builtin)
    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                       limit=limit, gen_kwargs=gen_kwargs, bootstrap_iters=bootstrap_iters,
                                       log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                       torch_random_seed=seed, fewshot_random_seed=seed)
    except LMForgeError:
        raise
    except OSError as e:  # ConnectionError included: the Hub refused in offline mode
        if "offline" in str(e).lower():
            raise LMForgeError(f"a task wanted to download its data ({str(e).splitlines()[0]}); lmforge eval never "
                               "downloads: give the task local data_files, or have the dataset in the local "
                               "Hugging Face cache") from None
        raise


def results_path(checkpoint: str, output: str | None) -> Path:
    """Where the results JSON goes: ``--output`` (a .json file, or a folder), else
    RUN/lm-eval/results_<time>.json in the checkpoint's run directory."""
    import time

    name = f"results_{time.strftime('%Y%m%d-%H%M%S')}.json"
    if output:
        out = Path(output)
        return out if out.suffix == ".json" else out / name
    path = Path(checkpoint)
    if path.parent.name == "checkpoints":  # RUN/checkpoints/step-N
        path = path.parent.parent
    return path / "lm-eval" / name


def save_results(results: dict, path: Path) -> list[Path]:
    """The results as JSON (without the samples), and with ``log_samples`` each task's samples as JSON
    Lines beside it (samples_<task>_<results name>.jsonl); returns the files written."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    kept = {k: v for k, v in results.items() if k != "samples"}
    path.write_text(json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    written = [path]
    for task, rows in samples.items():
        file = path.with_name(f"samples_{task}_{path.stem}.jsonl")
        file.write_text("".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                for r in rows), encoding="utf-8")
        written.append(file)
    return written
