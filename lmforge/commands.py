"""The bodies of the ``lmforge`` commands; :mod:`lmforge.cli` is the table that parses for them.

Each ``cmd_*`` takes the parsed arguments and the recipe overrides left over (``--section.key=value``);
``lmforge.cli.main`` has already refused leftovers a command does not take. Everything heavy (torch,
the model, the data) is imported inside the command that needs it, so ``lmforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.errors import LMForgeError


def print_summary(summary: dict) -> None:
    """A run's summary as JSON, once: under torchrun every process runs the command, rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))


def _load(args: argparse.Namespace, overrides: list[str]):
    from lmforge.recipes import load_config

    return load_config(args.config, overrides)


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.data.shards import prepare

    cfg = _load(args, overrides)
    meta = prepare(cfg.data, progress=not args.quiet)
    print(f"prepared {cfg.data.data_dir}: vocab {meta['vocab_size']} ({meta['tokenizer']}), "
          f"train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.lm import train

    cfg = _load(args, overrides)
    if cfg.model.arch == "seq2seq" or cfg.task.name != "lm":
        raise LMForgeError("this recipe is a translation/summarization task; train it with `lmforge finetune "
                           f"{cfg.task.name if cfg.task.name != 'lm' else 'translation'} -c RECIPE`")
    if args.quiet:
        cfg.train.progress = False
    summary = train(cfg, resume=args.resume)  # a BERT-style encoder learns by masked-language modelling
    print_summary({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})


def _not_utf8(where: str, e: UnicodeDecodeError) -> LMForgeError:
    return LMForgeError(f"{where} is not UTF-8 text (byte {e.start + 1}: {e.object[e.start:e.start + 1]!r}); "
                        "convert it to UTF-8, e.g. with `iconv -f latin1 -t utf-8`")


def _stdin_lines():
    """Lines of standard input, decoded as UTF-8 (one clear error for anything else)."""
    for n, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(f"standard input (line {n})", e) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(str(path), e) from None


def _input_file(path: str, fix: str) -> Path:
    """``path`` as an existing file, else a one-line error naming it (shortened) and ``fix``: also
    for a text given where a file's name belongs (too long for a name, the system says)."""
    p = Path(path)
    try:
        found = p.is_file()
    except OSError:
        found = False
    if not found:
        shown = path if len(path) <= 60 else path[:57] + "..."
        raise LMForgeError(f"input file {shown!r} not found; {fix}")
    return p


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [_unescape(p) for p in args.prompt]
    if not sys.stdin.isatty():
        text = "".join(_stdin_lines())
        lines = [ln for ln in text.splitlines() if ln.strip()] if args.lines else [text]
        if lines and any(lines):
            return lines
    return [""]


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    from lmforge.data.sources import converter
    from lmforge.generate import generate_text
    from lmforge.train.checkpoint import load_model

    from lmforge.tasks.model import checkpoint_task
    from lmforge.tasks.registry import TASKS

    task = checkpoint_task(args.checkpoint)
    if task != "lm":
        command = TASKS[task].command if task in TASKS else "finetune"
        raise LMForgeError(f"{args.checkpoint} is a {task} checkpoint; use `lmforge {command}` with it")
    model, cfg, tokenizer = load_model(args.checkpoint, device=args.device)
    model = _cast_for_decoding(model, args.dtype)
    convert = converter(cfg.data.convert)  # prompts in the script the model was trained on
    prompts = [convert(p) if convert else p for p in _read_prompts(args)] * args.num_samples
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    stream = None
    shown = []  # the prompt goes out with the first token: a bad argument is reported before anything
    if len(prompts) == 1 and not args.no_stream:
        def stream(row: int, text: str) -> None:
            if not shown:
                sys.stdout.write(prompts[0])
                shown.append(True)
            sys.stdout.write(text)
            sys.stdout.flush()
    outputs = generate_text(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
        generator=generator, stream=stream, stop=[_unescape(x) for x in args.stop], max_lines=args.max_lines,
    )
    if stream is not None:
        sys.stdout.write(("" if shown else prompts[0]) + "\n")
        return
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1}/{len(prompts)}")
        print(prompt + out)


def _cast_for_decoding(model, dtype: str):
    """The model in the weight format decoding runs in: float32 as trained, bfloat16, or int8."""
    import torch

    if dtype == "int8":
        from lmforge.generate import quantize_int8

        return quantize_int8(model)
    return model.to(torch.bfloat16) if dtype == "bfloat16" else model


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.train.checkpoint import load_model
    from lmforge.evaluate import evaluate_checkpoint

    from lmforge.tasks.model import checkpoint_task

    if args.tasks is not None:
        return _eval_harness(args)
    if checkpoint_task(args.checkpoint) != "lm":  # a translation or summarization checkpoint
        return _eval_task(args)
    model, cfg, tokenizer = load_model(args.checkpoint, device=args.device)
    result = evaluate_checkpoint(model, cfg, tokenizer, text_file=args.file, split=args.split,
                                 batch_size=args.batch_size, max_batches=args.max_batches, device=args.device)
    print(json.dumps(result, indent=2))


def _eval_harness(args: argparse.Namespace) -> None:
    """``lmforge eval --tasks``: lm-evaluation-harness tasks on a language model (``lmforge.lm_eval_adapter``)."""
    if args.file is not None:
        raise LMForgeError("--file measures the loss on a text; with --tasks give a task's data with --data "
                           "TASK=FILE (lmforge_perplexity scores a text file the same way)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LMForgeError("lmforge eval --tasks needs lm-eval (EleutherAI's lm-evaluation-harness); install it "
                           "with: pip install 'lmforge[eval]'") from None
    from lm_eval.utils import make_table

    from lmforge.lm_eval_adapter import LMForgeLM, evaluate_tasks, results_path, save_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm = LMForgeLM(args.checkpoint, device=args.device, batch_size=args.batch_size, seed=args.seed)
    results = evaluate_tasks(lm, tasks, include_paths=args.include_path, data=args.data,
                             builtin=args.builtin_tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters,
                             log_samples=args.log_samples, seed=args.seed)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    for path in save_results(results, results_path(args.checkpoint, args.output)):
        print(f"wrote {path}", file=sys.stderr)


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.train.plot import plot_run

    print(plot_run(args.run_dir))


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.config import ModelConfig
    from lmforge.recipes import build_section, load_config, parse_overrides
    from lmforge.plan import Cluster, format_plan, make_plan

    cfg = load_config(args.config, overrides)
    if args.preset:  # the preset's model, not the recipe's, with --model.* overrides on top
        cfg.model = build_section(ModelConfig, {"preset": args.preset, **parse_overrides(overrides).get("model", {})},
                                  "model")
    note = None
    if cfg.model.vocab_size == 0:  # normally taken from the tokenizer: read it, or estimate it
        meta = Path(cfg.data.data_dir) / "meta.json"
        if meta.is_file():
            cfg.model.vocab_size = int(json.loads(meta.read_text(encoding="utf-8"))["vocab_size"])
        elif cfg.data.tokenizer == "bpe":
            cfg.model.vocab_size = cfg.data.vocab_size
        else:
            cfg.model.vocab_size = 256 + len(cfg.data.special_tokens) + 128
            note = (f"vocabulary size estimated as {cfg.model.vocab_size} (no {meta}); run `lmforge prepare` "
                    "or pass --model.vocab_size=N for the exact figure")
    memory = args.gpu_memory * 1e9 if args.gpu_memory else None
    plan = make_plan(cfg, Cluster(gpu=args.gpu, count=args.gpus, memory=memory), mfu=args.mfu)
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    print(format_plan(plan))
    if note:
        print(f"note: {note}")


def cmd_import(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.interop import import_checkpoint

    import_checkpoint(args.hf_dir, args.out_dir, drop_prefixes=tuple(args.drop_prefix))


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.interop import export_checkpoint
    from lmforge.interop.convert import DEFAULT_SHARD_SIZE

    base = str(args.checkpoint).rstrip("/")
    if args.format == "gguf":
        from lmforge.interop.gguf import export_gguf

        if args.max_shard_size is not None:
            raise LMForgeError("--max-shard-size applies to --format hf; a GGUF file is always one file")
        dtype = args.dtype or "f32"
        export_gguf(args.checkpoint, args.out_dir or f"{base}-{dtype}.gguf", dtype=dtype)
        return
    if args.dtype is not None:
        raise LMForgeError("--dtype applies to --format gguf; the Hugging Face export writes float32 weights "
                           "(add --format gguf, or leave out --dtype)")
    export_checkpoint(args.checkpoint, args.out_dir or f"{base}-hf",
                      max_shard_size=args.max_shard_size or DEFAULT_SHARD_SIZE)


# ---------------------------------------------------------------------------------------- tasks

def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    """Any task of the registry: its objective handed to the one trainer."""
    from lmforge.recipes import load_config
    from lmforge.tasks.registry import finetune, get_task

    spec = get_task(args.task)
    cfg = load_config(args.config or spec.recipe, overrides, base=spec.defaults())
    if cfg.task.name != spec.name:
        raise LMForgeError(f"recipe {args.config!r} is for task {cfg.task.name!r}, not {spec.name}; "
                           f"use a {spec.name} recipe (e.g. {spec.recipe})")
    if args.train is not None:
        cfg.task.train_file = args.train[0] if len(args.train) == 1 else args.train
    if args.valid is not None:
        cfg.task.valid_file = args.valid or None
    if args.init_from:
        cfg.train.init_from = args.init_from
    if args.quiet:
        cfg.train.progress = False
    summary = finetune(cfg, resume=args.resume)
    shown = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    valid = summary.get("valid")
    if isinstance(valid, dict):
        valid = valid.get("scores", valid)
        shown["valid"] = {k: v for k, v in valid.items() if isinstance(v, (int, float))}
    print_summary(shown)


def _text_inputs(args: argparse.Namespace) -> list[str]:
    """The TEXT arguments, else --file lines, else stdin lines (empty lines skipped)."""
    if args.text:
        texts = [_unescape(t) for t in args.text]
    elif args.file:
        p = _input_file(args.file, "give a text file with one input per line")
        texts = [ln for ln in _read_text(p).splitlines() if ln.strip()]
    elif not sys.stdin.isatty():
        texts = [ln.rstrip("\n") for ln in _stdin_lines() if ln.strip()]
    else:
        raise LMForgeError("no input; give the text as an argument, --file FILE, or pipe lines into stdin")
    if not texts or not any(t.strip() for t in texts):
        raise LMForgeError("the input is empty; give at least one non-empty text")
    return texts


def cmd_classify(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.sentiment import Classifier, print_predictions

    texts = _text_inputs(args)
    classifier = Classifier(args.checkpoint, device=args.device)
    for batch in _batches(texts, args.batch_size):
        print_predictions(batch, classifier(batch, args.batch_size), as_json=args.json)


def cmd_srl(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.srl import describe, describe_unseen, evaluate_sentences, load_labeller, sentence_from_text
    from lmforge.tasks.srl_data import format_score, read_conllu, write_conllu

    labeller, _ = load_labeller(args.checkpoint, device=args.device)
    if args.conllu:  # sentences with gold words: label them, and score them when they are annotated
        gold = read_conllu(args.conllu)
        if any(s.predicates for s in gold):
            result = evaluate_sentences(labeller, gold)
            if result["unseen_labels"]:
                print(f"note: {describe_unseen(result['unseen_labels'])}")
            print(format_score(result["gold_predicates"], "gold predicates:"))
            print(format_score(result["end_to_end"], "predicted predicates:"))
        predicted = labeller.label(gold, [s.predicates for s in gold] if args.gold_predicates else None)
    else:
        predicted = labeller.label([sentence_from_text(t, i + 1) for i, t in enumerate(_text_inputs(args))])
        for s in predicted:
            print(describe(s))
    if args.output:
        write_conllu(predicted, args.output)
        print(f"wrote {args.output}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LMForgeError(f"lmforge serve needs {e.name}; install it with: pip install 'lmforge[serve]'") from None
    from lmforge.serve.app import serve

    for name in ("max_batch", "max_queue", "max_tokens_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LMForgeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: serving on {args.host} without an API key; anyone who reaches it can use it "
              "(set --api-key or LMFORGE_API_KEY)", file=sys.stderr)
    serve(args.checkpoint, args.host, args.port, api_key=api_key, device=args.device, max_batch=args.max_batch,
          max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit)


def cmd_lora_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.head import merge_lora_checkpoint

    print(merge_lora_checkpoint(args.checkpoint, args.out_dir))


def cmd_average(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.train.average import average_checkpoints

    print(average_checkpoints(args.checkpoints, args.out_dir))


def cmd_sentiment_data(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.sentiment_data import write_sets

    for path, rows in write_sets(args.sdist, args.out_dir).values():
        print(f"{path}: {rows:,} sentences")


def cmd_pretrain_encoder(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.mlm import MaskedLanguageModel
    from lmforge.train.trainer import fit

    cfg = _load(args, overrides)
    if args.quiet:
        cfg.train.progress = False
    print_summary(fit(cfg, MaskedLanguageModel(), resume=args.resume))


def _decoding_from_args(task_cfg, args: argparse.Namespace):
    from lmforge.tasks.model import Decoding

    return Decoding.from_task(task_cfg, beam_size=1 if getattr(args, "greedy", False) else args.beam_size,
                              length_penalty=getattr(args, "length_penalty", None),
                              no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", None),
                              no_repeat_words={"yes": True, "no": False}.get(getattr(args, "no_repeat_words", None)),
                              source_words={"yes": True, "no": False}.get(getattr(args, "source_words", None)),
                              max_len_a=getattr(args, "max_len_a", None), max_len_b=getattr(args, "max_len_b", None))


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _task_inputs(args: argparse.Namespace, texts: list[str] | None, source_key: str):
    """Input texts: the arguments, else the file (lines, a JSONL key, or the whole file), else stdin lines."""
    if texts:
        return iter([_unescape(t) for t in texts])
    path = getattr(args, "file", None)
    if path:
        from lmforge.tasks.data import file_format, read_examples

        p = _input_file(path, "give a text file (one input per line), JSONL or TSV, or pipe the text into stdin "
                              "(with --whole, a file that is one document)")
        if getattr(args, "whole", False):
            return iter([_read_text(p)])
        if file_format(p) == "jsonl" or p.suffix.lower() == ".tsv":
            pairs, report = read_examples(p, source_key, None)
            if report.skipped:
                print(f"note: {report.summary()}", file=sys.stderr)
            return iter([s for s, _ in pairs])
        return (line for line in _read_text(p).splitlines() if line.strip())
    if sys.stdin.isatty():
        raise LMForgeError("no input; give the text as an argument, --file FILE, or pipe lines into stdin")
    return (line.rstrip("\n") for line in _stdin_lines() if line.strip())


def _run_task(args: argparse.Namespace, task: str, texts: list[str] | None) -> None:
    from lmforge.tasks.model import load_task_model

    task_model = load_task_model(args.checkpoint, expect=task, device=args.device)
    decoding = _decoding_from_args(task_model.cfg.task, args)
    n = 0
    for batch in _batches(_task_inputs(args, texts, task_model.cfg.task.source_key), args.batch_size):
        for out in task_model.generate(batch, decoding, batch_size=args.batch_size):
            print(out.replace("\n", " "), flush=True)
        n += len(batch)
    if n == 0:
        raise LMForgeError("the input is empty; give at least one non-empty line of text")


def cmd_translate(args: argparse.Namespace, overrides: list[str]) -> None:
    _run_task(args, "translation", args.text)


def cmd_summarize(args: argparse.Namespace, overrides: list[str]) -> None:
    _run_task(args, "summarization", None)


def _eval_task(args: argparse.Namespace) -> None:
    """``lmforge eval`` on a translation or summarization checkpoint: decode a test file, write
    the hypotheses and the scores."""
    from lmforge.tasks.model import Decoding, load_task_model
    from lmforge.tasks.seq2seq import evaluate_file

    task_model = load_task_model(args.checkpoint, device=args.device)
    test_file = args.file or task_model.cfg.task.valid_file
    if not test_file:
        raise LMForgeError("no test file; pass --file FILE (TSV or JSONL with the task's columns)")
    decoding = Decoding.from_task(task_model.cfg.task, beam_size=args.beam_size)
    result = evaluate_file(task_model, test_file, decoding,
                           say=lambda m: print(m, file=sys.stderr))
    out = Path(args.output or f"eval-{Path(test_file).stem}")
    out.mkdir(parents=True, exist_ok=True)
    hyps = result.pop("hypotheses")
    (out / "hypotheses.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
    result["checkpoint"] = str(args.checkpoint)
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"file": result["file"], "examples": result["examples"], **result["scores"],
                      "output": str(out)}, indent=2))
