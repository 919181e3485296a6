"""Model-local ONNX function bodies of the MoE ops, in standard ONNX, written with onnxscript.

**MoeExperts** (domain ``hybridtrt`` v1; contract in `hybridtrt.ops.moe` and DESIGN.md §5)::

    in:  0 x [T, D]   1 topk_indices [T, K] int64   2 topk_weights [T, K] fp32
         3 up_proj [E, I, D]   4 down_proj [E, D, I]          (x's dtype)
    out: 0 y [T, D] (x's dtype)
    attrs: activation="relu2", plugin_namespace="hybridtrt", plugin_version="1"

**MoeExpertsFp8** — the same op after ``hybridtrt export --quantize fp8`` (the FP8 pass replaces
the node); FP8 weights and per-expert scales go into the op, so a grouped FP8 GEMM plugin can take
it as is::

    in:  0 x [T, D]   1 topk_indices [T, K]   2 topk_weights [T, K]
         3 up_proj [E, I, D] float8e4m3fn     4 up_weight_scale [E, 1] or [E, I] fp32   5 up_input_scale [E] fp32
         6 down_proj [E, D, I] float8e4m3fn   7 down_weight_scale [E, 1] or [E, D] fp32 8 down_input_scale [E] fp32
    out: 0 y [T, D] (x's dtype)
    attrs: as MoeExperts

    up input of expert e:   fq(x_t, up_input_scale[e]);    up weight: up_proj[e] * up_weight_scale[e, :, None]
    down input of expert e: fq(relu(up_e x_t)², down_input_scale[e]); down weight likewise
    fq(v, s) = s · float8e4m3fn_saturating(v / s)   (QuantizeLinear → DequantizeLinear, zero point 0)

    Matmuls of MoeExpertsFp8 run in fp32 on the dequantized values. ONNX ``Gather`` takes no
    float8 tensor, so its body casts all E experts' weights before picking the chosen ones: the
    matmul work scales with the selected experts, that elementwise cast with E.

**MoeExpertsNvfp4** — the same op with a ModelOpt NVFP4 checkpoint's routed experts as they are
(4-bit weights, activations in x's dtype: W4A16; `hybridtrt.graphs.weight_only`). The packed codes
and scales go into the op unchanged, so a grouped NVFP4 GEMM plugin can take them as they are::

    in:  0 x [T, D]   1 topk_indices [T, K]   2 topk_weights [T, K]
         3 up_codes [E, I, D/2] uint8     4 up_block_scale [E, I, D/16] float8e4m3fn     5 up_global_scale [E] fp32
         6 down_codes [E, D, I/2] uint8   7 down_block_scale [E, D, I/16] float8e4m3fn   8 down_global_scale [E] fp32
    out: 0 y [T, D] (x's dtype)
    attrs: as MoeExperts

    codes: the checkpoint's bytes, two E2M1 values a byte along the GEMM's K, the first in the low nibble
    weight of expert e: E2M1(code) · (float(block_scale[e, o, k / 16]) · global_scale[e]) in fp32, then x's dtype

which is ModelOpt's ``NVFP4QTensor.dequantize`` (codes 0–7 and 8–15 are ±0, ±0.5, …, ±6; code 8,
"-0", dequantizes to +0 there and here), then `MoeExperts` on those weights. The codes stay ``uint8``
so the body can ``Gather`` the chosen experts before unpacking them (ONNX ``Gather`` takes no 4- or
8-bit float); the block scales are cast for all ``E`` experts first, 1/16 of the weights' count.

**Cost scales with the selected experts** (the body that is attached): pairs ``(token, k)`` are
grouped by expert with a one-hot cumulative sum; only the ``A`` experts that some token chose run,
busiest first, each on a zero-padded block of ``C = max tokens per expert`` rows::

    matmul work = A · C · I · D · 2      (dense: E · T · I · D · 2)

A decode step (``T`` = batch) computes ``≤ T·K`` experts on one row each; a prefill computes every
chosen expert on ``C ≈ T·K/E`` rows (more when routing is unbalanced; never more than dense). ``A``
and ``C`` are data-dependent sizes (TensorRT's "implicitly data-dependent shapes"); the ops are ones
the TensorRT ONNX parser lists as supported (Equal, CumSum, GatherElements, TopK, ScatterElements,
ScatterND without reduction, ReduceSum/ReduceMax, Gather, MatMul, Relu, Expand, Slice, Reshape,
Transpose, Cast). `moe_experts_dense_function` is the all-experts formulation (every expert on every
token, ``E/K`` times the work) kept as the stated fallback and for `benchmarks/moe_cpu.py`.

The shared steps (dispatch to expert blocks, weighted combine) are onnxscript functions of a private
domain that `_build` inlines, so every body is one self-contained `onnx.FunctionProto` of domain
``hybridtrt`` importing only the default domain (at the model's opset).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx.inliner
from onnx import FunctionProto, helper
from onnxscript import FLOAT, FLOAT8E4M3FN, INT64, script
from onnxscript import opset18 as op
from onnxscript import opset19 as op19  # float8 Cast with saturation
from onnxscript.values import Opset

from hybridtrt.ops.onnx_functions import DOMAIN, DOMAIN_VERSION, FUNCTION_BUILDERS, _check_opset

__all__ = [
    "MOE_EXPERTS",
    "MOE_EXPERTS_ATTRS",
    "MOE_EXPERTS_FP8",
    "MOE_EXPERTS_FP8_INPUTS",
    "MOE_EXPERTS_INPUTS",
    "MOE_EXPERTS_NVFP4",
    "MOE_EXPERTS_NVFP4_INPUTS",
    "MOE_EXPERTS_OUTPUTS",
    "moe_experts_dense_function",
    "moe_experts_fp8_function",
    "moe_experts_function",
    "moe_experts_nvfp4_function",
]

MOE_EXPERTS = "MoeExperts"
MOE_EXPERTS_FP8 = "MoeExpertsFp8"
MOE_EXPERTS_INPUTS = ("x", "topk_indices", "topk_weights", "up_proj", "down_proj")
MOE_EXPERTS_FP8_INPUTS = (
    "x",
    "topk_indices",
    "topk_weights",
    "up_proj",
    "up_weight_scale",
    "up_input_scale",
    "down_proj",
    "down_weight_scale",
    "down_input_scale",
)
MOE_EXPERTS_NVFP4 = "MoeExpertsNvfp4"
MOE_EXPERTS_NVFP4_INPUTS = (
    "x",
    "topk_indices",
    "topk_weights",
    "up_codes",
    "up_block_scale",
    "up_global_scale",
    "down_codes",
    "down_block_scale",
    "down_global_scale",
)
MOE_EXPERTS_OUTPUTS = ("y",)
MOE_EXPERTS_ATTRS = ("activation", "plugin_namespace", "plugin_version")
#: The only expert activation of Nemotron-3 (value of the ``activation`` attribute).
RELU2 = "relu2"

# Input indices of MoeExpertsFp8 (MoeExperts' are `hybridtrt.ops.moe.kIN_*`).
(
    kFP8_IN_X,
    kFP8_IN_TOPK_INDICES,
    kFP8_IN_TOPK_WEIGHTS,
    kFP8_IN_UP_PROJ,
    kFP8_IN_UP_WEIGHT_SCALE,
    kFP8_IN_UP_INPUT_SCALE,
    kFP8_IN_DOWN_PROJ,
    kFP8_IN_DOWN_WEIGHT_SCALE,
    kFP8_IN_DOWN_INPUT_SCALE,
) = range(9)

_hybridtrt = Opset(DOMAIN, DOMAIN_VERSION)
#: Helpers shared by the bodies; inlined by `_build`, never present in an exported model.
_local = Opset("hybridtrt.moe_local", 1)


@script(_local, default_opset=op)
def _Dispatch(x, topk_indices, per_expert):
    """Group the ``P = T·K`` (token, k) pairs by expert (``per_expert``: any ``[E, …]`` input).

    Returns ``blocks [A, C, D]`` (x's rows, zero-padded: block ``a`` holds the tokens of expert
    ``chosen[a]``), ``slot [P]`` (row of pair ``p`` in ``blocks`` flattened to ``[A·C, D]``) and
    ``chosen [A]`` (the experts that some token selected, busiest first).
    """
    n_experts = op.Shape(per_expert, start=0, end=1)  # [1] = E
    dim = op.Shape(x, start=1, end=2)  # [1] = D
    k = op.Shape(topk_indices, start=1, end=2)  # [1] = K
    pairs = op.ReduceProd(op.Shape(topk_indices), keepdims=1)  # [1] = T·K
    expert = op.Reshape(topk_indices, [-1])  # [P], pair p = t·K + k
    expert_col = op.Unsqueeze(expert, [1])
    one_hot = op.Cast(op.Equal(expert_col, op.Range(0, op.Squeeze(n_experts), 1)), to=FLOAT.dtype)  # [P, E]
    tokens_per_expert = op.ReduceSum(one_hot, [0], keepdims=0)  # [E], exact integers in fp32
    # Rank of each pair among the pairs of its expert (inclusive running count minus one).
    rank_in_expert = op.Sub(op.GatherElements(op.CumSum(one_hot, 0), expert_col, axis=1), 1.0)
    rank_in_expert = op.Cast(op.Reshape(rank_in_expert, [-1]), to=INT64.dtype)  # [P]
    capacity = op.Cast(op.ReduceMax(tokens_per_expert, [0], keepdims=1), to=INT64.dtype)  # [1] = C
    used = op.Cast(op.Greater(tokens_per_expert, 0.0), to=INT64.dtype)
    active = op.ReduceSum(used, [0], keepdims=1)  # [1] = A
    _, busiest_first = op.TopK(tokens_per_expert, n_experts, axis=0, largest=1, sorted=1)  # [E]
    block_of_expert = op.ScatterElements(busiest_first, busiest_first, op.Range(0, op.Squeeze(n_experts), 1), axis=0)
    slot = op.Add(op.Mul(op.Gather(block_of_expert, expert), capacity), rank_in_expert)  # [P]
    token = op.Div(op.Range(0, op.Squeeze(pairs), 1), k)  # [P] = p // K
    empty = op.Expand(op.CastLike(0.0, x), op.Concat(op.Mul(active, capacity), dim, axis=0))  # [A·C, D]
    blocks = op.ScatterND(empty, op.Unsqueeze(slot, [1]), op.Gather(x, token, axis=0))
    blocks = op.Reshape(blocks, op.Concat(active, capacity, dim, axis=0))  # [A, C, D]
    chosen = op.Slice(busiest_first, [0], active)  # [A]
    return blocks, slot, chosen


@script(_local, default_opset=op)
def _Combine(out_t, slot, topk_weights, x):
    """``out_t [A, D, C]`` (expert outputs, transposed) -> ``y [T, D]`` in x's dtype:
    ``y[t] = Σ_k w[t, k] · out[pair (t, k)]`` summed in fp32."""
    dim = op.Shape(x, start=1, end=2)
    k = op.Shape(topk_weights, start=1, end=2)
    rows = op.Reshape(op.Transpose(out_t, perm=[0, 2, 1]), op.Concat([-1], dim, axis=0))  # [A·C, D]
    per_pair = op.Cast(op.Gather(rows, slot, axis=0), to=FLOAT.dtype)  # [P, D]
    weighted = op.Mul(per_pair, op.Reshape(op.Cast(topk_weights, to=FLOAT.dtype), [-1, 1]))
    y = op.ReduceSum(op.Reshape(weighted, op.Concat([-1], k, dim, axis=0)), [1], keepdims=0)  # [T, D]
    return op.CastLike(y, x)


@script(_hybridtrt, default_opset=op)
def MoeExperts(x, topk_indices, topk_weights, up_proj, down_proj):
    blocks, slot, chosen = _Dispatch(x, topk_indices, up_proj)
    up = op.Gather(up_proj, chosen, axis=0)  # [A, I, D]
    down = op.Gather(down_proj, chosen, axis=0)  # [A, D, I]
    h = op.Relu(op.MatMul(up, op.Transpose(blocks, perm=[0, 2, 1])))  # [A, I, C]
    out_t = op.MatMul(down, op.Mul(h, h))  # [A, D, C]
    y = _Combine(out_t, slot, topk_weights, x)
    return y


@script(_hybridtrt, default_opset=op)
def MoeExpertsDense(x, topk_indices, topk_weights, up_proj, down_proj):
    h = op.Relu(op.MatMul(up_proj, op.Transpose(x, perm=[1, 0])))  # [E, I, T]: every expert, every token
    out = op.Cast(op.MatMul(down_proj, op.Mul(h, h)), to=FLOAT.dtype)  # [E, D, T]
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(up_proj, start=0, end=1), axis=0)
    gates = op.ScatterElements(op.Expand(0.0, shape), topk_indices, op.Cast(topk_weights, to=FLOAT.dtype), axis=1)  # [T, E]
    weighted = op.Mul(op.Transpose(out, perm=[2, 0, 1]), op.Unsqueeze(gates, [2]))  # [T, E, D]
    y = op.CastLike(op.ReduceSum(weighted, [1], keepdims=0), x)
    return y


@script(_local, default_opset=op19)
def _FakeQuant(v, scale):
    """``v [A, …]`` fp32 through float8e4m3fn with the per-expert ``scale [A]`` (saturating)."""
    s = op19.Reshape(scale, [-1, 1, 1])
    q = op19.Cast(op19.Div(v, s), to=FLOAT8E4M3FN.dtype, saturate=1)
    return op19.Mul(op19.Cast(q, to=FLOAT.dtype), s)


@script(_local, default_opset=op19)
def _Dequantize(w, scale, chosen):
    """Rows ``chosen`` of an FP8 ``w [E, O, N]`` times ``scale [E, 1 | O]`` -> ``[A, O, N]`` fp32.

    ONNX ``Gather`` takes no float8 tensors (no opset up to 25 lists them), so all ``E`` experts
    are cast to fp32 before the rows are picked: elementwise work ``E·O·N`` per call."""
    rows = op19.Gather(op19.Cast(w, to=FLOAT.dtype), chosen, axis=0)
    return op19.Mul(rows, op19.Unsqueeze(op19.Gather(scale, chosen, axis=0), [2]))


@script(_hybridtrt, default_opset=op19)
def MoeExpertsFp8(x, topk_indices, topk_weights, up_proj, up_weight_scale, up_input_scale, down_proj, down_weight_scale, down_input_scale):
    blocks, slot, chosen = _Dispatch(x, topk_indices, up_weight_scale)
    xq = _FakeQuant(op19.Cast(blocks, to=FLOAT.dtype), op19.Gather(up_input_scale, chosen, axis=0))  # [A, C, D]
    up = _Dequantize(up_proj, up_weight_scale, chosen)  # [A, I, D]
    h = op19.Relu(op19.MatMul(up, op19.Transpose(xq, perm=[0, 2, 1])))  # [A, I, C]
    hq = _FakeQuant(op19.Mul(h, h), op19.Gather(down_input_scale, chosen, axis=0))
    out_t = op19.MatMul(_Dequantize(down_proj, down_weight_scale, chosen), hq)  # [A, D, C]
    y = _Combine(out_t, slot, topk_weights, x)
    return y


@script(_local, default_opset=op19)
def _DequantizeNvfp4(codes, block_scale, global_scale, chosen):
    """Experts ``chosen`` of NVFP4 weights ``[E, O, N]`` (``codes [E, O, N/2]`` uint8, ``block_scale
    [E, O, N/16]`` float8e4m3fn, ``global_scale [E]``) -> ``[A, O, N]`` fp32, as ModelOpt dequantizes."""
    packed = op19.Gather(codes, chosen, axis=0)  # [A, O, N/2]
    low = op19.BitwiseAnd(packed, op19.CastLike(15, packed))
    high = op19.BitShift(packed, op19.CastLike(4, packed), direction="RIGHT")
    pairs = op19.Concat(op19.Unsqueeze(low, [3]), op19.Unsqueeze(high, [3]), axis=3)  # [A, O, N/2, 2]: element 2j, 2j+1
    # each E2M1 code's value as ModelOpt dequantizes it (code 8 is +0 there, not the ONNX table's -0)
    table = op19.Constant(value_floats=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    values = op19.Gather(table, op19.Cast(pairs, to=INT64.dtype), axis=0)
    lead = op19.Shape(packed, start=0, end=2)  # [A, O]
    blocked = op19.Reshape(values, op19.Concat(lead, [-1, 16], axis=0))  # [A, O, N/16, 16]: NVFP4's blocks of 16
    per_expert = op19.Reshape(op19.Gather(global_scale, chosen, axis=0), [-1, 1, 1])
    scale = op19.Mul(op19.Gather(op19.Cast(block_scale, to=FLOAT.dtype), chosen, axis=0), per_expert)  # [A, O, N/16]
    return op19.Reshape(op19.Mul(blocked, op19.Unsqueeze(scale, [3])), op19.Concat(lead, [-1], axis=0))


@script(_hybridtrt, default_opset=op19)
def MoeExpertsNvfp4(x, topk_indices, topk_weights, up_codes, up_block_scale, up_global_scale, down_codes, down_block_scale, down_global_scale):
    blocks, slot, chosen = _Dispatch(x, topk_indices, up_global_scale)
    up = op19.CastLike(_DequantizeNvfp4(up_codes, up_block_scale, up_global_scale, chosen), x)  # [A, I, D]
    down = op19.CastLike(_DequantizeNvfp4(down_codes, down_block_scale, down_global_scale, chosen), x)  # [A, D, I]
    h = op19.Relu(op19.MatMul(up, op19.Transpose(blocks, perm=[0, 2, 1])))  # [A, I, C]
    out_t = op19.MatMul(down, op19.Mul(h, h))  # [A, D, C]
    y = _Combine(out_t, slot, topk_weights, x)
    return y


_HELPERS = (_Dispatch, _Combine, _FakeQuant, _Dequantize, _DequantizeNvfp4)


def _build(body, name: str, inputs: tuple[str, ...], opset: int, min_opset: int, doc: str) -> FunctionProto:
    """``body`` as a self-contained `FunctionProto` named ``name`` at default-domain ``opset``.

    The private helpers are inlined (via a one-node temporary model and `onnx.inliner`); the
    attributes are declared so nodes may carry them (the body reads none of them).
    """
    _check_opset(opset)
    if opset < min_opset:
        raise AssertionError(f"{name} needs opset ≥ {min_opset}, got {opset}")
    outer = body.to_function_proto()
    used = {n.op_type for n in outer.node if n.domain == _local.domain}
    helpers = [h.to_function_proto() for h in _HELPERS if h.name in used]
    for fn in (outer, *helpers):  # one default-domain version for the inliner: the model's
        for entry in fn.opset_import:
            if entry.domain == "":
                entry.version = opset
    call = helper.make_node(outer.name, list(outer.input), list(outer.output), domain=DOMAIN)
    graph = helper.make_graph([call], "inline", [], [])
    temp = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION), helper.make_opsetid(_local.domain, 1)],
        functions=[outer, *helpers],
    )
    inlined = onnx.inliner.inline_selected_functions(temp, [(_local.domain, h.name) for h in helpers])
    function = next(f for f in inlined.functions if f.domain == DOMAIN and f.name == outer.name)
    if list(function.input) != list(inputs):
        raise AssertionError(f"{name} body inputs {list(function.input)} != contract {list(inputs)}")
    function.name = name
    del function.opset_import[:]
    function.opset_import.append(helper.make_opsetid("", opset))  # the helpers are gone
    del function.attribute[:]
    function.attribute.extend(MOE_EXPERTS_ATTRS)
    function.doc_string = doc
    return function


def moe_experts_function(opset: int = 18) -> FunctionProto:
    """Body of ``hybridtrt::MoeExperts`` (work proportional to the selected experts, see module doc)."""
    return _build(MoeExperts, MOE_EXPERTS, MOE_EXPERTS_INPUTS, opset, 18, "MoE routed experts (relu²), grouped by selected expert, in standard ONNX (hybridtrt v1). See hybridtrt/ops/moe_onnx.py.")


def moe_experts_dense_function(opset: int = 18) -> FunctionProto:
    """The all-experts fallback body of ``hybridtrt::MoeExperts``: every expert on every token
    (``E/K`` times the work of `moe_experts_function`), only static shapes."""
    return _build(MoeExpertsDense, MOE_EXPERTS, MOE_EXPERTS_INPUTS, opset, 18, "MoE routed experts (relu²), dense over all experts, in standard ONNX (hybridtrt v1). See hybridtrt/ops/moe_onnx.py.")


def moe_experts_fp8_function(opset: int = 19) -> FunctionProto:
    """Body of ``hybridtrt::MoeExpertsFp8`` (float8e4m3fn needs opset ≥ 19)."""
    return _build(MoeExpertsFp8, MOE_EXPERTS_FP8, MOE_EXPERTS_FP8_INPUTS, opset, 19, "MoE routed experts (relu²) with FP8 weights and per-expert FP8 activation scales, in standard ONNX (hybridtrt v1). See hybridtrt/ops/moe_onnx.py.")


def moe_experts_nvfp4_function(opset: int = 19) -> FunctionProto:
    """Body of ``hybridtrt::MoeExpertsNvfp4`` (float8e4m3fn block scales need opset ≥ 19)."""
    return _build(MoeExpertsNvfp4, MOE_EXPERTS_NVFP4, MOE_EXPERTS_NVFP4_INPUTS, opset, 19, "MoE routed experts (relu²) with NVFP4 weights (ModelOpt's packed codes, FP8 block scales, fp32 global scales), activations in x's dtype, in standard ONNX (hybridtrt v1). See hybridtrt/ops/moe_onnx.py.")


#: Registered with `hybridtrt.ops.onnx_functions.attach_functions` (op_type -> body builder).
BUILDERS: dict[str, Callable[[int], FunctionProto]] = {
    MOE_EXPERTS: moe_experts_function,
    MOE_EXPERTS_FP8: moe_experts_fp8_function,
    MOE_EXPERTS_NVFP4: moe_experts_nvfp4_function,
}
FUNCTION_BUILDERS.update(BUILDERS)
