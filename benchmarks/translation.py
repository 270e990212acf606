"""Translation on the Bible (English -> Spanish): encoder-decoder vs decoder-only, greedy vs beam 4.

    python benchmarks/translation.py [--minutes 8] [--size small|recipe] [--threads 1] [--only seq2seq|decoder] [--parallel]

Both designs train on ../shared/data/mt/bible_en_es.train.tsv (30,469 verse pairs) with the same
joint BPE tokenizer (4,096 tokens, trained once into data/bible-en-es) and the same CPU budget:

1. seq2seq: recipe translation-bible (3 + 3 blocks, sinusoidal positions, shared embedding);
   decoder: recipe translation-bible-decoder (6 blocks, "source <sep> target", loss on the target
   only). About the same number of parameters. --size small (the default) fits both to a few
   minutes of CPU: 128 wide instead of 256 (feed-forward 512, about three times the tokens per
   second), batches of 1,024 tokens instead of 4,096 (four times the optimizer steps), peak
   learning rate 3e-3, no dropout. --size recipe runs the recipes unchanged.
2. Every design trains for the same wall time (train.max_minutes). A few timed training steps
   estimate how many steps fit, and the cosine schedule decays over that many (then stays at
   train.min_lr if time is left). Evaluation happens only at the end, so the budget is training
   time. On a machine shared with other jobs the speed drifts during a run: compare the steps
   and tokens per second as well as the scores.
3. The 211 validation verses (Esther and Titus) are decoded greedily, with beam search (length
   penalty 1.0), and with beam search that never repeats a 3-gram (--no-repeat); BLEU and chrF
   are sacrebleu's corpus scores. Reported: training tokens per second (real tokens, source +
   target), decoding sentences per second and the mean output length in words. --decode-only
   scores the runs of an earlier call again without training.

Prints a table, writes benchmarks/results/translation.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, print_table, write_result  # noqa: E402

RECIPES = {"seq2seq": "translation-bible", "decoder": "translation-bible-decoder"}
#: small: settings for a few minutes of CPU (a narrower model, more and smaller steps, a higher peak
#: learning rate, no dropout); recipe: the recipes unchanged
SIZES = {"small": ["--model.d_model=128", "--model.d_ff=512", "--task.batch_tokens=1024", "--train.lr=3e-3",
                   "--train.warmup_steps=50", "--model.dropout=0"], "recipe": []}


def seconds_per_step(cfg, steps: int = 8) -> float:
    """Median wall time of a training step (after one warm-up step) on real batches."""
    import torch

    from lmforge.tasks.data import TokenBatcher
    from lmforge.tasks.format import SpecialIds, TaskFormat
    import functools

    from lmforge.model import build_model
    from lmforge.tasks.seq2seq import TaskData, pair_count, pair_loss, resolve_tokenizer
    from lmforge.train.trainer import accumulate_gradients
    from lmforge.train.optim import build_optimizer

    from lmforge.tasks.model import warm_start_config
    from lmforge.train import checkpoint as ckpt_io

    start = ckpt_io.latest_checkpoint(cfg.train.init_from) if cfg.train.init_from else None
    tokenizer = resolve_tokenizer(cfg, start, print)
    cfg.model.vocab_size = tokenizer.vocab_size
    mcfg = warm_start_config(ckpt_io.read_config(start).model, cfg.model) if start else cfg.model
    fmt = TaskFormat(mcfg.arch, SpecialIds.from_tokenizer(tokenizer, cfg.task.source_prefix))
    data = TaskData.load(cfg.task.train_file, tokenizer, fmt, cfg)
    batcher = TokenBatcher(data.lengths, cfg.task.batch_tokens, seed=cfg.train.seed)
    from lmforge.hardware import resolve_dtype

    model = build_model(mcfg)
    optimizer = build_optimizer(model, cfg.train, "cpu")
    dtype = resolve_dtype(cfg.train.dtype, torch.device("cpu"))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        batches = [data.batch(fmt, batcher.next_batch()) for _ in range(cfg.train.grad_accum)]
        accumulate_gradients(model, batches, functools.partial(pair_loss, label_smoothing=cfg.task.label_smoothing),
                             pair_count, dtype=dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    cfg.model.vocab_size = 0
    return statistics.median(times[1:])


def budget_config(recipe: str, minutes: float, work: Path, overrides: list[str], dtype: str = "auto"):
    """The recipe, trained for ``minutes`` in ``dtype`` into work/<recipe>-<dtype>, with the schedule fitted
    to the budget."""
    from lmforge.recipes import load_config

    out = work / f"{recipe}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    cfg = load_config(recipe, [f"--train.out_dir={out}", "--train.progress=false",
                               "--train.tensorboard=false", "--train.eval_interval=0", "--train.ckpt_interval=0",
                               "--train.device=cpu", f"--train.dtype={dtype}", *overrides])
    cfg.task.train_file = str(SHARED_DATA / "mt" / "bible_en_es.train.tsv")
    cfg.task.valid_file = str(SHARED_DATA / "mt" / "bible_en_es.valid.tsv")
    seconds = fit_schedule(cfg, minutes)
    print(f"{recipe}: {seconds:.2f} s per step -> cosine over {cfg.train.decay_steps} steps, "
          f"{minutes} minutes of training", flush=True)
    return cfg, seconds


def fit_schedule(cfg, minutes: float) -> float:
    """Train for ``minutes`` of wall time, the learning rate decaying over the steps estimated to fit."""
    seconds = seconds_per_step(cfg)
    cfg.train.decay_steps = max(20, int(minutes * 60 / seconds))
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.decay_steps // 10)
    cfg.train.max_steps = 10_000_000  # the time limit ends the run
    cfg.train.max_minutes = minutes
    return seconds


def run_design(design: str, minutes: float, beam_size: int, no_repeat: int, work: Path, overrides: list[str],
               decode_only: bool = False, dtype: str = "auto") -> dict:
    """Train one design (unless ``decode_only``: reuse the run in work/) and decode the validation set."""
    import json

    from lmforge.tasks.model import Decoding, load_task_model
    from lmforge.tasks.seq2seq import TaskData, finetune, score_examples

    run_dir = work / f"{RECIPES[design]}-{dtype}"
    if decode_only:
        summary = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        calibrated = None
    else:
        cfg, calibrated = budget_config(RECIPES[design], minutes, work, overrides, dtype)
        summary = finetune(cfg)
    task_model = load_task_model(summary["checkpoint"])
    task = task_model.cfg.task
    valid = TaskData.load(task.valid_file, task_model.tokenizer, task_model.fmt, task_model.cfg)
    row = {"design": design, "dtype": summary.get("dtype", dtype), "recipe": RECIPES[design], "params": summary["num_params"], "steps": summary["steps"],
           "train_minutes": summary["train_seconds"] / 60, "seconds_per_step_calibrated": calibrated,
           "train_tokens_per_second": summary["tokens_per_second"], "val_nll": summary["val_nll"],
           "run_dir": str(run_dir)}
    searches = {"greedy": Decoding.from_task(task, beam_size=1, no_repeat_ngram_size=0),
                f"beam{beam_size}": Decoding.from_task(task, beam_size=beam_size, no_repeat_ngram_size=0)}
    if no_repeat:
        searches[f"beam{beam_size}_norep{no_repeat}"] = Decoding.from_task(task, beam_size=beam_size,
                                                                           no_repeat_ngram_size=no_repeat)
    for name, decoding in searches.items():
        scores, hyps, speed = score_examples(task_model, valid.texts, valid.sources, decoding)
        row.update({f"bleu_{name}": scores["bleu"], f"chrf_{name}": scores["chrf"],
                    f"{name}_sentences_per_second": speed,
                    f"{name}_mean_words": sum(len(h.split()) for h in hyps) / len(hyps)})
        (run_dir / f"valid.{name}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    row["reference_mean_words"] = sum(len(t.split()) for _, t in valid.texts) / len(valid.texts)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per design (default: 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: settings for a few CPU minutes (default); recipe: the recipes unchanged")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; on a machine shared with other jobs one thread ran "
                             "several times faster than two)")
    parser.add_argument("--only", choices=sorted(RECIPES), default=None, help="run one design only")
    parser.add_argument("--parallel", action="store_true",
                        help="train the designs at the same time, one process each with --threads threads "
                             "(on 2 cores with --threads 1: each design gets one core for the whole budget)")
    parser.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                        help="train.dtype of each run; several compare them side by side (default: auto)")
    parser.add_argument("--beam", type=int, default=4, help="beam size compared with greedy (default: 4)")
    parser.add_argument("--no-repeat", type=int, default=3,
                        help="also decode with the beam and this no_repeat_ngram_size (default: 3; 0 = skip)")
    parser.add_argument("--decode-only", action="store_true",
                        help="skip training: decode and score the runs already in --work")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-translation"), help="run directories")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both designs, e.g. --train.lr=2e-3")
    args, extra = parser.parse_known_args()
    import torch

    if not (SHARED_DATA / "mt").is_dir():
        sys.exit(f"{SHARED_DATA / 'mt'} not found; this benchmark needs the shared Bible data")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    designs = [args.only] if args.only else ["seq2seq", "decoder"]
    overrides = SIZES[args.size] + args.overrides + extra
    jobs = [(d, args.minutes, args.beam, args.no_repeat, work, overrides, args.decode_only, dtype)
            for d in designs for dtype in args.dtypes]
    if args.parallel:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            rows = list(pool.map(run_design, *zip(*jobs)))
    else:
        rows = [run_design(*job) for job in jobs]
    searches = ["greedy", f"beam{args.beam}"] + ([f"beam{args.beam}_norep{args.no_repeat}"] if args.no_repeat else [])
    print_table(rows, ["design", "dtype", "params", "steps", "train_minutes", "train_tokens_per_second", "val_nll"])
    print()
    table = [{"design": r["design"], "dtype": r["dtype"], "search": name, "bleu": r[f"bleu_{name}"], "chrf": r[f"chrf_{name}"],
              "sentences_per_second": r[f"{name}_sentences_per_second"], "mean_words": r[f"{name}_mean_words"]}
             for r in rows for name in searches]
    print_table(table, ["design", "dtype", "search", "bleu", "chrf", "sentences_per_second", "mean_words"])

    from lmforge.hardware import cpu_bf16_is_faster

    print(f"this CPU {'has' if cpu_bf16_is_faster() else 'has no'} bf16 units faster than float32 in a matmul "
          "(train.dtype=auto then times the model's own step in both and keeps the faster)")
    path = write_result("translation", {"minutes_per_design": args.minutes, "size": args.size,
                                        "overrides": overrides, "threads": args.threads,
                                        "parallel": args.parallel, "dtypes": args.dtypes,
                                        "valid_sentences": 211, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
