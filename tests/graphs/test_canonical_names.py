"""The passes that make an exported graph depend on its computation alone, not on the trace that
made it (`hybridtrt.graphs.dims.read_dims_off_first_input`, `hybridtrt.graphs.naming.name_values`):
what lets a stitched trace and a whole-model trace give the same bytes (tests/exporter/test_stitch.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hybridtrt.graphs.dims import read_dims_off_first_input
from hybridtrt.graphs.naming import name_values


def _model(shape_source: str) -> onnx.ModelProto:
    """``out = x + batch`` where ``batch`` is read off ``shape_source`` (twice, as torch.export may)."""
    nodes = [
        helper.make_node("Shape", [shape_source], ["s1"], start=0, end=1),
        helper.make_node("Shape", [shape_source], ["s2"], start=0, end=1),
        helper.make_node("Add", ["s1", "s2"], ["two_b"]),
        helper.make_node("Cast", ["two_b"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "f"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s0", 3]), helper.make_tensor_value_info("state", TensorProto.FLOAT, ["s0", 5, 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["s0", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.zeros((4, 3), np.float32), "state": np.zeros((4, 5, 7), np.float32)})[0]


def test_a_dim_is_read_once_off_the_first_input_that_has_it():
    off_state, off_x = read_dims_off_first_input(_model("state")), read_dims_off_first_input(_model("x"))
    shapes = [n for n in off_state.graph.node if n.op_type == "Shape"]
    assert [(n.input[0], n.output[0]) for n in shapes] == [("x", "s1")]  # merged, hoisted, off x
    assert list(off_state.graph.node[1].input) == ["s1", "s1"]
    assert off_state.SerializeToString() == off_x.SerializeToString()  # the source input no longer shows
    np.testing.assert_array_equal(_run(off_state), _run(_model("state")))
    np.testing.assert_array_equal(_run(off_state), np.full((4, 3), 8.0, np.float32))


def test_a_read_of_an_unnamed_or_several_dims_is_left_alone():
    model = _model("state")
    model.graph.node[0].attribute[0].i = 2  # end=2: two dims
    for d in model.graph.input[1].type.tensor_type.shape.dim:
        d.dim_param = ""
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 4
    out = read_dims_off_first_input(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.input[0] for n in out.graph.node if n.op_type == "Shape"] == ["state", "state"]


def test_values_are_named_after_their_nodes():
    model = _model("x")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "val_7"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "model.layers.0.norm.weight"))
    model.graph.node.append(helper.make_node("Mul", ["out", "val_7"], ["y"], name="/model/Mul"))
    model.graph.node.append(helper.make_node("Mul", ["y", "model.layers.0.norm.weight"], ["z"], name="/model/Mul_1"))
    model.graph.output[0].name = "z"
    for k, node in enumerate(model.graph.node[:5]):
        node.name = f"/model/N{k}"
    name_values(model)
    g = model.graph
    assert list(g.node[4].output) == ["/model/N4_output_0"] and list(g.node[5].input) == ["/model/N4_output_0", "/model/Mul_input_1"]
    assert [t.name for t in g.initializer] == ["/model/Mul_input_1", "model.layers.0.norm.weight"]  # parameters keep their names
    assert [v.name for v in (*g.input, *g.output)] == ["x", "state", "z"]
    onnx.checker.check_model(model, full_check=True)
