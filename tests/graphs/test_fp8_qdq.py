"""FP8 Q/DQ pass: structure of the rewritten graph, refusals, and ONNX Runtime numerics against the
unquantized graph (DESIGN.md §7, §8: FP8 cosine ≥ 0.99, top-1 agreement reported).

The numeric gate uses the tiny preset with ``initializer_range=0.05`` (weights of a trained-like
scale). The presets' default 0.3 makes a deliberately chaotic random model in which any 3-bit
mantissa rounding is amplified ~10x by depth; its FP8 numbers are reported by
``benchmarks/fp8_accuracy.py`` and ``docs/fp8.md``, not gated.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.calibration import calibrate, calibration_batches
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.graphs.fp8_qdq import FP8_E4M3_MAX, QUANTIZABLE_PROJECTIONS, insert_fp8_qdq, quantized_weight_bytes
from hybridtrt.models.loading import load_model
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.judge.metrics import compare

PRESET = "tiny-nemotron-h"
INIT_RANGE = 0.05
#: Gates (tolerances are data): DESIGN.md §8 FP8 cosine; top-1 is reported, with a loose floor.
COSINE_MIN = 0.99
TOP1_MIN = 0.75
_PROJ = re.compile(r"/mixer/(" + "|".join(QUANTIZABLE_PROJECTIONS) + r")/MatMul$")


@pytest.fixture(scope="module")
def setup(make_export):
    """(model, export_dir, amax, inputs, fp32 logits)."""
    ckpt, out = make_export(PRESET, initializer_range=INIT_RANGE)
    model = load_model(ckpt, "fp32")
    amax = calibrate(model, calibration_batches(None, calib_file=None, calib_random=8, vocab_size=model.config.vocab_size, seq_len=32))
    inputs = example_inputs(model, batch=32, seq=8, past=4, seed=5)
    session = OrtSession(out / "model.onnx")
    feeds = dict(zip(session.input_names, inputs))
    return model, out, amax, feeds, session.run(feeds)["logits"]


def _quantize(setup, tmp: Path, **kwargs) -> tuple[onnx.ModelProto, object, Path]:
    _, out, amax, _, _ = setup
    proto = onnx.load(str(out / "model.onnx"))  # external data loaded
    recipe = insert_fp8_qdq(proto, kwargs.pop("amax", amax), **kwargs)
    path = tmp / "model.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.data", size_threshold=1024)
    return proto, recipe, path


@pytest.fixture(scope="module")
def per_tensor(setup, tmp_path_factory):
    return _quantize(setup, tmp_path_factory.mktemp("fp8_tensor"))


@pytest.fixture(scope="module")
def per_channel(setup, tmp_path_factory):
    return _quantize(setup, tmp_path_factory.mktemp("fp8_channel"), weight_scale="channel")


def _logits(setup, path: Path) -> np.ndarray:
    return OrtSession(path).run(setup[3])["logits"]


# -- structure --------------------------------------------------------------------------------


def test_exactly_the_linear_projections_get_qdq(setup, per_tensor):
    original = onnx.load(str(setup[1] / "model.onnx"), load_external_data=False)
    matmuls = [n.name for n in original.graph.node if n.op_type == "MatMul"]
    expected = [n for n in matmuls if _PROJ.search(n)]
    proto, recipe, _ = per_tensor
    assert recipe.quantized == expected and len(expected) == 20
    assert set(recipe.excluded) == set(matmuls) - set(expected)
    assert "lm_head" in recipe.excluded["/model/MatMul"]
    producers = {o: n for n in proto.graph.node for o in n.output}
    # The attention BMMs live inside one standard Attention node per layer (opset ≥ 23): never quantized.
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    assert all(producers[i].op_type != "DequantizeLinear" for n in attention for i in n.input if i in producers)
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        act, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if node.name not in expected:
            assert act is None or act.op_type != "DequantizeLinear"
            continue
        scope = node.name.removesuffix("/MatMul")
        dotted = scope.lstrip("/").replace("/", ".")
        assert act.name == f"{scope}/input_quantizer/DequantizeLinear"
        assert producers[act.input[0]].name == f"{scope}/input_quantizer/QuantizeLinear"
        assert weight.name == f"{scope}/weight_quantizer/DequantizeLinear" and weight.input[0] == f"{dotted}.weight_t_fp8"
        fp8 = inits[f"{dotted}.weight_t_fp8"]
        assert fp8.data_type == TensorProto.FLOAT8E4M3FN
        assert f"{dotted}.weight_t" not in inits  # the fp32 copy is gone
        assert inits[f"{dotted}.input_zero_point"].data_type == TensorProto.FLOAT8E4M3FN
        scale = onnx.numpy_helper.to_array(inits[f"{dotted}.input_scale"])
        assert scale.dtype == np.float32 and scale.shape == ()
        assert float(scale) == pytest.approx(setup[2][node.name] / FP8_E4M3_MAX, rel=1e-6)
        assert recipe.activation_scales[node.name] == float(scale)
    assert "model.lm_head.weight_t" in inits and inits["model.lm_head.weight_t"].data_type == TensorProto.FLOAT


def test_checker_full_check_passes(per_tensor, per_channel):
    for _, _, path in (per_tensor, per_channel):
        onnx.checker.check_model(str(path), full_check=True)


def test_per_channel_scales_have_axis_1(per_channel):
    proto, recipe, _ = per_channel
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == "/model/layers.0/mixer/in_proj/weight_quantizer/DequantizeLinear")
    assert [(a.name, a.i) for a in node.attribute] == [("axis", 1)]
    w, s = inits[node.input[0]], inits[node.input[1]]
    assert list(s.dims) == [w.dims[1]]  # one scale per output channel of [in, out]
    assert recipe.weight_scale == "channel" and recipe.weight_scales == {}


def test_exclude_pattern_is_respected(setup, tmp_path):
    _, recipe, _ = _quantize(setup, tmp_path, exclude=[r"layers\.3/", "q_proj"])
    assert not [n for n in recipe.quantized if "layers.3/" in n or "q_proj" in n]
    assert recipe.excluded["/model/layers.3/mixer/up_proj/MatMul"] == r"matches --exclude 'layers\\.3/'"
    assert recipe.excluded["/model/layers.1/mixer/q_proj/MatMul"] == "matches --exclude 'q_proj'"
    assert len(recipe.quantized) == 20 - 2 - 2
    assert recipe.exclude_patterns == [r"layers\.3/", "q_proj"]


def test_refusals_say_why(setup):
    proto = onnx.load(str(setup[1] / "model.onnx"), load_external_data=False)
    with pytest.raises(QuantizationError, match="external data"):
        insert_fp8_qdq(proto, setup[2])
    with pytest.raises(QuantizationError, match="not a valid regular expression"):
        insert_fp8_qdq(proto, setup[2], exclude=["("])
    with pytest.raises(QuantizationError, match="no calibration amax"):
        insert_fp8_qdq(proto, {}, base_dir=str(setup[1]))
    old = onnx.ModelProto()
    old.CopyFrom(proto)
    next(o for o in old.opset_import if o.domain == "").version = 18
    with pytest.raises(QuantizationError, match="opset ≥ 19"):
        insert_fp8_qdq(old, setup[2])


# -- numerics ---------------------------------------------------------------------------------


def test_fp8_accuracy_per_tensor_and_per_channel(setup, per_tensor, per_channel):
    ref = setup[4]
    results = {mode: compare(_logits(setup, q[2]), ref, top1=True) for mode, q in (("tensor", per_tensor), ("channel", per_channel))}
    for mode, c in results.items():
        print(f"{PRESET} (init {INIT_RANGE}) FP8 per-{mode}: cosine {c.cosine:.5f} top-1 {c.top1:.3f} rel L2 {c.rel_l2:.4f}")
        assert c.finite and c.cosine >= COSINE_MIN, (mode, c)
        assert c.top1 >= TOP1_MIN, (mode, c)
    # Per-channel is never meaningfully worse than per-tensor (both are reported in docs/fp8.md).
    assert results["channel"].cosine >= results["tensor"].cosine - 1e-3


def test_too_small_activation_scale_fails_the_gate(setup, tmp_path):
    bad = {k: v / 1000 for k, v in setup[2].items()}  # saturates almost every activation
    _, _, path = _quantize(setup, tmp_path, amax=bad)
    c = compare(_logits(setup, path), setup[4], top1=True)
    print(f"activation scale 1000x too small: cosine {c.cosine:.4f} top-1 {c.top1:.3f}")
    assert c.cosine < 0.9


def test_weights_shrink_to_a_quarter(setup, per_tensor):
    before = quantized_weight_bytes(onnx.load(str(setup[1] / "model.onnx"), load_external_data=False))
    after = quantized_weight_bytes(per_tensor[0])
    assert before["fp8"] == 0 and after["high_precision"] == 0
    assert after["fp8"] * 4 == before["high_precision"]
    size_before = (setup[1] / "weights.data").stat().st_size
    size_after = (per_tensor[2].parent / "weights.data").stat().st_size
    print(f"linear weights {before['high_precision']} -> {after['fp8']} bytes; weights.data {size_before} -> {size_after} ({size_after / size_before:.3f})")
    assert size_after < size_before


# -- a hand-built one-layer graph: dtypes and exact numerics -----------------------------------


def _one_linear(elem_type: int, seed: int = 0, smallest: float = 0.1) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """``y = x @ W`` with ``x [3, 16]``, ``W [16, 8]`` named like an exported in_proj; output
    channel ranges grow geometrically from ``smallest`` to 3."""
    from onnx import helper

    from hybridtrt.graphs.fp8_qdq import float_tensor

    rng = np.random.default_rng(seed)
    np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(elem_type)
    w = (rng.standard_normal((16, 8)) * np.geomspace(smallest, 3.0, 8)).astype(np.float32)  # channels differ in range
    x = rng.standard_normal((3, 16)).astype(np.float32) * 2
    if np_type is not None:
        w_init = float_tensor("model.layers.0.mixer.in_proj.weight_t", w.astype(np_type), elem_type)
    else:  # bf16
        import ml_dtypes

        w_init = float_tensor("model.layers.0.mixer.in_proj.weight_t", w.astype(ml_dtypes.bfloat16), elem_type)
    node = helper.make_node("MatMul", ["x", w_init.name], ["y"], name="/model/layers.0/mixer/in_proj/MatMul")
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", elem_type, [3, 16])], [helper.make_tensor_value_info("y", elem_type, [3, 8])], [w_init]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)]), x, w


def _fake_quant(a: np.ndarray, scale: np.ndarray) -> np.ndarray:
    from hybridtrt.graphs.fp8_qdq import fp8_saturating_cast

    return fp8_saturating_cast(a / scale).astype(np.float32) * scale


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_one_linear_matches_numpy_fake_quant(mode, tmp_path):
    proto, x, w = _one_linear(TensorProto.FLOAT)
    amax = {"/model/layers.0/mixer/in_proj/MatMul": float(np.abs(x).max()) / 2}  # half of x saturates
    recipe = insert_fp8_qdq(proto, amax, weight_scale=mode)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    got = OrtSession(tmp_path / "m.onnx").run({"x": x})["y"]
    a_scale = np.float32(recipe.activation_scales["/model/layers.0/mixer/in_proj/MatMul"])
    w_scale = np.abs(w).max(axis=0 if mode == "channel" else None).astype(np.float32) / np.float32(FP8_E4M3_MAX)
    expected = _fake_quant(x, a_scale) @ _fake_quant(w, w_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(_fake_quant(x, a_scale)).max() == pytest.approx(amax["/model/layers.0/mixer/in_proj/MatMul"], rel=1e-6)  # saturated, not NaN


def test_per_channel_rescues_channels_that_underflow_per_tensor():
    """FP8 is floating point: relative error is about the same at any scale, so per-channel scales
    only matter once a channel's range is below ~2^-15 of the largest (448 → FP8's smallest normal, 2^-6)."""
    errors = {}
    for mode in ("tensor", "channel"):
        proto, x, w = _one_linear(TensorProto.FLOAT, seed=1, smallest=1e-5)
        insert_fp8_qdq(proto, {"/model/layers.0/mixer/in_proj/MatMul": float(np.abs(x).max())}, weight_scale=mode)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        w_dq = inits["model.layers.0.mixer.in_proj.weight_t_fp8"].astype(np.float32) * inits["model.layers.0.mixer.in_proj.weight_scale"]
        errors[mode] = float(np.linalg.norm(w_dq[:, 0] - w[:, 0]) / np.linalg.norm(w[:, 0]))  # the narrowest channel
    assert errors["channel"] < 0.05 < 0.5 < errors["tensor"]


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_scales_keep_the_model_dtype(elem_type, tmp_path):
    proto, x, _ = _one_linear(elem_type)
    insert_fp8_qdq(proto, {"/model/layers.0/mixer/in_proj/MatMul": 4.0})
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t for t in proto.graph.initializer}
    for name in ("model.layers.0.mixer.in_proj.input_scale", "model.layers.0.mixer.in_proj.weight_scale"):
        assert inits[name].data_type == elem_type  # DequantizeLinear outputs the model dtype
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types["/model/layers.0/mixer/in_proj/input_quantizer/DequantizeLinear_output_0"] == elem_type
    assert types["/model/layers.0/mixer/in_proj/weight_quantizer/DequantizeLinear_output_0"] == elem_type
    if elem_type == TensorProto.FLOAT16:  # ORT CPU has no bf16 MatMul
        onnx.save(proto, str(tmp_path / "m.onnx"))
        got = OrtSession(tmp_path / "m.onnx").run({"x": x.astype(np.float16)})["y"]
        assert got.dtype == np.float16 and np.isfinite(got).all()


def test_quantizing_twice_is_refused():
    proto, _, _ = _one_linear(TensorProto.FLOAT)
    insert_fp8_qdq(proto, {"/model/layers.0/mixer/in_proj/MatMul": 1.0})
    with pytest.raises(QuantizationError, match="quantized already"):
        insert_fp8_qdq(proto, {"/model/layers.0/mixer/in_proj/MatMul": 1.0})
