"""Random fixed-size windows of prepared token shards: the data path the language model and the masked
language model share (``lmforge prepare`` on the main process, then :class:`~lmforge.data.sampler.BlockSampler`).

``train.batch_size`` is the global number of windows per micro-batch: each of W processes draws
its own ``batch_size / W`` of them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.lock import DirectoryLock
from lmforge.train import checkpoint as ckpt_io
from lmforge.train import distributed as dist_io
from lmforge.train.distributed import World
from lmforge.train.objective import Objective, Run, check_same_model


def prepare_data(cfg: Config, progress: bool, world: World | None = None) -> dict:
    """``lmforge prepare`` on the main rank unless ``data.data_dir`` holds prepared data; the
    vocabulary size it implies goes into ``cfg.model``."""
    from lmforge.data.shards import check_fingerprint, load_meta, prepare

    world = world or World()
    meta_path = Path(cfg.data.data_dir) / "meta.json"
    if world.is_main:  # one process prepares; another one preparing the same directory waits for it
        with DirectoryLock(cfg.data.data_dir, "data preparation", wait=True):
            if meta_path.exists():
                check_fingerprint(cfg.data, load_meta(cfg.data.data_dir))
            else:
                prepare(cfg.data, progress=progress)
    dist_io.barrier(world)
    if not meta_path.exists():
        raise LMForgeError(
            f"{meta_path} is missing on this node (rank {world.rank}); put data.data_dir on a shared file system "
            "or run `lmforge prepare` with the same recipe on every node first"
        )
    meta = load_meta(cfg.data.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size != meta["vocab_size"] and not ckpt_io.padded_vocabulary(
            Path(cfg.data.data_dir), cfg.model.vocab_size, int(meta["vocab_size"])):  # an import's padded embedding
        start = cfg.train.init_from and ckpt_io.latest_checkpoint(cfg.train.init_from)
        if start and ckpt_io.padded_vocabulary(start, cfg.model.vocab_size, int(meta["vocab_size"])):
            fix = (f"the model's embedding is padded beyond its tokenizer: copy {start / ckpt_io.VOCABULARY_RECORD} "
                   f"beside the tokenizer.json in {cfg.data.data_dir}")
        else:
            fix = "set --model.vocab_size=0 to take it from the data"
        raise LMForgeError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {cfg.data.data_dir} has "
                           f"{meta['vocab_size']} tokens; {fix}")
    return meta


def check_compatible(ckpt: Path, cfg: Config, what: str) -> None:
    """Refuse a checkpoint whose weights cannot be this config's model, or whose tokenizer differs."""
    check_same_model(ckpt, cfg, what)
    ckpt_tok = ckpt_io.require_file(ckpt, ckpt_io.TOKENIZER, "copy the tokenizer.json it was trained with into it")
    data_tok = Path(cfg.data.data_dir) / ckpt_io.TOKENIZER
    if not data_tok.is_file():
        raise LMForgeError(f"{data_tok} is missing; rerun `lmforge prepare` for data.data_dir")
    if ckpt_io.read_json(ckpt_tok) != ckpt_io.read_json(data_tok):
        raise LMForgeError(
            f"cannot {what} {ckpt}: its tokenizer differs from {data_tok}; "
            "use the data directory the checkpoint was trained on (data.data_dir)"
        )


class WindowObjective(Objective):
    """Random windows of the prepared token shards: the data path of the language model and of the
    masked language model. Subclasses give the model and the loss."""

    def setup(self, run: Run) -> None:
        from lmforge.data.shards import TokenDataset

        super().setup(run)
        cfg, world = run.cfg, run.world
        prepare_data(cfg, progress=cfg.train.progress and world.is_main, world=world)
        self.train_data = TokenDataset(cfg.data.data_dir, "train")
        self.val_data = TokenDataset(cfg.data.data_dir, "val")
        for split, ds in (("train", self.train_data), ("val", self.val_data)):
            if len(ds) < cfg.model.block_size + 1:
                raise LMForgeError(
                    f"the {split} split of {cfg.data.data_dir} has {len(ds)} tokens, fewer than model.block_size+1 "
                    f"({cfg.model.block_size + 1}); use a larger corpus or a smaller model.block_size")
        self.rank_batch = dist_io.per_rank_batch(cfg.train.batch_size, world)
        self.init_from = None
        if run.resume_from is not None:
            check_compatible(run.resume_from, cfg, "resume from")
        elif cfg.train.init_from:
            self.init_from = ckpt_io.latest_checkpoint(cfg.train.init_from)
            check_compatible(self.init_from, cfg, "initialise from")
        from lmforge.data.sampler import BlockSampler

        self.sampler = BlockSampler(self.train_data, cfg.model.block_size, self.rank_batch, seed=cfg.train.seed,
                                    rank=world.rank, world_size=world.world_size)

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.run.cfg.data.data_dir) / ckpt_io.TOKENIZER

    def describe(self, model: nn.Module) -> str:
        cfg = self.run.cfg
        tcfg = cfg.train
        per_step = tcfg.batch_size * cfg.model.block_size * tcfg.grad_accum
        return (f"{self.name} model: {model.num_params():,} parameters "
                f"({model.num_params(exclude_embeddings=True):,} without embeddings); {tcfg.batch_size} x "
                f"{cfg.model.block_size} tokens per micro-batch ({self.rank_batch} windows per rank), "
                f"{per_step:,} tokens per step")

    def throughput(self, batch) -> int:
        return batch[0].numel()
