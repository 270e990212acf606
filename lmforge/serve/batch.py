"""The engine's batch: the running rows and the KV cache they share (touched by the worker only).

One ``KVCache`` (per-layer keys/values [B, n_kv, capacity, head_dim] with ONE shared ``length``)
holds every running row. Rows are left-padded so that every row's newest token sits in the last
filled column; an attention mask [B, capacity] marks the real slots and each row carries its own
positions (0 at its first real token), exactly as ``lmforge.generate.generate`` lays out a batch.

``Batch`` prefills joining prompts together (left-padded, one forward) into a fresh cache and
splices it in below the running rows (the batch is padded on the left when a prompt is longer than
the current length), feeds every row its pending token (one batched forward, T = 1; retried row by
row if it fails), and drops the rows that left (``index_select``, trimming leading columns that no
row uses any more). It also records each step's chosen tokens in the rows (``record``) and streams
them to their requests.
"""

from __future__ import annotations

import copy

import torch

from lmforge.data.padding import pad_batch
from lmforge.serve.requests import Request, TokenEvent, failure_message


class Row:
    """A running request's place in the batch (worker only)."""

    __slots__ = ("req", "n", "pending", "generated", "fed_max", "seen", "outcome")

    def __init__(self, req: Request, block_size: int, vocab_size: int, device: torch.device):
        self.req = req
        prompt_len = len(req.prompt_ids)
        self.n = prompt_len  # tokens fed so far (= this row's next position)
        self.pending: int | None = None  # chosen last step, fed next step
        self.generated = 0
        # the most tokens this row will ever have fed: it stops when prompt + generated = block_size
        self.fed_max = prompt_len + min(req.params.max_tokens, block_size - prompt_len) - 1
        self.seen = None  # bool [1, V]: the tokens seen so far, for the repetition penalty (else None)
        if req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt_ids, device=device)] = True
        # (finish_reason, error) once the row is done; the request is told after the row left the
        # batch, so that whoever sees it finished also sees its slot free in ``stats``
        self.outcome: tuple[str, str | None] | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None and not self.req._cancelled and not self.req._done


class Batch:
    """The running rows (``rows``, in cache order) and their cache: ``cache`` (a KVCache, or None
    when no row runs), ``mask`` (bool [B, capacity], True = a real token) and ``length`` (filled
    columns, shared by all rows)."""

    def __init__(self, model, device: torch.device, vocab_size: int):
        self.model = model
        self.device = device
        self.vocab_size = vocab_size
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.length = 0

    def clear(self) -> list[Request]:
        """Drop every row at once (their requests are not told); returns their requests."""
        reqs = [r.req for r in self.rows]
        self.rows, self.cache, self.mask, self.length = [], None, None, 0
        return reqs

    def prefill(self, prompts: list[list[int]]):
        """Left-padded prompts through the model into a fresh cache of their width:
        (last logits [J, V], cache, mask [J, W])."""
        idx, mask = pad_batch(prompts, 0, left=True)
        idx, mask = idx.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = self.model.new_cache(len(prompts), idx.size(1))
        unpadded = all(len(p) == idx.size(1) for p in prompts)
        logits = self.model(idx, attention_mask=None if unpadded else mask, positions=positions, cache=cache,
                            last_only=True)[:, -1]
        return logits, cache, mask

    def join(self, joining: list[tuple[Row, tuple]]) -> None:
        """Append new rows below the running ones; each comes with its prefilled (cache, mask [1, W])."""
        rows = self.rows + [row for row, _ in joining]
        self._rebuild(list(range(len(self.rows))), rows, [part for _, part in joining])
        self.rows = rows

    def leave(self) -> list[Row]:
        """Drop the rows that finished, failed or were cancelled; returns them (in batch order)."""
        active = [r.active for r in self.rows]  # once: another thread may cancel meanwhile
        if all(active):
            return []
        keep = [i for i, a in enumerate(active) if a]
        leaving = [r for r, a in zip(self.rows, active) if not a]
        kept_rows = [self.rows[i] for i in keep]
        self._rebuild(keep, kept_rows, [])
        self.rows = kept_rows
        return leaving

    def decode(self) -> torch.Tensor:
        """Feed every running row its pending token; logits [B, V] (a failed row's are zeros)."""
        rows, L = self.rows, self.length
        if L + 1 > self.cache.max_len:  # not expected (capacity covers every row's limit): grow
            self._rebuild(list(range(len(rows))), rows, [], min_capacity=L + 1)
            L = self.length
        idx = torch.tensor([[r.pending] for r in rows], device=self.device)
        positions = torch.tensor([[r.n] for r in rows], device=self.device)
        self.mask[:, L] = True
        padded = any(r.n < L for r in rows)
        mask = self.mask[:, : L + 1] if padded else None
        self.cache.length = L
        try:
            logits = self.model(idx, attention_mask=mask, positions=positions, cache=self.cache)[:, -1]
        except Exception:
            logits = self._decode_rows(idx, positions, L)
        self.cache.length = self.length = L + 1
        for r in rows:
            r.n += 1
        return logits

    def record(self, logits: torch.Tensor, chosen: dict[int, int], eot_id: int | None, block_size: int) -> int:
        """Give the rows in ``chosen`` (row index: token id) their tokens, chosen from ``logits``
        [B, V]: each is fed next step and streamed with its log-probability (and the top
        alternatives when asked for). A row is finished by a stop token ("stop", not streamed),
        ``max_tokens`` or a full context ("length"). Returns the number of tokens streamed."""
        rows = self.rows
        order = sorted(chosen)
        sel = torch.tensor(order, device=self.device)
        token_t = torch.tensor([chosen[i] for i in order], device=self.device)
        logp = torch.log_softmax(logits.index_select(0, sel), dim=-1)
        picked = logp.gather(1, token_t[:, None]).squeeze(1).tolist()
        n_top = max((rows[i].req.params.logprobs or 0 for i in order), default=0)
        n_top = min(n_top, self.vocab_size)
        top_values = top_ids = [[] for _ in order]
        if n_top:
            top_values, top_ids = logp.topk(n_top, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()

        produced = 0
        for k, i in enumerate(order):
            row, token = rows[i], chosen[i]
            p = row.req.params
            row.pending = token
            row.generated += 1
            if row.seen is not None:
                row.seen[0, token] = True
            if token == eot_id or token in p.stop_token_ids:
                row.outcome = ("stop", None)
                continue
            top = None
            if p.logprobs is not None:
                top = {int(t): float(v) for t, v in zip(top_ids[k][: p.logprobs], top_values[k][: p.logprobs])}
            row.req._push(TokenEvent(token, float(picked[k]), top))
            produced += 1
            if row.generated >= p.max_tokens or len(row.req.prompt_ids) + row.generated >= block_size:
                row.outcome = ("length", None)
        return produced

    def _decode_rows(self, idx: torch.Tensor, positions: torch.Tensor, L: int) -> torch.Tensor:
        """The batched forward failed: feed the rows one by one (each through a one-row view of the
        batch cache, so their keys/values land in place) and fail the rows that still raise."""
        logits = torch.zeros(len(self.rows), self.vocab_size, device=self.device)
        for i, row in enumerate(self.rows):
            view = rows_view(self.cache, i)
            view.length = L
            mask = self.mask[i:i + 1, : L + 1] if row.n < L else None
            try:
                logits[i] = self.model(idx[i:i + 1], attention_mask=mask, positions=positions[i:i + 1],
                                       cache=view)[0, -1]
            except Exception as e:
                row.outcome = ("error", failure_message(row.req, e, "decoding"))
        return logits

    def _rebuild(self, keep: list[int], rows_after: list[Row], parts: list[tuple], min_capacity: int = 0) -> None:
        """Make the batch cache hold the old rows ``keep`` (in that order) followed by the rows of
        ``parts`` ((cache, mask [J, W]) of newly prefilled requests), right-aligned in a shared
        length: the longest row's fed tokens (leading columns no row uses are trimmed; shorter rows
        are left-padded). The capacity covers the most any row will ever feed."""
        if not rows_after:
            self.cache, self.mask, self.length = None, None, 0
            return
        old, old_mask, L = self.cache, self.mask, self.length
        new_len = max(r.n for r in rows_after)
        capacity = max(new_len, min_capacity, max(r.fed_max for r in rows_after))
        cache = self.model.new_cache(len(rows_after), capacity)
        mask = torch.zeros(len(rows_after), capacity, dtype=torch.bool, device=self.device)
        b = 0
        if keep and old is not None:
            width = min(L, new_len)
            if keep == list(range(old.k[0].size(0))):
                pick = lambda t: t[:, :, L - width: L]  # noqa: E731
            else:
                index = torch.tensor(keep, device=self.device)
                pick = lambda t: t[:, :, L - width: L].index_select(0, index)  # noqa: E731
            for layer in range(len(cache.k)):
                cache.k[layer][: len(keep), :, new_len - width: new_len] = pick(old.k[layer])
                cache.v[layer][: len(keep), :, new_len - width: new_len] = pick(old.v[layer])
            mask[: len(keep), new_len - width: new_len] = old_mask[keep, L - width: L]
            b = len(keep)
        for part_cache, part_mask in parts:
            J, W = part_mask.shape
            for layer in range(len(cache.k)):
                cache.k[layer][b: b + J, :, new_len - W: new_len] = part_cache.k[layer][:, :, :W]
                cache.v[layer][b: b + J, :, new_len - W: new_len] = part_cache.v[layer][:, :, :W]
            mask[b: b + J, new_len - W: new_len] = part_mask
            b += J
        cache.length = new_len
        self.cache, self.mask, self.length = cache, mask, new_len


def rows_view(cache, j: int):
    """Row j of a KVCache, as a one-row KVCache sharing its storage."""
    view = copy.copy(cache)
    view.k = [k[j:j + 1] for k in cache.k]
    view.v = [v[j:j + 1] for v in cache.v]
    view.batch_size = 1
    return view
