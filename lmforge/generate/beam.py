"""Greedy and beam search over a batch of sources, for the encoder-decoder and the decoder-only model.

The search only talks to a *decoding state* (:class:`Seq2SeqState`, :class:`DecoderOnlyState`, or
a toy in the tests) through three calls: ``first()`` gives the logits of each source's first
output token, ``step(tokens)`` feeds one token per row and gives the next logits, and
``select(rows)`` keeps, repeats or reorders rows (beams that survive, sources that are done).
The encoder runs once per source; its output's cross-attention keys/values are projected once;
the decoder's own keys/values live in a KV cache, so each step runs one token per row.

Beam search (as in fairseq and Hugging Face): each step extends every live beam by every token,
keeps the 2K best candidates per source by total log-probability, sets aside those ending in
<eos> (only from the top K), and carries the K best others on. A finished hypothesis y scores

    score(y) = log p(y | x) / |y| ** length_penalty        (|y| counts <eos>)

so 0 ranks by raw probability and larger values favour longer outputs. A source is done when
K hypotheses have finished (``early_stopping=True``), or else once no live beam can still beat
the K-th best finished one; and at its length limit, where only <eos> is allowed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.padding import pad_batch


class DecodeState(Protocol):
    def first(self) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def select(self, rows: torch.Tensor) -> None: ...


# ------------------------------------------------------------------------------------------- model states


def _select_cache(cache, rows: torch.Tensor) -> None:
    cache.k = [k.index_select(0, rows) for k in cache.k]
    cache.v = [v.index_select(0, rows) for v in cache.v]
    cache.batch_size = len(rows)


class Seq2SeqState:
    """Decoding an encoder-decoder: the sources are encoded once, the target grows one token a step."""

    def __init__(self, model, sources: Sequence[list[int]], bos_id: int, pad_id: int, max_len: int):
        device = model.tok_emb.weight.device
        src, mask = pad_batch(sources, pad_id)
        self.model, self.bos_id = model, bos_id
        self.mask, self.src = mask.to(device), src.to(device)
        self.memory = model.project_memory(model.encode(self.src, self.mask))
        self.cache = model.new_cache(len(sources), max_len)

    def first(self) -> torch.Tensor:
        bos = torch.full((self.mask.size(0), 1), self.bos_id, dtype=torch.long, device=self.mask.device)
        return self.model.decode(bos, self.memory, self.mask, cache=self.cache, src=self.src)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], self.memory, self.mask, cache=self.cache, src=self.src)[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.mask.device)
        self.mask, self.src = self.mask.index_select(0, rows), self.src.index_select(0, rows)
        self.memory = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.memory]
        _select_cache(self.cache, rows)


class DecoderOnlyState:
    """Decoding a decoder-only model: the prompts (``source <sep>``) are left-padded and run once,
    then each step feeds one token per row at that row's next position (as ``generate`` does)."""

    def __init__(self, model, prompts: Sequence[list[int]], pad_id: int, max_len: int):
        device = model.tok_emb.weight.device
        idx, mask = pad_batch(prompts, pad_id, left=True)
        width = idx.size(1)
        self.model, self.idx = model, idx.to(device)
        self.mask = mask.to(device)
        self.next_pos = self.mask.long().sum(dim=1)
        self.cache = model.new_cache(len(prompts), width + max_len - 1)

    def first(self) -> torch.Tensor:
        positions = (self.mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return self.model(self.idx, attention_mask=self.mask, positions=positions, cache=self.cache,
                          last_only=True)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), 1)], dim=1)
        logits = self.model(tokens[:, None], attention_mask=self.mask, positions=self.next_pos[:, None],
                            cache=self.cache)[:, -1]
        self.next_pos = self.next_pos + 1
        return logits

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.mask.device)
        self.mask = self.mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)
        _select_cache(self.cache, rows)


# ------------------------------------------------------------------------------------------- constraints


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``tokens`` (no_repeat_ngram_size)."""
    if n <= 0 or len(tokens) < n - 1:
        return set()
    if n == 1:
        return set(tokens)
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


def current_word(tokens: Sequence[int], continues: frozenset[int]) -> tuple[int, ...]:
    """The word the output ends in: its last token that is not a continuation piece and the pieces
    after it; () while the output is still in its opening run of continuation pieces, which is not
    checked (a byte-level BPE writes a text's first word without the space mark, so its pieces
    are not the ones the source has for that word elsewhere)."""
    j = len(tokens)
    while j > 0 and tokens[j - 1] in continues:
        j -= 1
    return tuple(tokens[j - 1:]) if j > 0 else ()


@functools.lru_cache(maxsize=4)
def _piece_mask(pieces: frozenset[int], vocab_size: int) -> torch.Tensor:
    """[vocab] True at ``pieces``: built once per tokenizer, not at every step of a search."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[t for t in pieces if t < vocab_size]] = True
    return mask


class SourceWords:
    """The words that one source holds (a token that is not a continuation piece and the
    continuation pieces after it): which piece may follow each beginning of a word of several
    pieces, and which words are whole (of one piece or several)."""

    def __init__(self, source: Sequence[int], continues: frozenset[int]):
        self.next: dict[tuple[int, ...], set[int]] = {}
        self.whole: set[tuple[int, ...]] = set()
        word: list[int] = []
        for t in [*source, None]:
            if t is not None and t in continues and word:
                word.append(t)
                continue
            if word:
                self.whole.add(tuple(word))
            if len(word) > 1:
                for k in range(1, len(word)):
                    self.next.setdefault(tuple(word[:k]), set()).add(word[k])
            word = [] if t is None else [t]


@dataclass(frozen=True)
class Constraints:
    """What an output may not do: repeat an n-gram of ``no_repeat_ngram_size`` tokens, put a token
    right after itself (``no_immediate_repeat``), hold a token of ``once`` twice (the task's
    ``no_repeat_words``: the tokenizer's word-initial tokens, so that no word begins twice), or,
    given ``continues`` (the tokenizer's continuation pieces: the task's ``source_words``), write
    a word of several pieces that its source does not hold: a continuation piece may only extend
    the word begun so far towards a word of the source, and a next word may only begin once that
    word is whole; nor may <eos> come while the output ends in the beginning of a source word that
    the source never has as it stands ("apologis" of "apologise"), except at the length limit or
    where the other rules leave nothing else. ``words``: each source's :class:`SourceWords` (:meth:`for_sources`).
    ``decodable``: ids from this one on are never written (an imported model's vocabulary padded
    beyond its tokenizer); 0 = every id."""

    no_repeat_ngram_size: int = 0
    no_immediate_repeat: bool = False
    once: frozenset[int] = frozenset()
    continues: frozenset[int] = frozenset()
    words: tuple[SourceWords, ...] = ()
    decodable: int = 0

    @property
    def active(self) -> bool:
        return (self.no_repeat_ngram_size > 0 or self.no_immediate_repeat or bool(self.once) or bool(self.continues)
                or self.decodable > 0)

    def for_sources(self, sources: Sequence[Sequence[int]]) -> "Constraints":
        """These constraints for a batch of sources (each row of a search names its source's index)."""
        if not self.continues:
            return self
        return replace(self, words=tuple(SourceWords(s, self.continues) for s in sources))

    def banned(self, tokens: Sequence[int]) -> set[int]:
        """The tokens that may not come after ``tokens`` (the constraints that need no source)."""
        banned = banned_ngram_tokens(tokens, self.no_repeat_ngram_size)
        if self.no_immediate_repeat and tokens:
            banned.add(tokens[-1])
        if self.once:
            banned.update(t for t in tokens if t in self.once)
        return banned

    def word_ban(self, rows: Sequence[tuple[Sequence[int], bool, int]], vocab_size: int, eos_id: int) -> torch.Tensor:
        """[rows, vocab] True where ``continues``' rule forbids the token (<eos> only after an
        unfinished word of the source, and not at the length limit)."""
        cont = _piece_mask(self.continues, vocab_size)
        ban = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
        extend, open_rows, unfinished, keep_rows, keep_tokens = [], [], [], [], []
        for r, (tokens, at_limit, i) in enumerate(rows):
            word = current_word(tokens, self.continues)
            if not word:
                continue
            extend.append(r)
            nxt = self.words[i].next.get(word, ())
            keep_rows += [r] * len(nxt)
            keep_tokens += nxt
            if word not in self.words[i].whole:
                if len(word) > 1:
                    open_rows.append(r)
                if nxt and not at_limit:
                    unfinished.append(r)
        ban[extend] = cont
        ban[keep_rows, keep_tokens] = False
        ban[open_rows] |= ~cont
        ban[:, eos_id] = False
        ban[unfinished, eos_id] = True  # no output ends in half a word
        return ban


NONE = Constraints()


def _constrain(logp: torch.Tensor, rows: list[tuple[Sequence[int], bool, int]], eos_id: int,
               constraints: Constraints = NONE) -> torch.Tensor:
    """Ban what ``constraints`` forbid (<eos> only while a word is unfinished, and never on a row
    that would have nothing left), and allow only <eos> on rows at their length limit.
    rows[i] = (tokens, at_limit, index of the row's source)."""
    if constraints.active:
        eos_before = logp[:, eos_id].clone() if constraints.continues else None  # only word_ban bans <eos>
        ban_rows, ban_tokens = [], []
        for r, (tokens, _, _) in enumerate(rows):
            banned = constraints.banned(tokens)
            banned.discard(eos_id)
            ban_rows += [r] * len(banned)
            ban_tokens += banned
        if ban_rows:
            logp[ban_rows, ban_tokens] = -math.inf
        if constraints.continues:
            logp.masked_fill_(constraints.word_ban(rows, logp.size(-1), eos_id).to(logp.device), -math.inf)
        if 0 < constraints.decodable < logp.size(-1):
            logp[:, constraints.decodable:] = -math.inf
        if eos_before is not None:
            stuck = torch.isneginf(logp).all(-1)  # every token banned: the output ends here
            if stuck.any():
                logp[stuck, eos_id] = eos_before[stuck]
    limit = [r for r, (_, at_limit, _) in enumerate(rows) if at_limit]
    if limit:
        eos_col = logp[limit, eos_id].clone()
        logp[limit] = -math.inf
        logp[limit, eos_id] = eos_col
    return logp


# ------------------------------------------------------------------------------------------------ greedy


@torch.no_grad()
def greedy_search(state: DecodeState, max_lens: Sequence[int], eos_id: int,
                  constraints: Constraints = NONE) -> list[list[int]]:
    """The most likely token at each step, per source, until <eos> or ``max_lens[i]`` tokens
    (<eos> included, and not returned)."""
    outputs: list[list[int]] = [[] for _ in max_lens]
    alive = list(range(len(max_lens)))
    logits = state.first()
    t = 0
    while True:
        logp = logits.float()
        if constraints.active or any(t + 1 >= max_lens[i] for i in alive):
            logp = _constrain(logp.clone(), [(outputs[i], t + 1 >= max_lens[i], i) for i in alive], eos_id,
                             constraints)
        chosen = logp.argmax(dim=-1)
        keep = []
        for r, (i, token) in enumerate(zip(alive, chosen.tolist())):
            if token != eos_id:
                outputs[i].append(token)
                keep.append(r)
        if not keep:
            return outputs
        if len(keep) < len(alive):
            rows = torch.tensor(keep, dtype=torch.long)
            state.select(rows)
            chosen = chosen[rows.to(chosen.device)]
            alive = [alive[r] for r in keep]
        logits = state.step(chosen)
        t += 1


# ---------------------------------------------------------------------------------------------- beam


@dataclass
class Hypothesis:
    tokens: list[int]  # without <eos>
    log_prob: float  # log p(tokens + <eos> | source)
    score: float  # log_prob / (len(tokens) + 1) ** length_penalty


def length_normalized(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / length ** length_penalty


@torch.no_grad()
def beam_search(state: DecodeState, max_lens: Sequence[int], eos_id: int, beam_size: int = 4,
                length_penalty: float = 1.0, early_stopping: bool = True,
                constraints: Constraints = NONE) -> list[list[Hypothesis]]:
    """Finished hypotheses of each source, best first (see the module docstring)."""
    K = beam_size
    n = len(max_lens)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    alive = list(range(n))  # sources still searching; rows are grouped by source, `width` rows each
    beams: dict[int, list[list[int]]] = {i: [[]] for i in range(n)}
    scores = torch.zeros(n, 1, dtype=torch.float64)
    logits = state.first()
    t = 0  # tokens each live beam holds
    while alive:
        width = scores.size(1)
        logp = F.log_softmax(logits.float(), dim=-1).double()
        V = logp.size(-1)
        rows = [(beams[i][b], t + 1 >= max_lens[i], i) for i in alive for b in range(width)]
        logp = _constrain(logp, rows, eos_id, constraints)
        candidates = (scores.to(logp.device).reshape(-1, 1) + logp).reshape(len(alive), width * V)
        top_scores, top_index = candidates.topk(min(2 * K, width * V), dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()

        next_rows, next_tokens, next_scores, still_alive = [], [], [], []
        for a, i in enumerate(alive):
            new_beams, new_scores, parents = [], [], []
            for rank, (s, flat) in enumerate(zip(top_scores[a], top_index[a])):
                if s == -math.inf or len(new_beams) == K:
                    break
                parent, token = divmod(flat, V)
                seq = beams[i][parent]
                if token == eos_id:
                    if rank < K:
                        finished[i].append(Hypothesis(list(seq), s, length_normalized(s, t + 1, length_penalty)))
                    continue
                new_beams.append(seq + [token])
                new_scores.append(s)
                parents.append(parent)
            if not new_beams or _done(finished[i], max(new_scores), K, t, max_lens[i], length_penalty, early_stopping):
                continue
            while len(new_beams) < K:  # fewer candidates than beams: fill with dead copies
                new_beams.append(new_beams[-1])
                new_scores.append(-math.inf)
                parents.append(parents[-1])
            beams[i] = new_beams
            still_alive.append(i)
            next_rows += [a * width + p for p in parents]
            next_tokens += [b[-1] for b in new_beams]
            next_scores.append(new_scores)
        for i in alive:
            if i not in still_alive:
                del beams[i]
        alive = still_alive
        if not alive:
            break
        state.select(torch.tensor(next_rows, dtype=torch.long))
        scores = torch.tensor(next_scores, dtype=torch.float64)
        logits = state.step(torch.tensor(next_tokens, dtype=torch.long, device=logits.device))
        t += 1
    return [sorted(f, key=lambda h: h.score, reverse=True) for f in finished]


def _done(finished: list[Hypothesis], best_live: float, K: int, t: int, max_len: int, length_penalty: float,
          early_stopping: bool) -> bool:
    if len(finished) < K:
        return False
    if early_stopping:
        return True
    # Log-probabilities only fall as a beam grows, so a live beam's best possible final score is
    # its current sum over the most favourable length it can still reach.
    if length_penalty > 0:
        bound = length_normalized(best_live, max_len, length_penalty)
    else:
        bound = length_normalized(best_live, t + 2, length_penalty)
    kth_best = sorted((h.score for h in finished), reverse=True)[K - 1]
    return kth_best >= bound


def decode(state: DecodeState, max_lens: Sequence[int], eos_id: int, beam_size: int = 1, length_penalty: float = 1.0,
           early_stopping: bool = True, constraints: Constraints = NONE) -> list[list[int]]:
    """The output tokens of each source: greedy for beam_size 1, else the best beam hypothesis."""
    if beam_size <= 1:
        return greedy_search(state, max_lens, eos_id, constraints)
    hyps = beam_search(state, max_lens, eos_id, beam_size, length_penalty, early_stopping, constraints)
    return [h[0].tokens if h else [] for h in hyps]
