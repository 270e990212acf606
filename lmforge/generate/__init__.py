"""Decoding a trained model: sampling from a language model, and greedy or beam search for tasks.

- :mod:`~lmforge.generate.sampling`: ``generate`` continues prompts with a decoder-only language
  model (greedy, temperature, top-k, top-p, repetition penalty) over the KV cache;
  ``generate_text`` wraps it with a tokenizer.
- :mod:`~lmforge.generate.beam`: greedy and beam search over a batch of sources, for the
  encoder-decoder and the decoder-only task models (``lmforge translate`` / ``summarize``).
- :mod:`~lmforge.generate.quantize`: ``quantize_int8``, int8 weights for faster CPU decoding.
"""

from lmforge.generate.quantize import quantize_int8
from lmforge.generate.sampling import (
    apply_repetition_penalty,
    generate,
    generate_text,
    next_tokens,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "apply_repetition_penalty", "generate", "generate_text", "next_tokens", "quantize_int8", "top_k_filter",
    "top_p_filter",
]
