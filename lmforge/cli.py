"""``lmforge <command>``: prepare, train, generate, eval, plot, finetune, translate, summarize, serve.

Every command works with no arguments on the bundled Shakespeare corpus, and
every problem the user can fix is reported as one line on stderr with exit code 2.

The commands are one table (:data:`COMMANDS`): a row names a command, its help, the function that
runs it (in :mod:`lmforge.commands`) and the arguments it takes, most of them shared groups built
by the helpers below. Nothing heavy is imported here: ``lmforge --help`` builds the parser only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

from lmforge import commands as c
from lmforge.errors import LMForgeError
from lmforge.tasks.registry import FINETUNE_TASKS  # a table of names: cheap to import

DEFAULT_RECIPE = "shakespeare-char"
DEFAULT_RUN = "runs/shakespeare-char"


# ---------------------------------------------------------------------------------------- arguments

class Arg(NamedTuple):
    """One ``add_argument`` call, kept until the parser is built."""
    flags: tuple[str, ...]
    kwargs: dict


def arg(*flags: str, **kwargs) -> Arg:
    return Arg(flags, kwargs)


def recipe(default: str | None = DEFAULT_RECIPE, shown: str | None = None) -> Arg:
    """``--config/-c RECIPE``: a recipe name in configs/ or a YAML path."""
    return arg("--config", "-c", default=default, metavar="RECIPE",
               help=f"recipe name in configs/ or path to a YAML file (default: {shown or default})")


def checkpoint(task: str | None = None, *, dest: str = "checkpoint",
               what: str = "run directory or checkpoint directory") -> Arg:
    """The positional checkpoint: required for a finetune ``task``'s, else optional with the default run."""
    if task:
        return arg(dest, help=f"{what} from `lmforge finetune {task}`")
    return arg(dest, nargs="?", default=DEFAULT_RUN, help=f"{what} (default: {DEFAULT_RUN})")


def text_inputs(what: str, per_line: str) -> tuple[Arg, ...]:
    """TEXT... arguments, else ``--file`` lines, else stdin lines (read by ``commands._text_inputs``)."""
    return (arg("text", nargs="*", help=f"{what} (default: --file, or stdin lines)"),
            arg("--file", "-f", default=None, help=per_line))


def batch_size(default: int, what: str) -> Arg:
    return arg("--batch-size", type=int, default=default, help=f"{what} (default: {default})")


RESUME = arg("--resume", nargs="?", const=True, default=False, metavar="CKPT",
             help="continue exactly from the latest checkpoint in train.out_dir, or from the one named: a step "
                  "number (e.g. --resume 500) or a checkpoint directory of this run")
QUIET = arg("--quiet", "-q", action="store_true", help="no progress bar")
DEVICE = arg("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")

FINETUNE = (
    arg("--train", default=None, nargs="+", metavar="FILE",
        help="training examples (sets task.train_file); sentiment and srl read several files as one set"),
    arg("--valid", default=None, metavar="FILE", help="validation examples (sets task.valid_file)"),
    arg("--init-from", default=None, metavar="CKPT",
        help="start from this checkpoint's weights and tokenizer: a language model from `lmforge train` "
             "or a task model (sets train.init_from)"),
)

SAMPLING = (
    arg("--prompt", "-p", action="append", help="prompt text (repeat for a batch of prompts; \\n becomes a newline)"),
    arg("--lines", action="store_true", help="treat each stdin line as its own prompt"),
    arg("--max-new-tokens", "-n", type=int, default=300, help="tokens to generate (default: 300)"),
    arg("--stop", action="append", default=[], metavar="STRING",
        help="end the text before this string (repeatable; \\n is a newline: --stop '\\n\\n' stops at a blank line)"),
    arg("--max-lines", type=int, default=None, metavar="N",
        help="end the text at the N-th line break it generates (the prompt's own line breaks do not count)"),
    arg("--temperature", "-t", type=float, default=0.8,
        help="divide logits by this before sampling; lower is more conservative (default: 0.8)"),
    arg("--top-k", type=int, default=None, help="sample only among the k most likely tokens"),
    arg("--top-p", type=float, default=None,
        help="sample only among the most likely tokens whose probabilities sum to p (nucleus)"),
    arg("--repetition-penalty", type=float, default=1.0,
        help="penalise tokens already present (>1 discourages repeats; default: 1.0 = off)"),
    arg("--greedy", action="store_true", help="always take the most likely token"),
    arg("--num-samples", type=int, default=1, help="samples per prompt (default: 1)"),
    arg("--seed", type=int, default=1337, help="random seed for sampling (default: 1337)"),
    arg("--no-stream", action="store_true", help="print when done instead of token by token"),
    arg("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
        help="weights while decoding: float32 (default, exact), bfloat16, or int8 (CPU only: int8 weights per "
             "output channel, ~2-4x faster on CPUs, where decoding is bound by memory reads)"),
)


def decoding(batch: int) -> tuple[Arg, ...]:
    """Beam search settings of translate and summarize; each defaults to the checkpoint's task.* value."""
    return (
        arg("--beam-size", "-b", type=int, default=None, help="beam size (default: the checkpoint's task.beam_size)"),
        arg("--greedy", action="store_true", help="greedy search (beam size 1)"),
        arg("--length-penalty", type=float, default=None,
            help="beam score = log-probability / length ** this (default: task.length_penalty)"),
        arg("--no-repeat-ngram-size", type=int, default=None,
            help="never repeat an n-gram of this size (default: task.no_repeat_ngram_size)"),
        arg("--no-repeat-words", choices=["yes", "no"], default=None,
            help="never begin two words with the same token (default: task.no_repeat_words)"),
        arg("--source-words", choices=["yes", "no"], default=None,
            help="write a word of several pieces only as the source has it (default: task.source_words)"),
        arg("--max-len-a", type=float, default=None,
            help="output limit = a * source tokens + b (default: task.max_len_a)"),
        arg("--max-len-b", type=int, default=None, help="see --max-len-a (default: task.max_len_b)"),
        batch_size(batch, "inputs decoded together"),
        DEVICE,
    )


# ---------------------------------------------------------------------------------------- the table

class Command(NamedTuple):
    """One row of the table: ``lmforge NAME`` runs ``run(args, overrides)``."""
    name: str
    help: str
    description: str
    run: Callable[[argparse.Namespace, list[str]], None]
    #: Args, and tuples of them (the shared groups above), in --help order
    args: tuple = ()
    #: what may follow the options. None: nothing (a leftover is an unknown option). Otherwise
    #: --section.key=value recipe overrides, and --help lists the recipe keys; anything else is
    #: refused by "argparse" (usage line and error) or "lmforge" (one `error:` line), or is left
    #: to the recipe loader ("config")
    overrides: str | None = None


COMMANDS: tuple[Command, ...] = (
    Command("prepare", "train a tokenizer and write token shards for a corpus",
            "Train the recipe's tokenizer on its corpus and write memory-mapped token shards (train/val) and "
            "meta.json to data.data_dir.",
            c.cmd_prepare, (recipe(), QUIET), overrides="argparse"),
    Command("train", "train a model from a YAML recipe",
            "Train from a recipe in configs/ (or a YAML path) with --section.key=value overrides. Prepares the "
            "data first when data.data_dir has none.",
            c.cmd_train, (recipe(), RESUME, QUIET), overrides="argparse"),
    Command("pretrain-encoder", "pre-train a BERT-style encoder by masked-language modelling",
            "Pre-train a bidirectional encoder (model.arch=encoder) on the recipe's corpus: 15% of the tokens "
            "chosen, 80% masked / 10% random / 10% kept, loss on the chosen ones. Same data preparation, optimizer "
            "and checkpoints as train; the checkpoint starts `lmforge finetune sentiment|srl --init-from`.",
            c.cmd_pretrain_encoder, (recipe("encoder-tiny"), RESUME, QUIET), overrides="lmforge"),
    Command("generate", "sample text from a checkpoint",
            "Sample text from a checkpoint. The prompt comes from --prompt, or from stdin when it is piped (one "
            "prompt, or one per line with --lines).",
            c.cmd_generate, (checkpoint(), SAMPLING, DEVICE)),
    Command("eval", "loss and perplexity of a checkpoint, or lm-evaluation-harness tasks",
            "Loss (nats per token) and perplexity of a checkpoint on a text file, or on the val split of the data "
            "it was trained on, over sequential windows. With --tasks, run lm-evaluation-harness tasks (pip "
            "install 'lmforge[eval]') on a language model: lmforge's own (lmforge_choice, lmforge_cloze, "
            "lmforge_perplexity, on local files given with --data) and task YAMLs of your own (--include-path); "
            "prints lm-eval's table and writes the results as JSON to RUN/lm-eval/. Nothing is downloaded.",
            c.cmd_eval, (
                checkpoint(),
                arg("--file", "-f", default=None, help="evaluate on this UTF-8 text file instead of a split"),
                arg("--split", default="val", choices=["train", "val"], help="data split (default: val)"),
                batch_size(16, "windows (with --tasks: requests) per batch"),
                arg("--max-batches", type=int, default=None, help="stop after this many batches (default: all)"),
                DEVICE,
                arg("--output", "-o", default=None,
                    help="translation/summarization checkpoints: folder for hypotheses.txt and scores.json "
                         "(default: eval-<test file name>); --file is then a TSV/JSONL test file. With --tasks: "
                         "the results file (.json) or its folder (default: RUN/lm-eval/)"),
                arg("--beam-size", type=int, default=None, help="translation/summarization checkpoints: beam "
                                                                "size (default: the checkpoint's task.beam_size)"),
                arg("--tasks", default=None, metavar="NAME[,NAME]",
                    help="lm-evaluation-harness tasks to run (lmforge_choice, lmforge_cloze, lmforge_perplexity, "
                         "or your own with --include-path)"),
                arg("--data", action="append", default=[], metavar="[TASK=]FILE",
                    help="the local file an lmforge_* task reads (repeatable; FILE alone: every lmforge_* task "
                         "named). lmforge_choice: JSONL {question, choices, label}; lmforge_cloze: text, one "
                         "passage a line; lmforge_perplexity: text (one document) or JSONL (\"text\")"),
                arg("--include-path", action="append", default=[], metavar="DIR",
                    help="a folder of task YAMLs of your own, or one YAML file (repeatable); their datasets "
                         "must be local (dataset_path: json with data_files)"),
                arg("--builtin-tasks", action="store_true",
                    help="also index lm-eval's built-in tasks (slow); their datasets must already be in the "
                         "local Hugging Face cache"),
                arg("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)"),
                arg("--limit", type=float, default=None,
                    help="at most this many examples per task (a fraction below 1: that share of them)"),
                arg("--gen-kwargs", default=None, metavar="K=V[,K=V]",
                    help="generation settings for generate_until tasks, e.g. max_gen_toks=64,do_sample=true,"
                         "temperature=0.7"),
                arg("--log-samples", action="store_true",
                    help="also write every example's prompt and scores (samples_<task>_*.jsonl beside the results)"),
                arg("--bootstrap-iters", type=int, default=100000,
                    help="bootstrap resamples for the standard errors (default: 100000, as lm-eval; 0: none)"),
                arg("--seed", type=int, default=1234, help="seed for few-shot sampling and decoding (default: 1234)"),
            )),
    Command("finetune", "train a translation or summarization model (encoder-decoder or decoder-only)",
            "Train a model on (source, target) examples from a TSV file with a header row or JSONL: translation "
            "(columns source, target; metric BLEU and chrF) or summarization (keys document, summary; metric "
            "ROUGE). The recipe picks the design: model.arch=seq2seq (encoder-decoder) or decoder (\"source <sep> "
            "target\" with the loss on the target only). Writes checkpoints, metrics.jsonl, loss.png, "
            "<metric>.png, valid.hyp.txt and report.json to train.out_dir.",
            c.cmd_finetune, (
                arg("task", choices=FINETUNE_TASKS,
                    help="the task (sentiment: TSV text/label; srl: CoNLL-U Plus as in Universal PropBank)"),
                recipe(None, shown="translation-bible / summarization-bbc"), FINETUNE, RESUME, QUIET,
            ), overrides="lmforge"),
    Command("translate", "translate text with a translation checkpoint",
            "Translate each TEXT argument, each line of --file, or each line piped into stdin (read and printed "
            "in batches, one output line per input line).",
            c.cmd_translate, (checkpoint("translation"),
                              text_inputs("texts to translate", "one input per line (or a TSV/JSONL with the "
                                                                "source column)"), decoding(32))),
    Command("summarize", "summarize documents with a summarization checkpoint",
            "Summarize each line of FILE (or, for a .jsonl/.tsv file, each document in it; with --whole, the "
            "whole file as one document), or each line piped into stdin.",
            c.cmd_summarize, (checkpoint("summarization"),
                              arg("file", nargs="?", default=None,
                                  help="input file (default: stdin, one document per line)"),
                              arg("--whole", action="store_true", help="the whole file is one document"),
                              decoding(16))),
    Command("classify", "label texts with a sentiment (text classification) checkpoint",
            "Print the label and the probability of every label for each TEXT argument, each line of --file, or "
            "each line piped into stdin: label<TAB>probabilities<TAB>text (or one JSON object per line with "
            "--json).",
            c.cmd_classify, (checkpoint("sentiment"), text_inputs("texts to label", "one text per line"),
                             arg("--json", action="store_true", help="one JSON object per line"),
                             batch_size(64, "texts run together"), DEVICE)),
    Command("srl", "semantic roles: predicates, senses and arguments of sentences",
            "Find each predicate of each sentence (TEXT arguments, --file lines or stdin lines), its sense and its "
            "arguments (label and head word), and print them; --output writes CoNLL-U Plus. With --conllu, label "
            "the sentences of a CoNLL-U Plus file (and score them with gold and with predicted predicates when "
            "it is annotated).",
            c.cmd_srl, (
                checkpoint("srl"), text_inputs("sentences", "one sentence per line"),
                arg("--conllu", default=None, metavar="FILE",
                    help="label (and score) the sentences of this CoNLL-U Plus file"),
                arg("--gold-predicates", action="store_true",
                    help="with --conllu: write roles for the file's own predicates instead of predicted ones"),
                arg("--output", "-o", default=None, help="write the predictions as CoNLL-U Plus to this file"),
                DEVICE,
            )),
    Command("serve", "serve a checkpoint over HTTP: an OpenAI-compatible API and a playground page",
            "Serve a checkpoint with FastAPI + uvicorn: a language model answers /v1/completions and "
            "/v1/chat/completions (OpenAI's wire format, streaming, continuous batching), a translation or "
            "summarization checkpoint /v1/completions, a sentiment checkpoint /v1/classify, an SRL checkpoint "
            "/v1/srl; GET /v1/models, /health, and a playground page at /. Needs `pip install 'lmforge[serve]'`. "
            "SIGINT/SIGTERM stop taking requests, finish the running ones, then exit.",
            c.cmd_serve, (
                checkpoint(what="run directory or checkpoint directory (any task)"),
                arg("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)"),
                arg("--port", type=int, default=8000, help="port (default: 8000)"),
                arg("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: the "
                                                    "LMFORGE_API_KEY environment variable, else no key)"),
                arg("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)"),
                arg("--max-queue", type=int, default=256,
                    help="requests waiting for a slot before new ones get 429 (default: 256)"),
                arg("--max-tokens-limit", type=int, default=None,
                    help="largest max_tokens a request may ask for (default: the model's context length)"),
                DEVICE,
            )),
    Command("sentiment-data", "the rated tweets and news-editorial sentences of the vaderSentiment package as TSV",
            "Read the human-rated tweets and New York Times editorial sentences from the vaderSentiment source "
            "package (pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR) and write "
            "OUT_DIR/tweets.tsv and OUT_DIR/nyt.tsv (text, label: positive above a mean rating of 0, negative "
            "below), more training data for `lmforge finetune sentiment --train`. Its movie and product-review "
            "sentences are never read.",
            c.cmd_sentiment_data, (arg("sdist", help="vaderSentiment-3.3.2.tar.gz"),
                                   arg("out_dir", help="folder for tweets.tsv and nyt.tsv"))),
    Command("lora-merge", "fold a LoRA task checkpoint's adapters into its weights",
            "Add each adapter's low-rank update (alpha/r * B A) to its weight and write a plain checkpoint "
            "(task.tuning=full) with the same outputs to OUT_DIR/checkpoints/.",
            c.cmd_lora_merge, (checkpoint("sentiment|srl --task.tuning=lora", what="run or checkpoint directory"),
                               arg("out_dir", help="run directory for the merged checkpoint"))),
    Command("average", "one checkpoint whose weights are the mean of several of the same model",
            "Average the weights of checkpoints of one model (in float64) and write them as a new checkpoint in "
            "OUT_DIR/checkpoints/: the last checkpoints of a run, or runs fine-tuned from the same pretrained "
            "weights with different seeds (a model soup). They must share the model settings, tokenizer and labels.",
            c.cmd_average, (arg("checkpoints", nargs="+", metavar="CKPT",
                                help="run directories (their latest checkpoint) or checkpoint directories"),
                            arg("out_dir", help="run directory for the averaged checkpoint"))),
    Command("plot", "PNG of a run's train/val loss curves",
            "Write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl and print its path.",
            c.cmd_plot, (checkpoint(dest="run_dir", what="run directory"),)),
    Command("plan", "parameters, FLOPs, memory per GPU and time per step on a cluster",
            "For a recipe (or --preset) on a cluster: parameters, training FLOPs per token, memory per GPU for DDP "
            "and FSDP (weights, gradients, AdamW state, activations with and without activation checkpointing), "
            "the largest micro-batch that fits, and the time per step at a given MFU. Arithmetic only: nothing "
            "is built or run.",
            c.cmd_plan, (
                recipe(),
                arg("--preset", default=None, help="plan this model preset instead of the recipe's model "
                                                   "(cpu-demo, small, gpt2-124m, gpt2-350m, llama-1b, ...)"),
                arg("--gpu", default="H100", help="GPU type: H100, H100 PCIe, H100 NVL, H200, A100, or any name "
                                                  "with --gpu-memory (default: H100)"),
                arg("--gpus", type=int, default=8, help="number of GPUs, all nodes together (default: 8)"),
                arg("--gpu-memory", type=float, default=None, metavar="GB",
                    help="memory per GPU in GB (default: the GPU type's)"),
                arg("--mfu", type=float, default=0.4, help="model FLOPs utilisation to expect (default: 0.4)"),
                arg("--json", action="store_true", help="print the figures as JSON"),
            ), overrides="config"),
    Command("import", "turn a Hugging Face checkpoint (gpt2, llama, bert, mpnet, marian) into an lmforge checkpoint",
            "Convert a local Hugging Face checkpoint directory (config.json, model.safetensors or "
            "pytorch_model.bin, possibly sharded, and its tokenizer) into an lmforge checkpoint that generate, "
            "eval and train --train.init_from accept. Maps GPT-2, Llama, BERT, MPNet and Marian (a translation "
            "checkpoint for translate and finetune; its tokenizer must be given as tokenizer.json) exactly; "
            "anything else is refused with the reason. A .bin file is read with torch.load(weights_only=True): "
            "tensors only, never code.",
            c.cmd_import, (
                arg("hf_dir", help="Hugging Face checkpoint directory"),
                arg("out_dir", help="new lmforge checkpoint directory (must not exist or be empty)"),
                arg("--drop-prefix", action="append", default=[], metavar="PREFIX",
                    help="leave out tensors whose names start with PREFIX (e.g. cls. for BERT's pre-training "
                         "heads); repeatable. Without it every tensor must find its place"),
            )),
    Command("export", "write an lmforge checkpoint in the Hugging Face format, or as a GGUF file for llama.cpp",
            "Write config.json, model.safetensors (sharded past --max-shard-size, with "
            "model.safetensors.index.json) and the tokenizer files, so that transformers' Auto classes load the "
            "model and give the same outputs. GPT-2-style models export as gpt2, Llama-style as llama, encoders "
            "as bert, Marian-style encoder-decoders as marian; other settings are refused. With --format gguf, "
            "write one .gguf file (weights in --dtype, byte-level BPE tokenizer) that llama.cpp runs: "
            "llama-cli -m OUT.gguf -p PROMPT; GPT-2- and Llama-style decoders only.",
            c.cmd_export, (
                checkpoint(what="lmforge run directory or checkpoint directory"),
                arg("out_dir", nargs="?", default=None, metavar="OUT",
                    help="new output directory, which must not exist or be empty (default: CHECKPOINT-hf); with "
                         "--format gguf a new file (default: CHECKPOINT-DTYPE.gguf)"),
                arg("--format", default="hf", choices=("hf", "gguf"),
                    help="hf: a Hugging Face checkpoint directory; gguf: one GGUF file for llama.cpp (default: hf)"),
                arg("--dtype", default=None, choices=("f32", "f16", "q8_0"),
                    help="--format gguf: type of the weight matrices; norms, biases and positions stay f32 "
                         "(default: f32)"),
                arg("--max-shard-size", default=None,
                    help="--format hf: largest safetensors file before the weights are split into shards "
                         "(default: 5GB)"),
            )),
)


# ---------------------------------------------------------------------------------------- parser and main

def _config_epilog() -> str:
    from lmforge.config import SECTIONS
    from lmforge.recipes import field_help

    lines = ["recipe keys (override any with --section.key=value, e.g. --train.lr=3e-4):"]
    for section, cls in SECTIONS.items():
        lines.append(f"  {section}:")
        for key, text in field_help(cls).items():
            lines.append(f"    {section}.{key:<20} {text}")
    return "\n".join(lines)


def _flat(args) -> list[Arg]:
    return [args] if isinstance(args, Arg) else [a for group in args for a in _flat(group)]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Pre-train, evaluate and sample Transformer language models.",
        formatter_class=fmt,
        epilog="Start with `lmforge train` (trains the default recipe on the bundled Shakespeare plays), "
               "then `lmforge generate`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    epilog = _config_epilog()
    for cmd in COMMANDS:
        recipe_keys = {"epilog": epilog, "formatter_class": fmt} if cmd.overrides else {}
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, **recipe_keys)
        for a in _flat(cmd.args):
            p.add_argument(*a.flags, **a.kwargs)
    return parser


def _check_rest(parser: argparse.ArgumentParser, cmd: Command, rest: list[str]) -> None:
    """Refuse what is left after the options unless the command takes it (see Command.overrides)."""
    if cmd.overrides is None:
        if rest:
            raise LMForgeError(f"unknown option {rest[0]!r} for {cmd.name}; see `lmforge {cmd.name} --help`")
        return
    bad = [r for r in rest if not r.lstrip("-").split("=", 1)[0].count(".")]
    if not bad or cmd.overrides == "config":
        return
    if cmd.overrides == "argparse":
        parser.error(f"unrecognized argument {bad[0]!r}; recipe overrides look like --train.lr=3e-4")
    raise LMForgeError(f"unrecognized argument {bad[0]!r} for {cmd.name}; recipe overrides look like "
                       f"--task.beam_size=5, see `lmforge {cmd.name} --help`")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(0)
    cmd = next(cmd for cmd in COMMANDS if cmd.name == args.command)
    try:
        _check_rest(parser, cmd, rest)
        cmd.run(args, rest)
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
