"""How a (source, target) pair becomes model inputs, for both designs, and the loss on them.

encoder-decoder (model.arch=seq2seq)::

    encoder:  [prefix] source <eos>
    decoder:  <s> target            (input)
              target <eos>          (labels)

decoder-only (model.arch=decoder): one sequence ``[prefix] source <sep> target <eos>``, trained
as a language model whose loss covers only ``target <eos>`` (the source positions carry the
ignore index), then prompted with ``[prefix] source <sep>`` to generate.

``<eos>`` is the tokenizer's end-of-text token (its first special token); ``<s>``, ``<sep>`` and
``<pad>`` are used when the tokenizer has them and fall back to ``<eos>`` otherwise (a language
model's tokenizer usually has only end-of-text), which is unambiguous because targets are read
after a fixed start and padding is always masked. A BERT-style tokenizer (``[CLS]``, ``[SEP]``,
``[PAD]``; an imported encoder's) uses those: ``[CLS]`` starts, ``[SEP]`` ends and separates.
``task.decoder_start`` names another start token (an imported Marian model's decoder starts from
``<pad>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.data.padding import IGNORE_INDEX, pad_batch
from lmforge.errors import LMForgeError
from lmforge.model.heads import token_loss

PAD, BOS, SEP = "<pad>", "<s>", "<sep>"


def task_special_tokens(special_tokens: list[str], source_prefix: str) -> list[str]:
    """The tokenizer's special tokens for a task: the recipe's (end-of-text first), then <pad>, <s>,
    <sep>, and the source prefix when it is a single tag such as ``<2es>``."""
    out = list(special_tokens) or ["<|endoftext|>"]
    extra = [PAD, BOS, SEP]
    if source_prefix and source_prefix.startswith("<") and source_prefix.endswith(">") and " " not in source_prefix:
        extra.append(source_prefix)
    return out + [t for t in extra if t not in out]


@dataclass
class SpecialIds:
    eos: int
    bos: int
    sep: int
    pad: int
    prefix: list[int]

    @classmethod
    def from_tokenizer(cls, tokenizer, source_prefix: str = "", decoder_start: str = "") -> "SpecialIds":
        """The ids in ``tokenizer``; ``decoder_start`` names the decoder's start token (task.decoder_start)."""
        if tokenizer.eot_id is None:
            raise LMForgeError("the tokenizer has no special tokens, so no end-of-sequence token; "
                               "train one with data.special_tokens (the first marks the end)")
        eos = tokenizer.eot_id
        names = {"bos": BOS, "sep": SEP, "pad": PAD}
        if all(t in tokenizer.special_tokens for t in ("[CLS]", "[SEP]", "[PAD]")) and BOS not in tokenizer.special_tokens:
            eos = tokenizer.token_to_id("[SEP]")
            names = {"bos": "[CLS]", "sep": "[SEP]", "pad": "[PAD]"}

        def get(token: str) -> int:
            i = tokenizer.token_to_id(token)
            return eos if i is None or token not in tokenizer.special_tokens else i

        bos = get(names["bos"])
        if decoder_start:
            bos = tokenizer.token_to_id(decoder_start)
            if bos is None:
                raise LMForgeError(f"task.decoder_start={decoder_start!r} is not a token of the tokenizer; "
                                   "name one of its tokens (e.g. <pad>) or leave it empty")
        prefix = tokenizer.encode(source_prefix) if source_prefix else []
        return cls(eos=eos, bos=bos, sep=get(names["sep"]), pad=get(names["pad"]), prefix=prefix)


class TaskFormat:
    """Token ids of the model inputs for one design (``arch`` seq2seq or decoder)."""

    def __init__(self, arch: str, ids: SpecialIds):
        self.arch, self.ids = arch, ids

    @property
    def source_room(self) -> int:
        """Tokens the format adds to a source: the prefix and <eos> (seq2seq) or <sep> (decoder)."""
        return len(self.ids.prefix) + 1

    def source(self, text_ids: list[int]) -> list[int]:
        """The encoder input (seq2seq) or the prompt (decoder-only) for a tokenized source."""
        end = self.ids.eos if self.arch == "seq2seq" else self.ids.sep
        return self.ids.prefix + list(text_ids) + [end]

    def lengths(self, sources: list[list[int]], targets: list[list[int]]) -> list[tuple[int, ...]]:
        """The padded-size parts of each example for token batching: (source, target) for seq2seq,
        (whole sequence,) for decoder-only."""
        room = self.source_room
        if self.arch == "seq2seq":
            return [(len(s) + room, len(t) + 1) for s, t in zip(sources, targets)]
        return [(len(s) + room + len(t),) for s, t in zip(sources, targets)]

    def collate(self, sources: list[list[int]], targets: list[list[int]]) -> "Batch":
        """Right-padded tensors of a batch of tokenized (source, target) pairs."""
        pad = self.ids.pad
        if self.arch == "seq2seq":
            src = [self.source(s) for s in sources]
            tgt_in = [[self.ids.bos] + list(t) for t in targets]
            labels = [list(t) + [self.ids.eos] for t in targets]
            src_t, src_mask = pad_batch(src, pad)
            tgt_t, _ = pad_batch(tgt_in, pad)
            lab_t, _ = pad_batch(labels, IGNORE_INDEX)
            return Batch(inputs=tgt_t, labels=lab_t, src=src_t, src_mask=src_mask)
        seqs, labels = [], []
        for s, t in zip(sources, targets):
            prompt = self.source(s)
            seq = prompt + list(t) + [self.ids.eos]
            seqs.append(seq[:-1])
            labels.append([IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt):])
        inputs, _ = pad_batch(seqs, pad)
        lab_t, _ = pad_batch(labels, IGNORE_INDEX)
        return Batch(inputs=inputs, labels=lab_t)


@dataclass
class Batch:
    """inputs [B, T] (decoder input), labels [B, T] (IGNORE_INDEX where no loss), and for an
    encoder-decoder the source src [B, S] with its mask (True = real token)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    src: torch.Tensor | None = None
    src_mask: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        """Tokens the model processes, padding included."""
        return self.inputs.numel() + (self.src.numel() if self.src is not None else 0)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.labels), move(self.src), move(self.src_mask))

    def logits(self, model) -> torch.Tensor:
        if self.src is not None:
            return model(self.src, self.inputs, self.src_mask)
        return model(self.inputs)

    def loss(self, model, label_smoothing: float = 0.0) -> torch.Tensor:
        """:func:`sequence_loss` of the batch; an encoder-decoder computes it in its forward (a copy
        head then never builds its full distribution)."""
        if self.src is not None:
            return model(self.src, self.inputs, self.src_mask, labels=self.labels, label_smoothing=label_smoothing)
        return sequence_loss(self.logits(model), self.labels, label_smoothing)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over target tokens of the label-smoothed cross-entropy (the caller divides by the
    number of target tokens). With smoothing eps the target distribution is (1 - eps) on the
    reference token plus eps / V on every token: loss = (1 - eps) * nll + eps * mean_v(-log p_v)."""
    return token_loss(logits.float(), labels, "sum", label_smoothing)
