"""Quantization recipes as data (`hybridtrt.exporter.recipes`): NVIDIA's layer tables resolved on the
real layer patterns, applied by ``export --recipe``, recorded, and refused when malformed."""

from __future__ import annotations

import json
import re

import pytest

from hybridtrt.cli.main import main
from hybridtrt.errors import InputError
from hybridtrt.exporter.recipes import exclusions, kept_layers, load_recipe
from hybridtrt.models.architectures import ARCHITECTURES
from hybridtrt.models.config import config_from_dict


def test_nvidias_nano_layout_resolves_to_the_published_layers():
    """On Nemotron-3-Nano-30B-A3B's own pattern, "the Mamba layers that feed" the attention layers
    are layers 4, 11, 18, 25, 32 and 41 — the list the Nemotron 3 Nano report gives (as quoted in the
    recipe's source) — and the six attention layers follow each."""
    pattern = config_from_dict(ARCHITECTURES["nemotron-3-nano-30b-a3b"]).pattern
    kept = kept_layers(load_recipe("nemotron-3-nano-nvfp4-layout"), pattern)
    mamba = [i for i, why in kept.items() if why == "mamba-before-attention"]
    attention = [i for i, why in kept.items() if why == "attention"]
    assert mamba == [4, 11, 18, 25, 32, 41] and attention == [i + 1 for i in mamba]
    rules = exclusions(load_recipe("nemotron-3-nano-nvfp4-layout"), pattern)
    assert any(re.search(r, "/model/layers.4/mixer/in_proj/MatMul") for r in rules)
    assert not any(re.search(r, "/model/layers.3/mixer/shared_experts/up_proj/MatMul") for r in rules)  # a MoE layer
    assert not any(re.search(r, "/model/layers.40/mixer/in_proj/MatMul") for r in rules)  # layers.4 does not match 40


def test_malformed_recipes_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    for body, needle in (
        ({"scheme": "int8"}, "scheme 'int8'"),
        ({"scheme": "int4", "keep": ["attn"]}, "unknown selector 'attn'"),
        ({"scheme": "int4", "block_size": 100}, "block_size 100"),
        ([1, 2], "a JSON object"),
    ):
        bad.write_text(json.dumps(body))
        with pytest.raises(InputError, match=re.escape(needle)):
            load_recipe(str(bad))
    with pytest.raises(InputError, match="neither a built-in recipe nor a file"):
        load_recipe("no-such-recipe")


def test_export_with_a_recipe_keeps_its_layers_and_records_it(make_checkpoint, tmp_path, capsys):
    """``--recipe nemotron-3-nano-nvfp4-layout`` on a Nemotron-H checkpoint: INT4 round to nearest
    (the recipe's scheme and block size; verified), its attention layers and the Mamba layers before
    them in the model dtype, the recipe (name, source, kept layers) in hybridtrt.json; a
    contradicting --quantize is refused."""
    checkpoint = make_checkpoint("tiny-nemotron-h")
    out = tmp_path / "out"
    # Verified: round to nearest (no calibration) against the 4-bit weights' reference.
    assert main(["export", str(checkpoint), "-o", str(out), "--recipe", "nemotron-3-nano-nvfp4-layout", "--no-split"]) == 0
    recipe = json.loads((out / "hybridtrt.json").read_text())["weight_only"]
    pattern = config_from_dict(json.loads((checkpoint / "config.json").read_text())).pattern
    kept = [i for i, k in enumerate(pattern) if k == "*" or (k == "M" and i + 1 < len(pattern) and pattern[i + 1] == "*")]
    assert recipe["recipe"]["name"] == "nemotron-3-nano-nvfp4-layout" and recipe["recipe"]["kept_layers"] == kept
    assert recipe["scheme"] == "int4" and recipe["block_size"] == 128 and "awq" not in recipe
    assert json.loads((out / "hybridtrt.json").read_text())["verification"]["truth"] == "int4 weights' fp32 reference"
    layers = {int(re.search(r"layers\.(\d+)/", n).group(1)) for n in recipe["quantized"]}
    assert layers and not layers & set(kept)
    capsys.readouterr()
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "o2"), "--recipe", "nemotron-3-nano-nvfp4-layout", "--quantize", "fp8", "--calib-random", "2"]) == 2
    assert "contradicts --recipe" in capsys.readouterr().err
