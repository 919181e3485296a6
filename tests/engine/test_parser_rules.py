"""The parser's own rules in the pre-build check: the static checker's attribute refusals, operators.md's element
types and constant inputs, applied to the graph and to every function body TensorRT would build.

The exports of every flavour at the default opset (fp16, bf16, static KV, MoE) must pass on TensorRT 11.1;
each kind of refused construct is planted — in the graph and inside a function body — and refused by name. The
softmax_precision attribute the half-precision exports used to carry is refused at any value, and ONNX Runtime
computes bitwise the same without it.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from hybridtrt.engine.dispatch import PLUGIN, emulate_dispatch, require_dispatch
from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS, OP_RULES
from hybridtrt.errors import EngineError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.ops.moe_onnx import moe_experts_fp8_function
from hybridtrt.runtime.onnxruntime import OrtModel
from tests.validation.faults import reseal
from tests.static_capacity import CAPACITY

#: The option sets other test modules export with (shared through the trace cache); fp32 at the default opset is
#: tests/engine/test_native_layers.py's.
FLAVOURS = {
    "fp16": ("tiny-nemotron-h", ExportOptions(dtype="fp16", verify=False)),
    "bf16": ("tiny-nemotron-h", ExportOptions(dtype="bf16", verify=False)),
    "static": ("tiny-nemotron-h", ExportOptions(kv_cache="static", max_cache_len=CAPACITY, split=True)),
    "moe-bf16": ("tiny-nemotron3-moe", ExportOptions(dtype="bf16", split=False, verify=False)),
}


def graphs(make_export, flavour):
    preset, options = FLAVOURS[flavour]
    out = make_export(preset, options)[1]
    return [onnx.load(str(path), load_external_data=False) for path in sorted(out.glob("*.onnx"))]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_every_flavour_passes_the_parser_rules_of_11_1(make_export, flavour):
    """The default opset-24 exports — half precision included, the main path — would parse, with or without
    the plugins (the function bodies are checked too)."""
    for model in graphs(make_export, flavour):
        for plugins in (HYBRIDTRT_CREATORS, frozenset()):
            report = emulate_dispatch(model, "11.1.0", plugins=plugins)
            assert report.ok, report.problems
        attention = [n for n in model.graph.node if n.op_type == "Attention"]
        assert attention and not [a.name for n in attention for a in n.attribute if a.name == "softmax_precision"]


def _set(node: onnx.NodeProto, **attrs) -> None:
    keep = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in attrs.items()])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


@pytest.mark.parametrize(
    "attrs, needle",
    [({"softmax_precision": 1}, "softmax_precision (any value)"), ({"softcap": 30.0}, "softcap = 30.0")],
)
def test_the_checker_refuses_attention_attributes(make_export, attrs, needle):
    """A bf16 export of the last release carried softmax_precision=FLOAT: refused before anything is imported."""
    model = _copy(graphs(make_export, "bf16")[-1])  # model.onnx
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    _set(node, **attrs)
    report = emulate_dispatch(model, "11.1.0", plugins=HYBRIDTRT_CREATORS)
    (problem,) = report.problems
    assert needle in problem and "onnxOpCheckers.cpp" in problem and repr(node.name) in problem
    with pytest.raises(EngineError, match=needle.split(" ")[0]):
        require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)
    # the checker predates nothing it refuses: 10.14 (the first Attention importer) refuses it too
    assert not emulate_dispatch(model, "10.14.0").ok


def _function_model(body: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str], opset: int = 24) -> onnx.ModelProto:
    """A graph of one ``test::Body`` node whose local function is ``body``."""
    names = [i.name for i in inputs]
    function = helper.make_function("test", "Body", names, outputs, body, [helper.make_opsetid("", opset)])
    call = helper.make_node("Body", names, ["y"], name="call", domain="test")
    graph = helper.make_graph([call], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("test", 1)], functions=[function])


def test_a_float8_cast_in_a_function_body_is_refused():
    body = [
        helper.make_node("Cast", ["x"], ["q"], name="to_fp8", to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("Cast", ["q"], ["y"], name="from_fp8", to=TensorProto.FLOAT),
    ]
    report = emulate_dispatch(_function_model(body, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], ["y"]), "11.1.0")
    text = "\n".join(report.problems)
    assert "in the body of test::Body" in text
    assert "Cast to FP8 is not supported" in text and "'to_fp8'" in text
    assert "Cast on FP8 (input 0) is not supported" in text and "'from_fp8'" in text  # its type propagated from the Cast
    assert "QuantizeLinear/DequantizeLinear" in text


def test_the_same_cast_in_the_graph_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [4])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], name="to_fp8", to=TensorProto.FLOAT8E4M3FN)], "g", [x], [y])
    (problem,) = emulate_dispatch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]), "11.1.0").problems
    assert problem.startswith("Cast to FP8 is not supported") and "'to_fp8'" in problem


def test_a_computed_reduction_axis_in_a_body_is_refused():
    body = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceSum", ["x", "s"], ["y"], name="sum_by_shape"),
    ]
    (problem, fix) = emulate_dispatch(_function_model(body, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], ["y"]), "11.1.0").problems
    assert "ReduceSum's input 1 must be a build-time constant" in problem and "'sum_by_shape'" in problem
    assert fix.startswith("test::Body cannot be built from its function body")


def test_a_constant_axis_passes_and_attribute_references_are_bound():
    """The function's attribute reference (the way our scan bodies pass chunk_size) resolves to the call's value."""
    axes = helper.make_node("Constant", [], ["axes"], name="axes")
    axes.attribute.append(helper.make_attribute_ref("value_ints", onnx.AttributeProto.INTS, ref_attr_name="which"))
    body = [axes, helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")]
    model = _function_model(body, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], ["y"])
    model.functions[0].attribute.append("which")
    _set(model.graph.node[0], which=[0])
    assert emulate_dispatch(model, "11.1.0").ok


def test_an_attribute_refused_inside_a_body_is_named():
    body = [helper.make_node("TopK", ["x", "k"], ["y", "i"], name="unsorted_topk", sorted=0)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("k", TensorProto.INT64, [1])]
    problems = emulate_dispatch(_function_model(body, inputs, ["y"]), "11.1.0").problems
    assert any("TopK with attribute sorted = 0" in p and "'unsorted_topk'" in p and "operators.md" in p for p in problems), problems


def test_a_type_outside_the_row_is_refused():
    """bf16 is in most rows; a Not on floats is not (Not takes BOOL only)."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4])
    graph = helper.make_graph([helper.make_node("Not", ["x"], ["y"], name="not_bf16")], "g", [x], [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    (problem,) = emulate_dispatch(model, "11.1.0").problems
    assert "Not on BF16 (input 0) is not supported: TensorRT's Not takes BOOL" in problem


def _fp8_moe_model(**attrs) -> onnx.ModelProto:
    """One MoeExpertsFp8 node with its function body (which casts to/from float8) and the node's ``attrs``."""
    function = moe_experts_fp8_function(opset=24)
    f32, f8, i64 = TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN, TensorProto.INT64
    types = {"x": (f32, [6, 8]), "topk_indices": (i64, [6, 2]), "topk_weights": (f32, [6, 2]), "up_proj": (f8, [4, 16, 8]),
             "up_weight_scale": (f32, [4, 1]), "up_input_scale": (f32, [4]), "down_proj": (f8, [4, 8, 16]),
             "down_weight_scale": (f32, [4, 1]), "down_input_scale": (f32, [4])}  # fmt: skip
    inputs = [helper.make_tensor_value_info(name, *types[name]) for name in function.input]
    call = helper.make_node(function.name, list(function.input), ["y"], name="experts", domain=function.domain, **attrs)
    graph = helper.make_graph([call], "g", inputs, [helper.make_tensor_value_info("y", f32, [6, 8])])
    opsets = [helper.make_opsetid("", 24), helper.make_opsetid(function.domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function])


def test_fp8_moe_experts_are_refused_without_the_plugin_library_with_the_fix():
    """MoeExpertsFp8's body casts to/from float8, which TensorRT does not build: without libhybridtrt_trt.so the build
    is refused naming the fix (load the plugin library, or bf16 experts)."""
    report = emulate_dispatch(_fp8_moe_model(plugin_namespace="hybridtrt", plugin_version="1"), "11.1.0")
    text = "\n".join(report.problems)
    assert "in the body of hybridtrt::MoeExpertsFp8" in text and "Cast to FP8 is not supported" in text
    assert "load libhybridtrt_trt.so" in text and "hybridtrt plugins build" in text
    assert "export the MoE checkpoint without --quantize fp8" in text
    with pytest.raises(EngineError, match="MoeExpertsFp8"):
        require_dispatch(report, plugins_loaded=False, allow_function_bodies=True)  # a body, knowingly: still refused


def test_fp8_moe_experts_are_our_plugin_with_the_library():
    """With the library's creators registered the node is the MoeExpertsFp8 plugin, so its body is never built and
    nothing is refused (issue 26). Where the parser would still build the body — a node without plugin_namespace on
    10.15+, or TensorRT <= 10.6 — the refusal says that, not "load the library"."""
    tagged = _fp8_moe_model(plugin_namespace="hybridtrt", plugin_version="1")
    report = emulate_dispatch(tagged, "11.1.0", plugins=HYBRIDTRT_CREATORS)
    assert report.ok, report.problems
    assert report.imported_as(PLUGIN) == {"hybridtrt::MoeExpertsFp8": 1} == report.expected_plugin_layers()
    require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)

    untagged = emulate_dispatch(_fp8_moe_model(), "11.1.0", plugins=HYBRIDTRT_CREATORS)
    text = "\n".join(untagged.problems)
    assert "Cast to FP8 is not supported" in text and "load libhybridtrt_trt.so" not in text
    assert 'hybridtrt::MoeExpertsFp8 v1 is registered, but the node does not ask for it' in text
    assert 'plugin_namespace="hybridtrt"' in text

    old = emulate_dispatch(tagged, "10.6.0", plugins=HYBRIDTRT_CREATORS)
    assert any("always builds a node's local function" in p and "MoeExpertsFp8" in p for p in old.problems), old.problems


def test_every_rule_names_its_types_in_tensorrt_terms():
    known = {"FP32", "FP16", "BF16", "FP8", "FP4", "INT4", "INT8", "INT32", "INT64", "UINT8", "BOOL"}
    for rule in OP_RULES.values():
        assert set(rule.types) <= known, rule


def _plant_softmax_precision(export_dir) -> int:
    planted = 0
    for path in export_dir.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            if node.op_type == "Attention":
                node.attribute.append(helper.make_attribute("softmax_precision", int(onnx.TensorProto.FLOAT)))
                planted += 1
        onnx.save(model, str(path))
    reseal(export_dir)  # recorded: the export is as if written with the attribute
    return planted


def _prefill_and_step(export_dir) -> list[np.ndarray]:
    model = OrtModel(export_dir)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: the mask path of the Attention node
    logits, state = model.step(ids, mask, model.zero_state(2), decode=False)
    step_ids = torch.tensor([[5], [7]])
    next_logits, _ = model.step(step_ids, torch.cat([mask, torch.ones_like(step_ids)], dim=1), state, decode=True)
    return [np.asarray(logits, dtype=np.float32), np.asarray(next_logits, dtype=np.float32)]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_onnx_runtime_ignores_the_refused_softmax_precision(make_export, tmp_path, dtype):
    preset, options = FLAVOURS[dtype]
    _, out = make_export(preset, options)
    for path in out.glob("*.onnx"):
        attention = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Attention"]
        assert attention and all(a.name != "softmax_precision" for n in attention for a in n.attribute)
    planted = shutil.copytree(out, tmp_path / "planted")
    assert _plant_softmax_precision(planted) == 4  # two attention layers, model.onnx and decode.onnx
    for ours, with_attribute in zip(_prefill_and_step(out), _prefill_and_step(planted)):
        assert np.isfinite(ours).all()
        np.testing.assert_array_equal(ours, with_attribute)
