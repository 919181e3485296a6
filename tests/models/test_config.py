"""config.json as HF transformers writes it, and typed errors for configs we cannot build."""

from __future__ import annotations

import json
import math

import pytest

from hybridtrt.errors import ConfigError
from hybridtrt.models.config import config_from_dict, load_config
from hybridtrt.models.presets import preset_config

transformers = pytest.importorskip("transformers", reason="HF transformers writes the reference configs")


def _hf_mamba2(tmp_path, **overrides):
    cfg = transformers.Mamba2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, expand=2,
        state_size=16, n_groups=2, chunk_size=16, **overrides,
    )
    transformers.Mamba2ForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_mamba2_time_step_limit_as_transformers_writes_it(tmp_path):
    ckpt = _hf_mamba2(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # the form we must read
    config = load_config(ckpt)
    assert config.time_step_limit == (0.0, math.inf)
    assert (config.mamba_num_heads, config.n_groups, config.chunk_size) == (8, 2, 16)


def test_finite_time_step_limit_and_bare_infinity(tmp_path):
    ckpt = _hf_mamba2(tmp_path, time_step_limit=(0.001, 0.2))
    assert load_config(ckpt).time_step_limit == (0.001, 0.2)
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace("0.2\n", "Infinity\n"))  # json.dumps(allow_nan) style
    assert load_config(ckpt).time_step_limit == (0.001, math.inf)


@pytest.mark.parametrize(
    "value, needle",
    [
        ([0.0, {"__float__": "NaN"}], "time_step_limit"),
        ([0.5, 0.1], "0 ≤ lo ≤ hi"),
        ([0.0], "time_step_limit"),
        ("fast", "time_step_limit"),
    ],
)
def test_bad_time_step_limit(tmp_path, value, needle):
    ckpt = _hf_mamba2(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["time_step_limit"] = value
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(cfg)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 0), ("hidden_size", 64.5), ("hidden_size", True), ("mamba_head_dim", "16"), ("chunk_size", -1), ("ssm_state_size", None)],
)
def test_sizes_must_be_positive_integers(field, value):
    cfg = preset_config("tiny-nemotron-h", **{field: value})
    if value is None:  # absent -> the default applies
        assert config_from_dict(cfg).ssm_state_size == 128
        return
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert f"{field}={value!r}" in str(e.value) and e.value.fix


def test_integral_floats_are_accepted():
    assert config_from_dict(preset_config("tiny-nemotron-h", hidden_size=64.0)).hidden_size == 64


def test_divisibility_is_checked():
    with pytest.raises(ConfigError, match="not divisible by n_groups=3"):
        config_from_dict(preset_config("tiny-nemotron-h", n_groups=3))
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        config_from_dict(preset_config("tiny-nemotron-h", num_key_value_heads=3))


def test_binary_config_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path)
