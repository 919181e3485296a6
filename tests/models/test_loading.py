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


# -- issue 10: refusals decided from the headers, before anything is built or read ----------------


@pytest.mark.parametrize(
    ("index", "shown"),
    [
        ({"weight_map": ["model.safetensors"]}, "found list"),
        ({"weight_map": {"model.embeddings.weight": 3}}, "'model.embeddings.weight': 3"),
        ({"metadata": {}}, "found NoneType"),
        ([1, 2], "found NoneType"),
    ],
)
def test_malformed_shard_index_is_refused(make_checkpoint, tmp_path, index, shown):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a valid safetensors index") as e:
        load_model(ckpt)
    assert shown in str(e.value)


def _hub_cache(src, tmp_path, revision="0123abcd"):
    """``models--org--name/{blobs,snapshots/<rev>}`` with the snapshot's files as relative
    symlinks into ``blobs/`` (what huggingface_hub writes)."""
    import hashlib

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    return snap


def test_hub_cache_layout_loads(tmp_path):
    sharded = create_checkpoint("tiny-nemotron-h", tmp_path / "sharded", max_shard_bytes=100_000)
    snap = _hub_cache(sharded, tmp_path)
    assert all(p.is_symlink() for p in snap.glob("*.safetensors"))
    a, b = load_model(sharded), load_model(snap)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hub_cache_symlink_out_of_the_repo_is_refused(tmp_path):
    sharded = create_checkpoint("tiny-nemotron-h", tmp_path / "sharded", max_shard_bytes=100_000)
    snap = _hub_cache(sharded, tmp_path)
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(sharded / shard.name)  # resolves outside the cache repo
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' named in model.safetensors.index.json is a link to .*outside the checkpoint and its hub cache repo"):
        load_model(snap)


@pytest.mark.parametrize("stored", [torch.int8, torch.float8_e4m3fn])
def test_integer_or_fp8_weights_are_refused(make_checkpoint, tmp_path, stored):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.3.mixer.up_proj.weight"] = tensors["model.layers.3.mixer.up_proj.weight"].clamp(-1, 1).to(stored)
    save_file(tensors, ckpt / "model.safetensors")
    code = {torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}[stored]
    with pytest.raises(CheckpointError, match=rf"model\.layers\.3\.mixer\.up_proj\.weight \({code}\)") as e:
        load_model(ckpt)
    assert "--quantize fp8" in str(e.value)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method='fp8'"):
        load_model(ckpt)


@pytest.mark.parametrize("lazy", [False, True])
def test_non_finite_weight_is_named_at_load(make_checkpoint, tmp_path, lazy):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.4.mixer.D"][2] = float("inf")
    save_file(tensors, ckpt / "model.safetensors")
    model = load_model(ckpt, lazy=True) if lazy else None
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.4\.mixer\.D has 1 NaN/Inf value\(s\) of 8"):
        if lazy:
            model(torch.ones(1, 3, dtype=torch.long))
        else:
            load_model(ckpt)


def test_overflow_to_fp16_is_named(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm_f.weight"][0] = 1e6  # finite in fp32, Inf in fp16
    save_file(tensors, ckpt / "model.safetensors")
    load_model(ckpt, "bf16")
    with pytest.raises(CheckpointError, match=r"model\.norm_f\.weight overflows fp16: 1 value\(s\) become Inf \(largest magnitude 1e\+06\)"):
        load_model(ckpt, "fp16")


def test_narrowing_read_converts_by_blocks_to_the_same_values(make_checkpoint, monkeypatch):
    """An fp32 checkpoint read in bf16 is converted a block of rows at a time (no fp32 copy of the
    whole tensor): the same bits as converting the stored tensor, and a NaN in a late block is
    still named with the tensor."""
    from hybridtrt.models import loading
    from hybridtrt.models.loading import open_checkpoint

    monkeypatch.setattr(loading, "NARROW_BLOCK_BYTES", 4096)  # several blocks per weight
    ckpt = open_checkpoint(make_checkpoint(), "bf16")
    names = [n for n in ckpt.parameters if ckpt.narrows(n)]
    assert "layers.0.mixer.in_proj.weight" in names and not ckpt.as_dtype("fp32").narrows("layers.0.mixer.in_proj.weight")
    blocks = []
    read_rows = type(ckpt.index).read_rows
    monkeypatch.setattr(type(ckpt.index), "read_rows", lambda self, n, a, b: blocks.append((n, a, b)) or read_rows(self, n, a, b))
    for name in names:
        got, want = ckpt.read(name), ckpt.read_stored(name).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16)), name
    in_proj = [b for b in blocks if b[0] == "model.layers.0.mixer.in_proj.weight"]
    assert len(in_proj) > 1 and all((b - a) * ckpt.index[n].nbytes // ckpt.index[n].shape[0] <= 4096 for n, a, b in in_proj)
    rows = ckpt.parameters["layers.0.mixer.in_proj.weight"].shape[0]
    stored = ckpt.read_stored("layers.0.mixer.in_proj.weight")
    stored[rows - 1, 0] = float("nan")
    monkeypatch.setattr(type(ckpt.index), "read_rows", lambda self, n, a, b: stored[a:b].clone())
    monkeypatch.setattr(type(ckpt), "read_stored", lambda self, n: stored)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mixer\.in_proj\.weight has 1 NaN/Inf value\(s\)"):
        ckpt.read("layers.0.mixer.in_proj.weight")


def test_layer_pattern_longer_than_the_weights_is_refused_fast(make_checkpoint, tmp_path):
    """Before building a module: 100,008 layers against 8 in the weights took 105 s and 3 GiB."""
    import time

    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "M*M-M*-M" * 12_501
    (ckpt / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"describes 100,008 decoder layers .* the weights have 8 \(layers\.0 … layers\.7\)"):
        load_model(ckpt)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("preset", ["tiny-nemotron-h", "tiny-mamba2", "small-nemotron-h"])
def test_header_matching_equals_the_built_model(preset):
    """The expected names/shapes come from one block per kind, not the whole model."""
    from hybridtrt.models.config import config_from_dict
    from hybridtrt.models.loading import expected_parameters
    from hybridtrt.models.model import HybridLM
    from hybridtrt.models.presets import preset_config

    config = config_from_dict(preset_config(preset))
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in HybridLM(config).state_dict().items()}
    assert list(expected_parameters(config).items()) == list(built.items())


def test_hf_save_pretrained_checkpoint_loads(tmp_path):
    """HF's own save_pretrained (bf16, sharded, ``backbone.`` names) loads like our presets."""
    from tests.models.hf import save_hf_checkpoint

    ckpt = save_hf_checkpoint("tiny-nemotron-h", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="100KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert all(k.startswith("backbone.") or k.startswith("lm_head.") for k in index["weight_map"])
    model = load_model(ckpt, "bf16")
    hf_tensors = {}
    for f in ckpt.glob("model-*.safetensors"):
        hf_tensors.update(load_file(f))
    assert torch.equal(model.layers[0].mixer.in_proj.weight, hf_tensors["backbone.layers.0.mixer.in_proj.weight"])


def test_truncated_shard_is_refused_from_its_header(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file: tensor .* run past the file"):
        load_model(ckpt, lazy=True)  # refused before anything is read
