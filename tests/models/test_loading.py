"""Checkpoint loading: sharded files, strict key checks, refusal of pickles, config errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridtrt.errors import CheckpointError, ConfigError
from hybridtrt.models import create_checkpoint, load_config, load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_identically(make_checkpoint, tmp_path):
    single = load_model(make_checkpoint())
    sharded_dir = create_checkpoint("tiny-nemotron-h", tmp_path / "sharded", max_shard_bytes=100_000)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 2
    sharded = load_model(sharded_dir)
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_dtype_and_frozen_parameters(make_checkpoint):
    model = load_model(make_checkpoint(), "bf16")
    assert model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_tensor_is_named(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.2.mixer.A_log"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.layers.2.mixer.A_log"):
        load_model(ckpt)


def test_misshapen_and_unexpected_tensors_are_named(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mixer.D"] = torch.ones(3)
    tensors["model.layers.0.mixer.extra"] = torch.ones(1)
    tensors["mtp.layers.0.weight"] = torch.ones(1)  # ignorable, like HF
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "model.layers.0.mixer.D: checkpoint (3,) vs model (8,)" in msg
    assert "unexpected (1): model.layers.0.mixer.extra" in msg
    assert "mtp" not in msg


def test_pickle_weights_are_refused_never_opened(make_checkpoint, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(make_checkpoint() / "config.json", ckpt)
    # A file that would run code if unpickled.
    (ckpt / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned > /tmp/hybridtrt-pwned'\ntR.")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(ckpt)


def test_corrupt_safetensors(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(ckpt)


def test_shard_outside_checkpoint_is_refused(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"hybrid_override_pattern": "M*Q-"}, "unknown block letter 'Q' at layer 2"),
        ({"hybrid_override_pattern": "ME"}, "config.json has no 'n_routed_experts'"),  # E needs the MoE fields
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"n_groups": 3}, "not divisible by n_groups=3"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act='gelu'"),
    ],
)
def test_bad_configs(make_checkpoint, tmp_path, patch, message):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(patch)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_config(ckpt)


def test_layers_block_type_form(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    pattern = cfg.pop("hybrid_override_pattern")
    names = {"M": "mamba", "*": "attention", "-": "mlp"}
    cfg["layers_block_type"] = [names[c] for c in pattern]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert load_config(ckpt).pattern == pattern


@pytest.mark.parametrize("breakage", ["unknown-letter", "missing-tensor", "pickle"])
def test_cli_reports_bad_input_without_traceback(make_checkpoint, tmp_path, breakage):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    if breakage == "unknown-letter":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["hybrid_override_pattern"] = "MZ"
        (ckpt / "config.json").write_text(json.dumps(cfg))
    elif breakage == "missing-tensor":
        tensors = load_file(ckpt / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, ckpt / "model.safetensors")
    else:
        (ckpt / "model.safetensors").unlink()
        (ckpt / "pytorch_model.bin").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-m", "hybridtrt.cli.main", "inspect", str(ckpt)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error" in proc.stderr and "fix:" in proc.stderr
