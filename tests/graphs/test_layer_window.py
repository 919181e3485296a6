"""Pass: decoder-layer windows cut out of an export — structure, and the same numbers as the whole graph."""

from __future__ import annotations

import onnx
import pytest
import torch

from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.io import state_specs
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.graphs import layer_window
from hybridtrt.models import load_model
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.judge.metrics import rel_l2

SPLIT = ExportOptions(split=True)


@pytest.fixture(scope="module", params=["tiny-nemotron-h", "tiny-mamba2"])
def exported(request, make_export):
    ckpt, out = make_export(request.param, SPLIT)
    return load_model(ckpt), out


def test_residual_stream_is_what_each_norm_reads(exported):
    model, out = exported
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stream = layer_window.residual_stream(full, model.config.num_layers)
    assert len(set(stream)) == model.config.num_layers
    producers = {o: n for n in full.graph.node for o in n.output}
    # h_i is produced outside every layer (the residual Add, or a cast/select around it).
    assert all(layer_window._layer_of(producers[h]) is None for h in stream)


def test_window_reads_only_its_own_weights(make_export):
    _, out = make_export("tiny-nemotron-h", SPLIT)
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stream = layer_window.residual_stream(full, 8)
    sub = layer_window.window(full, stream, 3, 4, ["present_conv_state.4", "present_ssm_state.4"], onnx.TensorProto.FLOAT)
    weights = {t.name for t in sub.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert weights == {
        "model.layers.3.mixer.up_proj.weight_t",
        "model.layers.3.mixer.down_proj.weight_t",
        "model.layers.4.mixer.in_proj.weight_t",
        "model.layers.4.mixer.out_proj.weight_t",
        "model.layers.4.mixer.conv1d.weight",
    }
    names = {i.name for i in sub.graph.input}
    assert layer_window.HIDDEN_IN in names and "past_ssm_state.4" in names and "past_ssm_state.2" not in names
    assert [o.name for o in sub.graph.output] == [layer_window.HIDDEN_OUT, "present_conv_state.4", "present_ssm_state.4"]
    path = out / ".test-window-check.onnx"
    onnx.save_model(sub, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    finally:
        path.unlink()


@pytest.mark.parametrize("graph", ["model.onnx", "decode.onnx"])
def test_chained_windows_compute_the_whole_graph(exported, tmp_path, graph):
    """Windows fed with each other's hidden_out (the last one is the head alone) give the whole
    graph's logits and states."""
    model, out = exported
    decode = graph == "decode.onnx"
    inputs = example_inputs(model, seq=1 if decode else 7, batch=3, past=4, seed=2)
    specs = state_specs(model.config)
    feeds = dict(zip(["input_ids", "attention_mask", *(s.past_name for s in specs)], inputs))
    whole = OrtSession(out / graph).run(feeds)
    full = onnx.load(str(out / graph), load_external_data=False)
    n = model.config.num_layers
    stream = layer_window.residual_stream(full, n)
    hidden = None
    bounds = [(0, 1), (2, n - 1), (n, n)]  # member n: the head alone
    for first, last in bounds:
        mine = [s.present_name for s in specs if first <= s.layer <= last]
        sub = layer_window.window(full, stream, first, last, mine, onnx.TensorProto.FLOAT)
        path = out / f".test-window-{graph}-{first}.onnx"
        onnx.save_model(sub, str(path))
        try:
            got = OrtSession(path).run({**feeds, layer_window.HIDDEN_IN: hidden} if hidden is not None else feeds)
        finally:
            path.unlink()
        hidden = got.get(layer_window.HIDDEN_OUT)
        for name in mine:
            assert rel_l2(got[name], whole[name]) <= 1e-6, name
    assert rel_l2(torch.as_tensor(got["logits"]), torch.as_tensor(whole["logits"])) <= 1e-6


def test_a_window_that_is_not_a_cut_is_refused(make_export):
    _, out = make_export("tiny-nemotron-h", SPLIT)
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stream = layer_window.residual_stream(full, 8)
    wrong = [stream[4]] + stream[1:]  # pretend h_0 is layer 4's output: layers 1..2 need layer 0
    with pytest.raises(layer_window.WindowError, match="reads weights outside it"):
        layer_window.window(full, wrong, 1, 2, [], onnx.TensorProto.FLOAT)


def test_expert_range_reads_its_rows_of_each_stack_in_place(make_export):
    """An expert range's weights are byte ranges of the stacks in weights.data (nothing copied),
    its node runs a copy of the body that leaves the sum in fp32; a body that does not end with
    ``CastLike(y, x)`` is refused."""
    from hybridtrt.graphs.bf16_emulation import value_types
    from hybridtrt.graphs.external_data import external_info

    ckpt, out = make_export("tiny-nemotron3-moe", ExportOptions(dtype="bf16", split=False, verify=False))
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    (node,) = [x for x in layer_window.expert_nodes(full) if x.name.startswith("/model/layers.3/")]
    assert [x.name.split("/")[2] for x in layer_window.expert_nodes(full)] == ["layers.1", "layers.3", "layers.6"]
    experts, nbytes = layer_window.expert_bytes(full, node)
    assert (experts, nbytes) == (16, 2 * 16 * 32 * 64 * 2)
    part = layer_window.expert_range(full, node, 4, 9, value_types(full))
    stacks = {t.name: t for t in full.graph.initializer}
    for t in part.graph.initializer:
        whole = stacks[t.name]
        location, offset, length = external_info(whole)
        assert list(t.dims) == [5, *whole.dims[1:]]
        assert external_info(t) == (location, offset + 4 * length // 16, 5 * length // 16)
    (call,) = part.graph.node
    (body,) = part.functions
    assert (call.domain, body.domain, body.name) == (layer_window.PAIRS_DOMAIN,) * 2 + (node.op_type,)
    assert body.node[-1].op_type == "Identity" and part.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {a.name for a in call.attribute} == {a.name for a in node.attribute}
    for f in full.functions:  # a body without the final cast
        if f.name == node.op_type:
            f.node[-1].op_type = "Identity"
            del f.node[-1].input[1:]
    with pytest.raises(layer_window.WindowError, match="does not end with CastLike"):
        layer_window.expert_range(full, node, 0, 4, value_types(full))
