"""The standard-ONNX bodies of the hybridtrt ops, run by stock ONNX Runtime (CPU) against the torch refs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hybridtrt.errors import ExportError
from hybridtrt.ops import mamba2_chunk_scan_ref, mamba2_state_update_ref
from hybridtrt.ops.onnx_functions import (
    CHUNK_SCAN,
    DOMAIN,
    DOMAIN_VERSION,
    STATE_UPDATE,
    attach_functions,
    chunk_scan_function,
    state_update_function,
    _scoped,
)

#: Tolerances are data: fp32 max abs error relative to max(1, output scale); half cosine.
TOLERANCES = {"fp32_max_abs_rel": 1e-5, "fp16_cosine": 0.999}
OPSETS = (18, 19, 20, 21, 22, 23)
CHUNK = 8
#: Ops TensorRT's ONNX parser supports; the bodies must use no others.
TRT_FRIENDLY_OPS = {
    "Add", "Cast", "CastLike", "Concat", "Constant", "CumSum", "Div", "Exp", "Gather", "Greater",
    "GreaterOrEqual", "MatMul", "Min", "Mul", "Pad", "Range", "Reshape", "Shape", "Slice", "Squeeze", "Sub",
    "Transpose", "Unsqueeze", "Where",
}  # fmt: skip

_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_DIMS = {
    CHUNK_SCAN: {
        "inputs": {
            "x": ["b", "L", "H", "P"], "dt": ["b", "L", "H"], "A": ["H"], "B": ["b", "L", "G", "N"],
            "C": ["b", "L", "G", "N"], "D": ["H"], "initial_state": ["b", "H", "P", "N"],
        },
        "outputs": {"y": ["b", "L", "H", "P"], "final_state": ["b", "H", "P", "N"]},
    },
    STATE_UPDATE: {
        "inputs": {
            "x": ["b", "H", "P"], "dt": ["b", "H"], "A": ["H"], "B": ["b", "G", "N"], "C": ["b", "G", "N"],
            "D": ["H"], "state": ["b", "H", "P", "N"],
        },
        "outputs": {"y": ["b", "H", "P"], "new_state": ["b", "H", "P", "N"]},
    },
}  # fmt: skip


def _build(
    op_type: str,
    act: int = TensorProto.FLOAT,
    state: int = TensorProto.FLOAT,
    opset: int = 18,
    chunk_size: int = CHUNK,
) -> onnx.ModelProto:
    """One-node model with fully dynamic dims; A and D are fp32, the rest ``act``; states ``state``."""
    dims = _DIMS[op_type]

    def dtype(name: str) -> int:
        if name in ("A", "D"):
            return TensorProto.FLOAT
        if name in ("initial_state", "state", "final_state", "new_state"):
            return state
        return act

    inputs = [helper.make_tensor_value_info(n, dtype(n), d) for n, d in dims["inputs"].items()]
    outputs = [helper.make_tensor_value_info(n, dtype(n), d) for n, d in dims["outputs"].items()]
    attrs: dict[str, object] = {"plugin_namespace": DOMAIN, "plugin_version": "1"}
    if op_type == CHUNK_SCAN:
        attrs["chunk_size"] = chunk_size
    node = helper.make_node(
        op_type, list(dims["inputs"]), list(dims["outputs"]), name=f"/model/{op_type}", domain=DOMAIN, **attrs
    )
    graph = helper.make_graph([node], "g", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]),
    )
    return attach_functions(model)


@functools.cache
def _session(
    op_type: str, act: int = TensorProto.FLOAT, state: int = TensorProto.FLOAT, opset: int = 18, chunk_size: int = CHUNK
) -> ort.InferenceSession:
    model = _build(op_type, act, state, opset, chunk_size)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _scan_inputs(
    batch: int, length: int, groups: int, *, seed: int, heads: int = 4, head_dim: int = 8, d_state: int = 6,
    zero_state: bool = False, act: torch.dtype = torch.float32, state: torch.dtype = torch.float32,
    a_scale: float = 2.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random inputs; dt in (0, 0.5] with ~20 % exact zeros (padding-like steps)."""
    g = torch.Generator().manual_seed(seed)
    dt = (1.0 - torch.rand(batch, length, heads, generator=g)) * 0.5
    dt = dt.masked_fill(torch.rand(batch, length, heads, generator=g) < 0.2, 0.0)
    s0 = torch.randn(batch, heads, head_dim, d_state, generator=g)
    return {
        "x": torch.randn(batch, length, heads, head_dim, generator=g).to(act),
        "dt": dt.to(act),
        "A": -torch.rand(heads, generator=g) * a_scale - 0.1,
        "B": torch.randn(batch, length, groups, d_state, generator=g).to(act),
        "C": torch.randn(batch, length, groups, d_state, generator=g).to(act),
        "D": torch.randn(heads, generator=g),
        "initial_state": (torch.zeros_like(s0) if zero_state else s0).to(state),
    }


def _run(session: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _max_rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    """Max abs error over max(1, max|ref|); non-finite values fail first."""
    assert np.isfinite(got).all(), "non-finite values in the ONNX Runtime output"
    ref_np = ref.float().numpy()
    assert got.shape == ref_np.shape and got.dtype == ref.numpy().dtype
    return float(np.abs(got.astype(np.float32) - ref_np).max() / max(1.0, float(np.abs(ref_np).max())))


def _cosine(got: np.ndarray, ref: torch.Tensor) -> float:
    assert np.isfinite(got).all(), "non-finite values in the ONNX Runtime output"
    a = torch.from_numpy(got.astype(np.float32)).flatten().double()
    b = ref.float().flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ---------------------------------------------------------------------------------------------
# Mamba2ChunkScan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_state", [False, True], ids=["state", "zero_state"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_chunk_scan_fp32_matches_ref(length: int, batch: int, groups: int, zero_state: bool) -> None:
    inputs = _scan_inputs(batch, length, groups, seed=length * 100 + batch * 10 + groups, zero_state=zero_state)
    y, final = _run(_session(CHUNK_SCAN), inputs)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


@pytest.mark.parametrize("opset", OPSETS)
def test_chunk_scan_opsets_check_and_run(opset: int) -> None:
    model = _build(CHUNK_SCAN, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    (fn,) = model.functions
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", opset)]
    inputs = _scan_inputs(2, 2 * CHUNK + 3, 2, seed=opset)
    y, final = _run(_session(CHUNK_SCAN, opset=opset), inputs)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_scan_respects_chunk_size(chunk_size: int) -> None:
    inputs = _scan_inputs(2, 11, 2, seed=chunk_size)
    y, final = _run(_session(CHUNK_SCAN, chunk_size=chunk_size), inputs)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_chunk_scan_long_sequence_strong_decay_is_stable() -> None:
    """Cumulative decays reach ~-1e3: a naive exp(cumsum) difference would overflow."""
    inputs = _scan_inputs(1, 300, 2, seed=7, a_scale=16.0)
    y, final = _run(_session(CHUNK_SCAN, chunk_size=64), inputs)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_chunk_scan_dynamic_dims_one_session() -> None:
    """One model, one session, several (batch, L, H, P, G, N) without a rebuild."""
    session = _session(CHUNK_SCAN)
    for i, (batch, length, heads, head_dim, groups, d_state) in enumerate(
        [(1, 5, 4, 8, 1, 6), (3, 20, 6, 16, 3, 4), (2, 1, 2, 4, 2, 8), (1, 33, 8, 8, 2, 16)]
    ):
        inputs = _scan_inputs(batch, length, groups, seed=50 + i, heads=heads, head_dim=head_dim, d_state=d_state)
        y, final = _run(session, inputs)
        y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
        assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
        assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_chunk_scan_left_padding_is_exact() -> None:
    """Left-padded steps (dt = x = B = C = 0) leave the final state and the real outputs unchanged."""
    inputs = _scan_inputs(1, 13, 2, seed=3)
    padded = {k: v.clone() for k, v in inputs.items()}
    for k in ("x", "dt", "B", "C"):
        padded[k] = torch.cat([torch.zeros_like(inputs[k][:, :6]), inputs[k]], dim=1)
    session = _session(CHUNK_SCAN)
    y, final = _run(session, inputs)
    y_pad, final_pad = _run(session, padded)
    np.testing.assert_allclose(y_pad[:, 6:], y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(final_pad, final, rtol=0, atol=1e-5)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16], ids=["fp32_state", "fp16_state"])
@pytest.mark.parametrize("length", [1, 3 * CHUNK + 5])
def test_chunk_scan_fp16(length: int, state_dtype: torch.dtype) -> None:
    state = TensorProto.FLOAT if state_dtype == torch.float32 else TensorProto.FLOAT16
    inputs = _scan_inputs(3, length, 2, seed=length, act=torch.float16, state=state_dtype)
    y, final = _run(_session(CHUNK_SCAN, act=TensorProto.FLOAT16, state=state), inputs)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    assert y.dtype == np.float16 and final.dtype == _NP[state]
    assert _cosine(y, y_ref) >= TOLERANCES["fp16_cosine"]
    assert _cosine(final, final_ref) >= TOLERANCES["fp16_cosine"]


# ---------------------------------------------------------------------------------------------
# Mamba2StateUpdate
# ---------------------------------------------------------------------------------------------


def _update_inputs(batch: int, groups: int, *, seed: int, act: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    scan = _scan_inputs(batch, 1, groups, seed=seed, act=act)
    return {
        "x": scan["x"][:, 0], "dt": scan["dt"][:, 0], "A": scan["A"], "B": scan["B"][:, 0],
        "C": scan["C"][:, 0], "D": scan["D"], "state": scan["initial_state"],
    }  # fmt: skip


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_state_update_fp32_matches_ref(batch: int, groups: int) -> None:
    inputs = _update_inputs(batch, groups, seed=batch * 10 + groups)
    y, new_state = _run(_session(STATE_UPDATE), inputs)
    y_ref, state_ref = mamba2_state_update_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(new_state, state_ref) <= TOLERANCES["fp32_max_abs_rel"]


@pytest.mark.parametrize("opset", OPSETS)
def test_state_update_opsets_check_and_run(opset: int) -> None:
    model = _build(STATE_UPDATE, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    inputs = _update_inputs(2, 2, seed=opset)
    y, new_state = _run(_session(STATE_UPDATE, opset=opset), inputs)
    y_ref, state_ref = mamba2_state_update_ref(**inputs)
    assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(new_state, state_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_state_update_fp16_with_fp32_state() -> None:
    inputs = _update_inputs(3, 2, seed=11, act=torch.float16)
    y, new_state = _run(_session(STATE_UPDATE, act=TensorProto.FLOAT16), inputs)
    y_ref, state_ref = mamba2_state_update_ref(**inputs)
    assert y.dtype == np.float16 and new_state.dtype == np.float32
    assert _cosine(y, y_ref) >= TOLERANCES["fp16_cosine"]
    assert _cosine(new_state, state_ref) >= TOLERANCES["fp16_cosine"]


def test_prefill_then_decode_equals_one_prefill() -> None:
    """ChunkScan(a) then StateUpdate per token of b == ChunkScan(a + b), both through ONNX Runtime."""
    full = _scan_inputs(2, 14, 2, seed=21)
    split = 10
    prefill = {k: (v[:, :split] if v.dim() > 1 and k != "initial_state" else v) for k, v in full.items()}
    _, state = _run(_session(CHUNK_SCAN), prefill)
    ys = []
    for t in range(split, 14):
        step = {
            "x": full["x"][:, t], "dt": full["dt"][:, t], "A": full["A"], "B": full["B"][:, t],
            "C": full["C"][:, t], "D": full["D"], "state": torch.from_numpy(state),
        }  # fmt: skip
        y, state = _run(_session(STATE_UPDATE), step)
        ys.append(y)
    y_full, state_full = _run(_session(CHUNK_SCAN), full)
    np.testing.assert_allclose(np.stack(ys, axis=1), y_full[:, split:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(state, state_full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bodies and attach_functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [chunk_scan_function, state_update_function])
def test_bodies_use_only_trt_friendly_default_domain_ops(builder: Callable[[int], onnx.FunctionProto]) -> None:
    fn = builder(18)
    assert fn.domain == DOMAIN
    assert all(n.domain == "" for n in fn.node)
    assert {n.op_type for n in fn.node} <= TRT_FRIENDLY_OPS
    names = [n.name for n in fn.node]
    assert len(set(names)) == len(names) and all(names)


def test_chunk_scan_body_reads_chunk_size_by_reference() -> None:
    fn = chunk_scan_function(18)
    assert list(fn.attribute) == ["chunk_size", "plugin_namespace", "plugin_version"]
    refs = [a.ref_attr_name for n in fn.node for a in n.attribute if a.ref_attr_name]
    assert refs == ["chunk_size"]
    assert list(state_update_function(18).attribute) == ["plugin_namespace", "plugin_version"]


def _two_op_model(opset: int = 18) -> onnx.ModelProto:
    """ChunkScan (prefill) feeding its final state to StateUpdate (one decode step)."""
    scan = _build(CHUNK_SCAN, opset=opset)
    update = _build(STATE_UPDATE, opset=opset)
    graph = scan.graph
    (node,) = update.graph.node
    step = {n: (n if n in ("A", "D") else f"u_{n}") for n in node.input}
    step["state"] = "final_state"
    del node.input[:]
    node.input.extend(step.values())
    renamed_outputs = [f"u_{n}" for n in node.output]
    del node.output[:]
    node.output.extend(renamed_outputs)
    graph.node.append(node)
    for value in update.graph.input:
        if value.name not in ("A", "D", "state"):
            value.name = f"u_{value.name}"
            graph.input.append(value)
    for value in update.graph.output:
        value.name = f"u_{value.name}"
        graph.output.append(value)
    return attach_functions(scan)


def test_two_op_model_checks_and_runs() -> None:
    model = _two_op_model()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    full = _scan_inputs(2, 12, 2, seed=5)
    feeds = {k: (v[:, :11] if k in ("x", "dt", "B", "C") else v) for k, v in full.items()}
    feeds.update({f"u_{k}": full[k][:, 11] for k in ("x", "dt", "B", "C")})
    _, _, y_step, state = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    y_ref, state_ref = mamba2_chunk_scan_ref(**full)
    assert _max_rel_err(y_step, y_ref[:, 11]) <= TOLERANCES["fp32_max_abs_rel"]
    assert _max_rel_err(state, state_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_attach_is_idempotent_and_deterministic() -> None:
    once = _two_op_model().SerializeToString(deterministic=True)
    again = _two_op_model().SerializeToString(deterministic=True)
    assert once == again
    model = onnx.load_from_string(once)
    assert once == attach_functions(model).SerializeToString(deterministic=True)
    assert sorted((f.domain, f.name) for f in model.functions) == [(DOMAIN, CHUNK_SCAN), (DOMAIN, STATE_UPDATE)]
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == DOMAIN] == [(DOMAIN, DOMAIN_VERSION)]


def test_attach_replaces_stub_in_place() -> None:
    model = _build(CHUNK_SCAN)
    del model.functions[:]
    del model.opset_import[1:]

    def identity_function(domain: str, name: str) -> onnx.FunctionProto:
        body = [helper.make_node("Identity", ["x"], ["y"])]
        return helper.make_function(domain, name, ["x"], ["y"], body, [helper.make_opsetid("", 18)])

    other = identity_function("other", "Keep")
    stub = identity_function(DOMAIN, CHUNK_SCAN)
    model.functions.extend([stub, other, stub])
    attach_functions(model)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, CHUNK_SCAN), ("other", "Keep")]
    assert model.functions[0] == _scoped(chunk_scan_function(18))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18), (DOMAIN, DOMAIN_VERSION)]


def test_attached_bodies_name_their_temporaries_apart_from_the_graph() -> None:
    """TensorRT < 10.8 confuses function values with outer tensors of the same name."""
    model = _build(CHUNK_SCAN)
    function = model.functions[0]
    formal = set(function.input) | set(function.output)
    internal = {v for n in function.node for v in n.output if v not in formal}
    assert internal and all(v.startswith(f"{CHUNK_SCAN}/") for v in internal)


def test_attach_uses_model_opset() -> None:
    model = _build(STATE_UPDATE, opset=21)
    assert [(o.domain, o.version) for o in model.functions[0].opset_import] == [("", 21)]


def test_attach_leaves_models_without_hybridtrt_ops_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = model.SerializeToString(deterministic=True)
    assert attach_functions(model).SerializeToString(deterministic=True) == before


def test_attach_unknown_op_raises() -> None:
    model = _build(STATE_UPDATE)
    model.graph.node.append(helper.make_node("Mamba3Scan", ["x"], ["z"], domain=DOMAIN))
    with pytest.raises(ExportError, match="Mamba3Scan"):
        attach_functions(model)


@pytest.mark.parametrize("chunk_size", [None, 0])
def test_attach_bad_chunk_size_raises(chunk_size: int | None) -> None:
    model = _build(CHUNK_SCAN)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "chunk_size"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if chunk_size is not None:
        node.attribute.append(helper.make_attribute("chunk_size", chunk_size))
    with pytest.raises(ExportError, match="chunk_size"):
        attach_functions(model)


def test_attach_unsupported_opset_raises() -> None:
    with pytest.raises(ExportError, match="opset 17"):
        _build(CHUNK_SCAN, opset=17)


def test_inlined_and_reference_evaluator_agree() -> None:
    """Inlining (what TensorRT and graph tools do) keeps strict shape inference and the numbers;
    onnx's own reference evaluator, a second interpreter of the body, agrees too."""
    from onnx import inliner, shape_inference
    from onnx.reference import ReferenceEvaluator

    model = _build(CHUNK_SCAN, chunk_size=4)
    inlined = shape_inference.infer_shapes(inliner.inline_local_functions(model), strict_mode=True)
    onnx.checker.check_model(inlined, full_check=True)
    assert all(n.domain == "" for n in inlined.graph.node)
    inputs = _scan_inputs(2, 11, 2, seed=9)
    y_ref, final_ref = mamba2_chunk_scan_ref(**inputs)
    session = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    for y, final in (session.run(None, feeds), ReferenceEvaluator(model).run(None, feeds)):
        assert _max_rel_err(y, y_ref) <= TOLERANCES["fp32_max_abs_rel"]
        assert _max_rel_err(final, final_ref) <= TOLERANCES["fp32_max_abs_rel"]


def test_chunk_longer_than_the_sequence_is_clamped() -> None:
    """cs = min(chunk_size, L): a one-token call does one token of work, not a padded chunk."""
    fn = chunk_scan_function(18)
    mins = [n for n in fn.node if n.op_type == "Min"]
    assert len(mins) == 1 and mins[0].output[0] == "dim_cs"
