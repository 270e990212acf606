"""Text sources, token shards and block sampling.

``BlockSampler`` and ``eval_batches`` return torch tensors; they are imported on first use so
that ``lmforge prepare`` does not pay for importing torch.
"""

from lmforge.data.shards import ShardWriter, TokenDataset, load_meta, prepare, token_dtype
from lmforge.data.sources import corpus_bytes, iter_documents

__all__ = [
    "BlockSampler", "ShardWriter", "TokenDataset", "corpus_bytes", "eval_batches", "iter_documents",
    "load_meta", "prepare", "token_dtype",
]


def __getattr__(name: str):
    if name in ("BlockSampler", "eval_batches"):
        from lmforge.data import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
