"""generate(): KV-cache decoding against a plain recompute-everything loop, and each sampling rule
against an explicit reference."""

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.generate import (
    apply_repetition_penalty,
    generate,
    generate_text,
    next_tokens,
    top_k_filter,
    top_p_filter,
)
from lmforge.model import DecoderLM

V = 40


def make_model(pos="learned", block_size=16, **kw):
    torch.manual_seed(0)
    # A large init spread keeps the logits far apart, so argmax never hinges on rounding.
    cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=4, d_model=32,
                      pos_encoding=pos, init_std=0.3, **kw)
    return DecoderLM(cfg).eval()


@torch.no_grad()
def reference_greedy(model, prompt, n, eot_id=None, penalty=1.0):
    """No cache, no padding, no batch: run the last block_size tokens every step and take the argmax."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq[-model.cfg.block_size:]]))[0, -1].double()
        if penalty != 1.0:
            for t in set(seq):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        token = int(logits.argmax())
        seq.append(token)
        if token == eot_id:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_greedy_equals_argmax_loop_without_cache(pos):
    model = make_model(pos, n_kv_head=2)
    prompt = torch.randint(0, V, (5,)).tolist()
    # 30 new tokens with a 16-token context: the window slides past the start.
    assert generate(model, [prompt], max_new_tokens=30, greedy=True) == [reference_greedy(model, prompt, 30)]


@pytest.mark.parametrize("pos", ["learned", "rotary"])
@pytest.mark.parametrize("block_size, lengths", [(32, (7, 1, 12, 3)), (16, (7, 1, 16, 3))])
def test_batch_equals_single_prompts(pos, block_size, lengths):
    """Left padding, per-row positions and the mask; with block_size 16 the window also slides."""
    model = make_model(pos, block_size=block_size, n_kv_head=2)
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in lengths]
    batch = generate(model, prompts, max_new_tokens=20, greedy=True, repetition_penalty=1.3)
    for prompt, got in zip(prompts, batch):
        assert [got] == generate(model, [prompt], max_new_tokens=20, greedy=True, repetition_penalty=1.3)
        assert got == reference_greedy(model, prompt, 20, penalty=1.3)


def first_new_token_index(tokens):
    return next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])


def test_stops_at_end_of_text_per_row():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, max_new_tokens=12, greedy=True)
    k = first_new_token_index(free[0])
    eot = free[0][k]
    stopped = generate(model, prompts, max_new_tokens=12, greedy=True, eot_id=eot)
    assert stopped[0] == free[0][:k]  # eot itself is not returned
    assert stopped[1] == reference_greedy(model, prompts[1], 12, eot_id=eot)


def test_streaming_callback_sees_every_token_in_order():
    model = make_model()
    seen = {0: [], 1: []}
    out = generate(model, [[1, 2], [3]], max_new_tokens=8, temperature=0.8, top_k=10,
                   generator=torch.Generator().manual_seed(0), on_token=lambda r, t: seen[r].append(t))
    assert [seen[0], seen[1]] == out
    assert all(len(o) == 8 for o in out)


def test_sampling_is_reproducible_and_temperature_zero_is_greedy():
    model = make_model()
    prompt = [[3, 1, 4]]
    a = generate(model, prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert a == b
    greedy = generate(model, prompt, 10, greedy=True)
    assert generate(model, prompt, 10, temperature=0.0) == greedy
    assert generate(model, prompt, 10, top_k=1, generator=torch.Generator().manual_seed(3)) == greedy


def test_model_mode_is_restored_and_zero_tokens():
    model = make_model()
    model.train()
    assert generate(model, [[1]], max_new_tokens=0) == [[]]
    generate(model, [[1]], max_new_tokens=2)
    assert model.training


def test_prompt_errors():
    model = make_model(block_size=16)
    with pytest.raises(LMForgeError, match="prompt 1 is 17 tokens but the model's context is 16; shorten"):
        generate(model, [[1], [2] * 17], max_new_tokens=5)
    generate(model, [[2] * 16], max_new_tokens=3)  # a full-context prompt is fine: the window slides
    with pytest.raises(LMForgeError, match="empty"):
        generate(model, [[]])
    with pytest.raises(LMForgeError, match="vocabulary"):
        generate(model, [[V]])
    with pytest.raises(LMForgeError, match="top_p"):
        generate(model, [[1]], top_p=0.0)
    with pytest.raises(LMForgeError, match="top_k"):
        generate(model, [[1]], top_k=0)
    with pytest.raises(LMForgeError, match="temperature"):
        generate(model, [[1]], temperature=-1)


# ----------------------------------------------------------------------------------------------
# Sampling rules against explicit references


def test_top_k_filter_matches_reference():
    logits = torch.randn(3, 20)
    for k in (1, 5, 20, 50):
        got = top_k_filter(logits, k)
        for row in range(3):
            kept = sorted(range(20), key=lambda i: -logits[row, i].item())[: min(k, 20)]
            for i in range(20):
                assert (got[row, i].item() == logits[row, i].item()) == (i in kept)
                assert (got[row, i].item() == -math.inf) == (i not in kept)


def test_top_p_filter_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 30) * 2
    for p in (0.05, 0.5, 0.9, 0.999):
        got = top_p_filter(logits, p)
        for row in range(4):
            probs = torch.softmax(logits[row].double(), -1).tolist()
            order = sorted(range(30), key=lambda i: -probs[i])
            kept, mass = set(), 0.0
            for i in order:  # smallest set of most likely tokens whose mass reaches p
                kept.add(i)
                mass += probs[i]
                if mass >= p:
                    break
            assert {i for i in range(30) if got[row, i] > -math.inf} == kept
            assert all(got[row, i] == logits[row, i] for i in kept)


def test_repetition_penalty_matches_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[True, True, False, True, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0, 0.5, -6.0, 1.0]]))


def test_sampled_frequencies_follow_filtered_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    draws = next_tokens(logits.expand(n, 6), temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    expected = torch.softmax(logits[:3].double() / 0.7, -1)
    torch.testing.assert_close(freq[:3], expected, atol=0.015, rtol=0)
    assert freq[3:].sum() == 0


# ----------------------------------------------------------------------------------------------
# Text in, text out


class CharTokenizer:
    """A stand-in with the contract's interface: one id per character, id 0 = end of text."""

    alphabet = "\0abcdefghijklmnopqrstuvwxyz .,;!?ABCDEFGHIJK"[:V]
    eot_id = 0

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)

    def stream_decoder(self):
        tokenizer = self

        class Stream:
            def push(self, token):
                return tokenizer.decode([token])

            def flush(self):
                return ""

        return Stream()


def test_generate_text_encodes_streams_and_decodes():
    model = make_model()
    tok = CharTokenizer()
    pieces = {0: [], 1: []}
    texts = generate_text(model, tok, ["hello", ""], max_new_tokens=12, greedy=True,
                          stream=lambda row, text: pieces[row].append(text))
    ids = generate(model, [tok.encode("hello"), [tok.eot_id]], max_new_tokens=12, greedy=True, eot_id=tok.eot_id)
    assert texts == [tok.decode(i) for i in ids]
    assert ["".join(pieces[0]), "".join(pieces[1])] == texts


def _cut_reference(text, stops, max_lines):
    """Where the text ends, found independently of lmforge.generate.stops."""
    ends = [text.find(s) for s in stops if s in text]
    if max_lines is not None and text.count("\n") >= max_lines:
        ends.append(len("\n".join(text.split("\n")[:max_lines])))
    return text[:min(ends)] if ends else text


@pytest.mark.parametrize("stops,max_lines", [(["\n\n"], None), (["ba", "\n\n"], None), ([], 1), ([], 3),
                                             (["aaa"], 2)])
def test_stop_strings_and_max_lines_end_the_text(stops, max_lines):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["ab\n"], "char", special_tokens=(), byte_fallback=False)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, d_model=16,
                                  init_std=0.3)).eval()

    def run(**kw):
        return generate_text(model, tok, ["a"], max_new_tokens=80, temperature=1.0,
                             generator=torch.Generator().manual_seed(3), **kw)[0]

    full = run()
    assert full.count("\n") >= 4 and "\n\n" in full and "ba" in full  # the cases below all cut something
    expected = _cut_reference(full, stops, max_lines)
    assert len(expected) < len(full)
    pieces = []
    assert run(stop=stops, max_lines=max_lines, stream=lambda row, text: pieces.append(text)) == expected
    assert "".join(pieces) == expected  # streamed, a stop string is never shown in part
    assert run(stop=stops, max_lines=max_lines) == expected


def test_on_token_returning_true_finishes_the_row():
    model = make_model()
    full = generate(model, [[1, 2], [3]], max_new_tokens=10, greedy=True)
    calls = []

    def on_token(row, token):
        calls.append(row)
        return row == 0 and calls.count(0) == 4  # row 0 ends after its 4th token

    out = generate(model, [[1, 2], [3]], max_new_tokens=10, greedy=True, on_token=on_token)
    assert out == [full[0][:4], full[1]]
    with pytest.raises(LMForgeError, match="max_lines"):
        generate_text(model, CharTokenizer(), ["ab"], max_new_tokens=3, max_lines=0)
