"""The MTP head (`hybridtrt.models.mtp`) against NVIDIA's definition as vLLM runs it, and its loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridtrt.errors import CheckpointError, ConfigError
from hybridtrt.models import load_model
from hybridtrt.models.mtp import load_mtp
from hybridtrt.models.model import causal_mask

PRESET = "tiny-nemotron3-super"


def _vllm_style(main, head, hidden, next_ids, mask, swap=False):
    """A twin written from vllm/model_executor/models/nemotron_h_mtp.py's control flow (fp32, no
    cache, no padding): the fused add-and-norm with a carried ``residual`` (``residual = None``
    before the first layer; a layer normalizes ``hidden + residual``), the fusion
    ``eh_proj(cat([enorm(embeds), hnorm(hidden)]))`` on the first layer, and
    ``final_layernorm(hidden + residual)`` after the last; the draft logits through the main
    model's LM head. ``swap`` plants the concatenation in the other order."""
    first = head.layers[0]
    parts = [first.enorm(main.embeddings(next_ids)), first.hnorm(hidden)]
    x = first.eh_proj(torch.cat(parts[::-1] if swap else parts, dim=-1))
    residual = None
    allowed = causal_mask(mask, next_ids.shape[1])
    for layer in head.layers:
        if residual is None:
            residual, normed = x, layer.norm(x)
        else:
            residual = x + residual
            normed = layer.norm(residual)
        if layer.kind == "*":
            empty = torch.zeros(x.shape[0], layer.mixer.num_kv_heads, 0, layer.mixer.head_dim)
            x, _, _ = layer.mixer(normed, allowed, empty, empty)
        else:
            x = layer.mixer(normed)
    out = head.layers[-1].final_layernorm(x + residual)
    return torch.matmul(out, (main.lm_head.weight if main.lm_head is not None else main.embeddings.weight).t())


@pytest.fixture(scope="module")
def super_model(make_checkpoint):
    ckpt = make_checkpoint(PRESET)
    main = load_model(ckpt)
    return ckpt, main, load_mtp(ckpt, main)


def test_the_head_computes_vllms_definition(super_model):
    _, main, head = super_model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    out = main(ids, logits="all")
    next_ids = torch.randint(3, 256, (2, 9), generator=gen)
    logits, hidden, cache = head(main, out.last_hidden, next_ids, mask, head.new_cache(2, main.dtype))
    twin = _vllm_style(main, head, out.last_hidden, next_ids, mask)
    assert torch.allclose(logits, twin, rtol=1e-5, atol=1e-5), (logits - twin).abs().max()
    assert logits.std() > 0.5  # the draft head is not a constant
    planted = _vllm_style(main, head, out.last_hidden, next_ids, mask, swap=True)
    assert (logits - planted).abs().max() > 0.1
    # Chained one position at a time on its own KV == all positions at once (the cache is right).
    chained, state = [], head.new_cache(2, main.dtype)
    for t in range(9):
        step, _, state = head(main, out.last_hidden[:, t : t + 1], next_ids[:, t : t + 1], mask[:, : t + 1], state)
        chained.append(step)
    assert torch.allclose(torch.cat(chained, 1), logits, rtol=1e-5, atol=1e-5)
    assert cache.key[0].shape[2] == 9 and hidden.shape == out.last_hidden.shape


def test_last_hidden_is_what_the_lm_head_reads(super_model):
    _, main, _ = super_model
    ids = torch.randint(3, 256, (1, 5))
    out = main(ids, logits="all")
    assert torch.equal(main.head_logits(out.last_hidden), out.logits)


def _edited(tmp_path, ckpt, edit_tensors=None, edit_config=None):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    if edit_tensors is not None:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_loading_is_strict(super_model, tmp_path):
    ckpt, main, _ = super_model
    missing = _edited(tmp_path / "a", ckpt, lambda t: t.pop("mtp.layers.0.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): mtp.layers.0.eh_proj.weight"):
        load_mtp(missing, main)
    extra = _edited(tmp_path / "b", ckpt, lambda t: t.__setitem__("mtp.layers.2.norm.weight", torch.ones(64)))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): mtp.layers.2.norm.weight"):
        load_mtp(extra, main)
    misshapen = _edited(tmp_path / "c", ckpt, lambda t: t.__setitem__("mtp.layers.0.eh_proj.weight", torch.ones(64, 64)))
    with pytest.raises(CheckpointError, match=r"eh_proj.weight: checkpoint \(64, 64\)"):
        load_mtp(misshapen, main)
    two_steps = _edited(tmp_path / "d", ckpt, edit_config=lambda c: c.update(num_nextn_predict_layers=2))
    with pytest.raises(ConfigError, match="num_nextn_predict_layers=2"):
        load_mtp(two_steps, main)
    mamba = _edited(tmp_path / "e", ckpt, edit_config=lambda c: c.update(mtp_hybrid_override_pattern="ME"))
    with pytest.raises(ConfigError, match="Mamba block"):
        load_mtp(mamba, main)


def test_hf_config_forms_of_the_mtp_pattern():
    """HF's NemotronHConfig: ``mtp_layers_block_type`` wins unless it is the default, the legacy
    string otherwise, ``*E`` when neither is given."""
    from hybridtrt.models.config import config_from_dict
    from hybridtrt.models.presets import preset_config

    def pattern(**fields):
        return config_from_dict(preset_config("tiny-nemotron3-moe", num_nextn_predict_layers=1, **fields)).mtp_pattern

    assert pattern() == "*E"
    assert pattern(mtp_hybrid_override_pattern="-E") == "-E"
    assert pattern(mtp_layers_block_type=["mlp", "moe"]) == "-E"
    assert pattern(mtp_layers_block_type=["full_attention", "moe"], mtp_hybrid_override_pattern="*-") == "*-"
    with pytest.raises(ConfigError, match="mtp_layers_block_type"):
        pattern(mtp_layers_block_type=["mamba2"])


def test_a_sharded_checkpoint_loads_the_same_head(super_model, tmp_path):
    """The hub's sharded layout (an index, ``mtp.*`` tensors spread over shards, experts per expert)
    loads the head tensor for tensor as the single file does."""
    from hybridtrt.models import create_checkpoint
    from hybridtrt.models.loading import INDEX_FILE

    _, main, head = super_model
    sharded = create_checkpoint(PRESET, tmp_path / "sharded", max_shard_bytes=64 << 10)
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    assert len({f for k, f in index.items() if k.startswith("mtp.")}) > 1 and "mtp.layers.1.mixer.experts.15.up_proj.weight" in index
    again = load_mtp(sharded, main)
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
