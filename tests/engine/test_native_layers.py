"""The native-layer rules inside the dispatch emulator: our attention and KV-update nodes become IAttention /
IKVCacheUpdateLayer for the TensorRT versions that import them, and every way a node would not is named."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from hybridtrt.engine.dispatch import NATIVE, UNSUPPORTED, emulate_dispatch, require_dispatch
from hybridtrt.engine.native_layers import IMPORTER_RULES
from hybridtrt.engine.trt_rules import NATIVE_OPS
from hybridtrt.errors import EngineError
from hybridtrt.exporter.export import ExportOptions
from tests.static_capacity import CAPACITY

STATIC = ExportOptions(kv_cache="static", max_cache_len=CAPACITY, split=True)


def _graph(make_export, options):
    _, out = make_export("tiny-nemotron-h", options)
    return onnx.load(str(out / "model.onnx"), load_external_data=False)


def native_nodes(model, version):
    """``{node name: NodeImport}`` of the standard nodes the emulator checked as native layers."""
    return {n.node: n for n in emulate_dispatch(model, version).nodes if not n.custom}


@pytest.mark.parametrize("version", ["10.15.1", "11.1.0"])
def test_static_export_maps_to_native_layers(make_export, version):
    report = emulate_dispatch(_graph(make_export, STATIC), version)
    assert report.ok, report.problems
    layers = sorted(n.detail.split(" ")[0] for n in report.nodes if n.importer == NATIVE)
    assert layers == ["IAttention"] * 2 + ["IKVCacheUpdateLayer"] * 4


def test_default_export_attention_is_native(make_export):
    model = _graph(make_export, ExportOptions())
    nodes = native_nodes(model, "10.14.0")
    assert [n.detail.split(" ")[0] for n in nodes.values()] == ["IAttention", "IAttention"]
    report = emulate_dispatch(model, "11.1.0")  # and every other parser rule (OP_RULES) passes
    assert report.ok, report.problems


def test_older_tensorrt_is_named(make_export):
    model = _graph(make_export, STATIC)
    by_op = {n.op: n for n in native_nodes(model, "10.14.0").values()}
    assert by_op["Attention"].importer == NATIVE
    assert by_op["TensorScatter"].importer == UNSUPPORTED and "needs TensorRT >= 10.15" in by_op["TensorScatter"].detail
    with pytest.raises(EngineError, match="TensorScatter"):
        require_dispatch(emulate_dispatch(model, "10.14.0"), plugins_loaded=False, allow_function_bodies=False)


def _mutate(model, op_type, edit):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == op_type)
    edit(model, node)
    return model, node.name


def _set(node, **attrs):
    keep = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in attrs.items()])


@pytest.mark.parametrize(
    "op_type, edit, reason",
    [
        ("Attention", lambda m, n: n.input.extend(["", "", "nonpad"]), "nonpad_kv_seqlen"),
        ("Attention", lambda m, n: n.input.extend(["present.1.key"]), "past_key/past_value"),
        ("Attention", lambda m, n: n.output.extend(["present_key_out"]), "one output"),
        ("Attention", lambda m, n: _set(n, is_causal=1), "upper-left"),
        ("TensorScatter", lambda m, n: _set(n, mode="circular"), "linear only"),
        ("TensorScatter", lambda m, n: _set(n, axis=1), "sequence dim"),
        ("TensorScatter", lambda m, n: m.graph.output.remove(next(o for o in m.graph.output if o.name == n.output[0])), "not a graph output"),
    ],
)
def test_each_importer_rule_is_enforced(make_export, op_type, edit, reason):
    model, name = _mutate(_graph(make_export, STATIC), op_type, edit)
    node = native_nodes(model, "11.1.0")[name]
    assert node.importer == UNSUPPORTED and reason in node.detail, node.detail
    assert any(name in p and reason in p for p in emulate_dispatch(model, "11.1.0").problems)


def test_dynamic_cache_capacity_is_refused(make_export):
    """IKVCacheUpdateLayer needs a static sequence dim: a TensorScatter on a dynamic cache is named."""
    model = _graph(make_export, STATIC)
    for v in [*model.graph.input, *model.graph.output]:
        if "key" in v.name or "value" in v.name:
            v.type.tensor_type.shape.dim[2].dim_param = "capacity"
    node = next(n for n in native_nodes(model, "11.1.0").values() if n.op == "TensorScatter")
    assert node.importer == UNSUPPORTED and "static capacity" in node.detail


def test_every_native_op_has_its_importer_rules():
    assert set(IMPORTER_RULES) == set(NATIVE_OPS)
    assert {op.layer for op in NATIVE_OPS.values()} == {"IAttention", "IKVCacheUpdateLayer"}
