"""``lmforge eval``: loss and perplexity of a checkpoint on a text file or a data split.

The tokens are cut into sequential, non-overlapping windows of ``block_size`` tokens, so every
token after the first is predicted exactly once, each with as much context as its window gives (the
last window, for a tail shorter than a block, ends at the last token and scores only its new
targets; see ``lmforge.data.sampler.eval_batches``). Loss is the mean negative log-likelihood in
nats per token; perplexity is its exponential.

A text file (``--file``) is read as the training data is (a .jsonl file is one document per line)
and each document is preceded by the end-of-text token, which separates documents in training: the
first token of every document is predicted too, so every token of the text is scored, and nothing
that is not in it except the separators between documents. For a one-document text this is exactly
lm-evaluation-harness's rolling log-likelihood (``loglikelihood_rolling``, its perplexity tasks),
which conditions the first token on the end-of-text token and cuts longer texts into the same
windows; ``lmforge eval --tasks`` runs it. A tokenizer without an end-of-text token leaves the first
token of the text unscored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError


class ArrayDataset:
    """A token array in memory with the ``TokenDataset`` interface (``len`` and ``window``)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


def text_dataset(path: str | Path, tokenizer, convert: str | None = None) -> ArrayDataset:
    """Tokenize one UTF-8 file (or any corpus spec that ``iter_pieces`` reads) for evaluation: each
    document preceded by the end-of-text token (when the tokenizer has one), converted as the
    training text was (``data.convert``)."""
    from lmforge.data.sources import converter, iter_pieces

    conversion = converter(convert) or (lambda text: text)
    ids: list[int] = []
    starts_document = True
    for _, text, last in iter_pieces([str(path)]):
        if starts_document and tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(conversion(text)))
        starts_document = last
    return ArrayDataset(np.array(ids, dtype=np.int64))


def evaluate_checkpoint(model, cfg, tokenizer, text_file: str | None = None, split: str = "val",
                        batch_size: int = 16, max_batches: int | None = None, device: str = "cpu") -> dict:
    from lmforge.data.shards import TokenDataset
    from lmforge.tasks.lm import evaluate

    if cfg.model.arch != "decoder":
        raise LMForgeError(f"this checkpoint is a model.arch={cfg.model.arch} model; lmforge eval measures a "
                           "language model's next-token loss, so give a decoder checkpoint")
    block = cfg.model.block_size
    if text_file is not None:
        dataset = text_dataset(text_file, tokenizer, cfg.data.convert)
        source = str(text_file)
    else:
        data_dir = Path(cfg.data.data_dir)
        if not (data_dir / "meta.json").is_file():
            raise LMForgeError(
                f"the checkpoint's data directory {data_dir} has no prepared data; run from the directory you "
                f"trained in, run `lmforge prepare` with the same recipe, or pass --file TEXT"
            )
        dataset = TokenDataset(data_dir, split)
        source = f"{data_dir} ({split})"
    if len(dataset) < block + 1:
        raise LMForgeError(
            f"{source} has {len(dataset)} tokens, fewer than one window of {block + 1}; give a longer text"
        )
    result = evaluate(model, dataset, block_size=block, batch_size=batch_size, n_batches=max_batches,
                      seed=None, device=device, dtype=cfg.train.dtype if device != "cpu" else "float32")
    return {"source": source, **result}
