"""bf16 emulation pass: structure, per-op agreement with true bf16 execution (the ONNX reference
evaluator on ml_dtypes bf16 arrays), and a whole exported model against the PyTorch references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.wrapper import GraphModule, example_inputs
from hybridtrt.graphs.bf16_emulation import RAW_SUFFIX, emulate_bf16, round_to_bf16
from hybridtrt.models import load_model
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.judge.metrics import compare


def _one_op(op: str, n_inputs: int) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.BFLOAT16, None) for i in range(n_inputs)]
    node = helper.make_node(op, [f"x{i}" for i in range(n_inputs)], ["y"], name=f"/{op}")
    out = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)
    return helper.make_model(helper.make_graph([node], "g", ins, [out]), opset_imports=[helper.make_opsetid("", 22)])


def _run_both(model: onnx.ModelProto, shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes]
    session = ort.InferenceSession(emulate_bf16(model).SerializeToString(), providers=["CPUExecutionProvider"])
    emulated = session.run(None, {f"x{i}": x.astype(np.float32) for i, x in enumerate(xs)})[0]
    true = ReferenceEvaluator(model).run(None, {f"x{i}": x for i, x in enumerate(xs)})[0].astype(np.float32)
    return emulated, true


@pytest.mark.parametrize(
    "op, shapes", [("MatMul", [(32, 256), (256, 48)]), ("Mul", [(64, 64)] * 2), ("Add", [(64, 64)] * 2), ("Exp", [(64, 64)]), ("Softplus", [(64, 64)])]
)
def test_single_ops_round_exactly_like_true_bf16(op, shapes):
    """fp32 compute + one rounding per output is bit-identical to bf16 execution for these ops."""
    emulated, true = _run_both(_one_op(op, len(shapes)), shapes)
    assert np.array_equal(emulated, true)
    assert np.array_equal(emulated, round_to_bf16(emulated))  # outputs are bf16 values


def test_composite_ops_are_more_precise_than_stepwise_bf16():
    """The reference evaluator evaluates Sigmoid as several rounded bf16 steps; we round once."""
    emulated, true = _run_both(_one_op("Sigmoid", 1), [(64, 256)])
    assert not np.array_equal(emulated, true)
    assert compare(emulated, true).rel_l2 < 5e-3  # measured 1.6e-3: ~14 % of elements one bf16 ulp apart


def test_structure_no_bf16_left_and_every_producer_rounds(make_export):
    _, out = make_export("tiny-nemotron-h", ExportOptions(dtype="bf16", verify=False))
    model = onnx.load(str(out / "model.onnx"))
    emulated = emulate_bf16(model)
    g = emulated.graph
    assert all(v.type.tensor_type.elem_type != TensorProto.BFLOAT16 for v in (*g.input, *g.output))
    # bf16 weights are read only by their exact widening Cast, or in bf16 by an embedding Gather
    bf16_weights = {t.name for t in g.initializer if t.data_type == TensorProto.BFLOAT16}
    readers = {n.op_type for n in g.node if bf16_weights.intersection(n.input)}
    assert bf16_weights and readers == {"Cast", "Gather"}
    raw = [n for n in g.node if any(o.endswith(RAW_SUFFIX) for o in n.output)]
    assert len([n for n in g.node if n.op_type == "Mamba2ChunkScan"]) == 4
    # y is fp32 whatever x's dtype (DESIGN.md §5) and the state fp32: nothing of a scan is rounded
    assert not [n for n in raw if n.op_type == "Mamba2ChunkScan"]
    assert any(n.op_type == "MatMul" for n in raw)
    by_input = {i: n for n in g.node for i in n.input}
    for node in raw:
        consumer = by_input[next(o for o in node.output if o.endswith(RAW_SUFFIX))]
        assert consumer.op_type == "Cast"
    onnx.checker.check_model(emulated, full_check=True)


def test_exported_model_matches_the_torch_bf16_reference(make_export):
    """Emulated ORT vs PyTorch in bf16 (two bf16 executions) and both vs the fp32 truth."""
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="bf16", verify=False))
    ref16, ref32 = load_model(ckpt, "bf16"), load_model(ckpt, "fp32")
    inputs = example_inputs(ref16, batch=3, seq=7, past=4, seed=1)
    session = OrtSession(out / "model.onnx")
    assert session.emulated_bf16
    got = session.run(dict(zip(session.input_names, inputs)))["logits"]
    with torch.no_grad():
        exp16 = GraphModule(ref16).eval()(*inputs)[0]
        exp32 = GraphModule(ref32).eval()(*[x.float() if x.is_floating_point() else x for x in inputs])[0]
    artefact, reference = compare(got, exp32), compare(exp16, exp32)
    assert compare(got, exp16).cosine > 0.99
    assert artefact.rel_l2 <= 1.5 * reference.rel_l2, (artefact.rel_l2, reference.rel_l2)


def test_weights_are_neither_read_nor_widened(make_export, tmp_path):
    """The pass runs on the graph alone: bf16 weights stay bf16 in the export's own weights file
    (widened by Cast nodes that ONNX Runtime folds), the embedding table is gathered in bf16, and
    the graph bytes handed to ONNX Runtime are the graph's, not the weights' (a 9B export's weights
    are 18 GB). Same logits as the weights-loaded rewrite."""
    import torch

    from hybridtrt.graphs.bf16_emulation import WEIGHT_SUFFIX
    from hybridtrt.runtime.onnxruntime import OrtModel

    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="bf16", verify=False))
    bare = onnx.load(str(out / "model.onnx"), load_external_data=False)
    emulated = emulate_bf16(bare)
    g = emulated.graph
    bf16_weights = [t for t in g.initializer if t.data_type == TensorProto.BFLOAT16]
    assert bf16_weights and all(t.name.endswith(WEIGHT_SUFFIX) for t in bf16_weights)
    assert any(t.data_location == TensorProto.EXTERNAL for t in bf16_weights)  # references kept as they are
    inline_bytes = sum(len(t.raw_data) for t in g.initializer)
    assert inline_bytes == sum(len(t.raw_data) for t in bare.graph.initializer)  # nothing widened
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[0].endswith(WEIGHT_SUFFIX))
    assert gather.name.startswith("/model/embeddings/")
    producers = {o: n for n in g.node for o in n.output}
    assert all(producers[t.name[: -len(WEIGHT_SUFFIX)]].op_type == "Cast" for t in bf16_weights if t.name[: -len(WEIGHT_SUFFIX)] in producers)
    # the same numbers as emulating a copy whose weights are loaded (inline)
    loaded = onnx.load(str(out / "model.onnx"))
    inline = ort.InferenceSession(emulate_bf16(loaded).SerializeToString(), providers=["CPUExecutionProvider"])
    session = OrtSession(out / "model.onnx")
    inputs = example_inputs(load_model(ckpt, "bf16"), batch=2, seq=5, past=3, seed=2)
    feeds = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in zip(session.input_names, inputs)}
    want = dict(zip([o.name for o in inline.get_outputs()], inline.run(None, feeds)))
    got = session.run(feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

