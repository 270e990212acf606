"""Typed settings for every stage: the model, the data, training and the task.

A recipe is a YAML file with up to four sections, ``model``, ``data``, ``train``
and (for ``lmforge finetune``) ``task``, whose keys are the fields of the dataclasses
below (reading recipes and ``--section.key=value`` overrides: :mod:`lmforge.recipes`).
The field docstrings (the ``#:`` comments) double as the CLI's ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


from lmforge.errors import LMForgeError

@dataclass
class ModelConfig:
    """Shape of the Transformer. ``preset`` fills the other fields first; keys given beside it win."""

    #: named size preset (see ``lmforge.config.PRESETS``), applied before the other keys
    preset: str | None = None
    #: vocabulary size; 0 = take it from the tokenizer
    vocab_size: int = 0
    #: round the embedding table up to a multiple of this (64 helps matmul speed; 1 = exact)
    pad_vocab_multiple: int = 1
    #: context length in tokens (the fixed-size block)
    block_size: int = 256
    #: number of Transformer blocks
    n_layer: int = 4
    #: number of attention (query) heads
    n_head: int = 4
    #: number of key/value heads (grouped-query attention); null = n_head
    n_kv_head: int | None = None
    #: width of the residual stream (embedding size)
    d_model: int = 128
    #: hidden width of the feed-forward layer; null = 4*d_model (gelu, relu, silu) or ~8/3*d_model rounded to 64
    #: (swiglu)
    d_ff: int | None = None
    #: positional encoding: sinusoidal (added to embeddings), learned, or rotary
    pos_encoding: str = "learned"
    #: sinusoidal positions: interleaved (sin and cos alternate, the paper) or halves (all sines, then all
    #: cosines: Marian)
    sinusoidal_layout: str = "interleaved"
    #: base of the rotary frequencies
    rope_theta: float = 10000.0
    #: feed-forward activation: gelu (exact), gelu_tanh (GPT-2's approximation), relu (the original
    #: Transformer), silu (plain, not gated: Marian's swish) or swiglu (gated: Llama)
    ffn: str = "gelu"
    #: normalisation: layernorm or rmsnorm (always pre-norm)
    norm: str = "layernorm"
    #: epsilon of the norms
    norm_eps: float = 1e-5
    #: biases in linear layers and LayerNorm
    bias: bool = False
    #: share the token embedding with the output head
    tie_embeddings: bool = True
    #: dropout probability (embeddings, attention weights, residual branches)
    dropout: float = 0.0
    #: standard deviation of the normal weight initialisation
    init_std: float = 0.02
    #: architecture: decoder (decoder-only language model), seq2seq (encoder-decoder, `lmforge finetune`)
    #: or encoder (bidirectional, BERT-like: lmforge.model.encoder)
    arch: str = "decoder"
    #: seq2seq: number of encoder blocks (null = n_layer, which counts the decoder blocks)
    n_encoder_layer: int | None = None
    #: norm placement: pre (before each sublayer, GPT-2/Llama) or post (after the residual sum,
    #: the original Transformer; seq2seq only)
    norm_position: str = "pre"
    #: seq2seq: one token embedding for source and target (joint vocabulary); false = separate source embedding
    share_embeddings: bool = True
    #: seq2seq: a bias added to the output logits (Marian's final_logits_bias)
    output_bias: bool = False
    #: seq2seq: a pointer-generator output (See et al. 2017): a learned gate mixes the vocabulary
    #: distribution with a copy distribution, one attention over the source tokens
    copy_attention: bool = False
    #: encoder: number of token types (segments), each with a learned embedding (BERT: 2); 0 = none
    type_vocab_size: int = 0
    #: encoder, seq2seq: normalise the summed embeddings before the first block (BERT; an encoder-decoder
    #: started from a BERT-style encoder has one such norm per side)
    embed_norm: bool = False
    #: encoder: a dense + tanh layer over the first token's final state (BERT's pooler)
    pooler: bool = False
    #: encoder: buckets of a learned relative-position bias added to every block's attention scores
    #: (MPNet: 32); 0 = none
    rel_pos_buckets: int = 0
    #: encoder: distance (tokens) from which all keys share the relative-position bias's last bucket
    rel_pos_max_distance: int = 128

    def __post_init__(self) -> None:
        _check_choice("model.pos_encoding", self.pos_encoding, ("sinusoidal", "learned", "rotary"))
        _check_choice("model.arch", self.arch, ("decoder", "seq2seq", "encoder"))
        _check_choice("model.norm_position", self.norm_position, ("pre", "post"))
        _check_choice("model.sinusoidal_layout", self.sinusoidal_layout, ("interleaved", "halves"))
        if self.sinusoidal_layout != "interleaved" and self.pos_encoding != "sinusoidal":
            raise LMForgeError(f"model.sinusoidal_layout={self.sinusoidal_layout} applies to pos_encoding=sinusoidal "
                               "only; set pos_encoding=sinusoidal or leave the layout at interleaved")
        if self.output_bias and self.arch != "seq2seq":
            raise LMForgeError("model.output_bias applies to arch=seq2seq only; "
                               "set model.arch=seq2seq or leave it false")
        if self.copy_attention and self.arch != "seq2seq":
            raise LMForgeError("model.copy_attention applies to arch=seq2seq only (a decoder-only model reads "
                               "its source through self-attention); set model.arch=seq2seq or leave it false")
        if self.norm_position == "post" and self.arch == "decoder":
            raise LMForgeError("model.norm_position=post is built for arch=seq2seq and encoder only; use pre for a decoder")
        if self.embed_norm and self.arch == "decoder":
            raise LMForgeError("model.embed_norm applies to arch=encoder and seq2seq only; leave it false for a decoder")
        if self.arch != "encoder" and (self.type_vocab_size or self.pooler):
            raise LMForgeError("model.type_vocab_size and pooler apply to arch=encoder only; "
                               "set model.arch=encoder or leave them at 0/false")
        if self.rel_pos_buckets and (self.arch != "encoder" or self.rel_pos_buckets < 8 or self.rel_pos_buckets % 4
                                     or self.rel_pos_max_distance <= self.rel_pos_buckets // 4):
            raise LMForgeError(f"model.rel_pos_buckets={self.rel_pos_buckets} needs arch=encoder, a multiple of 4 "
                               "from 8 up and rel_pos_max_distance above a quarter of it (MPNet: 32, 128); "
                               "fix them or set 0")
        if self.type_vocab_size < 0:
            raise LMForgeError(f"model.type_vocab_size must not be negative, got {self.type_vocab_size}")
        if self.n_encoder_layer is not None and self.n_encoder_layer < 1:
            raise LMForgeError(f"model.n_encoder_layer must be at least 1, got {self.n_encoder_layer}")
        _check_choice("model.ffn", self.ffn, ("gelu", "gelu_tanh", "relu", "silu", "swiglu"))
        _check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        for name in ("block_size", "n_layer", "n_head", "d_model", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise LMForgeError(f"model.{name} must be at least 1, got {getattr(self, name)}; set a positive value")
        if self.d_model % self.n_head:
            raise LMForgeError(
                f"model.d_model ({self.d_model}) is not divisible by model.n_head ({self.n_head}); "
                "pick n_head that divides d_model"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv:
            raise LMForgeError(
                f"model.n_kv_head ({kv}) must divide model.n_head ({self.n_head}); "
                "use n_head, 1, or another divisor"
            )
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise LMForgeError(f"rotary positions need an even head size, got {self.head_dim}; change d_model or n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise LMForgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.ffn == "swiglu":
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m


#: Named model sizes. ``cpu-demo`` trains in minutes on a laptop; the others match
#: published architectures (GPT-2 small, and a Llama-style 1B with grouped KV heads).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": dict(block_size=128, n_layer=4, n_head=4, d_model=128, pos_encoding="learned"),
    "small": dict(block_size=256, n_layer=6, n_head=6, d_model=384, pos_encoding="rotary"),
    "gpt2-124m": dict(
        vocab_size=50257, pad_vocab_multiple=64, block_size=1024, n_layer=12, n_head=12, d_model=768,
        pos_encoding="learned", ffn="gelu_tanh", norm="layernorm", bias=True, tie_embeddings=True,
    ),
    "gpt2-350m": dict(
        vocab_size=50257, pad_vocab_multiple=64, block_size=1024, n_layer=24, n_head=16, d_model=1024,
        pos_encoding="learned", ffn="gelu_tanh", norm="layernorm", bias=True, tie_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632,
        pos_encoding="rotary", ffn="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=False,
    ),
}


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and where the shards go."""

    #: text sources: files (.txt, .md, .jsonl with a 'text' field), folders, globs, or 'shakespeare' (bundled plays)
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    #: tokenizer kind: char (one token per character, bytes for unseen ones) or bpe (byte-level BPE)
    tokenizer: str = "char"
    #: vocabulary size for bpe (the char tokenizer's size follows the text)
    vocab_size: int = 2048
    #: char tokenizer: add 256 byte tokens so any text round-trips, even characters not seen in training
    byte_fallback: bool = True
    #: special tokens; the first marks the end of a document
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    #: share of the text (by position, at the end) kept for validation
    val_fraction: float = 0.1
    #: validation text from its own files, folders or globs; when given, all of corpus is training text and
    #: val_fraction is not used
    val_corpus: list[str] = field(default_factory=list)
    #: char tokenizer: keep only characters seen at least this many times in the training text; rarer ones
    #: are written as their UTF-8 bytes (needs byte_fallback), which shrinks a large alphabet's embedding
    min_char_count: int = 1
    #: convert every text before tokenizing with an OpenCC configuration, e.g. t2s (traditional to simplified
    #: Chinese), s2t, t2tw, s2hk; needs `pip install 'lmforge[zh]'`; null = no conversion
    convert: str | None = None
    #: directory for tokenizer.json, the token shards and meta.json
    data_dir: str = "data/shakespeare-char"
    #: tokens per shard file
    shard_tokens: int = 100_000_000

    def __post_init__(self) -> None:
        _check_choice("data.tokenizer", self.tokenizer, ("char", "bpe"))
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if isinstance(self.val_corpus, str):
            self.val_corpus = [self.val_corpus]
        if self.min_char_count < 1:
            raise LMForgeError(f"data.min_char_count must be at least 1, got {self.min_char_count}")
        if self.min_char_count > 1 and not (self.tokenizer == "char" and self.byte_fallback):
            raise LMForgeError("data.min_char_count applies to tokenizer=char with byte_fallback=true (rarer characters "
                               "become bytes); set those, or leave min_char_count at 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise LMForgeError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size < 256 + len(self.special_tokens):
            raise LMForgeError(
                f"data.vocab_size {self.vocab_size} is too small for byte-level BPE; use at least 256 + special tokens"
            )


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, precision, evaluation, checkpoints."""

    #: run directory: checkpoints, metrics.jsonl, TensorBoard events, loss.png
    out_dir: str = "runs/shakespeare-char"
    #: random seed (model init, data order, dropout): same seed, same run
    seed: int = 1337
    #: sequences per micro-batch
    batch_size: int = 12
    #: micro-batches accumulated per optimizer step
    grad_accum: int = 1
    #: optimizer steps
    max_steps: int = 2000
    #: stop early after this many minutes (0 = no limit); a checkpoint is written first
    max_minutes: float = 0.0
    #: peak learning rate
    lr: float = 1e-3
    #: final learning rate of the cosine decay
    min_lr: float = 1e-4
    #: linear warmup steps
    warmup_steps: int = 100
    #: steps of the cosine decay (null = max_steps)
    decay_steps: int | None = None
    #: what the cosine decay runs over: steps (to decay_steps), or minutes (to train.max_minutes of
    #: wall time, so a time-budgeted run ends decayed on any machine; max_steps is then only a cap)
    schedule: str = "steps"
    #: shape of the decay: 0 = half a cosine over the whole schedule; a fraction f in (0, 1] = the rate
    #: stays at lr until the last f of the schedule, then falls linearly to min_lr (warmup-stable-decay,
    #: which leaves a time-budgeted run at its peak rate longest and still ends it decayed)
    cooldown: float = 0.0
    #: adamw, or muon (orthogonalized momentum for the blocks' weight matrices, AdamW for the rest)
    optimizer: str = "adamw"
    #: peak learning rate of Muon's matrices (follows the same warmup and cosine shape as train.lr)
    muon_lr: float = 0.02
    #: Muon's momentum (Nesterov)
    muon_momentum: float = 0.95
    #: Newton-Schulz iterations per Muon step (fewer: cheaper, rougher orthogonalization)
    muon_ns_steps: int = 5
    #: dtype of the Newton-Schulz iterations: auto = bf16 on GPUs, and on CPUs with bf16 units when
    #: timing the run's own matrices finds it clearly faster (recorded, kept on resume), else float32
    muon_ns_dtype: str = "auto"
    #: AdamW weight decay (never on norms, biases or embeddings)
    weight_decay: float = 0.1
    #: AdamW beta1
    beta1: float = 0.9
    #: AdamW beta2
    beta2: float = 0.99
    #: clip the global gradient norm to this (0 = off)
    grad_clip: float = 1.0
    #: device: auto, cpu, cuda, cuda:N, mps
    device: str = "auto"
    #: compute dtype: auto (bf16 on GPUs that have it and on CPUs measured faster in bf16, else float32; kept on resume), float32, bfloat16
    dtype: str = "auto"
    #: wrap the model in torch.compile
    compile: bool = False
    #: evaluate every this many steps (0 = only at the end)
    eval_interval: int = 250
    #: batches averaged for the validation loss
    eval_batches: int = 20
    #: windows per validation batch (null = batch_size)
    eval_batch_size: int | None = None
    #: write a checkpoint every this many steps (0 = only at the end)
    ckpt_interval: int = 500
    #: log training metrics every this many steps
    log_interval: int = 10
    #: also write TensorBoard event files (needs the tensorboard package)
    tensorboard: bool = True
    #: start from the weights of this checkpoint directory (fresh optimizer)
    init_from: str | None = None
    #: with init_from (task fine-tuning), the parameters the checkpoint does not fill (e.g. an encoder-decoder's
    #: cross-attention and copy head started from an encoder) learn at this many times the schedule's rate (AdamW)
    fresh_lr_scale: float = 1.0
    #: layer-wise learning-rate decay (AdamW): the top block learns at this fraction of the rate, each block below at
    #: this fraction of the one above, the embeddings one step further; the head at the full rate. 1 = off
    layer_lr_decay: float = 1.0
    #: show the progress bar
    progress: bool = True
    #: data parallelism under torchrun: auto (ddp when a full replica fits a GPU, else fsdp), ddp, or fsdp (FSDP2, sharded per block); one process ignores it
    strategy: str = "auto"
    #: how train.dtype is applied: autocast (float32 weights, torch.autocast; any strategy) or fsdp (FSDP2 gathers weights in train.dtype; ddp and one process fall back to autocast)
    mixed_precision: str = "autocast"
    #: dtype of the gradient reduction with mixed_precision=fsdp: float32 or bfloat16
    reduce_dtype: str = "float32"
    #: recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("train.optimizer", self.optimizer, ("adamw", "muon"))
        _check_choice("train.schedule", self.schedule, ("steps", "minutes"))
        _check_choice("train.muon_ns_dtype", self.muon_ns_dtype, ("auto", "float32", "bfloat16"))
        if self.schedule == "minutes" and not self.max_minutes > 0:
            raise LMForgeError("train.schedule=minutes decays the learning rate over train.max_minutes; "
                               "set train.max_minutes (e.g. --train.max_minutes=30) or use train.schedule=steps")
        for name in ("batch_size", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise LMForgeError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.warmup_steps < 0:
            raise LMForgeError("train.max_steps and train.warmup_steps must not be negative")
        if not 0.0 <= self.cooldown <= 1.0:
            raise LMForgeError(f"train.cooldown is the fraction of the schedule spent decaying, between 0 and 1; "
                               f"got {self.cooldown} (0 = cosine over the whole schedule)")
        for name in ("lr", "min_lr", "muon_lr", "weight_decay", "grad_clip", "max_minutes", "fresh_lr_scale",
                     "layer_lr_decay"):
            if not math.isfinite(getattr(self, name)):
                raise LMForgeError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LMForgeError(f"train.lr must be positive, got {self.lr}")
        if not 0 < self.layer_lr_decay <= 1:
            raise LMForgeError(f"train.layer_lr_decay is the rate's factor per block from the top, in (0, 1], "
                               f"got {self.layer_lr_decay} (1 = off; 0.8 is common)")
        if not 0 <= self.min_lr <= self.lr:
            raise LMForgeError(f"train.min_lr must be between 0 and train.lr ({self.lr}), got {self.min_lr}")
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise LMForgeError(f"train.decay_steps ({self.decay_steps}) must not be below train.warmup_steps "
                               f"({self.warmup_steps}); raise decay_steps or lower warmup_steps")
        if not 0 <= self.seed < 2**32:
            raise LMForgeError(f"train.seed must be between 0 and 2**32 - 1, got {self.seed}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise LMForgeError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")


@dataclass
class TaskConfig:
    """Sequence-to-sequence tasks (`lmforge finetune`): example files, lengths, batches, loss, decoding."""

    #: task: lm (language modelling, `lmforge train`), translation, summarization, sentiment (text
    #: classification) or srl (semantic role labelling)
    name: str = "lm"
    #: training examples: TSV with a header row naming the columns, or JSONL (one object per line);
    #: sentiment and srl also take a list of files, read as one training set
    train_file: str | list[str] | None = None
    #: validation examples, same format (loss and metric during training, report at the end)
    valid_file: str | None = None
    #: TSV column or JSON key of the input text
    source_key: str = "source"
    #: TSV column or JSON key of the output text
    target_key: str = "target"
    #: put before every source, e.g. a language or task token such as <2es> (made a special token); "" = none
    source_prefix: str = ""
    #: seq2seq: the token the decoder starts from; "" = <s> when the tokenizer has it, else the end token
    #: (an imported Marian model starts from <pad>)
    decoder_start: str = ""
    #: use this tokenizer.json instead of training a joint tokenizer on both sides into data.data_dir
    tokenizer_file: str | None = None
    #: longest source in tokens (prefix included); longer ones are cut or skipped, and counted
    max_source_len: int = 256
    #: longest target in tokens (end token included); longer ones are cut or skipped, and counted
    max_target_len: int = 128
    #: over-long examples: truncate (cut to the limits) or skip (leave out)
    overlong: str = "truncate"
    #: tokens per micro-batch, padding included (batches are built by length; train.batch_size is unused)
    batch_tokens: int = 4096
    #: sentiment, srl: batches of train.batch_size texts of like length (about half the padding of random
    #: batches on short texts); leave off where length says much about the label (batches of one class)
    group_by_length: bool = False
    #: sentiment, srl: the first N steps train only what the trunk's checkpoint did not fill (the head),
    #: the trunk frozen and run forward only (about a third of a step); then everything trains
    head_only_steps: int = 0
    #: seq2seq: train also on this many copies of each pair whose target carries names over from its
    #: source unchanged, those names replaced in both by made-up ones, so that the model learns to copy
    #: names it has never seen (0 = off)
    made_up_names: int = 0
    #: label smoothing of the cross-entropy, normalised by target tokens (0 = plain maximum likelihood)
    label_smoothing: float = 0.1
    #: validation metric logged during training and drawn in <metric>.png: bleu, chrf, rouge1, rouge2, rougeL
    metric: str = "bleu"
    #: validation examples decoded for the metric at each evaluation (0 = all)
    eval_samples: int = 0
    #: beam size used for the metric during training (1 = greedy, fastest)
    eval_beam_size: int = 1
    #: beam size of translate/summarize/eval (1 = greedy)
    beam_size: int = 4
    #: beam score = sum of log-probabilities / length ** length_penalty (0 = raw sum; larger favours longer)
    length_penalty: float = 1.0
    #: end a beam search once beam_size hypotheses are complete (false: once none can still win)
    early_stopping: bool = True
    #: never repeat an n-gram of this size within an output (0 = off)
    no_repeat_ngram_size: int = 0
    #: never put a token right after itself ("mart mart", "28bnbn"); off for character-level models
    no_immediate_repeat: bool = False
    #: never begin two words of an output with the same token: with a WordPiece vocabulary, where most
    #: words are one token, no word is written twice ("U2, U2 to rock U2"); with BPE, no word-initial
    #: piece; no effect with a character-level tokenizer
    no_repeat_words: bool = False
    #: write a word of several pieces only as the source holds it, and begin the next word only once
    #: it is whole ("screenss", "Lifese" are not written): for outputs that copy their rare words
    #: (summarization with a WordPiece vocabulary); no effect with a character-level tokenizer
    source_words: bool = False
    #: output length limit = max_len_a * source tokens + max_len_b (end token included)
    max_len_a: float = 1.5
    #: see max_len_a
    max_len_b: int = 10
    #: sentiment/srl: label names (filled from the training file; kept in the checkpoint)
    labels: list[str] = field(default_factory=list)
    #: srl: predicate sense numbers (e.g. 01, 02), filled from the training file; empty = no senses
    senses: list[str] = field(default_factory=list)
    #: srl: the senses seen with each lemma in training, one entry per lemma: "lemma sense sense ..."
    #: (most frequent first); a predicate's sense is chosen among its lemma's, "<lemma>.01" for a new lemma
    sense_lexicon: list[str] = field(default_factory=list)
    #: sentiment: how one vector is drawn from the token states: first, mean, last, or auto
    #: (last for a causal decoder, mean for an encoder)
    pooling: str = "auto"
    #: sentiment/srl: dropout on the trunk's states before the task head
    head_dropout: float = 0.1
    #: sentiment/srl: full (train every weight), frozen (train the head only) or lora (head + low-rank adapters)
    tuning: str = "full"
    #: lora: rank of the adapters on the attention and feed-forward weights
    lora_rank: int = 8
    #: lora: the adapter's output is scaled by lora_alpha / lora_rank
    lora_alpha: float = 16.0
    #: lora: dropout on the adapter's input
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("task.name", self.name, ("lm", "translation", "summarization", "sentiment", "srl"))
        _check_choice("task.pooling", self.pooling, ("auto", "first", "mean", "last"))
        _check_choice("task.tuning", self.tuning, ("full", "frozen", "lora"))
        if self.lora_rank < 1:
            raise LMForgeError(f"task.lora_rank must be at least 1, got {self.lora_rank}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise LMForgeError(f"task.head_dropout must be in [0, 1), got {self.head_dropout}")
        _check_choice("task.overlong", self.overlong, ("truncate", "skip"))
        _check_choice("task.metric", self.metric, ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "accuracy", "macro_f1", "f1"))
        for name in ("max_source_len", "max_target_len", "batch_tokens", "beam_size", "eval_beam_size"):
            if getattr(self, name) < 1:
                raise LMForgeError(f"task.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_target_len < 2:
            raise LMForgeError("task.max_target_len must be at least 2 (one token and the end token)")
        for name in ("made_up_names", "head_only_steps"):
            if getattr(self, name) < 0:
                raise LMForgeError(f"task.{name} must not be negative (0 = off), got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LMForgeError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_len_a < 0 or self.max_len_b < 0 or self.max_len_a == self.max_len_b == 0:
            raise LMForgeError("task.max_len_a and task.max_len_b must not be negative, nor both 0")


@dataclass
class Config:
    """A whole recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "task": TaskConfig}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LMForgeError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
