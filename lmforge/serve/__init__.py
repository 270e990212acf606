"""Serving a decoder-only language model: :mod:`lmforge.serve.engine` holds the decoding engine
(one model worker thread, continuous batching over the KV cache) behind ``lmforge serve``."""
