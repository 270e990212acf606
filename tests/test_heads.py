"""Task heads: subword alignment, the ignored positions of the token loss, pooling, and a tiny
model learning a toy classification and a toy tagging task."""

import random

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.encoder import EncoderModel
from lmforge.model.heads import (IGNORE_INDEX, SequenceClassifier, TokenClassifier, align_words,
                                 first_subword_labels, first_subword_positions, pad_batch, pad_labels, pool,
                                 token_loss, trunk_states)
from lmforge.tokenizer import Tokenizer



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = "the cat sat on a mat while dogs barked loudly".split()


@pytest.fixture(scope="module")
def bpe():
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(3000))
    return Tokenizer.train([text], kind="bpe", vocab_size=270)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train([" ".join(WORDS)], kind="char")


def tiny(arch: str, vocab: int, **kw) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=vocab, block_size=48, n_layer=2, n_head=2, d_model=32, arch=arch, **kw)
    return DecoderLM(cfg) if arch == "decoder" else EncoderModel(cfg)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_alignment_round_trip(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    words = ["unseen", "cat", "sat", "mat.", "Zq"]
    ids, owners = align_words(tok, words)
    assert len(ids) == len(owners)
    # the tokens of each word decode back to the word (a leading space aside)
    for w, word in enumerate(words):
        pieces = [i for i, o in zip(ids, owners) if o == w]
        assert tok.decode(pieces).strip() == word
    assert sorted({o for o in owners if o >= 0}) == list(range(len(words)))
    labels = first_subword_labels(owners, [10, 11, 12, 13, 14])
    assert [x for x in labels if x != IGNORE_INDEX] == [10, 11, 12, 13, 14]
    first = first_subword_positions(owners, len(words))
    assert [labels[t] for t in first] == [10, 11, 12, 13, 14]
    if kind == "char":  # several characters per word: all but the first are ignored
        assert labels.count(IGNORE_INDEX) >= len(ids) - len(words)


def test_wordpiece_alignment():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "play": 1, "##ing": 2, "the": 3, "game": 4, "##s": 5}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = Tokenizer(hf)
    ids, owners = align_words(tok, ["playing", "the", "games"])
    assert ids == [1, 2, 3, 4, 5] and owners == [0, 0, 1, 2, 2]
    assert first_subword_labels(owners, [7, 8, 9]) == [7, IGNORE_INDEX, 8, 9, IGNORE_INDEX]


def test_token_loss_ignores_other_subwords_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[1, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX], [0, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = torch.randn(int((labels == IGNORE_INDEX).sum()), 3) * 100
    assert torch.allclose(token_loss(logits, labels), token_loss(changed, labels))
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(token_loss(logits, labels), expected)


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    for arch in ("encoder", "decoder"):
        model = tiny(arch, 50).eval()
        clf = SequenceClassifier(model, 3, "mean" if arch == "encoder" else "last").eval()
        a, b = [5, 6, 7], [8, 9, 10, 11, 12]
        ids, mask = pad_batch([a, b], 0)
        alone, _ = pad_batch([a], 0)
        with torch.no_grad():
            both = clf(ids, mask)
            single = clf(alone, torch.ones_like(alone, dtype=torch.bool))
        assert torch.allclose(both[0], single[0], atol=1e-5)


def test_pool_and_trunk_states_match_the_trunk():
    torch.manual_seed(0)
    dec = tiny("decoder", 50).eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        h = trunk_states(dec, idx)
        assert torch.allclose(dec.lm_head(h)[..., :50].float(), dec(idx), atol=1e-5)
        for extra in ({}, {"type_vocab_size": 2, "embed_norm": True}, {"rel_pos_buckets": 8, "rel_pos_max_distance": 16}):
            enc = EncoderModel(ModelConfig(arch="encoder", vocab_size=50, block_size=32, n_layer=2, n_head=2,
                                           d_model=16, norm_position="post", **extra)).eval()
            if enc.rel_pos is not None:
                enc.rel_pos.weight.normal_(0, 1)  # a bias that matters
            padded = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7]).bool()
            ours, theirs = trunk_states(enc, idx, padded), enc(idx, attention_mask=padded)
            assert torch.allclose(ours[padded], theirs[padded], atol=1e-6), extra
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7]).bool()
    assert torch.equal(pool(h, mask, "last")[0], h[0, 2])
    assert torch.allclose(pool(h, mask, "mean")[0], h[0, :3].mean(0))
    assert torch.equal(pool(h, mask, "first"), h[:, 0])


def _train(model, batches, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = batches(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_tiny_model_learns_toy_classification():
    """Label = whether token 3 occurs in the sequence (needs the whole sequence)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def data(n):
        ids = torch.randint(4, 20, (n, 10), generator=gen)
        y = torch.randint(0, 2, (n,), generator=gen)
        pos = torch.randint(0, 10, (n,), generator=gen)
        ids[y == 1, pos[y == 1]] = 3
        return ids, y

    clf = SequenceClassifier(tiny("encoder", 20), 2, "mean", dropout=0.0)
    mask = torch.ones(64, 10, dtype=torch.bool)

    def step(_):
        ids, y = data(64)
        return torch.nn.functional.cross_entropy(clf(ids, mask), y)

    _train(clf, step, 150)
    ids, y = data(400)
    with torch.no_grad():
        acc = (clf(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1) == y).float().mean().item()
    assert acc > 0.95


def test_tiny_model_learns_toy_tagging_with_indicator():
    """Tag = 1 on the indicated token and on odd token ids, else 0; labels only on even positions."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tagger = TokenClassifier(tiny("encoder", 12), 2, n_indicator=2, dropout=0.0)

    def data(n):
        ids = torch.randint(1, 12, (n, 12), generator=gen)
        where = torch.randint(0, 12, (n,), generator=gen)
        ind = torch.zeros_like(ids)
        ind[torch.arange(n), where] = 1
        target = ((ind == 1) | (ids % 2 == 1)).long()
        target[:, 1::2] = IGNORE_INDEX  # "non-first subwords": never scored
        return ids, ind, target

    mask = torch.ones(64, 12, dtype=torch.bool)

    def step(_):
        ids, ind, target = data(64)
        return token_loss(tagger(ids, mask, ind), target)

    _train(tagger, step, 100)
    ids, ind, target = data(300)
    with torch.no_grad():
        pred = tagger(ids, torch.ones_like(ids, dtype=torch.bool), ind).argmax(-1)
    keep = target != IGNORE_INDEX
    assert (pred[keep] == target[keep]).float().mean().item() > 0.95


def test_pad_labels():
    out = pad_labels([[1, 2], [3]], 3)
    assert out.tolist() == [[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]]


def test_mask_tokens_80_10_10():
    from lmforge.tasks.mlm import mask_tokens

    x = torch.randint(3, 50, (64, 128), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0  # a special token: never chosen
    inputs, labels = mask_tokens(x, mask_id=1, vocab_size=50, generator=torch.Generator().manual_seed(1), never=(0,))
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])
    masked = (inputs[chosen] == 1).float().mean().item()
    kept = (inputs[chosen] == x[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03


def test_pretrain_encoder_checkpoint_loads(tmp_path, capsys):
    import json

    from lmforge.cli import main
    from lmforge.train.checkpoint import load_model

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(random.Random(0).choice(WORDS) for _ in range(4000)) + "\n")
    main(["pretrain-encoder", "-q", f"--data.corpus={corpus}", f"--data.data_dir={tmp_path / 'data'}",
          "--data.tokenizer=char", f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=4",
          "--train.eval_interval=2", "--train.eval_batches=1", "--model.n_layer=1", "--model.d_model=32",
          "--model.block_size=32", "--train.batch_size=4", "--train.log_interval=1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["val_loss"] > 0
    model, cfg, tok = load_model(tmp_path / "run")
    assert cfg.model.arch == "encoder" and tok.token_to_id("<mask>") is not None


def test_indicator_marks_as_second_segment_and_leaves_unmarked_tokens_alone():
    """Unmarked tokens see exactly the trunk's input; with token types, a marked token reads as
    segment B (the same hidden states as token_type_ids=1); without, the mark is not zero."""
    torch.manual_seed(0)
    bert_like = tiny("encoder", 20, type_vocab_size=2, embed_norm=True, norm_position="post")
    tagger = TokenClassifier(bert_like, 3, n_indicator=2, dropout=0.0).eval()
    ids = torch.randint(0, 20, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    marked = torch.zeros_like(ids)
    marked[:, 3] = 1
    with torch.no_grad():
        torch.testing.assert_close(tagger.states(ids, mask, torch.zeros_like(ids)), bert_like(ids, attention_mask=mask))
        torch.testing.assert_close(tagger.states(ids, mask, marked),
                                   bert_like(ids, attention_mask=mask, token_type_ids=marked))
    plain = TokenClassifier(tiny("encoder", 20), 3, n_indicator=2)
    assert plain.indicator.weight[0].abs().sum() == 0
    assert plain.indicator.weight[1].std() > 0.5 * plain.trunk.tok_emb.weight.std()
