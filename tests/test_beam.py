"""Greedy and beam search: beam 1 is greedy, beams find what greedy misses, length penalty, constraints."""

import itertools
import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import DecoderLM
from lmforge.model.seq2seq import Seq2SeqLM
from lmforge.generate import beam

EOS = 0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyState:
    """A 'model' whose next-token distribution is a fixed function of the tokens so far.

    table maps a prefix (tuple) to probabilities over the vocabulary; prefixes not in the table
    get ``default``. Each row of the batch is one prefix; select() reorders them.
    """

    def __init__(self, n_sources: int, table: dict, default: list[float]):
        self.table, self.default = table, default
        self.rows = [(i, ()) for i in range(n_sources)]

    def _logits(self):
        return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in self.table.get(prefix, self.default)]
                             for _, prefix in self.rows], dtype=torch.float64)

    def first(self):
        return self._logits()

    def step(self, tokens):
        self.rows = [(i, prefix + (int(t),)) for (i, prefix), t in zip(self.rows, tokens.tolist())]
        return self._logits()

    def select(self, rows):
        self.rows = [self.rows[r] for r in rows.tolist()]


# V = 3: 0 = <eos>, 1 = a, 2 = b. Greedy takes a (0.6), then <eos> (0.4): p = 0.24.
# The best sequence is b <eos>: 0.4 * 0.9 = 0.36.
TABLE = {(): [0.0, 0.6, 0.4], (1,): [0.4, 0.3, 0.3], (2,): [0.9, 0.05, 0.05]}
DEFAULT = [0.5, 0.25, 0.25]


def all_sequences(table, default, max_len):
    """Every finished output (tokens without <eos>) of at most max_len tokens with its log-probability."""
    out = {}
    for length in range(max_len):
        for seq in itertools.product([1, 2], repeat=length):
            logp = 0.0
            for t in range(length + 1):
                probs = table.get(tuple(seq[:t]), default)
                token = seq[t] if t < length else EOS
                logp += math.log(probs[token]) if probs[token] > 0 else -math.inf
            out[seq] = logp
    return out


def test_beam_finds_the_sequence_greedy_misses():
    greedy = beam.greedy_search(ToyState(1, TABLE, DEFAULT), [5], EOS)
    assert greedy == [[1]]
    hyps = beam.beam_search(ToyState(1, TABLE, DEFAULT), [5], EOS, beam_size=2, length_penalty=0.0)
    assert hyps[0][0].tokens == [2]
    assert hyps[0][0].log_prob == pytest.approx(math.log(0.36))
    best = max(all_sequences(TABLE, DEFAULT, 5).items(), key=lambda kv: kv[1])
    assert list(best[0]) == [2]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_length_penalty_follows_its_formula(alpha):
    """With beams wide enough to keep everything, the result is the brute-force best of
    log p(y) / |y| ** alpha (|y| counts <eos>); every returned score is that formula."""
    table = {(): [0.5, 0.3, 0.2], (1,): [0.6, 0.2, 0.2], (1, 1): [0.3, 0.4, 0.3], (2,): [0.2, 0.5, 0.3]}
    default = [0.45, 0.35, 0.2]
    max_len = 4
    seqs = all_sequences(table, default, max_len)
    expected = max(seqs, key=lambda s: seqs[s] / (len(s) + 1) ** alpha)
    hyps = beam.beam_search(ToyState(1, table, default), [max_len], EOS, beam_size=16, length_penalty=alpha,
                            early_stopping=False)[0]
    assert hyps[0].tokens == list(expected)
    for h in hyps:
        assert h.log_prob == pytest.approx(seqs[tuple(h.tokens)])
        assert h.score == pytest.approx(h.log_prob / (len(h.tokens) + 1) ** alpha)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_longer_outputs_win_as_the_length_penalty_grows():
    lengths = []
    for alpha in (0.0, 1.0, 3.0):
        hyps = beam.beam_search(ToyState(1, TABLE, DEFAULT), [6], EOS, beam_size=8, length_penalty=alpha,
                                early_stopping=False)
        lengths.append(len(hyps[0][0].tokens))
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def tiny_seq2seq():
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=30, d_model=32, n_head=4, n_layer=2, n_encoder_layer=2, d_ff=64, arch="seq2seq",
                      pos_encoding="sinusoidal", block_size=32)
    m = Seq2SeqLM(cfg).eval()
    with torch.no_grad():  # a peaked random model, so that outputs are not all <eos> at once
        m.lm_head.weight.mul_(40)
    return m


SOURCES = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [12, 13, 14, 15, 1], [7, 7, 1]]


def test_beam_one_equals_greedy_batched_for_both_designs():
    m = tiny_seq2seq()
    max_lens = [9, 5, 12, 7]
    greedy = beam.greedy_search(beam.Seq2SeqState(m, SOURCES, 2, 3, 12), max_lens, EOS)
    one = beam.beam_search(beam.Seq2SeqState(m, SOURCES, 2, 3, 12), max_lens, EOS, beam_size=1)
    assert [h[0].tokens for h in one] == greedy
    assert any(len(g) > 1 for g in greedy)
    torch.manual_seed(4)
    lm = DecoderLM(ModelConfig(vocab_size=30, d_model=32, n_head=4, n_layer=2, block_size=32)).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(40)
    greedy = beam.greedy_search(beam.DecoderOnlyState(lm, SOURCES, 3, 12), max_lens, EOS)
    one = beam.beam_search(beam.DecoderOnlyState(lm, SOURCES, 3, 12), max_lens, EOS, beam_size=1)
    assert [h[0].tokens for h in one] == greedy


def test_batched_beam_search_equals_one_source_at_a_time():
    m = tiny_seq2seq()
    max_lens = [9, 5, 12, 7]
    batched = beam.beam_search(beam.Seq2SeqState(m, SOURCES, 2, 3, 12), max_lens, EOS, beam_size=3)
    for src, limit, hyps in zip(SOURCES, max_lens, batched):
        alone = beam.beam_search(beam.Seq2SeqState(m, [src], 2, 3, limit), [limit], EOS, beam_size=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        for a, b in zip(alone, hyps):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_beam_scores_are_the_model_log_probabilities():
    """A hypothesis' log_prob equals the teacher-forced log-probability of its tokens and <eos>."""
    m = tiny_seq2seq()
    hyps = beam.beam_search(beam.Seq2SeqState(m, SOURCES[:1], 2, 3, 12), [12], EOS, beam_size=4)[0]
    src = torch.tensor(SOURCES[:1])
    for h in hyps[:3]:
        tgt = torch.tensor([[2] + h.tokens])
        logp = torch.log_softmax(m(src, tgt).double(), dim=-1)[0]
        total = sum(logp[t, tok].item() for t, tok in enumerate(h.tokens + [EOS]))
        assert h.log_prob == pytest.approx(total, abs=1e-4)


def test_length_limits_and_no_repeat_ngrams():
    m = tiny_seq2seq()
    for search in ("greedy", "beam"):
        kw = {} if search == "greedy" else {"beam_size": 3}
        outs = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 4), [4, 2, 3, 1], EOS, **kw)
        assert [len(o) <= limit - 1 for o, limit in zip(outs, [4, 2, 3, 1])] == [True] * 4
        assert outs[3] == []  # a limit of 1 leaves room for <eos> only
        outs = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 20), [20] * 4, EOS,
                           constraints=beam.Constraints(no_repeat_ngram_size=2), **kw)
        for o in outs:
            bigrams = list(zip(o, o[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_no_immediate_repeat():
    m = tiny_seq2seq()
    for search in ("greedy", "beam"):
        kw = {} if search == "greedy" else {"beam_size": 3}
        plain = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 20), [20] * 4, EOS, **kw)
        outs = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 20), [20] * 4, EOS,
                           constraints=beam.Constraints(no_immediate_repeat=True), **kw)
        assert any(a == b for o in plain for a, b in zip(o, o[1:])), "the toy model should repeat without the ban"
        for o in outs:
            assert all(a != b for a, b in zip(o, o[1:])), o


def test_tokens_allowed_once():
    """no_repeat_words' mechanism: the tokens of ``once`` stand at most once in an output, others freely."""
    m = tiny_seq2seq()
    for search in ("greedy", "beam"):
        kw = {} if search == "greedy" else {"beam_size": 3}
        plain = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 20), [20] * 4, EOS, **kw)
        repeated = {t for o in plain for t in o if o.count(t) > 1}
        assert repeated, "the toy model should repeat tokens without the ban"
        once = frozenset(sorted(repeated)[: max(1, len(repeated) // 2)])
        outs = beam.decode(beam.Seq2SeqState(m, SOURCES, 2, 3, 20), [20] * 4, EOS,
                           constraints=beam.Constraints(once=once), **kw)
        for o in outs:
            assert all(o.count(t) <= 1 for t in once), (o, once)
        assert outs != plain


def test_banned_ngram_tokens():
    assert beam.banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert beam.banned_ngram_tokens([1, 2, 1], 2) == {2}
    assert beam.banned_ngram_tokens([4, 5], 1) == {4, 5}
    assert beam.banned_ngram_tokens([1], 3) == set()


def test_exhaustive_stopping_is_never_worse_than_early_stopping():
    m = tiny_seq2seq()
    early = beam.beam_search(beam.Seq2SeqState(m, SOURCES, 2, 3, 12), [12] * 4, EOS, beam_size=2,
                             length_penalty=1.0, early_stopping=True)
    full = beam.beam_search(beam.Seq2SeqState(m, SOURCES, 2, 3, 12), [12] * 4, EOS, beam_size=2,
                            length_penalty=1.0, early_stopping=False)
    for e, f in zip(early, full):
        assert f[0].score >= e[0].score - 1e-9


def test_decoding_flags_of_the_cli_reach_the_search_settings():
    """translate/summarize/eval: --no-repeat-words yes/no overrides the checkpoint's task setting."""
    from lmforge.cli import build_parser
    from lmforge.commands import _decoding_from_args
    from lmforge.config import TaskConfig

    parser = build_parser()
    for name in ("no_repeat_words", "source_words"):
        for flag, task_value, expected in (("yes", False, True), ("no", True, False), (None, True, True)):
            argv = ["summarize", "run", "text"] + ([f"--{name.replace('_', '-')}={flag}"] if flag else [])
            args, _ = parser.parse_known_args(argv)
            decoding = _decoding_from_args(TaskConfig(name="summarization", **{name: task_value}), args)
            assert getattr(decoding, name) is expected


def _source_word_valid(seq, source, continues, finished=False):
    """An independent statement of source_words: cut the output and the source into words (a token
    that is not a continuation piece, and the continuation pieces after it); every word of several
    pieces is a word of the source, the last one possibly unfinished unless the output is
    ``finished`` (ended by <eos> before its length limit), when it may not be the first piece of a
    source word that the source never has alone either; continuation pieces that open the output
    are free (a byte-level BPE's first word has no space mark)."""
    def words(tokens):
        out = []
        for t in tokens:
            if out and t in continues:
                out[-1].append(t)
            else:
                out.append([t])
        return [tuple(w) for w in out]

    known = {w for w in words(source) if len(w) > 1}
    prefixes = {w[:k] for w in known for k in range(2, len(w))}
    opening = next((k for k, t in enumerate(seq) if t not in continues), len(seq))
    ws = words(seq[opening:])
    alone = {w for w in words(source) if len(w) == 1}
    starts = {w[:1] for w in known}
    if finished and ws and ws[-1] in starts - alone:
        return False
    return all(len(w) == 1 or w in known or (not finished and k == len(ws) - 1 and w in prefixes)
               for k, w in enumerate(ws))


@pytest.mark.parametrize("seed", range(4))
def test_source_words_returns_the_best_output_whose_words_the_source_holds(seed):
    """V = 6: <eos>, two word-initial tokens (1, 2), a punctuation-like token (5), two continuation
    pieces (3, 4). With beams wide enough to keep everything, the constrained search returns the
    brute-force best (by log p / length) of the outputs _source_word_valid accepts, for each of two sources at once,
    and greedy takes the best allowed token at each step."""
    gen = torch.Generator().manual_seed(seed)
    V, max_len, continues = 6, 5, frozenset({3, 4})
    sources = [[1, 3, 4, 2, 5, 2, 3], [2, 4, 4, 1]]
    prefixes = [p for n in range(max_len) for p in itertools.product(range(1, V), repeat=n)]
    lean = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 0.0])  # towards a continuation piece after a word's first
    table = {p: (torch.rand(V, generator=gen) + 0.05 + (lean if p and p[-1] not in continues else 0)).tolist()
             for p in prefixes}
    for p in prefixes:
        if len(p) < 3:  # outputs of 3 tokens or more
            table[p][EOS] = 0.001
    table = {p: [x / sum(v) for x in v] for p, v in table.items()}

    def logp(seq):
        return sum(math.log(table[seq[:t]][seq[t] if t < len(seq) else EOS]) for t in range(len(seq) + 1))

    constraints = beam.Constraints(continues=continues).for_sources(sources)
    hyps = beam.beam_search(ToyState(2, table, None), [max_len] * 2, EOS, beam_size=len(prefixes),
                            length_penalty=1.0, early_stopping=False, constraints=constraints)
    greedy = beam.greedy_search(ToyState(2, table, None), [max_len] * 2, EOS, constraints)
    kept = []  # whether the best output holds a word of several pieces
    for i, source in enumerate(sources):
        valid = [p for p in prefixes if _source_word_valid(p, source, continues, finished=len(p) < max_len - 1)]
        assert len(valid) < len(prefixes) / 2  # the rule bites
        best = max(valid, key=lambda p: logp(p) / (len(p) + 1))
        assert hyps[i][0].tokens == list(best)
        start = next((k for k, t in enumerate(best) if t not in continues), len(best))
        kept.append(any(t in continues for t in best[start + 1:]))  # a source word after the opening run
        assert {tuple(h.tokens) for h in hyps[i]} <= set(valid)
        assert hyps[i][0].log_prob == pytest.approx(logp(tuple(hyps[i][0].tokens)))
        # greedy: the most likely allowed token at each step
        out = greedy[i]
        assert _source_word_valid(tuple(out), source, continues, finished=len(out) < max_len - 1)
        for t in range(len(out) + 1):
            token = out[t] if t < len(out) else EOS
            allowed = [x for x in range(V) if (_source_word_valid(tuple(out[:t]), source, continues, finished=True)
                                               if x == EOS else _source_word_valid(tuple(out[:t]) + (x,), source, continues))]
            if t + 1 >= max_len:
                allowed = [EOS]
            assert token == max(allowed, key=lambda x: table[tuple(out[:t])][x])
    assert any(kept)



def test_an_unfinished_word_cannot_end_the_output_unless_nothing_else_can():
    """Source word (1, 3, 3): after the output (1, 3) only 3 may follow, not <eos> (the word would be
    left half written), after (1) anything but <eos> and 4; at the length limit only <eos>; and where
    another rule bans the one piece that finishes the word (no token right after itself), <eos> with
    its own log-probability is what is left."""
    V, continues = 6, frozenset({3, 4})
    logp = torch.log_softmax(torch.randn(1, V, generator=torch.Generator().manual_seed(0)), -1)
    words = beam.Constraints(continues=continues).for_sources([[1, 3, 3]])
    out = beam._constrain(logp.clone(), [([1, 3], False, 0)], EOS, words)
    assert torch.isfinite(out[0]).tolist() == [x == 3 for x in range(V)]
    out = beam._constrain(logp.clone(), [([1], False, 0)], EOS, words)  # 1 begins a source word, never alone
    assert torch.isfinite(out[0]).tolist() == [x in (1, 2, 3, 5) for x in range(V)]  # not <eos>; a next word may
    out = beam._constrain(logp.clone(), [([1], False, 0)], EOS, beam.Constraints(continues=continues).for_sources(
        [[1, 3, 3, 1]]))  # ... where the source has 1 alone too, <eos> may follow it
    assert torch.isfinite(out[0]).tolist() == [x != 4 for x in range(V)]
    out = beam._constrain(logp.clone(), [([1, 3], True, 0)], EOS, words)
    assert torch.isfinite(out[0]).tolist() == [x == EOS for x in range(V)]
    strict = beam.Constraints(continues=continues, no_immediate_repeat=True).for_sources([[1, 3, 3]])
    out = beam._constrain(logp.clone(), [([1, 3], False, 0)], EOS, strict)
    assert torch.isfinite(out[0]).tolist() == [x == EOS for x in range(V)] and out[0, EOS] == logp[0, EOS]
    out = beam._constrain(logp.clone(), [([1, 3, 3], False, 0)], EOS, strict)  # whole: <eos> or a next word
    assert torch.isfinite(out[0]).tolist() == [x not in continues for x in range(V)]
