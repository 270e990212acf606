"""Task heads on a trunk: one label per text (sequence classification) or per word (token classification).

The trunk is any lmforge body: a causal ``DecoderLM`` (its output head is not used), a
bidirectional ``EncoderModel``, or an imported BERT-style encoder. :func:`trunk_states` runs it
to the final hidden states, optionally adding an extra embedding to the input (the predicate
indicator of semantic role labelling), so the heads never reach into the trunk's classes.

Words and subwords: a tokenizer may split a word into several tokens. :func:`align_words`
tokenizes a list of words and records which word each token belongs to; a word's label sits on
its first token, every other token gets ``IGNORE_INDEX`` and so counts for nothing in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# pad_batch and pad_labels are not used here: they are imported for the tasks that batch inputs for the heads
from lmforge.data.padding import IGNORE_INDEX, pad_batch, pad_labels  # noqa: F401
from lmforge.errors import LMForgeError
from lmforge.model.dropout import Dropout
from lmforge.model.layers import embed_tokens


def is_causal(trunk: nn.Module) -> bool:
    return getattr(trunk.cfg, "arch", "decoder") == "decoder"


def trunk_states(trunk: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, d_model] of a DecoderLM or EncoderModel.

    ``extra`` [B, T, d_model] is added to the input embeddings (before BERT's embedding norm).
    attention_mask: [B, T], True/1 = real token; padding keys are never attended to.
    """
    cfg = trunk.cfg
    B, T = idx.shape
    if trunk.rotary is None and T > cfg.block_size:
        raise LMForgeError(f"input of {T} tokens is longer than the model's context ({cfg.block_size}); "
                           "lower task.max_source_len")
    if not is_causal(trunk):  # the encoder's own forward: token types, MPNet's position bias, ...
        return trunk(idx, attention_mask=attention_mask, extra=extra)
    positions = torch.arange(T, device=idx.device).unsqueeze(0)
    x = embed_tokens(trunk.tok_emb, idx, getattr(trunk, "emb_scale", 1.0), trunk.pos_emb, positions)
    if extra is not None:
        x = x + extra.to(x.dtype)
    x = trunk.drop(x)
    rope = trunk.rotary(positions) if trunk.rotary is not None else None
    mask = attention_mask.bool() if attention_mask is not None else None
    for block in trunk.blocks:
        x = block(x, causal=True, key_padding_mask=mask, rope=rope)
    return trunk.norm_f(x)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence [B, d]: the first token, the mean over real tokens, or the last real token."""
    mask = mask.bool()
    if how == "first":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":  # right padding: the last real token is at length - 1
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise LMForgeError(f"unknown pooling {how!r}; use first, mean or last")


def resolve_pooling(how: str, trunk: nn.Module) -> str:
    """``auto``: the last token for a causal trunk (the only one that has seen the whole text), else the mean."""
    if how != "auto":
        if how == "first" and is_causal(trunk):
            raise LMForgeError("pooling=first on a causal decoder sees only the first token; use last or mean")
        return how
    return "last" if is_causal(trunk) else "mean"


class SequenceClassifier(nn.Module):
    """trunk -> pooled state -> dropout -> linear: logits [B, n_labels]."""

    def __init__(self, trunk: nn.Module, n_labels: int, pooling: str = "auto", dropout: float = 0.1):
        super().__init__()
        if n_labels < 2:
            raise LMForgeError(f"a classifier needs at least 2 labels, got {n_labels}; check the label column")
        self.trunk = trunk
        self.pooling = resolve_pooling(pooling, trunk)
        self.drop = Dropout(dropout)
        self.classifier = nn.Linear(trunk.cfg.d_model, n_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = trunk_states(self.trunk, idx, attention_mask)
        return self.classifier(self.drop(pool(hidden, attention_mask, self.pooling))).float()


class TokenClassifier(nn.Module):
    """trunk -> per-token logits [B, T, n_labels]; optional indicator embedding added to the input
    (``n_indicator`` values, e.g. 2 for "is / is not the predicate").

    Value 0 adds nothing, so unmarked tokens are exactly the trunk's pre-trained input. The other
    values must be visible from the first step (a mark learned up from zero is still too faint
    to tell predicates apart after hundreds of steps): with a BERT-style trunk they start as its
    second segment, ``type_emb[1] - type_emb[0]`` (a marked token reads as segment B, which the
    trunk was pre-trained on); otherwise as random vectors on the scale of the token embeddings.
    """

    def __init__(self, trunk: nn.Module, n_labels: int, n_indicator: int = 0, dropout: float = 0.1):
        super().__init__()
        self.trunk = trunk
        d = trunk.cfg.d_model
        self.indicator = nn.Embedding(n_indicator, d) if n_indicator else None
        if self.indicator is not None:
            self._init_indicator(trunk)
        self.drop = Dropout(dropout)
        self.classifier = nn.Linear(d, n_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @torch.no_grad()
    def _init_indicator(self, trunk: nn.Module) -> None:
        weight = self.indicator.weight
        weight.zero_()
        types = getattr(trunk, "type_emb", None)
        if types is not None and types.num_embeddings >= 2:
            weight[1:] = types.weight[1] - types.weight[0]
        else:
            weight[1:].normal_(std=float(trunk.tok_emb.weight.std()))

    def states(self, idx: torch.Tensor, attention_mask: torch.Tensor, indicator: torch.Tensor | None = None):
        extra = self.indicator(indicator) if self.indicator is not None and indicator is not None else None
        return self.drop(trunk_states(self.trunk, idx, attention_mask, extra))

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor,
                indicator: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.states(idx, attention_mask, indicator)).float()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over tokens whose label is not IGNORE_INDEX (non-first subwords, padding).
    With smoothing eps: (1 - eps) * nll + eps * mean_v(-log p_v)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------ words and subwords


@dataclass
class Special:
    """Tokens put around every input: those the tokenizer's post-processor puts there when it
    names both (BERT's [CLS] ... [SEP], MPNet's <s> ... </s>), else the tokenizer's first special
    token (end of text) at both ends, so a first-token or last-token pooling has a fixed place."""

    bos: int | None
    eos: int | None
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Special":
        cls_id, sep_id = tokenizer.frame
        if cls_id is None or sep_id is None:
            cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        pad_id = next((i for i in map(tokenizer.token_to_id, ("<pad>", "[PAD]")) if i is not None), 0)
        if cls_id is not None and sep_id is not None:
            return cls(cls_id, sep_id, pad_id)
        eot = tokenizer.eot_id
        return cls(eot, eot, eot if eot is not None else 0)

    def wrap(self, ids: list[int]) -> list[int]:
        return ([self.bos] if self.bos is not None else []) + ids + ([self.eos] if self.eos is not None else [])

    @property
    def room(self) -> int:
        return (self.bos is not None) + (self.eos is not None)


def align_words(tokenizer, words: list[str]) -> tuple[list[int], list[int]]:
    """Tokenize the words joined by spaces; return (ids, word index of each token, -1 for a token
    that holds no character of any word, e.g. a lone space). Offsets come from the tokenizer, so
    this works for char, byte-level BPE and WordPiece tokenizers alike."""
    if not words:
        return [], []
    text = " ".join(words)
    char_word = []
    for i, w in enumerate(words):
        if not w or any(c.isspace() for c in w):
            raise LMForgeError(f"word {i + 1} ({w!r}) is empty or holds a space; give words without spaces")
        char_word.extend([i] * len(w))
        char_word.append(-1)
    enc = tokenizer._hf.encode(text, add_special_tokens=False)
    owners = []
    for start, end in enc.offsets:
        owner = next((char_word[c] for c in range(start, min(end, len(text))) if char_word[c] >= 0), -1)
        owners.append(owner)
    return list(enc.ids), owners


def first_subword_labels(owners: list[int], word_labels: list[int]) -> list[int]:
    """Per-token labels: the word's label on its first token, IGNORE_INDEX on the others."""
    out, seen = [], set()
    for w in owners:
        if w < 0 or w in seen:
            out.append(IGNORE_INDEX)
        else:
            seen.add(w)
            out.append(word_labels[w])
    return out


def first_subword_positions(owners: list[int], n_words: int) -> list[int]:
    """Position of each word's first token (-1 for a word that lost all its tokens to truncation)."""
    pos = [-1] * n_words
    for t, w in enumerate(owners):
        if w >= 0 and pos[w] < 0:
            pos[w] = t
    return pos
