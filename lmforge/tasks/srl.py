"""Semantic role labelling: find the predicates of a sentence, their senses, and each one's arguments.

One trunk, three small heads (:class:`SRLModel`):

- predicate identification: tag every word predicate / not (one pass per sentence);
- roles: for one predicate, tag every word with its role (ARG0, ARGM-TMP, ..., ``_`` for none).
  The predicate's position enters as an indicator embedding added to the input (1 on the
  predicate's tokens, 0 elsewhere; it starts as the trunk's second segment, see
  :class:`lmforge.model.heads.TokenClassifier`), so one pass per (sentence, predicate) pair, batched;
- senses (optional): the sense number (01, 02, ...) from the predicate's state in its role pass.

Labels sit on each word's first subword (:func:`lmforge.model.heads.align_words`); the other
subwords and the special tokens are ignored by the loss. ``lmforge finetune srl`` trains on
CoNLL-U Plus files; ``lmforge srl CKPT "sentence"`` labels raw sentences end to end.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.errors import LMForgeError
from lmforge.model.heads import (IGNORE_INDEX, Special, TokenClassifier, align_words, first_subword_labels,
                                 first_subword_positions, pad_batch, pad_labels, token_loss)
from lmforge.tasks.head import HeadObjective, load_head_checkpoint, to_device
from lmforge.tasks.srl_data import NONE, Sentence, format_score, read_conllu, score, write_conllu

NAME = "srl"
#: the role label of a word that is no argument (the file's ``_``)
O = NONE


class SRLModel(nn.Module):
    """Trunk with a predicate indicator; role, predicate and (optional) sense classifiers."""

    def __init__(self, trunk: nn.Module, n_roles: int, n_senses: int = 0, dropout: float = 0.1):
        super().__init__()
        self.tagger = TokenClassifier(trunk, n_roles, n_indicator=2, dropout=dropout)
        self.trunk = trunk
        d = trunk.cfg.d_model
        self.predicate = nn.Linear(d, 2)
        self.sense = nn.Linear(d, n_senses) if n_senses else None

    def forward(self, ids, mask, indicator, sense_pos=None):
        """(hidden [B, T, d], role logits [B, T, n_roles], predicate logits [B, T, 2]); with
        ``sense_pos`` [B] (the predicate's first token, -1 for none) also the sense logits of the
        rows that have one [R, n_senses] (None without a sense head)."""
        h = self.tagger.states(ids, mask, indicator)
        out = (h, self.tagger.classifier(h).float(), self.predicate(h).float())
        if sense_pos is None:
            return out
        sense = None
        if self.sense is not None:
            rows = (sense_pos >= 0).nonzero().squeeze(-1)
            sense = self.sense(h[rows, sense_pos[rows]]).float()
        return out + (sense,)


# ---------------------------------------------------------------------------------------- examples


def sense_number(sense: str) -> str:
    """``nominate.01`` -> ``01``."""
    return sense.rsplit(".", 1)[1] if "." in sense else sense


class Encoder:
    """Sentences to model inputs: tokens, word alignment, and label ids."""

    def __init__(self, tokenizer, roles: list[str], senses: list[str], max_len: int):
        self.tokenizer, self.special, self.max_len = tokenizer, Special.from_tokenizer(tokenizer), max_len
        self.roles, self.senses = roles, senses
        self.role_id = {r: i for i, r in enumerate(roles)}
        self.sense_id = {s: i for i, s in enumerate(senses)}

    def tokens(self, words: list[str]) -> tuple[list[int], list[int]]:
        ids, owners = align_words(self.tokenizer, words)
        room = self.max_len - self.special.room
        ids, owners = ids[:room], owners[:room]
        if self.special.bos is not None:
            owners = [-1] + owners
        if self.special.eos is not None:
            owners = owners + [-1]
        return self.special.wrap(ids), owners

    def sentence_examples(self, s: Sentence, where: str = "") -> list[dict]:
        """One predicate-identification example, and one role example per predicate."""
        ids, owners = self.tokens(s.words)
        n = len(s.words)
        preds = s.predicates
        is_pred = [0] * n
        for p in preds:
            is_pred[p] = 1
        out = [{"ids": ids, "owners": owners, "pred": -1, "pid": first_subword_labels(owners, is_pred)}]
        first = first_subword_positions(owners, n)
        columns = s.arguments()
        for k, (p, sense) in enumerate(zip(preds, s.senses)):
            if first[p] < 0:  # the predicate was cut off with the end of a long sentence
                continue
            labels = []
            for w, label in enumerate(columns[k]):
                if label not in self.role_id:
                    raise LMForgeError(f"{where}{s.path}:{s.row_lines[s.word_rows[w]]}: role {label!r} is not among "
                                       f"the model's labels; fix the label or add it to the training file")
                labels.append(self.role_id[label])
            out.append({"ids": ids, "owners": owners, "pred": p,
                        "roles": first_subword_labels(owners, labels),
                        "sense": self.sense_id.get(sense_number(sense), IGNORE_INDEX)})
        return out

    def collate(self, examples: list[dict]) -> dict:
        ids, mask = pad_batch([e["ids"] for e in examples], self.special.pad)
        T = ids.size(1)
        indicator = torch.zeros_like(ids)
        sense_pos = torch.full((len(examples),), -1, dtype=torch.long)
        for i, e in enumerate(examples):
            if e["pred"] >= 0:
                toks = [t for t, w in enumerate(e["owners"]) if w == e["pred"]]
                indicator[i, toks] = 1
                sense_pos[i] = toks[0]
        roles = pad_labels([e.get("roles", []) for e in examples], T)
        pid = pad_labels([e.get("pid", []) for e in examples], T)
        sense = torch.tensor([e.get("sense", IGNORE_INDEX) for e in examples], dtype=torch.long)
        count = int((roles != IGNORE_INDEX).sum() + (pid != IGNORE_INDEX).sum())
        if self.senses:  # the items the loss sums over, known before the forward pass
            count += int((sense[sense_pos >= 0] != IGNORE_INDEX).sum())
        return {"ids": ids, "mask": mask, "indicator": indicator, "roles": roles, "pid": pid,
                "sense_pos": sense_pos, "sense": sense, "examples": examples, "count": count}


def role_inventory(sentences: list[Sentence]) -> tuple[list[str], list[str]]:
    """(role labels with ``_`` first, sense numbers) seen in annotated sentences."""
    roles, senses = set(), set()
    for s in sentences:
        if s.annotated:
            for col in s.arguments():
                roles.update(col)
            senses.update(sense_number(x) for x in s.senses)
    roles.discard(O)
    return [O] + sorted(roles), sorted(senses)


def sense_lexicon(sentences: list[Sentence]) -> list[str]:
    """The senses each lemma carries in annotated sentences, as ``task.sense_lexicon`` entries
    ``"lemma sense sense ..."``, the most frequent sense first (ties by name)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for s in sentences:
        if s.annotated:
            lemmas = s.lemmas
            for p, sense in zip(s.predicates, s.senses):
                seen[lemmas[p]][sense] += 1
    return [" ".join([lemma] + sorted(c, key=lambda x: (-c[x], x))) for lemma, c in sorted(seen.items())]


# --------------------------------------------------------------------------------------------- predict


class Labeller:
    """Predicates, senses and roles for sentences (gold or predicted predicates), as CoNLL-U Plus.

    Each word takes its most likely role (a constraint of one word per core role was measured and
    did not pay: validation F1 0.692 with it, 0.697 without); a predicate's sense is the sense head's choice among the senses its lemma had in training
    (``task.sense_lexicon``), or ``<lemma>.01`` for a lemma training never saw."""

    def __init__(self, model: SRLModel, encoder: Encoder, batch_size: int = 64, sense_lexicon: list[str] = ()):
        self.model, self.enc, self.batch_size = model, encoder, batch_size
        self.lexicon = {entry.split()[0]: entry.split()[1:] for entry in sense_lexicon if entry.split()}

    @torch.no_grad()
    def _run(self, examples: list[dict]):
        """Per example: (role log-probabilities [T, n_roles], predicate tags [T], sense logits or None)."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
        out: list[Any] = [None] * len(examples)
        for s in range(0, len(order), self.batch_size):
            rows = order[s: s + self.batch_size]
            batch = self.enc.collate([examples[i] for i in rows])
            h, role_logits, pid_logits = self.model(batch["ids"].to(device), batch["mask"].to(device),
                                                    batch["indicator"].to(device))
            role_logp = role_logits.log_softmax(-1).cpu()
            for j, i in enumerate(rows):
                sense = None
                if self.model.sense is not None and batch["sense_pos"][j] >= 0:
                    sense = self.model.sense(h[j, batch["sense_pos"][j]]).float().cpu()
                out[i] = (role_logp[j], pid_logits[j].argmax(-1).tolist(), sense)
        return out

    def find_predicates(self, sentences: list[Sentence]) -> list[list[int]]:
        examples = [{"ids": ids, "owners": owners, "pred": -1}
                    for ids, owners in (self.enc.tokens(s.words) for s in sentences)]
        found = []
        for e, s, (_, pid, _) in zip(examples, sentences, self._run(examples)):
            first = first_subword_positions(e["owners"], len(s.words))
            found.append([w for w, t in enumerate(first) if t >= 0 and pid[t] == 1])
        return found

    def sense(self, lemma: str, logits: torch.Tensor | None) -> str:
        """The sense of a predicate with this lemma: among the lemma's senses from training, the one
        the sense head scores highest (the most frequent without a head); ``<lemma>.01`` otherwise."""
        candidates = self.lexicon.get(lemma)
        if not candidates:
            number = self.enc.senses[int(logits.argmax())] if logits is not None and not self.lexicon else "01"
            return f"{lemma}.{number}"
        if logits is None or len(candidates) == 1:
            return candidates[0]
        ids = [self.enc.sense_id.get(sense_number(c)) for c in candidates]
        scored = [(float(logits[i]) if i is not None else float("-inf"), -k) for k, i in enumerate(ids)]
        return candidates[-max(scored)[1]]

    def label(self, sentences: list[Sentence], predicates: list[list[int]] | None = None) -> list[Sentence]:
        """Sentences with predicted senses and roles, for the given predicates (default: predicted)."""
        if predicates is None:
            predicates = self.find_predicates(sentences)
        examples, owner_of = [], []
        for n, (s, preds) in enumerate(zip(sentences, predicates)):
            ids, owners = self.enc.tokens(s.words)
            first = first_subword_positions(owners, len(s.words))
            for p in preds:
                if first[p] >= 0:
                    examples.append({"ids": ids, "owners": owners, "pred": p})
                    owner_of.append((n, p, first))
        results = self._run(examples)
        by_sentence: dict[int, dict[int, tuple[list[str], str]]] = {}
        for (n, p, first), (role_logp, _, sense) in zip(owner_of, results):
            best = role_logp.argmax(-1).tolist()
            labels = [self.enc.roles[best[t]] if t >= 0 else O for t in first]
            by_sentence.setdefault(n, {})[p] = (labels, self.sense(sentences[n].lemmas[p], sense))
        out = []
        for n, (s, preds) in enumerate(zip(sentences, predicates)):
            done = by_sentence.get(n, {})
            kept = [p for p in preds if p in done]
            out.append(s.with_predictions(kept, [done[p][1] for p in kept], [done[p][0] for p in kept]))
        return out


def unseen_roles(sentences: list[Sentence], roles: list[str]) -> Counter:
    """Gold arguments whose label the model was never trained with (it cannot get them right: they
    are scored as misses), by label."""
    known = set(roles)
    return Counter(label for s in sentences if s.annotated for col in s.arguments() for label in col
                   if label not in known and label not in (O, ""))


def describe_unseen(unseen: dict[str, int]) -> str:
    """One line for :func:`unseen_roles`' counts (or the ``unseen_labels`` of a result)."""
    return (f"{sum(unseen.values())} gold arguments carry labels the model was not trained with, scored as misses: "
            + ", ".join(f"{label} x{n}" for label, n in Counter(unseen).most_common()))


def evaluate_sentences(labeller: Labeller, gold: list[Sentence]) -> dict[str, Any]:
    """Scores with gold predicates and end to end (predicted predicates), and sentences per second."""
    gold = [s for s in gold if s.annotated]
    unseen = unseen_roles(gold, labeller.enc.roles)
    start = time.perf_counter()
    with_gold = labeller.label(gold, [s.predicates for s in gold])
    mid = time.perf_counter()
    end_to_end = labeller.label(gold)
    stop = time.perf_counter()
    return {"gold_predicates": score(gold, with_gold), "end_to_end": score(gold, end_to_end),
            "sentences": len(gold), "sentences_per_second_gold": len(gold) / max(mid - start, 1e-9),
            "sentences_per_second_end_to_end": len(gold) / max(stop - mid, 1e-9), "predictions": end_to_end,
            "unseen_labels": dict(unseen)}


# ----------------------------------------------------------------------------------------------- train


def build_srl_model(trunk, cfg: Config) -> SRLModel:
    return SRLModel(trunk, len(cfg.task.labels), len(cfg.task.senses), dropout=cfg.task.head_dropout)


def _max_len(cfg: Config) -> int:
    return min(cfg.task.max_source_len, cfg.model.block_size)


class SemanticRoles(HeadObjective):
    """Predicates, senses and roles from CoNLL-U Plus files: the summed cross-entropy of every
    labelled token (roles, predicate or not) and sense; scored as argument F1 with gold predicates."""

    def head(self, trunk, cfg: Config):
        return build_srl_model(trunk, cfg)

    train_file_help = "CoNLL-U Plus, Universal PropBank format"

    def read_file(self, path: str) -> list:
        return read_conllu(path)

    def fill_labels(self, cfg: Config) -> None:
        cfg.task.labels, cfg.task.senses = role_inventory(self.train_rows)
        cfg.task.sense_lexicon = sense_lexicon(self.train_rows)
        cfg.task.pooling = "auto"

    def examples(self, tokenizer):
        cfg = self.run.cfg
        task = cfg.task
        self.encoder = Encoder(tokenizer, task.labels, task.senses, _max_len(cfg))
        skipped = sum(not s.annotated for s in self.train_rows)
        train = [e for s in self.train_rows if s.annotated for e in self.encoder.sentence_examples(s)]
        unseen = unseen_roles(self.valid_rows or [], task.labels)
        if unseen:  # reported before training; scored as misses
            self.run.say(f"valid: {describe_unseen(unseen)}")
        self.run.say(f"srl: {len(task.labels) - 1} role labels, {len(task.senses)} sense numbers; "
                     f"{len(self.train_rows) - skipped:,} training sentences ({skipped} not annotated, left out), "
                     f"{len(train):,} examples")
        return train, self.valid_rows

    def collate(self, examples: list[dict]) -> dict:
        return self.encoder.collate(examples)

    def loss(self, model, batch) -> torch.Tensor:
        b = to_device(batch, self.run.device)
        _, role_logits, pid_logits, sense_logits = model(b["ids"], b["mask"], b["indicator"], b["sense_pos"])
        loss = token_loss(role_logits, b["roles"], "sum") + token_loss(pid_logits, b["pid"], "sum")
        if sense_logits is not None:
            loss = loss + F.cross_entropy(sense_logits, b["sense"][b["sense_pos"] >= 0], ignore_index=IGNORE_INDEX,
                                          reduction="sum")
        return loss

    def labeller(self, model) -> Labeller:
        return Labeller(model, self.encoder, sense_lexicon=self.run.cfg.task.sense_lexicon)

    def scores(self, model, sentences) -> dict[str, Any]:
        labeller = self.labeller(model)
        gold = [s for s in sentences if s.annotated]
        out = score(gold, labeller.label(gold, [s.predicates for s in gold]))
        found = labeller.find_predicates(gold)
        preds = {(n, p) for n, ps in enumerate(found) for p in ps}
        golds = {(n, p) for n, s in enumerate(gold) for p in s.predicates}
        tp = len(preds & golds)
        pf1 = 2 * tp / (len(preds) + len(golds)) if preds or golds else 0.0
        return {"f1": out["arguments"]["f1"], "precision": out["arguments"]["precision"],
                "recall": out["arguments"]["recall"], "predicate_f1": pf1, "sense_f1": out["senses"]["f1"]}

    def final_report(self, model, summary: dict[str, Any]) -> None:
        run = self.run
        result = evaluate_sentences(self.labeller(model), self.valid)
        write_conllu(result.pop("predictions"), run.out_dir / "valid.pred.conllu")
        summary["valid"] = {"f1_gold_predicates": result["gold_predicates"]["arguments"]["f1"],
                            "f1_end_to_end": result["end_to_end"]["arguments"]["f1"],
                            "predicate_f1": result["end_to_end"]["predicates"]["f1"],
                            "sense_f1_gold_predicates": result["gold_predicates"]["senses"]["f1"],
                            "sentences_per_second_end_to_end": result["sentences_per_second_end_to_end"]}
        summary["valid_scores"] = result
        if result["unseen_labels"]:
            run.say(f"valid: {describe_unseen(result['unseen_labels'])}")
        run.say(format_score(result["gold_predicates"], "valid, gold predicates:"))
        run.say(format_score(result["end_to_end"], "valid, predicted predicates:"))


# ------------------------------------------------------------------------------------------- inference

_WORD = re.compile(r"\w+(?=n't\b)|n't\b|'\w+|\w+(?:[-.]\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Words and punctuation of a raw sentence (a simple tokenizer close to English UD's)."""
    return _WORD.findall(text)


def sentence_from_text(text: str, number: int = 1) -> Sentence:
    words = split_words(text)
    if not words:
        raise LMForgeError(f"input {number} is empty; give a sentence with at least one word")
    rows = [[str(i + 1), w] + [NONE] * 8 + [NONE, ""] for i, w in enumerate(words)]
    return Sentence([f"# sent_id = {number}", f"# text = {text.strip()}"], rows, number, "<input>",
                    list(range(1, len(rows) + 1)))


def load_labeller(path: str | Path, device: str = "cpu") -> tuple[Labeller, Config]:
    model, cfg, tokenizer = load_head_checkpoint(path, NAME, device)
    encoder = Encoder(tokenizer, cfg.task.labels, cfg.task.senses, _max_len(cfg))
    return Labeller(model, encoder, sense_lexicon=cfg.task.sense_lexicon), cfg


def describe(s: Sentence) -> str:
    """Each predicate with its sense and its arguments: ``nominated (nominate.01): ARG0 Bush | ARG1 individuals``."""
    words, lines = s.words, []
    text = next((c.split("=", 1)[1].strip() for c in s.comments if c.startswith("# text =")), " ".join(words))
    lines.append(text)
    if not s.predicates:
        lines.append("  (no predicate found)")
    for k, (p, sense) in enumerate(zip(s.predicates, s.senses)):
        args = [f"{label} {words[w]}" for w, label in enumerate(s.arguments()[k]) if label not in (O, "", "V")]
        lines.append(f"  {words[p]} ({sense}): " + (" | ".join(args) if args else "no arguments"))
    return "\n".join(lines)
