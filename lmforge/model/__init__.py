"""The Transformer: layers (the article's pieces by name) and the decoder-only language model."""

from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import KVCache

__all__ = ["DecoderLM", "KVCache"]
