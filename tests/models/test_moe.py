"""The MoE block: config fields (supported / refused / ignored), checkpoint forms, `_ref` twins."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridtrt.errors import CheckpointError, ConfigError
from hybridtrt.models import config_from_dict, load_model
from hybridtrt.models.moe import moe_forward_ref, route, route_ref
from hybridtrt.models.presets import preset_config
from hybridtrt.judge.metrics import rel_l2
from tests.models.moe_hf import save_hf_moe

PRESET = "tiny-nemotron3-moe"


def test_preset_parses_as_nemotron3():
    c = config_from_dict(preset_config(PRESET))
    assert c.pattern == "MEMEM*E"
    m = c.moe
    assert (m.num_experts, m.top_k, m.intermediate_size, m.shared_intermediate_size) == (16, 6, 32, 64)
    assert (m.n_group, m.topk_group, m.norm_topk_prob, m.routed_scaling_factor, m.latent_size) == (1, 1, True, 2.5, None)
    assert c.to_dict()["moe"]["num_experts"] == 16


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*X"}, "mtp_hybrid_override_pattern='*X'"),
        ({"n_shared_experts": 2}, "n_shared_experts=2 is not supported"),
        ({"n_group": 3}, "n_routed_experts=16 is not divisible by n_group=3"),
        ({"n_group": 16}, "leaves 1 expert per group"),
        ({"n_group": 4, "topk_group": 5}, "topk_group=5 exceeds n_group=4"),
        ({"n_group": 4, "topk_group": 1}, "num_experts_per_tok=6 exceeds the 4 experts"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0 in config.json must be ≥ 1"),
        ({"moe_latent_size": 0}, "moe_latent_size=0"),
        ({"num_experts_per_tok": None}, "no 'num_experts_per_tok'"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
    ],
)
def test_refused_fields_are_named(patch, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        config_from_dict(preset_config(PRESET, **patch))


def test_mtp_layers_are_recorded_and_leave_the_main_model_alone():
    """Nemotron-3 Super's config (``num_nextn_predict_layers`` 1, pattern ``*E``): accepted, recorded,
    and the main model's config is the one without them."""
    import dataclasses

    base = config_from_dict(preset_config(PRESET))
    mtp = config_from_dict(preset_config(PRESET, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E"))
    assert (mtp.mtp_layers, mtp.mtp_pattern) == (1, "*E")
    assert dataclasses.replace(mtp, mtp_layers=0, mtp_pattern="") == base


def test_ignored_fields_do_not_change_the_model():
    base = config_from_dict(preset_config(PRESET))
    ignored = {
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.5,
        "moe_shared_expert_overlap": False,
        "output_router_logits": True,
        "mtp_hybrid_override_pattern": "*E",
        "mtp_layers_block_type": ["attention", "moe"],
    }
    assert config_from_dict(preset_config(PRESET, **ignored)) == base


def test_hf_applies_no_rope(tmp_path):
    """HF's NemotronH attention ignores rope_theta / partial_rotary_factor (so do we): the same
    weights with different RoPE fields give identical HF logits."""
    from tests.models.hf import load_hf

    a = save_hf_moe(tmp_path / "a", rope_theta=10000, partial_rotary_factor=1.0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg.update(rope_theta=10.0, partial_rotary_factor=0.5)
    (b / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_hf(a)(ids).logits, load_hf(b)(ids).logits)


def test_checkpoint_forms_load_identically(tmp_path):
    """HF's save_pretrained form (``backbone.``, per expert) == stacked ``model.`` form == bf16
    sharded; the router weight and correction bias stay fp32 in a bf16 model."""
    hub = save_hf_moe(tmp_path / "hub")
    tensors = load_file(hub / "model.safetensors")
    assert "backbone.layers.1.mixer.experts.0.up_proj.weight" in tensors
    reference = load_model(hub)

    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    (stacked_dir / "config.json").write_text((hub / "config.json").read_text())
    stacked = {k.replace("backbone.", "model."): v for k, v in tensors.items() if ".experts." not in k}
    for name, param in reference.state_dict().items():
        if ".experts." in name:
            stacked["model." + name] = param
    save_file(stacked, stacked_dir / "model.safetensors")
    for a, b in zip(reference.state_dict().values(), load_model(stacked_dir).state_dict().values()):
        assert torch.equal(a, b)

    sharded = save_hf_moe(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    model = load_model(sharded, "bf16")
    assert model.layers[1].mixer.experts.up_proj.dtype == torch.bfloat16
    assert model.layers[1].mixer.gate.weight.dtype == torch.float32
    assert model.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.randint(3, 256, (1, 5))).logits.isfinite().all()


def test_incomplete_or_doubled_experts_are_named(tmp_path):
    hub = save_hf_moe(tmp_path / "hub")
    tensors = load_file(hub / "model.safetensors")
    broken = tmp_path / "gap"
    shutil.copytree(hub, broken)
    save_file({k: v for k, v in tensors.items() if k != "backbone.layers.3.mixer.experts.5.down_proj.weight"}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers.3.mixer.experts.down_proj: per-expert tensors for experts \[5\]"):
        load_model(broken)
    doubled = tmp_path / "doubled"
    shutil.copytree(hub, doubled)
    both = dict(tensors)
    both["backbone.layers.1.mixer.experts.up_proj"] = torch.zeros(16, 32, 64)
    save_file(both, doubled / "model.safetensors")
    with pytest.raises(CheckpointError, match="stored both stacked and per expert"):
        load_model(doubled)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "norm_topk_prob": False}, {"moe_latent_size": 24, "n_shared_experts": 0}],
    ids=["nano", "groups-nonorm", "latent-noshared"],
)
def test_moe_matches_sequential_ref(make_checkpoint, overrides):
    """`route` / `MoE.forward` (vectorised, grouped by expert) vs per-token `route_ref` / `moe_forward_ref`."""
    model = load_model(make_checkpoint(PRESET, **overrides))
    mixer = model.layers[1].mixer
    h = torch.randn(3, 11, model.config.hidden_size) * 2
    with torch.no_grad():
        w, idx = route(h.reshape(-1, h.shape[-1]), mixer.gate.weight, mixer.gate.e_score_correction_bias, mixer.moe)
        w_ref, idx_ref = route_ref(h.reshape(-1, h.shape[-1]), mixer.gate.weight, mixer.gate.e_score_correction_bias, mixer.moe)
        assert torch.equal(idx, idx_ref)
        assert rel_l2(w, w_ref) <= 1e-6
        assert rel_l2(mixer(h), moe_forward_ref(mixer, h)) <= 1e-6


def test_group_limit_is_respected(make_checkpoint):
    model = load_model(make_checkpoint(PRESET, n_group=4, topk_group=2, num_experts_per_tok=3))
    mixer = model.layers[1].mixer
    with torch.no_grad():
        _, idx = mixer.gate(torch.randn(500, model.config.hidden_size))
    groups_used = (idx // 4).sort(-1).values
    assert ((groups_used[:, 1:] != groups_used[:, :-1]).sum(-1) <= 1).all()  # ≤ 2 distinct groups per token


def test_a_checkpoint_with_mtp_layers_exports_its_main_model(tmp_path, capsys):
    """Nemotron-3 Super's layout: ``num_nextn_predict_layers`` 1, ``mtp_hybrid_override_pattern`` ``*E`` and
    ``mtp.layers.*`` tensors (names as vLLM's NemotronH-MTP loads them: ``enorm``, ``hnorm``, ``eh_proj``,
    the layers' mixers, ``final_layernorm``). Through the CLI: exit 0, the same main-model graph and weights
    byte for byte as the checkpoint without them, and the summary says what was left out."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from hybridtrt.cli.main import main

    plain = save_hf_moe(tmp_path / "plain")
    mtp = tmp_path / "mtp"
    shutil.copytree(plain, mtp)
    config = json.loads((mtp / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    (mtp / "config.json").write_text(json.dumps(config))
    hidden = config["hidden_size"]
    tensors = load_file(mtp / "model.safetensors")
    tensors.update({
        "mtp.layers.0.enorm.weight": torch.ones(hidden), "mtp.layers.0.hnorm.weight": torch.ones(hidden),
        "mtp.layers.0.eh_proj.weight": torch.randn(hidden, 2 * hidden), "mtp.layers.0.norm.weight": torch.ones(hidden),
        "mtp.layers.0.mixer.q_proj.weight": torch.randn(hidden, hidden), "mtp.layers.1.norm.weight": torch.ones(hidden),
        "mtp.layers.1.mixer.experts.0.up_proj.weight": torch.randn(8, hidden), "mtp.layers.1.final_layernorm.weight": torch.ones(hidden),
    })  # fmt: skip
    save_file(tensors, mtp / "model.safetensors", metadata={"format": "pt"})
    outs = {}
    for name, ckpt in (("plain", plain), ("mtp", mtp)):
        outs[name] = tmp_path / f"out-{name}"
        assert main(["export", str(ckpt), "-o", str(outs[name]), "--no-verify", "--no-split"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "MTP head" in printed and "1 MTP layer(s) (pattern '*E')" in printed
    for file in ("model.onnx", "weights.data"):
        assert (outs["mtp"] / file).read_bytes() == (outs["plain"] / file).read_bytes(), file
    manifest = json.loads((outs["mtp"] / "hybridtrt.json").read_text())
    assert "not exported" in manifest["source"]["mtp"] and manifest["model"]["mtp_layers"] == 1
