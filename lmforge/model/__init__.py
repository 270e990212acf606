"""The Transformer: layers (the article's pieces by name), the decoder-only language model, the
BERT-style encoder and the encoder-decoder, and the one factory that builds any of them."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import KVCache


def build_model(cfg, device: str | torch.device | None = None, empty: bool = False) -> nn.Module:
    """The model ``cfg.arch`` names (a :class:`~lmforge.config.ModelConfig`): DecoderLM (decoder),
    EncoderModel (encoder) or Seq2SeqLM (seq2seq), initialised from the global random generator.

    ``empty=True``: memory allocated on ``device`` but not initialised, for weights about to be
    loaded (import, export).
    """
    from lmforge.model.encoder import EncoderModel
    from lmforge.model.seq2seq import Seq2SeqLM

    cls = {"encoder": EncoderModel, "seq2seq": Seq2SeqLM, "decoder": DecoderLM}.get(cfg.arch)
    if cls is None:
        from lmforge.errors import LMForgeError

        raise LMForgeError(f"unknown model.arch {cfg.arch!r}; use decoder, encoder or seq2seq")
    if not empty:
        model = cls(cfg)
        return model.to(device) if device is not None else model
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device=device or "cpu")
    if cfg.arch != "encoder" and cfg.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.tok_emb.weight
    return model


__all__ = ["DecoderLM", "KVCache", "build_model"]
