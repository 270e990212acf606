"""``lmforge pretrain-encoder``: a BERT-style encoder pre-trained by masked-language modelling.

The data path is the language model's (``lmforge prepare``: tokenizer, token shards, random
fixed-size windows from ``BlockSampler``), and so are the optimizer, schedule, checkpoints and
logs. What differs is the objective: 15% of the positions of each window are chosen; of those
80% become the mask token, 10% a random token and 10% stay as they are; the loss is the
cross-entropy of the original tokens at the chosen positions only (Devlin et al. 2019).

The output layer is the token embedding itself (logits = h E^T), so a checkpoint holds nothing
but :class:`~lmforge.model.encoder.EncoderModel` weights: ``load_model`` reads it, and
``lmforge finetune sentiment|srl --init-from`` starts from it. The mask token is a special
token of the recipe's tokenizer (``data.special_tokens``, e.g. ``<mask>``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.model.heads import IGNORE_INDEX
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.loop import MetricsLog, _prepare_data, autocast, resolve_device, resolve_dtype
from lmforge.train.optim import build_optimizer, lr_at, set_lr

MASK_TOKENS = ("<mask>", "[MASK]")


def mask_tokens(x: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15, never: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): ``rate`` of the positions chosen (never those holding ``never`` ids), 80% of
    them masked, 10% replaced by a random token, 10% kept; labels are IGNORE_INDEX elsewhere."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    chosen = u < rate
    for t in never:
        chosen &= x != t
    labels = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    v = torch.rand(x.shape, generator=generator, device=x.device)
    inputs = x.clone()
    inputs[chosen & (v < 0.8)] = mask_id
    swap = chosen & (v >= 0.8) & (v < 0.9)
    inputs[swap] = torch.randint(0, vocab_size, (int(swap.sum()),), generator=generator, device=x.device)
    return inputs, labels


def mlm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Scores of every vocabulary token at every position, through the (tied) token embedding."""
    return (hidden @ model.tok_emb.weight.t())[..., : model.cfg.vocab_size].float()


def mlm_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = mlm_logits(model, model(inputs))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def find_mask_id(tokenizer) -> int:
    for name in MASK_TOKENS:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    raise LMForgeError("the tokenizer has no mask token; add <mask> to data.special_tokens "
                       "(e.g. --data.special_tokens='[\"<|endoftext|>\", \"<mask>\"]') and a new data.data_dir")


def pretrain_encoder(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Masked-language-model pre-training of ``cfg.model`` (arch=encoder); returns a summary."""
    from lmforge.data import BlockSampler, TokenDataset, eval_batches
    from lmforge.model.encoder import EncoderModel
    from lmforge.tokenizer import Tokenizer

    say = lambda m: tqdm.write(m, file=sys.stderr)  # noqa: E731
    if cfg.model.arch != "encoder":
        raise LMForgeError(f"pretrain-encoder trains model.arch=encoder, the recipe has {cfg.model.arch}; "
                           "use an encoder recipe (e.g. -c encoder-tiny) or --model.arch=encoder")
    tcfg = cfg.train
    out_dir = Path(tcfg.out_dir)
    existing = ckpt_io.step_dirs(out_dir / ckpt_io.CHECKPOINTS)
    if existing and not resume:
        raise LMForgeError(f"{out_dir} already holds checkpoints; pass --resume to continue or choose another train.out_dir")
    if resume and not existing:
        raise LMForgeError(f"no checkpoint to resume in {out_dir}; start without --resume")
    _prepare_data(cfg, tcfg.progress)
    tok_path = Path(cfg.data.data_dir) / ckpt_io.TOKENIZER
    tokenizer = Tokenizer.load(tok_path)
    mask_id = find_mask_id(tokenizer)
    never = tuple(tokenizer.token_to_id(t) for t in tokenizer.special_tokens)
    device = resolve_device(tcfg.device)
    amp_dtype = resolve_dtype(tcfg.dtype, device)
    torch.manual_seed(tcfg.seed)
    model = EncoderModel(cfg.model)
    train_ds, val_ds = TokenDataset(cfg.data.data_dir, "train"), TokenDataset(cfg.data.data_dir, "val")
    sampler = BlockSampler(train_ds, cfg.model.block_size, tcfg.batch_size, tcfg.seed)
    start_step = 0
    if resume:
        ckpt = ckpt_io.latest_checkpoint(out_dir)
        ckpt_io.load_weights(model, ckpt)
    model.to(device)
    optimizer = build_optimizer(model, tcfg, device)
    if resume:
        state = ckpt_io.load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        ckpt_io.restore_rng_state(state["rng"])
        start_step = int(state["step"])
    say(f"encoder: {model.num_params():,} parameters; masked-LM on {len(train_ds):,} tokens, "
        f"batch {tcfg.batch_size} x {cfg.model.block_size}; device {device}")
    log = MetricsLog(out_dir, start_step, tcfg.tensorboard)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        g = torch.Generator().manual_seed(0)  # the same masks at every evaluation
        total, count = 0.0, 0
        for x, _ in eval_batches(val_ds, cfg.model.block_size, tcfg.eval_batch_size or tcfg.batch_size,
                                 tcfg.eval_batches, seed=0):
            inputs, labels = mask_tokens(x, mask_id, cfg.model.vocab_size, g, never=never)
            with autocast(device, amp_dtype):
                total += mlm_loss(model, inputs.to(device), labels.to(device)).item()
            count += int((labels != IGNORE_INDEX).sum())
        model.train()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    bar = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not tcfg.progress)
    model.train()
    t0 = t_last = time.perf_counter()
    step, record, val, ckpt_path, tokens = start_step, {}, {}, None, 0
    while step < tcfg.max_steps:
        lr = lr_at(step, tcfg)
        set_lr(optimizer, lr)
        gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step)  # the step's masks, same on resume
        parts = [mask_tokens(sampler.next_batch()[0], mask_id, cfg.model.vocab_size, gen, never=never)
                 for _ in range(tcfg.grad_accum)]
        count = max(sum(int((lab != IGNORE_INDEX).sum()) for _, lab in parts), 1)
        total = 0.0
        for inputs, labels in parts:  # summed over the step's masked tokens, divided by their number
            with autocast(device, amp_dtype):
                loss = mlm_loss(model, inputs.to(device), labels.to(device)) / count
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        tokens += sum(x.numel() for x, _ in parts)
        last = step == tcfg.max_steps or (tcfg.max_minutes > 0 and time.perf_counter() - t0 > tcfg.max_minutes * 60)
        do_eval = last or (tcfg.eval_interval > 0 and step % tcfg.eval_interval == 0)
        if last or do_eval or step % max(tcfg.log_interval, 1) == 0:
            now = time.perf_counter()
            record = {"step": step, "loss": total, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_second": tokens / max(now - t_last, 1e-9)}
            tokens, t_last = 0, now
            if do_eval:
                val = evaluate()
                record.update(val)
                say(f"step {step}: train loss {total:.4f}, val loss {val['val_loss']:.4f}")
            log.write(record)
            bar.set_postfix(loss=f"{total:.3f}", refresh=False)
        if last or (tcfg.ckpt_interval > 0 and step % tcfg.ckpt_interval == 0):
            ckpt_path = ckpt_io.save_checkpoint(
                out_dir, model, cfg, step=step, optimizer=optimizer, metrics=record, tokenizer_path=tok_path,
                sampler_state=sampler.state_dict())
        if last:
            break
    bar.close()
    log.close()
    if step > start_step:
        from lmforge.train.plot import plot_run

        try:
            plot_run(out_dir)
        except Exception as e:  # a missing plot must not lose a finished run
            say(f"could not draw the loss plot: {e}")
    return {"steps": step, "train_loss": record.get("loss"), **val, "train_seconds": time.perf_counter() - t0,
            "num_params": model.num_params(), "checkpoint": str(ckpt_path) if ckpt_path else None}
