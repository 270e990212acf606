"""Hugging Face interoperability: ``lmforge import`` and ``lmforge export``.

Mapped architectures: GPT-2 and Llama (decoders, ``DecoderLM``), BERT (encoder,
``EncoderModel``) and Marian (encoder-decoder, ``Seq2SeqLM``). Every tensor is accounted for and
every setting is mapped exactly or refused with a message naming it; tests/test_interop.py
checks logits and greedy continuations against transformers. A model vocabulary larger than the
tokenizer (a padded embedding) is kept as it is, and never generated beyond the tokenizer (see
:mod:`lmforge.interop.convert`). ``lmforge export --format gguf`` writes GPT-2- and Llama-shaped
decoders as one GGUF file for llama.cpp (:mod:`lmforge.interop.gguf`).
"""

from lmforge.interop.architectures import ARCHITECTURES
from lmforge.interop.convert import (
    architecture_for,
    export_checkpoint,
    from_transformers,
    import_checkpoint,
    model_from_hf,
    supported,
)

__all__ = ["ARCHITECTURES", "architecture_for", "export_checkpoint", "from_transformers", "import_checkpoint",
           "model_from_hf", "supported"]
