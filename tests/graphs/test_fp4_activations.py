"""FP4 activations (W4A4, `hybridtrt.graphs.fp4_activations`): the ``trt::TRT_FP4DynamicQuantize`` chain
as its function body defines it under ONNX's own reference evaluator, against the ONNX Runtime
emulation (`hybridtrt.graphs.fp4_emulation`) and the torch reference (`weight_only_reference.
fp4_activation`), three formulations bit for bit; the ties of E2M1's round to nearest even checked
against the spec's table; planted rounding errors in each implementation caught by the same inputs;
the pass's refusals; TensorRT's rules for the op in the dispatch emulator."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import hybridtrt.exporter.weight_only_reference as weight_only_reference
from hybridtrt.engine.dispatch import NATIVE, UNSUPPORTED, emulate_dispatch
from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.weight_only_reference import fp4_activation
from hybridtrt.graphs.fp4_activations import BLOCK, FP4_DYNAMIC_QUANTIZE, TRT_DOMAIN, function_proto, insert_fp4_activations
from hybridtrt.graphs.fp4_emulation import emulate_fp4
from hybridtrt.graphs.fp8_qdq import float_tensor

NODE = "/model/layers.0/mixer/up_proj/MatMul"
SCOPE = "/model/layers.0/mixer/up_proj/input_quantizer"


def _chain(scale: float, shape: list[int], *, block_size: int = BLOCK, scale_type: int = TensorProto.FLOAT8E4M3FN, opset: int = 24) -> onnx.ModelProto:
    """x -> TRT_FP4DynamicQuantize -> DQ(block scale) -> DQ(codes) -> y, as the pass writes it."""
    nodes = [
        helper.make_node(FP4_DYNAMIC_QUANTIZE, ["x", "s"], ["q", "bs"], name="/q", domain=TRT_DOMAIN, axis=-1, block_size=block_size, scale_type=scale_type),
        helper.make_node("DequantizeLinear", ["bs", "s"], ["d"], name="/dq_scale"),
        helper.make_node("DequantizeLinear", ["q", "d"], ["y"], name="/dq", axis=-1, block_size=block_size),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(scale, np.float32), "s")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(TRT_DOMAIN, 1)], functions=[function_proto(opset)])


def _inputs() -> tuple[np.ndarray, float]:
    """Blocks of 16 (scale 1): exact E2M1 ties (amax 6 makes the block scale exactly 1), a zero block,
    a block whose scale underflows float8, one that saturates at 448, and random blocks at magnitudes
    from 1e-6 to 1e3."""
    ties = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0], np.float32)
    rng = np.random.default_rng(0)
    random_blocks = rng.standard_normal((8, BLOCK)).astype(np.float32) * np.logspace(-6, 3, 8, dtype=np.float32)[:, None]
    special = np.stack([ties, np.zeros(BLOCK, np.float32), np.full(BLOCK, 1e-4, np.float32), np.linspace(-9000, 9000, BLOCK, dtype=np.float32)])
    return np.concatenate([special, random_blocks]).reshape(2, 3, 2 * BLOCK), 1.0


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(emulate_fp4(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_definition_emulation_and_torch_reference_agree_bit_for_bit():
    x, s = _inputs()
    model = _chain(s, list(x.shape))
    onnx.checker.check_model(model, full_check=True)
    definition = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert np.array_equal(_ort(model, x), definition)
    assert np.array_equal(fp4_activation(torch.from_numpy(x), s).numpy(), definition)
    # E2M1's ties go to the even code (the ONNX float4e2m1 table: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    # 2.5 -> 2, 3.5 -> 4, 5 -> 4), and the block scale float8(6 / 6) is exactly 1.
    ties = definition.reshape(-1, BLOCK)[0]
    assert ties.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0]
    blocks = definition.reshape(-1, BLOCK)
    assert not blocks[1].any() and not blocks[2].any()  # zero block; 1e-4 / 6 underflows float8 at s = 1
    assert np.abs(blocks[3]).max() == 448 * 6  # the block scale saturates at 448


def test_other_scales_and_random_inputs_agree():
    rng = np.random.default_rng(1)
    for s in (1e-3, 0.37, 25.0):
        x = (rng.standard_normal((3, 5, 4 * BLOCK)) * rng.choice([1e-4, 1.0, 300.0], size=(3, 5, 1))).astype(np.float32)
        model = _chain(s, list(x.shape))
        definition = ReferenceEvaluator(model).run(None, {"x": x})[0]
        assert np.array_equal(_ort(model, x), definition), s
        assert np.array_equal(fp4_activation(torch.from_numpy(x), s).numpy(), definition), s


def test_the_block_scale_is_float8_of_amax_over_six_scale():
    """The body's second output against numpy and ml_dtypes (round to nearest even, saturating)."""
    x, _ = _inputs()
    s = 0.05
    model = _chain(s, list(x.shape))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("bs", TensorProto.FLOAT8E4M3FN, None))
    got = ReferenceEvaluator(model).run(None, {"x": x})[0]
    amax = np.abs(x.reshape(2, 3, 2, BLOCK)).max(axis=-1)
    want = np.minimum(amax / np.float32(6 * np.float32(s)), 448).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))


def test_a_planted_rounding_error_in_the_emulation_is_caught():
    """Planted error: the emulation's finest spacing rounding half up (Ceil of a tie) instead of to even."""
    x, s = _inputs()
    model = _chain(s, list(x.shape))
    emulated = emulate_fp4(model)
    for node in emulated.graph.node:
        if node.op_type == "Round" and node.input[0].endswith("/a2"):
            node.op_type = "Ceil"
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not np.array_equal(session.run(None, {"x": x})[0], ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_a_planted_rounding_error_in_the_torch_reference_is_caught(monkeypatch):
    """Planted error: one tie of the torch reference's thresholds going up (``<`` for ``<=`` at 2.5)."""
    x, s = _inputs()
    definition = ReferenceEvaluator(_chain(s, list(x.shape))).run(None, {"x": x})[0]
    wrong = tuple((b, not inclusive if b == 2.5 else inclusive, v) for b, inclusive, v in weight_only_reference.E2M1_THRESHOLDS)
    monkeypatch.setattr(weight_only_reference, "E2M1_THRESHOLDS", wrong)
    assert not np.array_equal(fp4_activation(torch.from_numpy(x), s).numpy(), definition)


def _nvfp4_linear(k: int = 32, n: int = 8, opset: int = 24) -> onnx.ModelProto:
    """A MatMul whose weight is the NVFP4 chain (weight_only's pattern), in fp16."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=k * n).astype(np.uint8)  # two a byte, the first in the low nibble
    fp4 = helper.make_tensor("w_fp4", TensorProto.FLOAT4E2M1, [k, n], (codes[0::2] | (codes[1::2] << 4)).tobytes(), raw=True)
    block_scale = np.full((k // BLOCK, n), 1.0, ml_dtypes.float8_e4m3fn)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_bs", "w_s2"], ["w_scale"], name="/w/scale/dq"),
        helper.make_node("DequantizeLinear", ["w_fp4", "w_scale"], ["w_f"], name="/w/dq", axis=0, block_size=BLOCK),
        helper.make_node("Cast", ["w_f"], ["w"], name="/w/cast", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x", "w"], ["y"], name=NODE),
    ]
    inits = [fp4, helper.make_tensor("w_bs", TensorProto.FLOAT8E4M3FN, block_scale.shape, block_scale.view(np.uint8).tobytes(), raw=True),
             float_tensor("w_s2", np.asarray(0.5, np.float32), TensorProto.FLOAT)]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", n])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])


def test_the_pass_writes_modelopts_chain_and_runs_on_onnx_runtime():
    model = _nvfp4_linear()
    assert insert_fp4_activations(model, {NODE: 0.02}) == [NODE]
    onnx.checker.check_model(model, full_check=True)
    by_name = {n.name: n for n in model.graph.node}
    q = by_name[f"{SCOPE}/{FP4_DYNAMIC_QUANTIZE}"]
    assert (q.domain, {a.name: helper.get_attribute_value(a) for a in q.attribute}) == (TRT_DOMAIN, {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN})
    assert by_name[NODE].input[0] == f"{SCOPE}/Cast_output_0"  # back to the model dtype before the GEMM
    x = np.random.default_rng(3).standard_normal((2, 3, 32)).astype(np.float16)
    session = ort.InferenceSession(emulate_fp4(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    w = ReferenceEvaluator(_nvfp4_linear()).run(None, {"x": x}, intermediate=True)["w"]
    want = fp4_activation(torch.from_numpy(x), 0.02).to(torch.float16).float().numpy() @ w.astype(np.float32)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_the_pass_refuses_what_it_cannot_pair():
    plain = _nvfp4_linear()
    with pytest.raises(QuantizationError, match="positive finite scale"):
        insert_fp4_activations(plain, {NODE: 0.0})
    with pytest.raises(QuantizationError, match="opset ≥ 23"):
        insert_fp4_activations(_nvfp4_linear(opset=21), {NODE: 0.02})
    with pytest.raises(QuantizationError, match="no MatMul"):
        insert_fp4_activations(_nvfp4_linear(), {"/model/layers.9/mixer/up_proj/MatMul": 0.02})
    unquantized = _nvfp4_linear()
    unquantized.graph.node[3].input[1] = "w_bs"  # the MatMul no longer reads the NVFP4 chain
    with pytest.raises(QuantizationError, match="no NVFP4 weights"):
        insert_fp4_activations(unquantized, {NODE: 0.02})


def _dispatch(model: onnx.ModelProto, version: str = "11.1"):
    return emulate_dispatch(model, version)


def test_tensorrt_builds_the_op_with_its_own_importer_from_10_11():
    model = _nvfp4_linear()
    insert_fp4_activations(model, {NODE: 0.02})
    report = _dispatch(model)
    assert report.ok, report.problems
    assert [(n.op, n.importer) for n in report.nodes if n.custom] == [(f"{TRT_DOMAIN}::{FP4_DYNAMIC_QUANTIZE}", NATIVE)]
    assert any("Blackwell" in note for note in report.notes)
    old = _dispatch(model, "10.8")
    assert [n.importer for n in old.nodes if n.custom] == [UNSUPPORTED] and not old.ok


@pytest.mark.parametrize(
    ("plant", "refusal"),
    [
        (lambda m: _set_attr(m, "block_size", 32), "block_size 32"),
        (lambda m: _set_attr(m, "scale_type", TensorProto.FLOAT), "scale_type FP32"),
        (lambda m: _scale_from_graph(m), "must be an initializer"),
        (lambda m: _rank4(m), "rank-4 input"),
        (lambda m: _dynamic_hidden(m), "blocking a dynamic axis ('batch')"),
    ],
    ids=["block-32", "scale-type-float", "computed-scale", "rank-4", "dynamic-blocked-axis"],
)
def test_planted_importer_refusals(plant, refusal):
    model = _nvfp4_linear()
    insert_fp4_activations(model, {NODE: 0.02})
    plant(model)
    report = _dispatch(model)
    assert not report.ok and any(refusal in p for p in report.problems), report.problems


def _quantizer(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == FP4_DYNAMIC_QUANTIZE)


def _set_attr(model: onnx.ModelProto, name: str, value: int) -> None:
    node = _quantizer(model)
    for a in node.attribute:
        if a.name == name:
            a.i = value


def _scale_from_graph(model: onnx.ModelProto) -> None:
    node = _quantizer(model)
    model.graph.node.insert(0, helper.make_node("Identity", [node.input[1]], ["computed_scale"], name="/computed_scale"))
    node.input[1] = "computed_scale"


def _rank4(model: onnx.ModelProto) -> None:
    x = model.graph.input[0].type.tensor_type.shape
    x.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
    y = model.graph.output[0].type.tensor_type.shape
    y.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))


def _dynamic_hidden(model: onnx.ModelProto) -> None:
    """The blocked (last) axis of the quantizer's input made a graph input's symbolic dim."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[-1]
    dim.Clear()
    dim.dim_param = "batch"
