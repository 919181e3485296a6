"""Checkpoints as users have them — written by HF transformers' own ``save_pretrained`` — through
the real CLI: ``hybridtrt export`` then ``hybridtrt validate``."""

from __future__ import annotations

import json

import pytest
import torch


transformers = pytest.importorskip("transformers", reason="HF transformers writes the checkpoints")


@pytest.fixture(scope="module")
def hf_mamba2_sharded_bf16(tmp_path_factory):
    """A random HF Mamba2ForCausalLM in bf16, sharded (index json), ``backbone.`` names."""
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, expand=2,
        state_size=16, n_groups=2, chunk_size=16, initializer_range=0.3,
    )
    model = transformers.Mamba2ForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("hf_mamba2")
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def test_hf_saved_mamba2_exports_and_validates(hf_mamba2_sharded_bf16, tmp_path):
    ckpt = hf_mamba2_sharded_bf16
    assert (ckpt / "model.safetensors.index.json").is_file()
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}

    from tests.cli.batch import run_batch

    export, validate, parity = run_batch(  # the three commands a user types, in one fresh interpreter
        [
            ["export", ckpt, "-o", tmp_path / "out"],
            ["validate", tmp_path / "out", "--random", "2", "--steps", "4"],
            ["validate", "--checkpoint", ckpt, "--reference", "hf", "--random", "2", "--steps", "4"],
        ]
    )
    assert export.code == 0, export.output
    assert "ORT vs reference" in export.stdout
    assert validate.code == 0, validate.output
    assert "PASS" in validate.stdout
    assert parity.code == 0, parity.output
