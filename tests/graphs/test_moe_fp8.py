"""FP8 for Nemotron-3 MoE layers: per-expert calibration (tokens seen, fallback for experts no token
reached), the MoeExperts -> MoeExpertsFp8 rewrite. FP8 export + per-layer validation of an MoE
model with routing held: tests/validation/test_moe_routing.py (the published Nano config).

Numbers are gated at ``initializer_range`` 0.05 (trained-like weight scale), as for the other FP8
tests; the preset default 0.3 is reported by ``benchmarks/fp8_accuracy.py``."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from hybridtrt.exporter.calibration import calibrate, calibration_batches, moe_node_name
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.graphs.fp8_qdq import EXPERT_FALLBACK, ExpertAmax, insert_fp8_qdq
from hybridtrt.models import load_model
from hybridtrt.ops.moe_onnx import MOE_EXPERTS, MOE_EXPERTS_FP8
from hybridtrt.ops.onnx_functions import DOMAIN
from hybridtrt.runtime.generation import left_pad

PRESET = "tiny-nemotron3-moe"
INIT_RANGE = 0.05


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint(PRESET, initializer_range=INIT_RANGE))


@pytest.fixture(scope="module")
def traced(make_export):
    """The unified graph with its weights in memory, as the FP8 export rewrites it (the streamed
    export's graph is the weight-loaded trace's, byte for byte: tests/exporter/test_streaming*.py)."""
    _, out = make_export(PRESET, ExportOptions(split=False, verify=False), initializer_range=INIT_RANGE)
    return onnx.load(str(out / "model.onnx"))


@pytest.fixture(scope="module")
def amax(model):
    return calibrate(model, calibration_batches(None, calib_file=None, calib_random=8, vocab_size=256, seq_len=32))


def test_calibration_counts_real_tokens_per_expert(model):
    """Each MoE layer sees every real token K times; left padding is not counted; amax per expert
    is the max over exactly the tokens routed to it."""
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12]], pad_id=0)
    stats = calibrate(model, [(ids, mask)])
    k = model.config.moe.top_k
    for layer in model.config.layers_of("E"):
        entry = stats[moe_node_name(f"layers.{layer}.mixer.experts")]
        assert isinstance(entry, ExpertAmax)
        assert sum(entry.tokens) == 8 * k
        assert all((n == 0) == (a == 0.0) for n, a in zip(entry.tokens, entry.up_input))
    # Expert amax by hand for the first MoE layer.
    layer = model.config.layers_of("E")[0]
    seen: dict[str, torch.Tensor] = {}
    hook = model.layers[layer].mixer.experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], idx=a[1]))
    with torch.no_grad():
        model(ids, mask, logits="last")
    hook.remove()
    keep = mask.reshape(-1) != 0
    x, idx = seen["x"][keep], seen["idx"][keep]
    expert = int(idx[0, 0])
    rows = (idx == expert).any(-1)
    entry = stats[moe_node_name(f"layers.{layer}.mixer.experts")]
    assert entry.tokens[expert] == int(rows.sum())
    assert entry.up_input[expert] == pytest.approx(float(x[rows].abs().max()))


def test_fp8_rewrite_of_the_experts(model, traced, amax):
    proto = copy.deepcopy(traced)
    recipe = insert_fp8_qdq(proto, amax)
    inits = {t.name: t for t in proto.graph.initializer}
    moe = model.config.moe
    fp8_nodes = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == MOE_EXPERTS_FP8]
    assert [n.name for n in fp8_nodes] == [f"/model/layers.{i}/mixer/experts/{MOE_EXPERTS_FP8}" for i in model.config.layers_of("E")]
    assert not [n for n in proto.graph.node if n.op_type == MOE_EXPERTS]
    for node in fp8_nodes:
        up, up_w, up_in, down, down_w, down_in = (inits[name] for name in node.input[3:])
        assert up.data_type == down.data_type == TensorProto.FLOAT8E4M3FN
        assert list(up.dims) == [moe.num_experts, moe.intermediate_size, model.config.hidden_size]
        assert list(up_w.dims) == list(down_w.dims) == [moe.num_experts, 1]
        assert list(up_in.dims) == list(down_in.dims) == [moe.num_experts]
        for scale in (up_w, up_in, down_w, down_in):
            assert (onnx.numpy_helper.to_array(scale) > 0).all()
        entry = recipe.experts[node.name]
        assert sum(entry["tokens"]) == 8 * 32 * moe.top_k and entry["fallback_experts"] == []
    assert not any(name.endswith(".experts.up_proj") for name in inits)  # fp32 experts dropped
    assert {f.name for f in proto.functions if f.domain == DOMAIN} == {"Mamba2ChunkScan", MOE_EXPERTS_FP8}
    layer = model.config.layers_of("E")[0]
    assert "router" in recipe.excluded[f"/model/layers.{layer}/mixer/gate/MatMul"]
    assert f"/model/layers.{layer}/mixer/shared_experts/down_proj/MatMul" in recipe.quantized
    onnx.checker.check_model(proto, full_check=True)


def test_unreached_experts_get_the_stated_fallback(model, traced):
    """One calibration token reaches K experts per layer; the others get the layer's largest scale."""
    stats = calibrate(model, [(torch.tensor([[42]]), torch.ones(1, 1, dtype=torch.long))])
    proto = copy.deepcopy(traced)
    recipe = insert_fp8_qdq(proto, stats, weight_scale="channel")
    assert recipe.expert_fallback == EXPERT_FALLBACK
    moe = model.config.moe
    for name, entry in recipe.experts.items():
        reached = [e for e, n in enumerate(entry["tokens"]) if n]
        assert len(reached) == moe.top_k
        assert entry["fallback_experts"] == [e for e in range(moe.num_experts) if e not in reached]
        for key in ("up_input_scale", "down_input_scale"):
            scales = np.array(entry[key])
            assert (scales > 0).all()
            assert np.allclose(scales[entry["fallback_experts"]], scales[reached].max())
    node = next(n for n in proto.graph.node if n.op_type == MOE_EXPERTS_FP8)
    up_w = next(t for t in proto.graph.initializer if t.name == node.input[4])
    assert list(up_w.dims) == [moe.num_experts, moe.intermediate_size]  # per expert and output channel


def test_excluded_experts_stay_high_precision(traced, amax):
    proto = copy.deepcopy(traced)
    recipe = insert_fp8_qdq(proto, amax, exclude=[r"/experts/"])
    assert all("--exclude" in recipe.excluded[n.name] for n in proto.graph.node if n.op_type == MOE_EXPERTS)
    assert not recipe.experts
    assert {f.name for f in proto.functions if f.domain == DOMAIN} == {"Mamba2ChunkScan", MOE_EXPERTS}


