"""The MoE function bodies on ONNX Runtime vs the eager op and its `_ref` twin: the grouped (attached)
body, the dense fallback, the FP8 body, the NVFP4 body (against ModelOpt's dequantization as the
loader writes it); and that the attached bodies never touch an expert nobody chose (their work scales
with the selected experts)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hybridtrt.graphs.fp8_qdq import fp8_tensor
from hybridtrt.ops.moe import moe_experts_ref, relu2
from hybridtrt.ops.moe_onnx import (
    MOE_EXPERTS,
    MOE_EXPERTS_FP8,
    MOE_EXPERTS_FP8_INPUTS,
    MOE_EXPERTS_INPUTS,
    MOE_EXPERTS_NVFP4_INPUTS,
    moe_experts_dense_function,
    moe_experts_fp8_function,
    moe_experts_function,
    moe_experts_nvfp4_function,
)
from hybridtrt.ops.onnx_functions import DOMAIN, MAX_OPSET, attach_functions
from hybridtrt.judge.metrics import rel_l2
from tests.ops.test_moe_op import _inputs

_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int64: TensorProto.INT64, np.uint8: TensorProto.UINT8}


def _session(function: onnx.FunctionProto, inputs: dict[str, np.ndarray], opset: int) -> ort.InferenceSession:
    """A one-node model calling ``function`` (dims symbolic so nothing is specialised). float8
    arrays become initializers (ONNX Runtime takes no float8 feeds; exported FP8 weights are
    initializers too)."""
    def info(name, arr):
        return helper.make_tensor_value_info(name, _TYPES[arr.dtype.type], [f"{name}_{i}" for i in range(arr.ndim)])

    fp8 = {k: v for k, v in inputs.items() if v.dtype == ml_dtypes.float8_e4m3fn}
    feeds = {k: v for k, v in inputs.items() if k not in fp8}
    node = helper.make_node(function.name, list(inputs), ["y"], domain=DOMAIN, activation="relu2")
    graph = helper.make_graph(
        [node], "moe", [info(k, v) for k, v in feeds.items()], [info("y", inputs["x"])], [fp8_tensor(k, v) for k, v in fp8.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)], functions=[function])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(function, args, opset=18):
    feeds = {name: a.numpy() for name, a in zip(MOE_EXPERTS_INPUTS, args)}
    return _session(function, feeds, opset).run(None, feeds)[0]


CASES = {
    "decode-1tok-top6-of-128": (1, 6, 128),
    "batch3-top2-of-8": (3, 2, 8),
    "prefill-37tok-top6-of-16": (37, 6, 16),
    "k-equals-E": (5, 4, 4),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opset", [18, 22, MAX_OPSET])
def test_grouped_body_matches_ref(case, opset):
    args = _inputs(*CASES[case])
    got = _run(moe_experts_function(opset), args, opset)
    assert rel_l2(got, moe_experts_ref(*args)) <= 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_dense_fallback_matches_ref(case):
    args = _inputs(*CASES[case])
    assert rel_l2(_run(moe_experts_dense_function(18), args), moe_experts_ref(*args)) <= 1e-6


def test_skewed_routing_and_fp16():
    """Every token on the same experts (capacity = T, a single active block) and fp16 activations."""
    x, idx, w, up, down = _inputs(20, 3, 8, dtype=torch.float16)
    idx[:] = torch.tensor([5, 0, 2])
    got = _run(moe_experts_function(18), (x, idx, w, up, down))
    assert got.dtype == np.float16
    assert rel_l2(got.astype(np.float32), moe_experts_ref(x, idx, w, up, down).float()) <= 2e-3


def test_grouped_body_never_reads_unselected_experts():
    """NaN weights in every expert nobody chose leave the grouped body's output finite and equal
    (the dense fallback multiplies them and turns NaN): the work is the selected experts'."""
    x, idx, w, up, down = _inputs(4, 2, 64)
    before = _run(moe_experts_function(18), (x, idx, w, up, down))
    unused = sorted(set(range(64)) - set(idx.flatten().tolist()))
    up[unused] = float("nan")
    down[unused] = float("nan")
    after = _run(moe_experts_function(18), (x, idx, w, up, down))
    assert np.array_equal(before, after)
    assert np.isnan(_run(moe_experts_dense_function(18), (x, idx, w, up, down))).all()


def _nvfp4(e: int, o: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random NVFP4 experts as ModelOpt stores them: codes [E, O, K/2] uint8, block scales [E, O, K/16]
    float8e4m3fn (positive), global scales [E] fp32."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(e, o, k // 2), dtype=np.uint8)
    block = (rng.uniform(0.05, 2.0, size=(e, o, k // 16)).astype(np.float32)).astype(ml_dtypes.float8_e4m3fn)
    return codes, block, rng.uniform(0.01, 0.1, size=e).astype(np.float32)


def test_nvfp4_body_is_moe_experts_on_modelopts_dequantized_weights():
    """MoeExpertsNvfp4 (the checkpoint's codes and scales) = MoeExperts on the weights ModelOpt's
    dequantization gives (`hybridtrt.models.modelopt.dequantize_nvfp4`, the loader's, in x's dtype):
    bit for bit on ONNX Runtime in fp32 (the same MatMuls on the same weights), and the torch `_ref`
    twin within fp32 rounding; an expert nobody chose is never read (NaN block scales change nothing)."""
    from hybridtrt.models.modelopt import dequantize_nvfp4

    x, idx, w, _, _ = _inputs(5, 2, 16, dim=32, inter=48)
    experts, inner, dim = 16, 48, 32
    up = _nvfp4(experts, inner, dim, 1)
    down = _nvfp4(experts, dim, inner, 2)

    def weights(codes, block, glob):
        return torch.stack([dequantize_nvfp4(torch.from_numpy(codes[i]), torch.from_numpy(block[i].view(np.uint8)).view(torch.float8_e4m3fn),
                                             torch.tensor(glob[i]), 16, torch.float32) for i in range(experts)])  # fmt: skip

    up_w, down_w = weights(*up), weights(*down)
    feeds = dict(zip(MOE_EXPERTS_NVFP4_INPUTS, (x.numpy(), idx.numpy(), w.numpy(), *up, *down)))
    got = _session(moe_experts_nvfp4_function(19), feeds, 19).run(None, {k: v for k, v in feeds.items() if v.dtype != ml_dtypes.float8_e4m3fn})[0]
    plain = _run(moe_experts_function(19), (x, idx, w, up_w, down_w), 19)
    assert np.array_equal(got, plain)
    assert rel_l2(got, moe_experts_ref(x, idx, w, up_w, down_w)) <= 1e-6
    unused = sorted(set(range(experts)) - set(idx.flatten().tolist()))
    assert unused
    poisoned = {k: v.copy() for k, v in feeds.items()}
    for name in ("up_block_scale", "down_block_scale"):
        poisoned[name].view(np.uint8)[unused] = 0x7F  # float8e4m3fn NaN
    again = _session(moe_experts_nvfp4_function(19), poisoned, 19).run(None, {k: v for k, v in poisoned.items() if v.dtype != ml_dtypes.float8_e4m3fn})[0]
    assert np.array_equal(again, got)


def _fake_quant(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(v / scale, -448, 448).to(torch.float8_e4m3fn)
    return q.float() * scale


def test_fp8_body_matches_a_torch_fake_quant_reference():
    """MoeExpertsFp8 = per-expert FP8 activations and FP8 weights (per expert or per channel)."""
    x, idx, w, up, down = _inputs(11, 3, 8)
    for channel in (False, True):
        def quant(weight):
            amax = weight.abs().amax(dim=2, keepdim=True) if channel else weight.abs().amax(dim=(1, 2), keepdim=True)
            scale = amax / 448
            return (weight / scale).to(torch.float8_e4m3fn), scale[..., 0]

        up_q, up_s = quant(up)
        down_q, down_s = quant(down)
        up_in = torch.full((8,), float(x.abs().max()) / 448)
        down_in = torch.rand(8) * 0.05 + 0.01
        rows = []
        for t in range(x.shape[0]):
            acc = torch.zeros(x.shape[1])
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                h = relu2((up_q[e].float() * up_s[e][:, None]) @ _fake_quant(x[t], up_in[e]))
                acc += w[t, k] * ((down_q[e].float() * down_s[e][:, None]) @ _fake_quant(h, down_in[e]))
            rows.append(acc)
        expected = torch.stack(rows)
        feeds = dict(zip(MOE_EXPERTS_FP8_INPUTS, (x, idx, w, up_q, up_s, up_in, down_q, down_s, down_in)))
        feeds = {k: v.numpy() if v.dtype != torch.float8_e4m3fn else v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) for k, v in feeds.items()}
        session = _session(moe_experts_fp8_function(19), feeds, 19)
        got = session.run(None, {k: v for k, v in feeds.items() if v.dtype != ml_dtypes.float8_e4m3fn})[0]
        assert rel_l2(got, expected) <= 1e-5, f"channel={channel}"


def test_attach_functions_attaches_the_moe_bodies():
    node = helper.make_node(MOE_EXPERTS, list(MOE_EXPERTS_INPUTS), ["y"], domain=DOMAIN)
    node8 = helper.make_node(MOE_EXPERTS_FP8, list(MOE_EXPERTS_FP8_INPUTS), ["y8"], domain=DOMAIN)
    graph = helper.make_graph([node, node8], "g", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    attach_functions(model)
    bodies = {f.name: f for f in model.functions}
    assert set(bodies) == {MOE_EXPERTS, MOE_EXPERTS_FP8}
    assert all(f.domain == DOMAIN and [(i.domain, i.version) for i in f.opset_import] == [("", 22)] for f in bodies.values())
    assert {n.op_type for n in bodies[MOE_EXPERTS].node} >= {"TopK", "CumSum", "ScatterND", "MatMul"}
