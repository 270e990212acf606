"""Text sources, token shards, block sampling and padding.

Every name is imported on first use: ``lmforge prepare`` does not pay for importing torch
(``BlockSampler`` and ``eval_batches`` return torch tensors), and ``lmforge.data.padding``, which
models and tasks import, does not pay for the tokenizer, numpy and tqdm that the shards need.
"""

from __future__ import annotations

import importlib

#: public name -> the submodule that defines it
_WHERE = {
    "BlockSampler": "sampler", "eval_batches": "sampler",
    "ShardWriter": "shards", "TokenDataset": "shards", "load_meta": "shards", "prepare": "shards",
    "token_dtype": "shards",
    "corpus_bytes": "sources", "iter_documents": "sources",
}
_SUBMODULES = ("padding", "sampler", "shards", "sources")

__all__ = [
    "BlockSampler", "ShardWriter", "TokenDataset", "corpus_bytes", "eval_batches", "iter_documents",
    "load_meta", "prepare", "token_dtype",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lmforge.data.{name}")
    if name in _WHERE:
        return getattr(importlib.import_module(f"lmforge.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
