import pytest

from lmforge.config import PRESETS, Config, ModelConfig
from lmforge.recipes import config_from_json, field_help, load_config, parse_overrides, save_config
from lmforge.errors import LMForgeError


def test_overrides_are_typed_and_applied():
    cfg = load_config("shakespeare-char", ["--model.n_layer=2", "--train.lr=3e-4", "--model.n_kv_head=null",
                                           "--data.corpus=a.txt,b/", "--train.compile=true"])
    assert cfg.model.n_layer == 2 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.n_kv_head is None
    assert cfg.data.corpus == ["a.txt", "b/"]
    assert cfg.train.compile is True


def test_preset_then_explicit_keys_win():
    cfg = load_config(None, ["--model.preset=gpt2-124m", "--model.dropout=0.1"])
    assert cfg.model.d_model == PRESETS["gpt2-124m"]["d_model"]
    assert cfg.model.dropout == 0.1
    assert cfg.model.padded_vocab_size % 64 == 0 and cfg.model.padded_vocab_size >= 50257


def test_json_round_trip(tmp_path):
    cfg = load_config("shakespeare-bpe", ["--train.max_steps=7"])
    save_config(cfg, tmp_path / "config.json")
    assert config_from_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("overrides, words", [
    (["--model.n_lyer=3"], "unknown config key 'model.n_lyer'"),
    (["--train.lr=fast"], "train.lr expects a number"),
    (["--model.ffn=tanh"], "model.ffn must be one of gelu, gelu_tanh, relu, silu, swiglu"),
    (["--model.sinusoidal_layout=split"], "model.sinusoidal_layout must be one of interleaved, halves"),
    (["--model.sinusoidal_layout=halves"], "applies to pos_encoding=sinusoidal only"),
    (["--model.output_bias=true"], "model.output_bias applies to arch=seq2seq only"),
    (["--model.rel_pos_buckets=32"], "model.rel_pos_buckets=32 needs arch=encoder"),
    (["--model.arch=encoder", "--model.rel_pos_buckets=30"], "a multiple of 4"),
    (["--model.arch=encoder", "--model.rel_pos_buckets=32", "--model.rel_pos_max_distance=8"], "above a quarter"),
    (["--model.d_model=130", "--model.n_head=4"], "not divisible"),
    (["--model.n_kv_head=3"], "must divide"),
    (["--optim.lr=1"], "unknown config section 'optim'"),
    (["lr=1"], "--section.key=value"),
    (["--data.val_fraction=1.5"], "val_fraction"),
    (["--train.batch_size=0"], "batch_size"),
    (["--model.preset=gpt5"], "unknown model preset"),
    (["--train.compile=maybe"], "expects true or false"),
])
def test_bad_values_give_one_clear_line(overrides, words):
    with pytest.raises(LMForgeError) as e:
        load_config(None, overrides)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(LMForgeError, match="shakespeare-char"):
        load_config("no-such-recipe")


def test_bad_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(LMForgeError, match="not valid YAML"):
        load_config(str(p))
    p.write_text("modle:\n  n_layer: 2\n")
    with pytest.raises(LMForgeError, match="unknown section 'modle'"):
        load_config(str(p))


def test_every_field_has_help():
    from lmforge.config import DataConfig, TrainConfig
    for cls in (ModelConfig, DataConfig, TrainConfig):
        names = {f for f in cls.__dataclass_fields__}
        assert names == set(field_help(cls)), cls


def test_ff_dim_rules():
    assert ModelConfig(d_model=128, ffn="gelu").ff_dim == 512
    assert ModelConfig(d_model=96, n_head=4, ffn="swiglu").ff_dim == 256  # 8/3*96=256, a multiple of 64
    assert ModelConfig(d_model=128, d_ff=300).ff_dim == 300


def test_default_config_is_valid():
    assert isinstance(Config(), Config)
