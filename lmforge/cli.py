"""``lmforge <command>``: prepare, train, generate, eval, plot, finetune, translate, summarize.

Every command works with no arguments on the bundled Shakespeare corpus, and
every problem the user can fix is reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.errors import LMForgeError

FINETUNE_TASKS = ("translation", "summarization", "sentiment", "srl")  # lmforge.tasks.registry.FINETUNE_TASKS
DEFAULT_RECIPE = "shakespeare-char"
DEFAULT_RUN = "runs/shakespeare-char"


def _config_epilog() -> str:
    from lmforge.config import SECTIONS, field_help

    lines = ["recipe keys (override any with --section.key=value, e.g. --train.lr=3e-4):"]
    for section, cls in SECTIONS.items():
        lines.append(f"  {section}:")
        for key, text in field_help(cls).items():
            lines.append(f"    {section}.{key:<20} {text}")
    return "\n".join(lines)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=DEFAULT_RECIPE, metavar="RECIPE",
                   help=f"recipe name in configs/ or path to a YAML file (default: {DEFAULT_RECIPE})")


def _load(args: argparse.Namespace, overrides: list[str]):
    from lmforge.config import load_config

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
    shown = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process trains; one prints
        print(json.dumps(shown, indent=2, default=str))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [_unescape(p) for p in args.prompt]
    if not sys.stdin.isatty():
        text = sys.stdin.read()
        lines = [ln for ln in text.splitlines() if ln.strip()] if args.lines else [text]
        if lines and any(lines):
            return lines
    return [""]


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    from lmforge.generate import generate_text
    from lmforge.train.checkpoint import load_model

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for generate; see `lmforge generate --help`")
    from lmforge.tasks.model import checkpoint_task
    from lmforge.tasks.registry import TASKS

    task = checkpoint_task(args.checkpoint)
    if task != "lm":
        command = TASKS[task].command if task in TASKS else "finetune"
        raise LMForgeError(f"{args.checkpoint} is a {task} checkpoint; use `lmforge {command}` with it")
    model, cfg, tokenizer = load_model(args.checkpoint, device=args.device)
    model = _cast_for_decoding(model, args.dtype)
    prompts = _read_prompts(args) * args.num_samples
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    stream = None
    if len(prompts) == 1 and not args.no_stream:
        def stream(row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write(prompts[0])
    outputs = generate_text(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
        generator=generator, stream=stream,
    )
    if stream is not None:
        sys.stdout.write("\n")
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

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for eval; see `lmforge eval --help`")
    from lmforge.tasks.model import checkpoint_task

    if checkpoint_task(args.checkpoint) != "lm":  # a translation or summarization checkpoint
        return _eval_task(args)
    model, cfg, tokenizer = load_model(args.checkpoint, device=args.device)
    result = evaluate_checkpoint(model, cfg, tokenizer, text_file=args.file, split=args.split,
                                 batch_size=args.batch_size, max_batches=args.max_batches, device=args.device)
    print(json.dumps(result, indent=2))


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.train.plot import plot_run

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for plot; see `lmforge plot --help`")
    print(plot_run(args.run_dir))


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.config import ModelConfig, build_section, load_config, parse_overrides
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

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for import; see `lmforge import --help`")
    import_checkpoint(args.hf_dir, args.out_dir, drop_prefixes=tuple(args.drop_prefix))


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.interop import export_checkpoint

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for export; see `lmforge export --help`")
    out_dir = args.out_dir or f"{str(args.checkpoint).rstrip('/')}-hf"
    export_checkpoint(args.checkpoint, out_dir, max_shard_size=args.max_shard_size)


# ---------------------------------------------------------------------------------------- tasks (seq2seq)

def _check_overrides(command: str, overrides: list[str]) -> None:
    bad = [r for r in overrides if not r.lstrip("-").split("=", 1)[0].count(".")]
    if bad:
        raise LMForgeError(f"unrecognized argument {bad[0]!r} for {command}; recipe overrides look like "
                           "--task.beam_size=5, see `lmforge " + command + " --help`")


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    """Any task of the registry: its objective handed to the one trainer."""
    from lmforge.config import load_config
    from lmforge.tasks.registry import finetune, get_task

    _check_overrides("finetune", overrides)
    spec = get_task(args.task)
    cfg = load_config(args.config or spec.recipe, overrides, base=spec.defaults())
    if cfg.task.name != spec.name:
        raise LMForgeError(f"recipe {args.config!r} is for task {cfg.task.name!r}, not {spec.name}; "
                           f"use a {spec.name} recipe (e.g. {spec.recipe})")
    for flag, key in (("train", "train_file"), ("valid", "valid_file")):
        if getattr(args, flag) is not None:
            setattr(cfg.task, key, getattr(args, flag) or None)
    if args.init_from:
        cfg.train.init_from = args.init_from
    if args.quiet:
        cfg.train.progress = False
    summary = finetune(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process trains; one prints
        return
    shown = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    valid = summary.get("valid")
    if isinstance(valid, dict):
        valid = valid.get("scores", valid)
        shown["valid"] = {k: v for k, v in valid.items() if isinstance(v, (int, float))}
    print(json.dumps(shown, indent=2, default=str))


def _text_inputs(args: argparse.Namespace) -> list[str]:
    """The TEXT arguments, else --file lines, else stdin lines (empty lines skipped)."""
    if args.text:
        texts = [_unescape(t) for t in args.text]
    elif args.file:
        p = Path(args.file)
        if not p.is_file():
            raise LMForgeError(f"input file {p} not found; give a text file with one input per line")
        texts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif not sys.stdin.isatty():
        texts = [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    else:
        raise LMForgeError("no input; give the text as an argument, --file FILE, or pipe lines into stdin")
    if not texts or not any(t.strip() for t in texts):
        raise LMForgeError("the input is empty; give at least one non-empty text")
    return texts


def cmd_classify(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.sentiment import Classifier, print_predictions

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for classify; see `lmforge classify --help`")
    texts = _text_inputs(args)
    classifier = Classifier(args.checkpoint, device=args.device)
    for batch in _batches(texts, args.batch_size):
        print_predictions(batch, classifier(batch, args.batch_size), as_json=args.json)


def cmd_srl(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.srl import describe, evaluate_sentences, load_labeller, sentence_from_text
    from lmforge.tasks.srl_data import format_score, read_conllu, write_conllu

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for srl; see `lmforge srl --help`")
    labeller, _ = load_labeller(args.checkpoint, device=args.device)
    if args.conllu:  # sentences with gold words: label them, and score them when they are annotated
        gold = read_conllu(args.conllu)
        if any(s.predicates for s in gold):
            result = evaluate_sentences(labeller, gold)
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


def cmd_lora_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.head import merge_lora_checkpoint

    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for lora-merge; see `lmforge lora-merge --help`")
    print(merge_lora_checkpoint(args.checkpoint, args.out_dir))


def cmd_pretrain_encoder(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.tasks.mlm import MaskedLanguageModel
    from lmforge.train.trainer import fit

    _check_overrides("pretrain-encoder", overrides)
    cfg = _load(args, overrides)
    if args.quiet:
        cfg.train.progress = False
    print(json.dumps(fit(cfg, MaskedLanguageModel(), resume=args.resume), indent=2, default=str))


def _decoding_from_args(task_cfg, args: argparse.Namespace):
    from lmforge.tasks.model import Decoding

    return Decoding.from_task(task_cfg, beam_size=1 if getattr(args, "greedy", False) else args.beam_size,
                              length_penalty=getattr(args, "length_penalty", None),
                              no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", None),
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

        p = Path(path)
        if not p.is_file():
            raise LMForgeError(f"input file {p} not found; give a text file (one input per line) or JSONL")
        if getattr(args, "whole", False):
            return iter([p.read_text(encoding="utf-8")])
        if file_format(p) == "jsonl" or p.suffix.lower() == ".tsv":
            pairs, report = read_examples(p, source_key, None)
            if report.skipped:
                print(f"note: {report.summary()}", file=sys.stderr)
            return iter([s for s, _ in pairs])
        return (line for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if sys.stdin.isatty():
        raise LMForgeError("no input; give the text as an argument, --file FILE, or pipe lines into stdin")
    return (line.rstrip("\n") for line in sys.stdin if line.strip())


def _run_task(args: argparse.Namespace, overrides: list[str], task: str, texts: list[str] | None) -> None:
    from lmforge.tasks.model import load_task_model

    command = "translate" if task == "translation" else "summarize"
    if overrides:
        raise LMForgeError(f"unknown option {overrides[0]!r} for {command}; see `lmforge {command} --help`")
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
    _run_task(args, overrides, "translation", args.text)


def cmd_summarize(args: argparse.Namespace, overrides: list[str]) -> None:
    _run_task(args, overrides, "summarization", None)


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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Pre-train, evaluate and sample Transformer language models.",
        formatter_class=fmt,
        epilog="Start with `lmforge train` (trains the default recipe on the bundled Shakespeare plays), "
               "then `lmforge generate`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="train a tokenizer and write token shards for a corpus",
                       description="Train the recipe's tokenizer on its corpus and write memory-mapped token "
                                   "shards (train/val) and meta.json to data.data_dir.",
                       epilog=_config_epilog(), formatter_class=fmt)
    _add_recipe_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train from a recipe in configs/ (or a YAML path) with --section.key=value "
                                   "overrides. Prepares the data first when data.data_dir has none.",
                       epilog=_config_epilog(), formatter_class=fmt)
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in train.out_dir")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-encoder", help="pre-train a BERT-style encoder by masked-language modelling",
                       description="Pre-train a bidirectional encoder (model.arch=encoder) on the recipe's corpus: 15%% "
                                   "of the tokens chosen, 80%% masked / 10%% random / 10%% kept, loss on the chosen "
                                   "ones. Same data preparation, optimizer and checkpoints as train; the checkpoint "
                                   "starts `lmforge finetune sentiment|srl --init-from`.",
                       epilog=_config_epilog(), formatter_class=fmt)
    p.add_argument("--config", "-c", default="encoder-tiny", metavar="RECIPE",
                   help="recipe name in configs/ or path to a YAML file (default: encoder-tiny)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in train.out_dir")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain_encoder)

    p = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="Sample text from a checkpoint. The prompt comes from --prompt, or from "
                                   "stdin when it is piped (one prompt, or one per line with --lines).")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_RUN,
                   help=f"run directory or checkpoint directory (default: {DEFAULT_RUN})")
    p.add_argument("--prompt", "-p", action="append",
                   help="prompt text (repeat for a batch of prompts; \\n becomes a newline)")
    p.add_argument("--lines", action="store_true", help="treat each stdin line as its own prompt")
    p.add_argument("--max-new-tokens", "-n", type=int, default=300, help="tokens to generate (default: 300)")
    p.add_argument("--temperature", "-t", type=float, default=0.8,
                   help="divide logits by this before sampling; lower is more conservative (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens whose probabilities sum to p (nucleus)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise tokens already present (>1 discourages repeats; default: 1.0 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling (default: 1337)")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weights while decoding: float32 (default, exact), bfloat16, or int8 (CPU only: int8 "
                        "weights per output channel, ~2-4x faster on CPUs, where decoding is bound by memory reads)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint",
                       description="Loss (nats per token) and perplexity of a checkpoint on a text file, or on "
                                   "the val split of the data it was trained on, over sequential windows.")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_RUN,
                   help=f"run directory or checkpoint directory (default: {DEFAULT_RUN})")
    p.add_argument("--file", "-f", default=None, help="evaluate on this UTF-8 text file instead of a split")
    p.add_argument("--split", default="val", choices=["train", "val"], help="data split (default: val)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (default: 16)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--output", "-o", default=None,
                   help="translation/summarization checkpoints: folder for hypotheses.txt and scores.json "
                        "(default: eval-<test file name>); --file is then a TSV/JSONL test file")
    p.add_argument("--beam-size", type=int, default=None,
                   help="translation/summarization checkpoints: beam size (default: the checkpoint's task.beam_size)")
    p.set_defaults(func=cmd_eval)

    epilog = _config_epilog()
    p = sub.add_parser("finetune", help="train a translation or summarization model (encoder-decoder or decoder-only)",
                       description="Train a model on (source, target) examples from a TSV file with a header row or "
                                   "JSONL: translation (columns source, target; metric BLEU and chrF) or "
                                   "summarization (keys document, summary; metric ROUGE). The recipe picks the "
                                   "design: model.arch=seq2seq (encoder-decoder) or decoder (\"source <sep> target\" "
                                   "with the loss on the target only). Writes checkpoints, metrics.jsonl, loss.png, "
                                   "<metric>.png, valid.hyp.txt and report.json to train.out_dir.",
                       epilog=epilog, formatter_class=fmt)
    p.add_argument("task", choices=FINETUNE_TASKS,
                   help="the task (sentiment: TSV text/label; srl: CoNLL-U Plus as in Universal PropBank)")
    p.add_argument("--config", "-c", default=None, metavar="RECIPE",
                   help="recipe name in configs/ or YAML path (default: translation-bible / summarization-bbc)")
    p.add_argument("--train", default=None, metavar="FILE", help="training examples (sets task.train_file)")
    p.add_argument("--valid", default=None, metavar="FILE", help="validation examples (sets task.valid_file)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights and tokenizer: a language model from `lmforge train` "
                        "or a task model (sets train.init_from)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in train.out_dir")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    def decoding_args(p: argparse.ArgumentParser, batch: int) -> None:
        p.add_argument("--beam-size", "-b", type=int, default=None,
                       help="beam size (default: the checkpoint's task.beam_size)")
        p.add_argument("--greedy", action="store_true", help="greedy search (beam size 1)")
        p.add_argument("--length-penalty", type=float, default=None,
                       help="beam score = log-probability / length ** this (default: task.length_penalty)")
        p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                       help="never repeat an n-gram of this size (default: task.no_repeat_ngram_size)")
        p.add_argument("--max-len-a", type=float, default=None,
                       help="output limit = a * source tokens + b (default: task.max_len_a)")
        p.add_argument("--max-len-b", type=int, default=None, help="see --max-len-a (default: task.max_len_b)")
        p.add_argument("--batch-size", type=int, default=batch, help=f"inputs decoded together (default: {batch})")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")

    p = sub.add_parser("translate", help="translate text with a translation checkpoint",
                       description="Translate each TEXT argument, each line of --file, or each line piped into stdin "
                                   "(read and printed in batches, one output line per input line).")
    p.add_argument("checkpoint", help="run directory or checkpoint directory from `lmforge finetune translation`")
    p.add_argument("text", nargs="*", help="texts to translate (default: --file, or stdin lines)")
    p.add_argument("--file", "-f", default=None, help="one input per line (or a TSV/JSONL with the source column)")
    decoding_args(p, 32)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("summarize", help="summarize documents with a summarization checkpoint",
                       description="Summarize each line of FILE (or, for a .jsonl/.tsv file, each document in it; "
                                   "with --whole, the whole file as one document), or each line piped into stdin.")
    p.add_argument("checkpoint", help="run directory or checkpoint directory from `lmforge finetune summarization`")
    p.add_argument("file", nargs="?", default=None, help="input file (default: stdin, one document per line)")
    p.add_argument("--whole", action="store_true", help="the whole file is one document")
    decoding_args(p, 16)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("classify", help="label texts with a sentiment (text classification) checkpoint",
                       description="Print the label and the probability of every label for each TEXT argument, "
                                   "each line of --file, or each line piped into stdin: label<TAB>probabilities<TAB>text "
                                   "(or one JSON object per line with --json).")
    p.add_argument("checkpoint", help="run directory or checkpoint directory from `lmforge finetune sentiment`")
    p.add_argument("text", nargs="*", help="texts to label (default: --file, or stdin lines)")
    p.add_argument("--file", "-f", default=None, help="one text per line")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=64, help="texts run together (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("srl", help="semantic roles: predicates, senses and arguments of sentences",
                       description="Find each predicate of each sentence (TEXT arguments, --file lines or stdin lines), "
                                   "its sense and its arguments (label and head word), and print them; --output writes "
                                   "CoNLL-U Plus. With --conllu, label the sentences of a CoNLL-U Plus file (and score "
                                   "them with gold and with predicted predicates when it is annotated).")
    p.add_argument("checkpoint", help="run directory or checkpoint directory from `lmforge finetune srl`")
    p.add_argument("text", nargs="*", help="sentences (default: --file, or stdin lines)")
    p.add_argument("--file", "-f", default=None, help="one sentence per line")
    p.add_argument("--conllu", default=None, metavar="FILE", help="label (and score) the sentences of this CoNLL-U Plus file")
    p.add_argument("--gold-predicates", action="store_true",
                   help="with --conllu: write roles for the file's own predicates instead of predicted ones")
    p.add_argument("--output", "-o", default=None, help="write the predictions as CoNLL-U Plus to this file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.set_defaults(func=cmd_srl)

    p = sub.add_parser("lora-merge", help="fold a LoRA task checkpoint's adapters into its weights",
                       description="Add each adapter's low-rank update (alpha/r * B A) to its weight and write a plain "
                                   "checkpoint (task.tuning=full) with the same outputs to OUT_DIR/checkpoints/.")
    p.add_argument("checkpoint", help="run or checkpoint directory from `lmforge finetune sentiment|srl --task.tuning=lora`")
    p.add_argument("out_dir", help="run directory for the merged checkpoint")
    p.set_defaults(func=cmd_lora_merge)

    p = sub.add_parser("plot", help="PNG of a run's train/val loss curves",
                       description="Write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl and print its path.")
    p.add_argument("run_dir", nargs="?", default=DEFAULT_RUN, help=f"run directory (default: {DEFAULT_RUN})")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU and time per step on a cluster",
                       description="For a recipe (or --preset) on a cluster: parameters, training FLOPs per token, "
                                   "memory per GPU for DDP and FSDP (weights, gradients, AdamW state, activations "
                                   "with and without activation checkpointing), the largest micro-batch that fits, "
                                   "and the time per step at a given MFU. Arithmetic only: nothing is built or run.",
                       epilog=_config_epilog(), formatter_class=fmt)
    _add_recipe_args(p)
    p.add_argument("--preset", default=None, help="plan this model preset instead of the recipe's model "
                                                  "(cpu-demo, small, gpt2-124m, gpt2-350m, llama-1b, ...)")
    p.add_argument("--gpu", default="H100", help="GPU type: H100, H100 PCIe, H100 NVL, H200, A100, or any name "
                                                 "with --gpu-memory (default: H100)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs, all nodes together (default: 8)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory per GPU in GB (default: the GPU type's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to expect (default: 0.4)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("import", help="turn a Hugging Face checkpoint (gpt2, llama, bert, marian) into an lmforge checkpoint",
                       description="Convert a local Hugging Face checkpoint directory (config.json, model.safetensors "
                                   "or pytorch_model.bin, possibly sharded, and its tokenizer) into an lmforge "
                                   "checkpoint that generate, eval and train --train.init_from accept. Maps GPT-2, "
                                   "Llama, BERT and Marian (a translation checkpoint for translate and finetune; its "
                                   "tokenizer must be given as tokenizer.json) exactly; anything else is refused with "
                                   "the reason. A .bin file is read with torch.load(weights_only=True): tensors only, "
                                   "never code.")
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory")
    p.add_argument("out_dir", help="new lmforge checkpoint directory (must not exist or be empty)")
    p.add_argument("--drop-prefix", action="append", default=[], metavar="PREFIX",
                   help="leave out tensors whose names start with PREFIX (e.g. cls. for BERT's pre-training heads); "
                        "repeatable. Without it every tensor must find its place")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write an lmforge checkpoint in the Hugging Face format",
                       description="Write config.json, model.safetensors (sharded past --max-shard-size, with "
                                   "model.safetensors.index.json) and the tokenizer files, so that transformers' "
                                   "Auto classes load the model and give the same outputs. GPT-2-style models export "
                                   "as gpt2, Llama-style as llama, encoders as bert, Marian-style encoder-decoders as "
                                   "marian; other settings are refused.")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_RUN,
                   help=f"lmforge run directory or checkpoint directory (default: {DEFAULT_RUN})")
    p.add_argument("out_dir", nargs="?", default=None,
                   help="new output directory, which must not exist or be empty (default: CHECKPOINT-hf)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file before the weights are split into shards (default: 5GB)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(0)
    if args.command in ("prepare", "train"):
        bad = [r for r in rest if not r.lstrip("-").split("=", 1)[0].count(".")]
        if bad:
            parser.error(f"unrecognized argument {bad[0]!r}; recipe overrides look like --train.lr=3e-4")
    try:
        args.func(args, rest)
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
