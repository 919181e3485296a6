"""Nemotron-3 MoE exports (``hybridtrt export``) on ONNX Runtime vs the PyTorch reference: every
length, left padding, past states, 8 decode steps, 32 greedy tokens, ``--split``, fp16, group
routing and latent MoE, determinism; and the graph structure (router in plain ONNX, one
``MoeExperts`` node per E layer carrying the contract's attributes and the grouped body)."""

from __future__ import annotations

import hashlib

import onnx
import pytest
import torch

from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.models import load_model
from hybridtrt.ops.moe_onnx import MOE_EXPERTS
from hybridtrt.ops.onnx_functions import DOMAIN
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch
from tests.exporter.test_export import _compare_call

PRESET = "tiny-nemotron3-moe"
TOL = 1e-5
#: Group-limited routing, no normalisation, latent MoE, no shared expert.
VARIANT = {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "norm_topk_prob": False, "moe_latent_size": 24, "n_shared_experts": 0}


@pytest.fixture(scope="module")
def exported(make_export):
    ckpt, out = make_export(PRESET, ExportOptions(split=True))
    return load_model(ckpt), out


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_matches_reference_for_all_lengths(exported, batch):
    model, out = exported
    ort = OrtModel(out)
    c = model.config.chunk_size
    for length in (1, c - 1, c + 1, 3 * c + 5):
        lengths = [length] if batch == 1 else [length, max(1, length // 2), 1]
        ids, mask = left_padded_batch(lengths, model.config.vocab_size, seed=length)
        _compare_call(model, ort, ids, mask)


@pytest.mark.parametrize("use_decode_graph", [False, True])
def test_eight_decode_steps_match_reference(exported, use_decode_graph):
    """Each decode step from the reference's states: logits and states within 1e-5 (unified graph
    with L = 1, and decode.onnx)."""
    model, out = exported
    ort = OrtModel(out, use_decode_graph=use_decode_graph)
    ids, mask = left_padded_batch([23, 9, 4], model.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = model(ids, mask, logits="last")
    for step in range(8):
        token = ref.logits.argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        state = {spec.past_name: v for spec, v in zip(ort.plan.buffers, ref.cache.named_states().values())}
        with torch.no_grad():
            ref = model(token, mask, ref.cache, logits="last")
        got = ort.step(token, mask, state, True)[0] if use_decode_graph else ort.run(token, mask, state)["logits"]
        assert rel_l2(got, ref.logits) <= TOL, f"step {step}: {rel_l2(got, ref.logits):.2e}"


def test_greedy_32_tokens_equal_reference(exported):
    model, out = exported
    ids, mask = left_padded_batch([17, 6], model.config.vocab_size, seed=4)
    ref = TorchStepper(model).generate(ids, mask, max_new_tokens=32)
    for use_decode_graph in (False, True):
        assert torch.equal(OrtModel(out, use_decode_graph=use_decode_graph).generate(ids, mask, max_new_tokens=32).tokens, ref.tokens)


def test_graph_structure(exported):
    model, out = exported
    manifest = read_manifest(out)
    assert [layer["kind"] for layer in manifest.layers if layer["index"] in model.config.layers_of("E")] == ["moe"] * 3
    assert manifest.model["moe"]["top_k"] == 6
    for role, entry in manifest.graphs.items():
        assert entry.custom_ops[MOE_EXPERTS] == len(model.config.layers_of("E"))
        proto = onnx.load(str(out / entry.file), load_external_data=False)
        onnx.checker.check_model(str(out / entry.file), full_check=True)
        moe_nodes = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == MOE_EXPERTS]
        for node, layer in zip(moe_nodes, model.config.layers_of("E")):
            assert node.name == f"/model/layers.{layer}/mixer/experts/{MOE_EXPERTS}"
            assert list(node.input[3:]) == [f"model.layers.{layer}.mixer.experts.up_proj", f"model.layers.{layer}.mixer.experts.down_proj"]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"activation": b"relu2", "plugin_namespace": b"hybridtrt", "plugin_version": b"1"}
        body = next(f for f in proto.functions if f.name == MOE_EXPERTS)
        assert "ScatterND" in {n.op_type for n in body.node}  # the grouped body, not the dense one
        # The router is plain ONNX: fp32 MatMul with the gate weight, Sigmoid, TopK (sorted).
        names = {n.name: n for n in proto.graph.node}
        layer = model.config.layers_of("E")[0]
        assert f"/model/layers.{layer}/mixer/gate/MatMul" in names and f"/model/layers.{layer}/mixer/gate/Sigmoid" in names
        topk = names[f"/model/layers.{layer}/mixer/gate/TopK"]
        assert {a.name: a.i for a in topk.attribute}["sorted"] == 1  # TensorRT's TopK needs sorted=1


def test_group_routing_latent_moe_export(make_export):
    ckpt, out = make_export(PRESET, ExportOptions(verify=False), **VARIANT)  # compared below
    model, ort = load_model(ckpt), OrtModel(out)
    for lengths in ([1], [33, 12, 2]):
        ids, mask = left_padded_batch(lengths, model.config.vocab_size, seed=len(lengths))
        _compare_call(model, ort, ids, mask)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(n.name.endswith("/mixer/fc1_latent_proj/MatMul") for n in proto.graph.node)


def test_reexport_is_byte_identical(make_export, tmp_path):
    ckpt, out = make_export(PRESET, ExportOptions(verify=False), **VARIANT)
    again = tmp_path / "again"
    export(ckpt, again, ExportOptions(verify=False))
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for name in ("model.onnx", "weights.data", "hybridtrt.json"):
        assert digest(out / name) == digest(again / name), name
