"""Sampling text from a trained model: greedy, temperature, top-k, top-p, repetition penalty.

Decoding uses the KV cache: the prompts are run once (prefill), then each step feeds only the
newest token. A batch of prompts is left-padded so that every row's next token sits in the last
column; the attention mask hides the padding and each row's positions start at 0 at its first
real token, so a prompt gives the same tokens alone or in a batch.

Context policy (as nanoGPT): a prompt may be up to block_size tokens. When prompt + generated
text grows past block_size, the model keeps seeing only the last block_size tokens, at positions
0..block_size-1 (a sliding window); from then on each step re-runs that window, because with
learned or sinusoidal positions every cached key would otherwise carry a stale position.

Decodable ids: a model's vocabulary (``cfg.model.vocab_size``, the width of its logits) may be larger
than its tokenizer, as in checkpoints whose embedding is padded (Llama 3, Qwen2, phi-2, GPT-NeoX).
The number of ids the tokenizer can decode is the tokenizer's own size (``Tokenizer.vocab_size``,
read from tokenizer.json when the checkpoint is loaded; an imported checkpoint's vocabulary.json only
vouches that the difference is meant). ``generate_text`` passes it as ``vocab_limit``, and
``generate`` / ``next_tokens`` then never choose an id at or above it (those logits are set to -inf;
nothing is masked, and nothing copied, when the two sizes are equal). Callers of ``generate`` or
``next_tokens`` with ids of their own pass ``vocab_limit=tokenizer.vocab_size`` themselves.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.padding import pad_batch
from lmforge.errors import LMForgeError
from lmforge.generate.stops import StopWatch, check_stops, find_stop

# ----------------------------------------------------------------------------------------------
# Logit processing: each function takes float logits [B, V] and returns new logits.


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens already in the prompt or the output:
    a positive logit is divided by ``penalty``, a negative one multiplied, so with penalty > 1
    a seen token always becomes less likely. ``seen`` is bool [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens whose probabilities
    sum to at least p. Token i, in order of decreasing probability, is kept when the probability
    mass of the tokens ranked above it is still below p (so the most likely token is always kept)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_above >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Choose one token per row from logits [B, V]: penalty, then argmax (greedy or temperature 0),
    or softmax(logits / temperature) restricted by top-k and top-p, then a random draw.

    ``vocab_limit``: only ids below it can be chosen (the tokenizer's size, for a model whose
    vocabulary is larger than its tokenizer); the logits at and above it become -inf."""
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.to(torch.float32, copy=True)  # never the caller's tensor
        logits[..., vocab_limit:] = float("-inf")
    else:
        logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The decoding loop


def _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, block_size, vocab_size):
    if not prompts:
        raise LMForgeError("no prompt given; pass at least one prompt")
    if max_new_tokens < 0:
        raise LMForgeError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if temperature < 0:
        raise LMForgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise LMForgeError(f"top_k must be at least 1, got {top_k}; leave it unset to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LMForgeError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise LMForgeError(f"repetition_penalty must be positive (1 = off), got {repetition_penalty}")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise LMForgeError(f"prompt {row} is empty; give at least one token (e.g. the end-of-text token)")
        if len(prompt) > block_size:
            raise LMForgeError(
                f"prompt {row} is {len(prompt)} tokens but the model's context is {block_size}; "
                f"shorten the prompt to at most {block_size} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise LMForgeError(
                f"prompt {row} holds token id {bad[0]}, outside the model's vocabulary of {vocab_size}; "
                "encode prompts with the model's own tokenizer"
            )


def _prefill(model, windows: list[list[int]], max_len: int, device):
    """Run left-padded windows through the model into a fresh cache; return the last logits,
    the cache, the attention mask (None when no row is padded: attention then takes its
    unmasked fast path) and each row's next position."""
    idx, mask = pad_batch(windows, 0, left=True)
    B, width = idx.shape
    idx, mask = idx.to(device), mask.to(device)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = model.new_cache(B, max_len)
    next_pos = mask.long().sum(dim=1)
    if all(len(w) == width for w in windows):
        mask = None
    logits = model(idx, attention_mask=mask, positions=positions, cache=cache, last_only=True)[:, -1]
    return logits, cache, mask, next_pos


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Returns the new tokens only, one list per prompt; a row stops at ``eot_id`` (which is not
    included). ``on_token(row, token_id)`` is called for each token as it is produced (streaming);
    when it returns True the row is finished after that token (its text reached a stop string).
    ``greedy`` or ``temperature=0`` takes the most likely token; otherwise tokens are drawn from
    softmax(logits / temperature) limited to the ``top_k`` most likely and to the ``top_p``
    probability mass. ``repetition_penalty`` > 1 discourages tokens already in the prompt or output.
    ``generator`` (on the model's device) makes sampling reproducible. ``vocab_limit``: the number of
    ids the tokenizer can decode (its ``vocab_size``) where the model's vocabulary is larger; no id at
    or above it is produced. ``generate_text`` passes the tokenizer's size itself.
    """
    if getattr(model.cfg, "arch", "decoder") != "decoder":
        raise LMForgeError(f"this checkpoint is a model.arch={model.cfg.arch} model, which generate() cannot continue "
                           "text with; use a decoder (language model) checkpoint")
    block_size = model.cfg.block_size
    vocab_size = model.cfg.vocab_size
    _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, block_size, vocab_size)
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) or vocab_limit < 1):
        raise LMForgeError(f"vocab_limit must be a positive number of token ids, got {vocab_limit!r}; "
                           "pass the tokenizer's vocab_size")
    if vocab_limit is not None and vocab_limit >= vocab_size:
        vocab_limit = None  # every id of the model can be decoded: nothing to mask
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()

    rows = len(prompts)
    tokens = [list(p) for p in prompts]  # everything fed so far, per row
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * rows
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True

    cache = mask = next_pos = chosen = None
    try:
        for step in range(max_new_tokens):
            if cache is None or cache.length >= cache.max_len:
                # Start, or the context is full: (re)run each row's last block_size tokens.
                windows = [t[-block_size:] for t in tokens]
                width = max(len(w) for w in windows)
                still_to_feed = max_new_tokens - step - 1
                logits, cache, mask, next_pos = _prefill(model, windows, min(block_size, width + still_to_feed), device)
            else:
                # Feed the token chosen last step (one per row) at each row's next position.
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.bool, device=device)], dim=1)
                logits = model(chosen[:, None], attention_mask=mask, positions=next_pos[:, None], cache=cache)[:, -1]
                next_pos = next_pos + 1

            chosen = next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, seen=seen, greedy=greedy,
                                 generator=generator, vocab_limit=vocab_limit)
            if seen is not None:
                seen[torch.arange(rows, device=device), chosen] = True
            for row, token in enumerate(chosen.tolist()):
                tokens[row].append(token)  # finished rows keep being fed; their tokens are dropped
                if finished[row]:
                    continue
                if eot_id is not None and token == eot_id:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None and on_token(row, token):
                    finished[row] = True
            if all(finished):
                break
    finally:
        model.train(was_training)
    return outputs


# ----------------------------------------------------------------------------------------------
# Text in, text out


class _Tokenizer(Protocol):
    eot_id: int | None
    #: (optional) the number of ids it decodes; a larger model vocabulary is masked beyond it
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream_decoder(self): ...


def generate_text(
    model,
    tokenizer: _Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 200,
    *,
    stream: Callable[[int, str], None] | None = None,
    stop: Sequence[str] = (),
    max_lines: int | None = None,
    **sampling,
) -> list[str]:
    """Encode the prompts, ``generate``, decode the new tokens; stops at the tokenizer's end-of-text.

    ``sampling`` holds ``generate``'s keywords for choosing tokens (``temperature``, ``top_k``,
    ``top_p``, ``repetition_penalty``, ``greedy``, ``generator``), with the same defaults.
    An empty prompt starts from the end-of-text token (unconditional sampling). ``stream(row, text)``
    receives printable pieces of each row's continuation as they are produced (never half a
    UTF-8 character). Where the model's vocabulary is larger than the tokenizer (a padded embedding),
    only ids below the tokenizer's ``vocab_size`` are produced.

    ``stop``: strings that end a continuation (cut off, not returned); ``max_lines``: a continuation
    ends just before its ``max_lines``-th line break (see :mod:`lmforge.generate.stops`).
    """
    stop = check_stops(stop, max_lines)
    eot_id = tokenizer.eot_id
    ids = []
    for prompt in prompts:
        encoded = tokenizer.encode(prompt)
        if not encoded:
            if eot_id is None:
                raise LMForgeError("the prompt is empty and the tokenizer has no end-of-text token; give a prompt")
            encoded = [eot_id]
        ids.append(encoded)

    on_token = None
    watching = stream is not None or stop or max_lines is not None
    if watching:
        decoders = [tokenizer.stream_decoder() for _ in prompts]
        watches = [StopWatch(stop, max_lines) for _ in prompts]

        def on_token(row: int, token: int) -> bool:
            piece = watches[row].push(decoders[row].push(token))
            if piece and stream is not None:
                stream(row, piece)
            return watches[row].done

    decodable = getattr(tokenizer, "vocab_size", None)
    if isinstance(decodable, int) and "vocab_limit" not in sampling:
        sampling["vocab_limit"] = decodable
    new_tokens = generate(model, ids, max_new_tokens=max_new_tokens, eot_id=eot_id, on_token=on_token, **sampling)
    if watching:
        for row, (decoder, watch) in enumerate(zip(decoders, watches)):
            tail = watch.push(decoder.flush()) + watch.flush()
            if tail and stream is not None:
                stream(row, tail)
    texts = [tokenizer.decode(t) for t in new_tokens]
    ends = [find_stop(text, stop, 0, max_lines) for text in texts]
    return [text if end is None else text[:end] for text, end in zip(texts, ends)]
