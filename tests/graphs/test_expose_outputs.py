"""Pass: locate each decoder layer's output by node names and expose it as a graph output.

Structure (every layer found, on our exports and on files re-saved or rewritten by other tools;
what is missing is named) and numbers (the exposed tensors equal the reference's per-layer hidden
states; the original outputs are bit-identical before and after the rewrite).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.graphs.expose_outputs import expose_outputs, locate_layer_outputs
from hybridtrt.graphs.fp8_qdq import insert_fp8_qdq
from hybridtrt.models.loading import load_model
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.validation.layers import ProtoSession


def _graph(out, *, weights: bool = False) -> onnx.ModelProto:
    return onnx.load(str(out / "model.onnx"), load_external_data=weights)


def _feeds(model, names):
    inputs = example_inputs(model, batch=2, seq=7, past=3, seed=3)
    return inputs, dict(zip(names, inputs))


def _reference_hidden(model, inputs):
    from hybridtrt.exporter.io import state_specs
    from hybridtrt.exporter.wrapper import cache_from_flat

    with torch.no_grad():
        return model(inputs[0], inputs[1], cache_from_flat(state_specs(model.config), inputs[2:]), logits="last", output_hidden_states=True).hidden_states


@pytest.mark.parametrize("preset", ["tiny-nemotron-h", "tiny-mamba2"])
def test_every_layer_is_located_on_a_plain_export(make_export, preset):
    """Every layer found, and each located tensor is that layer's hidden state (numerically, at
    every position): the independent check of the rule."""
    ckpt, out = make_export(preset)
    model = load_model(ckpt)
    n = len(model.layers)
    found = locate_layer_outputs(_graph(out), n)
    assert found.missing == {} and len(set(found.tensors.values())) == n
    session = ProtoSession(expose_outputs(_graph(out), list(found.tensors.values())), out)
    inputs, feeds = _feeds(model, session.input_names)
    got, ref = session.run(feeds), _reference_hidden(model, inputs)
    for i, tensor in found.tensors.items():
        assert np.linalg.norm(got[tensor] - ref[i].numpy()) / np.linalg.norm(ref[i].numpy()) < 1e-5, (i, tensor)


def test_per_layer_export_is_located_at_its_layer_outputs(make_export):
    _, out = make_export("tiny-nemotron-h", ExportOptions(per_layer=True, verify=False))
    found = locate_layer_outputs(_graph(out), 8)
    assert found.tensors == {i: f"layer_output.{i}" for i in range(8)}


@pytest.fixture(scope="module")
def plain(make_export):
    ckpt, out = make_export("tiny-nemotron-h")
    return load_model(ckpt), out


def test_exposed_tensors_are_the_reference_hidden_states_and_outputs_are_unchanged(plain):
    model, out = plain
    proto = _graph(out)
    before = proto.SerializeToString()
    found = locate_layer_outputs(proto, 8)
    exposed = expose_outputs(proto, list(found.tensors.values()))
    assert proto.SerializeToString() == before  # the input model is untouched
    original_outputs = [o.name for o in proto.graph.output]
    assert [o.name for o in exposed.graph.output] == original_outputs + list(found.tensors.values())
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in exposed.graph.output[len(original_outputs) :])

    session = ProtoSession(exposed, out)
    inputs, feeds = _feeds(model, session.input_names)
    got = session.run(feeds)
    plain_run = OrtSession(out / "model.onnx").run(feeds)
    for name in original_outputs:  # marking outputs changes nothing else (ORT, CPU)
        np.testing.assert_array_equal(got[name], plain_run[name])
    ref = _reference_hidden(model, inputs)
    for i, tensor in found.tensors.items():
        a, b = got[tensor], ref[i].numpy()
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, (i, tensor)


def test_files_resaved_by_other_tools_are_read_the_same(plain, tmp_path):
    import onnx_ir

    _, out = plain
    expected = locate_layer_outputs(_graph(out), 8).tensors
    # onnx.save with the weights inline, no metadata, no doc strings.
    proto = _graph(out, weights=True)
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(tmp_path / "inline.onnx"))
    assert locate_layer_outputs(onnx.load(str(tmp_path / "inline.onnx")), 8).tensors == expected
    # onnx_ir (the IR behind onnxscript and ModelOpt's ONNX passes): load and save.
    onnx_ir.save(onnx_ir.load(str(out / "model.onnx")), tmp_path / "ir.onnx", external_data="ir.data")
    assert locate_layer_outputs(onnx.load(str(tmp_path / "ir.onnx"), load_external_data=False), 8).tensors == expected


def _rename_tensors(proto: onnx.ModelProto) -> dict[str, str]:
    """Rename every intermediate tensor to t0, t1, … (as graph-surgery tools do); returns the map."""
    io = {v.name for v in (*proto.graph.input, *proto.graph.output)} | {t.name for t in proto.graph.initializer}
    rename = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name and name not in io:
                rename[name] = f"t{len(rename)}"
                node.output[i] = rename[name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    return rename


def _residual_add(proto: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    """The Add a located layer output comes from (back through block-level Mul/Where/Cast, if any)."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = producers[tensor]
    while node.op_type != "Add":
        node = producers[node.input[1 if node.op_type == "Where" else 0]]
    return node


def test_graph_surgery_that_keeps_node_names(plain):
    """Tensors renamed, Q/DQ inserted on the residual path under foreign names (ModelOpt quantizes
    residual Adds), nodes shuffled and re-sorted: the same layers are found."""
    _, out = plain
    proto = _graph(out)
    expected = locate_layer_outputs(proto, 8).tensors
    rename = _rename_tensors(proto)
    adds = [_residual_add(proto, rename[t]) for t in expected.values()]
    scale = helper.make_tensor("q_scale", onnx.TensorProto.FLOAT, [], [0.05])
    proto.graph.initializer.append(scale)
    extra = []
    for k, add in enumerate(adds):
        for j, inp in enumerate(list(add.input)):
            q, dq = f"Add_{k}_{j}_q", f"Add_{k}_{j}_dq"
            extra += [
                helper.make_node("QuantizeLinear", [inp, "q_scale"], [q], name=f"{q}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [q, "q_scale"], [dq], name=f"{dq}_DequantizeLinear"),
            ]
            add.input[j] = dq
    nodes = list(proto.graph.node) + extra
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))  # order is irrelevant to the rule
    found = locate_layer_outputs(proto, 8)
    assert found.missing == {}
    assert found.tensors == {i: rename[t] for i, t in expected.items()}


def test_the_hidden_state_is_followed_past_a_padding_mask(plain):
    """``h = where(row, h + out, 0)`` or ``(h + out) * row`` (padding rows held at zero), then a
    Cast: the located tensor is the one the next layer reads, not the bare Add output; a tensor with
    two readers is not followed."""
    _, out = plain
    proto = _graph(out)
    adds = locate_layer_outputs(proto, 8).tensors
    proto.graph.initializer.extend(
        [helper.make_tensor("row", onnx.TensorProto.FLOAT, [], [1.0]), helper.make_tensor("keep", onnx.TensorProto.BOOL, [], [True]), helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])]
    )
    producers = {o: n for n in proto.graph.node for o in n.output}
    expected = {}
    for i, tensor in adds.items():
        masked, cast = f"{tensor}_masked", f"{tensor}_cast"
        for node in proto.graph.node:
            node.input[:] = [cast if x == tensor else x for x in node.input]
        at = list(proto.graph.node).index(producers[tensor]) + 1
        mask = (
            helper.make_node("Mul", [tensor, "row"], [masked], name=f"/model/Mul_row_{i}")
            if i % 2
            else helper.make_node("Where", ["keep", tensor, "zero"], [masked], name=f"/model/Where_{i}")
        )
        proto.graph.node.insert(at, mask)
        proto.graph.node.insert(at + 1, helper.make_node("Cast", [masked], [cast], name=f"/model/Cast_row_{i}", to=onnx.TensorProto.FLOAT))
        expected[i] = cast
    assert locate_layer_outputs(proto, 8).tensors == expected
    # A second reader of the masked tensor stops the walk there.
    proto.graph.node.append(helper.make_node("Identity", [f"{adds[3]}_masked"], ["spy"], name="/model/Identity_spy"))
    assert locate_layer_outputs(proto, 8).tensors[3] == f"{adds[3]}_masked"


def test_fp8_graph_is_located_like_the_plain_one(plain):
    _, out = plain
    proto = _graph(out, weights=True)
    expected = locate_layer_outputs(proto, 8).tensors
    amax = {n.name: 4.0 for n in proto.graph.node if n.op_type == "MatMul"}
    recipe = insert_fp8_qdq(proto, amax)
    assert len(recipe.quantized) == 20
    assert locate_layer_outputs(proto, 8).tensors == expected


def test_a_layer_renamed_by_another_tool_is_named_missing(plain):
    _, out = plain
    proto = _graph(out)
    for node in proto.graph.node:
        node.name = node.name.replace("/model/layers.3/", "/fused_3/")
    found = locate_layer_outputs(proto, 8)
    assert set(found.tensors) == {0, 1, 2, 4, 5, 6, 7}
    assert set(found.missing) == {3} and "/model/layers.3/" in found.missing[3]


def test_two_candidate_adds_are_ambiguous_not_guessed(plain):
    _, out = plain
    proto = _graph(out)
    add = _residual_add(proto, locate_layer_outputs(proto, 8).tensors[2])
    proto.graph.node.append(helper.make_node("Add", list(add.input), ["copy"], name="/model/Add_copy"))
    found = locate_layer_outputs(proto, 8)
    assert 2 not in found.tensors and "ambiguous" in found.missing[2] and "/model/Add_copy" in found.missing[2]


def test_refuses_tensors_that_do_not_exist(plain):
    _, out = plain
    with pytest.raises(ArtefactError, match="no_such_tensor"):
        expose_outputs(_graph(out), ["no_such_tensor"])


def test_graph_outputs_are_not_duplicated(plain):
    _, out = plain
    proto = _graph(out)
    exposed = expose_outputs(proto, ["logits", "present_ssm_state.0"])
    assert [o.name for o in exposed.graph.output] == [o.name for o in proto.graph.output]
