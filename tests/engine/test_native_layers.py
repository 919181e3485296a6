"""The parser-rule check: our attention and KV-update nodes become IAttention / IKVCacheUpdateLayer
for the TensorRT versions that import them, and every way a node would not is named."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from hybridtrt.engine.native_layers import NATIVE_LAYERS, check_native_layers, native_dispatch
from hybridtrt.errors import EngineError
from hybridtrt.exporter.export import ExportOptions

STATIC = ExportOptions(kv_cache="static", max_cache_len=96, split=True)


def _graph(make_export, options):
    _, out = make_export("tiny-nemotron-h", options)
    return onnx.load(str(out / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("version", ["10.15.1", "11.1.0"])
def test_static_export_maps_to_native_layers(make_export, version):
    dispatch = check_native_layers(_graph(make_export, STATIC), version)
    layers = sorted(d.layer for d in dispatch)
    assert layers == ["IAttention"] * 2 + ["IKVCacheUpdateLayer"] * 4


def test_default_export_attention_is_native(make_export):
    dispatch = check_native_layers(_graph(make_export, ExportOptions()), "10.14.0")
    assert [d.layer for d in dispatch] == ["IAttention", "IAttention"]


def test_older_tensorrt_is_named(make_export):
    model = _graph(make_export, STATIC)
    by_op = {d.op_type: d for d in native_dispatch(model, "10.14.0")}
    assert by_op["Attention"].layer == "IAttention"
    assert by_op["TensorScatter"].layer is None and "predates the TensorScatter importer (10.15)" in by_op["TensorScatter"].reasons[0]
    with pytest.raises(EngineError, match="TensorScatter"):
        check_native_layers(model, "10.14.0")


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
        ("Attention", lambda m, n: _set(n, softcap=30.0), "softcap"),
        ("TensorScatter", lambda m, n: _set(n, mode="circular"), "linear only"),
        ("TensorScatter", lambda m, n: _set(n, axis=1), "sequence dim"),
        ("TensorScatter", lambda m, n: m.graph.output.remove(next(o for o in m.graph.output if o.name == n.output[0])), "not a graph output"),
    ],
)
def test_each_importer_rule_is_enforced(make_export, op_type, edit, reason):
    model, name = _mutate(_graph(make_export, STATIC), op_type, edit)
    dispatch = {d.node: d for d in native_dispatch(model, "11.1.0")}
    assert dispatch[name].layer is None
    assert any(reason in r for r in dispatch[name].reasons), dispatch[name].reasons


def test_dynamic_cache_capacity_is_refused(make_export):
    """IKVCacheUpdateLayer needs a static sequence dim: a TensorScatter on a dynamic cache is named."""
    model = _graph(make_export, STATIC)
    for v in [*model.graph.input, *model.graph.output]:
        if "key" in v.name or "value" in v.name:
            v.type.tensor_type.shape.dim[2].dim_param = "capacity"
    d = next(d for d in native_dispatch(model, "11.1.0") if d.op_type == "TensorScatter")
    assert d.layer is None and "static capacity" in " ".join(d.reasons)


def test_rules_are_data():
    assert {r.layer for r in NATIVE_LAYERS.values()} == {"IAttention", "IKVCacheUpdateLayer"}
    assert NATIVE_LAYERS["TensorScatter"].since_opset == 24 and NATIVE_LAYERS["Attention"].since_opset == 23
