"""Scoring token ids with a decoder-only language model: log p(ids[i] | ids[:i]) for every position.

One batched forward per call: the rows are right-padded to the longest, which a causal model never
attends to (a position sees only the positions before it, and the padding comes after every real
token), so each row's scores are those of the row alone. The log-softmax is taken in float64 over the
model's whole vocabulary, one row at a time (the float64 copy of a batch of logits would be large).

Both ``lmforge serve`` (echo and prompt logprobs, through the engine's worker) and the
lm-evaluation-harness adapter (``lmforge eval --tasks``) score with :func:`score_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmforge.data.padding import pad_batch


@dataclass
class RowScores:
    """The scores of one row of ids (n tokens): n - 1 entries each, for positions 1..n-1."""

    #: log p(ids[i] | ids[:i])
    logprobs: list[float]
    #: ids[i] is the most likely token at position i (among ids below the ``greedy_limit``)
    greedy: list[bool]
    #: the ``top`` likeliest tokens at each position ({token id: log-prob}, most likely first), if asked for
    top: list[dict[int, float]] = field(default_factory=list)


@torch.inference_mode()
def score_rows(model, rows: Sequence[Sequence[int]], *, top: int = 0, greedy_limit: int | None = None,
               device: torch.device | str | None = None) -> list[RowScores]:
    """Score each row of token ids in one batched forward of every row but its last token (so a row
    may be up to ``block_size + 1`` tokens: the model reads at most ``block_size``).

    ``top``: also the ``top`` likeliest tokens at each position. ``greedy_limit``: the number of ids
    the tokenizer can decode, where the model's vocabulary is larger (a padded embedding); the
    greedy flags then consider only ids below it, as greedy decoding does (the log-probabilities
    are always over the whole vocabulary).
    """
    out = [RowScores([], []) for _ in rows]
    scored = [b for b, ids in enumerate(rows) if len(ids) >= 2]
    if not scored:
        return out
    if device is None:
        device = next(model.parameters()).device
    idx, _ = pad_batch([list(rows[b]) for b in scored], 0)
    idx = idx.to(device)
    logits = model(idx[:, :-1])  # [B, T - 1, V]: position i predicts token i + 1
    for row, b in enumerate(scored):
        n = len(rows[b])
        logp = torch.log_softmax(logits[row, : n - 1].double(), dim=-1)  # [n - 1, V]
        targets = idx[row, 1:n]
        picked = logp.gather(1, targets[:, None]).squeeze(1)
        limited = logp if greedy_limit is None or greedy_limit >= logp.size(-1) else logp[:, :greedy_limit]
        greedy = (limited.argmax(dim=-1) == targets).tolist()
        tops: list[dict[int, float]] = []
        if top > 0:
            values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        out[b] = RowScores(picked.tolist(), greedy, tops)
    return out
