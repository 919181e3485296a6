"""4-bit weights (W4A16): the pass's INT4 and NVFP4 DequantizeLinear, judged by ONNX's own reference
evaluator and by the torch reference (`hybridtrt.exporter.weight_only_reference`), an implementation
independent of the exporter's; ONNX Runtime's exact path and its fused MatMulNBits; the float4e2m1
emulation for ONNX Runtime; TensorRT's rules for them in the dispatch emulator."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import hybridtrt.graphs.weight_only as weight_only
from hybridtrt.engine.dispatch import emulate_dispatch
from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.weight_only_reference import int4_dequantized
from hybridtrt.graphs.fp4_emulation import emulate_fp4
from hybridtrt.graphs.fp8_qdq import float_tensor
from hybridtrt.graphs.quantized_types import packed_bytes, quantized_tensor
from hybridtrt.graphs.weight_only import NVFP4Scales, insert_weight_only, layer_block
from hybridtrt.runtime.onnxruntime import QDQ_FUSION, OrtSession

NODE = "/model/layers.0/mixer/up_proj/MatMul"
_TYPES = {"fp32": (TensorProto.FLOAT, np.float32, torch.float32), "fp16": (TensorProto.FLOAT16, np.float16, torch.float16)}


def _linear_graph(w: np.ndarray, elem: int, rows: int = 3) -> onnx.ModelProto:
    """``y = x @ W`` named like a hybridtrt linear (``W [in, out]``)."""
    k, n = w.shape
    x = helper.make_tensor_value_info("x", elem, [rows, k])
    y = helper.make_tensor_value_info("y", elem, [rows, n])
    init = float_tensor("model.layers.0.mixer.up_proj.weight_t", w, elem)
    node = helper.make_node("MatMul", ["x", init.name], ["y"], name=NODE)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [init]), opset_imports=[helper.make_opsetid("", 24)])


def _dequantized_weight(model: onnx.ModelProto) -> np.ndarray:
    """The MatMul's weight input as ONNX's reference evaluator computes it."""
    g = model.graph
    matmul = next(n for n in g.node if n.op_type == "MatMul")
    out = helper.make_tensor_value_info(matmul.input[1], 0, None)
    weight_nodes = [n for n in g.node if n.op_type in ("DequantizeLinear", "Cast")]
    probe = helper.make_model(helper.make_graph(weight_nodes, "w", [], [out], list(g.initializer)), opset_imports=model.opset_import)
    return ReferenceEvaluator(probe).run(None, {})[0]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("block", [32, 128])
def test_int4_weights_are_what_the_torch_reference_dequantizes(dtype, block):
    """The export's int4 DequantizeLinear (ONNX's reference evaluator running it) gives exactly the
    weights the torch reference computes from the same float weights, per block of ``block`` inputs."""
    elem, np_dtype, torch_dtype = _TYPES[dtype]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 48)) * rng.uniform(0.01, 2.0, (256, 1))).astype(np_dtype)  # blocks of very different ranges
    model = _linear_graph(w, elem)
    recipe = insert_weight_only(model, "int4", block_size=block)
    assert recipe.quantized == [NODE] and recipe.block_of(NODE) == block
    onnx.checker.check_model(model, full_check=True)
    ours = _dequantized_weight(model)
    theirs = int4_dequantized(torch.from_numpy(w.T.copy()), block, torch_dtype).numpy().T
    assert ours.dtype == np_dtype
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < np.abs(ours.astype(np.float32) - w).max() <= np.abs(w).max() / 7  # quantized, within half a step of the largest block
    packed = next(t for t in model.graph.initializer if t.data_type == TensorProto.INT4)
    assert len(packed.raw_data) == w.size // 2  # two a byte


def test_a_wrong_scale_rule_is_caught_by_the_reference(monkeypatch):
    """Planted error: the exporter dividing by 8 instead of 7 (amax on the grid's edge, the wrong
    bound) — the torch reference, with its own constant, no longer agrees."""
    w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    monkeypatch.setattr(weight_only, "INT4_MAX", 8)
    model = _linear_graph(w, TensorProto.FLOAT)
    insert_weight_only(model, "int4", block_size=32)
    theirs = int4_dequantized(torch.from_numpy(w.T.copy()), 32, torch.float32).numpy().T
    assert not np.array_equal(_dequantized_weight(model), theirs)


def test_block_sizes_that_do_not_divide_fall_back_to_a_power_of_two_that_does():
    """Nemotron-Nano-9B-v2's down_proj (15,680 inputs = 64 · 245) takes blocks of 64 when 128 is
    asked; a dimension no block of at least 16 divides keeps its weight (and says why)."""
    assert layer_block(15680, 128) == 64 and layer_block(15680, 64) == 64 and layer_block(4480, 128) == 128
    assert layer_block(48, 32) == 16 and layer_block(40, 32) is None
    model = _linear_graph(np.ones((15680 // 64 * 16, 4), np.float32), TensorProto.FLOAT)  # 3,920 = 16 · 245 inputs
    recipe = insert_weight_only(model, "int4", block_size=128)
    assert recipe.blocks == {NODE: 16}
    odd = _linear_graph(np.ones((40, 4), np.float32), TensorProto.FLOAT)
    with pytest.raises(QuantizationError, match="no linear layer is left"):
        insert_weight_only(odd, "int4", block_size=32)


def test_bad_requests_are_refused():
    w = np.ones((64, 4), np.float32)
    with pytest.raises(QuantizationError, match="--block-size 48"):
        insert_weight_only(_linear_graph(w, TensorProto.FLOAT), "int4", block_size=48)
    with pytest.raises(QuantizationError, match="NVFP4 checkpoint"):
        insert_weight_only(_linear_graph(w, TensorProto.FLOAT), "nvfp4")
    old = _linear_graph(w, TensorProto.FLOAT)
    old.opset_import[0].version = 20
    with pytest.raises(QuantizationError, match="opset ≥ 21"):
        insert_weight_only(old, "int4", block_size=32)


def _nvfp4_case(k: int = 64, n: int = 8, seed: int = 0):
    """Codes, block scales [n, k/16] as a checkpoint stores them, a global scale, and the weight they
    dequantize to (ModelOpt's arithmetic: e2m1 · (block_scale · global) in fp32)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8).view(ml_dtypes.float4_e2m1fn)
    stored = rng.uniform(0.1, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)  # [out, in/16], as ModelOpt writes it
    global_scale = np.float32(3.1e-4)
    scale = stored.T.astype(np.float32) * global_scale
    w = (codes.astype(np.float32).reshape(k // 16, 16, n) * scale[:, None, :]).reshape(k, n)
    return codes, stored, global_scale, w


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nvfp4_weights_are_the_checkpoints_codes_and_dequantize_bit_for_bit(dtype):
    """From weights dequantized by a checkpoint's NVFP4 scales (and rounded to the model dtype), the
    pass finds the checkpoint's E2M1 codes again; the chained DequantizeLinear (ONNX's reference
    evaluator) gives back ModelOpt's fp32 dequantization bit for bit, and the ONNX Runtime emulation
    of the float4e2m1 DequantizeLinear gives the reference evaluator's bits."""
    codes, stored, global_scale, w = _nvfp4_case()
    elem = {"fp32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16}[dtype]
    model_w = w.astype(ml_dtypes.bfloat16) if dtype == "bf16" else w
    model = _linear_graph(model_w, elem)
    scales = NVFP4Scales("layers.0.mixer.up_proj.weight_scale", float(global_scale), lambda name: stored)
    recipe = insert_weight_only(model, "nvfp4", fixed={NODE: scales}, source="checkpoint: test")
    assert recipe.quantized == [NODE] and recipe.global_scales == {NODE: float(global_scale)}
    onnx.checker.check_model(model, full_check=True)
    fp4 = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT4E2M1)
    assert fp4.raw_data == packed_bytes(codes).tobytes()
    dq = next(n for n in model.graph.node if n.name.endswith("weight_quantizer/DequantizeLinear"))
    probe = helper.make_model(
        helper.make_graph([n for n in model.graph.node if n.op_type == "DequantizeLinear"], "w", [], [helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None)], list(model.graph.initializer)),
        opset_imports=model.opset_import,
    )
    reference = ReferenceEvaluator(probe).run(None, {})[0]
    np.testing.assert_array_equal(reference, w)  # ModelOpt's fp32 dequantization, bit for bit (±0 aside)
    emulated = OrtSession.from_proto(probe, ".").run({})[dq.output[0]]
    np.testing.assert_array_equal(emulated.view(np.uint32), reference.view(np.uint32))


def test_weights_that_are_not_their_scales_values_are_refused():
    """Planted error: one weight moved off the E2M1 grid of its scales (a checkpoint whose weights and
    scales do not belong together) — refused, never silently rounded to another code."""
    codes, stored, global_scale, w = _nvfp4_case()
    w = w.copy()
    w[5, 3] *= 1.3
    scales = NVFP4Scales("layers.0.mixer.up_proj.weight_scale", float(global_scale), lambda name: stored)
    with pytest.raises(QuantizationError, match="1 weight\\(s\\) are not the E2M1 values"):
        insert_weight_only(_linear_graph(w, TensorProto.FLOAT), "nvfp4", fixed={NODE: scales})


def test_fp4_emulation_handles_odd_counts_and_per_axis_scales():
    """The emulation against ONNX's reference evaluator on the other DequantizeLinear forms it accepts:
    an odd element count (the last byte half used) and a per-axis scale; a float4e2m1 initializer read
    by anything but a DequantizeLinear is refused."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (5, 3)).astype(np.uint8).view(ml_dtypes.float4_e2m1fn)
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1)
    model = helper.make_model(
        helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 3])], [quantized_tensor("w", codes), numpy_helper.from_array(scale, "s")]),
        opset_imports=[helper.make_opsetid("", 24)],
    )
    reference = ReferenceEvaluator(model).run(None, {})[0]
    np.testing.assert_array_equal(OrtSession.from_proto(model, ".").run({})["y"], reference)
    misuse = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT4E2M1, [5, 3])], [quantized_tensor("w", codes)]),
        opset_imports=[helper.make_opsetid("", 24)],
    )
    with pytest.raises(ValueError, match="read by a Identity"):
        emulate_fp4(misuse)


def test_onnx_runtime_runs_int4_exactly_and_measures_its_fusion():
    """ONNX Runtime's default fuses int4 DequantizeLinear + MatMul into MatMulNBits, which (pre-packed)
    rounds the activations to int8 (accuracy level 4); `OrtSession` turns the fusion off, so it
    computes the graph's product (fp32 rounding only), and the fused drift is measurable by turning
    it and pre-packing back on."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    model = _linear_graph(w, TensorProto.FLOAT)
    insert_weight_only(model, "int4", block_size=32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    exact = x.astype(np.float64) @ _dequantized_weight(model).astype(np.float64)

    def rel(y):
        return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))

    assert rel(OrtSession.from_proto(model, ".").run({"x": x})["y"]) < 1e-6
    # MatMulNBits rounds the activations only with its pre-packed weights (OrtSession turns pre-packing
    # off for shared weights; fused but unpacked, it computes in fp32).
    fused = rel(OrtSession.from_proto(model, ".", config={QDQ_FUSION: "0", "session.disable_prepacking": "0"}).run({"x": x})["y"])
    assert 1e-4 < fused < 5e-2  # measured 5.8e-3 on these shapes


def _dq_graph(kind: int, k: int, n: int, block: int, scale_rows: int, zero_point: bool = False) -> onnx.ModelProto:
    codes = np.zeros((k, n), np.uint8).view(ml_dtypes.int4 if kind == TensorProto.INT4 else ml_dtypes.float4_e2m1fn)
    inits = [quantized_tensor("w", codes), numpy_helper.from_array(np.ones((scale_rows, n), np.float32), "s")]
    inputs = ["w", "s"]
    if zero_point:
        zp = np.ones((scale_rows, n), np.uint8).view(ml_dtypes.int4)
        inits.append(quantized_tensor("zp", zp))
        inputs.append("zp")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["wd"], name="dq", axis=0, block_size=block), helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits), opset_imports=[helper.make_opsetid("", 24)])


def test_tensorrt_rules_for_4bit_weights():
    """The dispatch emulator applies TensorRT's documented rules (`hybridtrt.engine.trt_rules.
    DEQUANTIZE_RULES`): INT4 blocks of 64/128 build, 32 is not documented; a partial last block is
    refused by the parser; a non-zero zero point is refused; blocked FP4 needs TensorRT 10.13."""
    ok = emulate_dispatch(_dq_graph(TensorProto.INT4, 256, 8, 128, 2), "11.1.0")
    assert ok.problems == []
    small = emulate_dispatch(_dq_graph(TensorProto.INT4, 256, 8, 32, 8), "11.1.0")
    assert any("INT4 blocks of 32" in p and "64 or 128" in p for p in small.problems)
    partial = emulate_dispatch(_dq_graph(TensorProto.INT4, 192, 8, 128, 2), "11.1.0")  # ONNX-legal: ceil(192/128) = 2
    assert any("Inferred block size is not an integer" in p for p in partial.problems)
    asymmetric = emulate_dispatch(_dq_graph(TensorProto.INT4, 256, 8, 128, 2, zero_point=True), "11.1.0")
    assert any("zero point" in p for p in asymmetric.problems)
    fp4 = _dq_graph(TensorProto.FLOAT4E2M1, 64, 8, 16, 4)
    report = emulate_dispatch(fp4, "11.1.0")
    assert report.problems == [] and any(n.startswith("FP4 weights: Blackwell (SM100+)") and "not verified" in n for n in report.notes)
    assert any("blocked DequantizeLinear of FP4 needs TensorRT >= 10.13" in p for p in emulate_dispatch(fp4, "10.12.0").problems)


def test_awq_pre_scale_is_a_mul_and_the_weight_divided_by_it():
    """AWQ's pre_quant_scale ``p``: the graph multiplies the MatMul's input by ``p`` and quantizes
    ``W / p``; ONNX's reference evaluator running the graph gives the torch reference's
    ``(x · p) · INT4(W / p)^T`` (fp32: to fp32 rounding)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    p = rng.uniform(0.25, 4.0, 128).astype(np.float32)
    model = _linear_graph(w, TensorProto.FLOAT)
    insert_weight_only(model, "int4", block_size=32, pre_scales={NODE: p})
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert [n.name for n in muls] == ["/model/layers.0/mixer/up_proj/pre_quant_scale/Mul"]
    x = rng.standard_normal((3, 128)).astype(np.float32)
    ours = ReferenceEvaluator(model).run(None, {"x": x})[0]
    deq = int4_dequantized(torch.from_numpy(w.T.copy()), 32, torch.float32, pre_scale=torch.from_numpy(p))
    theirs = (torch.from_numpy(x) * torch.from_numpy(p)) @ deq.t()
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)
    plain = _dequantized_weight(_quantized_plain(w))
    assert not np.allclose(_dequantized_weight(model), plain)  # p changed what was quantized


def _quantized_plain(w: np.ndarray) -> onnx.ModelProto:
    model = _linear_graph(w, TensorProto.FLOAT)
    insert_weight_only(model, "int4", block_size=32)
    return model


def test_awq_search_finds_the_outlier_channels():
    """On activations with a few large input channels (what trained LLMs have), AWQ's search cuts the
    output error of round to nearest; α = 0 is in its grid, so it is never worse."""
    from hybridtrt.exporter.awq import search

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    x = torch.randn(512, 256, generator=gen)
    x[:, :8] *= 30.0  # outlier channels
    result = search(w, x, x.abs().mean(dim=0), 128, torch.float32)
    assert result.alpha > 0 and result.awq_error < 0.8 * result.rtn_error
    flat = search(w, torch.randn(512, 256, generator=gen), torch.ones(256), 128, torch.float32)
    assert flat.awq_error <= flat.rtn_error


def test_weights_are_quantized_in_bounded_chunks_with_the_same_bits(monkeypatch):
    """The quantizers work through a weight a few block rows at a time (bounded temporaries, whatever
    the weight's size): forced to chunks of one block row, they give the bits of one pass."""
    from hybridtrt.graphs.weight_only import PreScale, quantize_int4, quantize_nvfp4_with_scales

    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 24)).astype(np.float32)
    p = PreScale(rng.uniform(0.5, 2.0, 256).astype(np.float32))
    codes, stored, global_scale, w4 = _nvfp4_case(k=64, n=24)
    scales = NVFP4Scales("m.weight_scale", float(global_scale), lambda name: stored)
    whole = (quantize_int4(w, 32, TensorProto.BFLOAT16, p), quantize_nvfp4_with_scales(w4, scales))
    monkeypatch.setattr(weight_only, "CHUNK_ELEMENTS", 1)
    chunked = (quantize_int4(w, 32, TensorProto.BFLOAT16, p), quantize_nvfp4_with_scales(w4, scales))
    for (a_q, a_s), (b_q, b_s) in zip(whole, chunked):
        assert a_q.tobytes() == b_q.tobytes() and a_s.tobytes() == b_s.tobytes()
    assert whole[1][0].tobytes() == codes.tobytes()


def test_fp8_weights_are_quantized_in_bounded_chunks_with_the_same_bits(monkeypatch):
    """The FP8 quantizers (linears per tensor and per channel, a checkpoint's own scale, expert stacks)
    work a chunk of rows at a time: forced to one row a chunk, the bits of the one-pass formula
    ``saturate(float8(w / scale))`` (saturation exercised by a checkpoint scale too small)."""
    import hybridtrt.graphs.fp8_qdq as fp8_qdq

    rng = np.random.default_rng(6)
    w = (rng.standard_normal((64, 24)) * 3).astype(ml_dtypes.bfloat16)
    experts = rng.standard_normal((5, 8, 16)).astype(np.float32)
    per_expert = tuple(float(s) for s in rng.uniform(1e-3, 1e-2, 5))

    def every():
        return (
            fp8_qdq.quantize_weight(w, "tensor", TensorProto.FLOAT),
            fp8_qdq.quantize_weight(w, "channel", TensorProto.BFLOAT16),
            fp8_qdq.quantize_weight_with_scale(w, 0.002, TensorProto.FLOAT),
            fp8_qdq.quantize_expert_weights(experts, "tensor"),
            fp8_qdq.quantize_expert_weights(experts, "channel"),
            fp8_qdq.quantize_expert_weights_with_scales(experts, per_expert),
        )

    whole = every()
    monkeypatch.setattr(fp8_qdq, "CHUNK_ELEMENTS", 1)
    for (a_q, a_s), (b_q, b_s) in zip(whole, every()):
        assert a_q.tobytes() == b_q.tobytes() and a_s.tobytes() == b_s.tobytes()
    for (q, scale), source in zip(whole, (w, w, w, experts, experts, experts)):
        s32 = np.asarray(scale, np.float32)
        s32 = s32[:, :, None] if source.ndim == 3 else s32
        assert q.tobytes() == fp8_qdq.fp8_saturating_cast(np.asarray(source, np.float32) / s32).tobytes()
    assert (np.abs(whole[2][0].astype(np.float32)) == 448).any()  # saturated, not NaN


def test_awq_search_in_row_slices_finds_the_same(monkeypatch):
    """The AWQ search dequantizes a few output rows at a time: forced to one row, same α and errors."""
    import hybridtrt.exporter.awq as awq

    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(32, 128, generator=gen), torch.randn(64, 128, generator=gen)
    x[:, :4] *= 20.0
    whole = awq.search(w, x, x.abs().mean(dim=0), 64, torch.float32)
    monkeypatch.setattr(awq, "ROWS_ELEMENTS", 1)
    sliced = awq.search(w, x, x.abs().mean(dim=0), 64, torch.float32)
    assert sliced.alpha == whole.alpha and np.array_equal(sliced.pre_quant_scale, whole.pre_quant_scale)
    assert sliced.awq_error == pytest.approx(whole.awq_error, rel=1e-5) and sliced.rtn_error == pytest.approx(whole.rtn_error, rel=1e-5)


def test_a_transposed_view_quantizes_like_its_copy():
    """The streaming exporter hands the quantizers a transposed view of the parameter it read (no
    contiguous copy): the same bits as the contiguous weight."""
    from hybridtrt.graphs.weight_only import PreScale, quantize_int4

    rng = np.random.default_rng(6)
    stored = rng.standard_normal((24, 128)).astype(np.float32)  # [out, in] as a checkpoint holds it
    p = PreScale(rng.uniform(0.5, 2.0, 128).astype(np.float32))
    for pre in (None, p):
        a_q, a_s = quantize_int4(stored.T, 32, TensorProto.FLOAT, pre)
        b_q, b_s = quantize_int4(np.ascontiguousarray(stored.T), 32, TensorProto.FLOAT, pre)
        assert a_q.tobytes() == b_q.tobytes() and a_s.tobytes() == b_s.tobytes()


def test_polygraphy_onnxrt_is_skipped_with_the_reason_on_graphs_it_cannot_run(tmp_path):
    """`hybridtrt compare` hands polygraphy's ONNX Runtime runner the file as it is: a float4e2m1
    DequantizeLinear (or a bf16 graph) is said to be out of its reach, not run into a traceback."""
    from hybridtrt.validation.polygraphy_bridge import onnxrt_cannot_run

    fp4, plain = tmp_path / "fp4.onnx", tmp_path / "plain.onnx"
    onnx.save(_dq_graph(TensorProto.FLOAT4E2M1, 64, 8, 16, 4), str(fp4))
    onnx.save(_linear_graph(np.ones((64, 4), np.float32), TensorProto.FLOAT), str(plain))
    assert "float4e2m1 DequantizeLinear" in onnxrt_cannot_run(fp4) and onnxrt_cannot_run(plain) is None
    with pytest.raises(Exception, match="DequantizeLinear"):  # what polygraphy's runner would meet
        import onnxruntime as ort

        ort.InferenceSession(str(fp4), providers=["CPUExecutionProvider"])


def test_nvfp4_expert_codes_are_the_checkpoints_bytes_and_a_stray_weight_is_refused():
    """Routed experts (`nvfp4_expert_codes`): the stored packed codes and block scales come back as they
    are, expert by expert from any first expert, when the loader's weights are their dequantization;
    planted: one expert weight off its E2M1 grid point is refused, naming the expert."""
    from hybridtrt.graphs.weight_only import nvfp4_expert_codes

    experts = []
    for e in range(3):
        codes, stored, global_scale, w = _nvfp4_case(k=32, n=8, seed=e)
        flat = codes.view(np.uint8).T.reshape(-1)  # [out, in] as ModelOpt stores it, packed along in
        packed = (flat[0::2] | (flat[1::2] << 4)).reshape(8, 16)
        experts.append((packed, stored, global_scale, w.T.copy()))
    tables = {f"e{e}.{kind}": arr for e, (packed, stored, _, _) in enumerate(experts) for kind, arr in (("weight", packed), ("weight_scale", stored))}
    scales = tuple(NVFP4Scales(f"e{e}.weight_scale", float(g), tables.__getitem__, f"e{e}.weight") for e, (_, _, g, _) in enumerate(experts))
    stack = np.stack([w for *_, w in experts])
    got_codes, got_blocks = nvfp4_expert_codes(stack[1:], scales, first=1)
    assert got_codes.tobytes() == b"".join(p.tobytes() for p, *_ in experts[1:])
    assert got_blocks.view(np.uint8).tobytes() == b"".join(s.view(np.uint8).tobytes() for _, s, *_ in experts[1:])
    stray = stack.copy()
    stray[2].reshape(-1)[np.flatnonzero(stray[2])[0]] *= 1.01  # a non-zero weight (a zero stays on the grid)
    with pytest.raises(QuantizationError, match="e2: 1 weight"):
        nvfp4_expert_codes(stray, scales)
