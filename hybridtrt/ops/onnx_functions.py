"""Model-local ONNX function bodies for the ``hybridtrt`` custom ops, in pure standard ONNX.

Every exported model carries these `onnx.FunctionProto` bodies (DESIGN.md §5, form 2), so stock
ONNX Runtime, ``polygraphy run --onnxrt`` and TensorRT without the plugin library run the graph as
is. With the plugin loaded, the TensorRT parser prefers the plugin because the node carries
``plugin_namespace``.

Op contract (domain ``hybridtrt``, version 1; accumulation in fp32; heads ``h`` read group
``h // (H // G)``; ``dt`` is the final step size, ``dt = 0`` at padded positions):

    s_t = exp(dt_t * A) * s_{t-1} + dt_t * (x_t ⊗ B_t)
    y_t = s_t · C_t + D * x_t

**Mamba2ChunkScan** (prefill, any ``L >= 1``)

    ====  ===============  ==================  ==========================================
    idx   input            shape               dtype
    ====  ===============  ==================  ==========================================
    0     x                [B, L, H, P]        fp32 | fp16 | bf16
    1     dt               [B, L, H]           any float
    2     A                [H]                 fp32 (negative)
    3     B                [B, L, G, N]        any float
    4     C                [B, L, G, N]        any float
    5     D                [H]                 fp32
    6     initial_state    [B, H, P, N]        fp32 | fp16 | bf16
    ====  ===============  ==================  ==========================================

    outputs: 0 ``y [B, L, H, P]`` (x's dtype), 1 ``final_state [B, H, P, N]`` (initial_state's
    dtype). Attributes: ``chunk_size`` (int, required, >= 1), ``plugin_namespace`` (string),
    ``plugin_version`` (string). The body is the chunked SSD of Mamba-2: ``L`` is zero-padded to a
    multiple of ``chunk_size`` inside the body (exact, since ``dt = 0`` there), decays within a
    chunk come from a masked-cumsum segment sum (never an ``exp`` of a positive number), and the
    upper triangle is zeroed with ``Where`` after the ``Exp`` (no ``-inf`` constants).

**Mamba2StateUpdate** (decode, one token)

    inputs: 0 ``x [B, H, P]``, 1 ``dt [B, H]``, 2 ``A [H]``, 3 ``B [B, G, N]``, 4 ``C [B, G, N]``,
    5 ``D [H]``, 6 ``state [B, H, P, N]``; outputs: 0 ``y [B, H, P]`` (x's dtype), 1 ``new_state
    [B, H, P, N]`` (state's dtype). Attributes: ``plugin_namespace``, ``plugin_version``.

All dimensions are dynamic. Bodies use only default-domain ops that TensorRT's ONNX parser
supports (Shape, Gather, Concat, Reshape, Transpose, Pad, Slice, Unsqueeze, Range, CumSum, Where,
Greater, GreaterOrEqual, Exp, Mul, Add, Sub, Div, Min, MatMul, Cast, CastLike, Constant); no Einsum, no
contrib ops, no loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from hybridtrt.errors import ExportError

__all__ = [
    "CHUNK_SCAN",
    "DOMAIN",
    "DOMAIN_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "STATE_UPDATE",
    "attach_functions",
    "chunk_scan_function",
    "state_update_function",
]

DOMAIN = "hybridtrt"
DOMAIN_VERSION = 1
CHUNK_SCAN = "Mamba2ChunkScan"
STATE_UPDATE = "Mamba2StateUpdate"

#: Default-domain opsets the bodies are built for (CastLike needs 15; Pad/Slice/Squeeze/Unsqueeze
#: take tensor inputs from 13; 18 is the oldest tested; ONNX Runtime 1.32 also ran 24 and 25).
MIN_OPSET = 18
MAX_OPSET = onnx.defs.onnx_opset_version()

# Input / output indices (mirrored in the TensorRT plugin headers).
kIN_X, kIN_DT, kIN_A, kIN_B, kIN_C, kIN_D, kIN_STATE = range(7)
kOUT_Y, kOUT_STATE = range(2)

CHUNK_SCAN_INPUTS = ("x", "dt", "A", "B", "C", "D", "initial_state")
CHUNK_SCAN_OUTPUTS = ("y", "final_state")
CHUNK_SCAN_ATTRS = ("chunk_size", "plugin_namespace", "plugin_version")
STATE_UPDATE_INPUTS = ("x", "dt", "A", "B", "C", "D", "state")
STATE_UPDATE_OUTPUTS = ("y", "new_state")
STATE_UPDATE_ATTRS = ("plugin_namespace", "plugin_version")

_INT64_MAX = np.iinfo(np.int64).max


class _Body:
    """Small node emitter for a function body: deterministic names, one node per call.

    Args:
        prefix: Node-name prefix, e.g. ``"Mamba2ChunkScan"``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[NodeProto] = []
        self._names: set[str] = set()

    def op(self, op_type: str, inputs: Sequence[str], out: str, **attrs: object) -> str:
        """Emit ``out = op_type(*inputs, **attrs)`` and return ``out``."""
        if out in self._names:
            raise AssertionError(f"duplicate value name {out!r} in {self.prefix} body")
        self._names.add(out)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=f"/{self.prefix}/{out}/{op_type}", **attrs)
        )
        return out

    def const(self, out: str, value: np.ndarray) -> str:
        """Emit a ``Constant`` holding ``value``."""
        return self.op("Constant", [], out, value=numpy_helper.from_array(np.asarray(value), name=out))

    def const_from_attr(self, out: str, attr: str) -> str:
        """Emit ``Constant(value_int=<ref to the function attribute attr>)``: an int64 scalar."""
        self.op("Constant", [], out)
        ref = AttributeProto()
        ref.name = "value_int"
        ref.type = AttributeProto.INT
        ref.ref_attr_name = attr
        self.nodes[-1].attribute.append(ref)
        return out

    def dims(self, shape: str, indices: Sequence[int], out: str) -> str:
        """``Shape`` entries ``indices`` of a shape tensor as an int64 ``[len(indices)]`` tensor."""
        idx = self.const(f"{out}_idx", np.array(indices, dtype=np.int64))
        return self.op("Gather", [shape, idx], out, axis=0)

    def segment_decay(self, a: str, length: str, out: str) -> str:
        """``exp(segment_sum(a))`` with the upper triangle set to zero.

        Args:
            a: ``[..., T]`` fp32, non-positive (``dt * A``).
            length: int64 ``[1]`` tensor holding ``T``.
            out: Output value name.

        Returns:
            ``[..., T, T]`` with ``out[..., i, j] = exp(sum(a[..., j+1 : i+1]))`` for ``i >= j``
            and ``0`` above the diagonal. The sum is a cumsum of ``a`` masked to ``i > j`` (no
            difference of large cumsums); above the diagonal it is ``0`` before the ``Exp`` and
            replaced by ``0`` after it, so nothing overflows and no ``-inf`` constant is needed.
        """
        zero_i = self.const(f"{out}_zero_i64", np.array(0, dtype=np.int64))
        one_i = self.const(f"{out}_one_i64", np.array(1, dtype=np.int64))
        zero_f = self.const(f"{out}_zero_f32", np.array(0.0, dtype=np.float32))
        axis0 = self.const(f"{out}_axis_0", np.array([0], dtype=np.int64))
        length_s = self.op("Squeeze", [length, axis0], f"{out}_len")
        idx = self.op("Range", [zero_i, length_s, one_i], f"{out}_range")  # [T]
        axis_col = self.const(f"{out}_axis_col", np.array([1], dtype=np.int64))
        rows = self.op("Unsqueeze", [idx, axis_col], f"{out}_rows")  # [T, 1]: i
        cols = self.op("Unsqueeze", [idx, axis0], f"{out}_cols")  # [1, T]: j
        strict = self.op("Greater", [rows, cols], f"{out}_strict")  # [T, T]: i > j
        lower = self.op("GreaterOrEqual", [rows, cols], f"{out}_lower")  # [T, T]: i >= j
        last = self.const(f"{out}_axis_last", np.array([-1], dtype=np.int64))
        a_i = self.op("Unsqueeze", [a, last], f"{out}_a_i")  # [..., T, 1]: a_i
        masked = self.op("Where", [strict, a_i, zero_f], f"{out}_masked")  # [..., T, T]
        axis_i = self.const(f"{out}_axis_i", np.array(-2, dtype=np.int64))
        seg = self.op("CumSum", [masked, axis_i], f"{out}_segsum")
        decay = self.op("Exp", [seg], f"{out}_exp")
        return self.op("Where", [lower, decay, zero_f], out)


def _function(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    attributes: Sequence[str],
    body: _Body,
    opset: int,
    doc: str,
) -> FunctionProto:
    """Wrap emitted nodes in a `FunctionProto` of domain `DOMAIN` importing the default domain."""
    _check_opset(opset)
    return helper.make_function(
        DOMAIN,
        name,
        list(inputs),
        list(outputs),
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(attributes),
        doc_string=doc,
    )


def _check_opset(opset: int) -> None:
    """Refuse a default-domain opset outside `MIN_OPSET`..`MAX_OPSET`."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"default-domain opset {opset} is outside what the hybridtrt function bodies support "
            f"({MIN_OPSET}..{MAX_OPSET})",
            fix=f"export with an opset between {MIN_OPSET} and {MAX_OPSET} (e.g. --opset {MIN_OPSET})",
        )


def chunk_scan_function(opset: int = 18) -> FunctionProto:
    """Body of ``hybridtrt::Mamba2ChunkScan`` as a model-local function (chunked SSD, fp32 math).

    Inputs ``x [B,L,H,P]``, ``dt [B,L,H]``, ``A [H]``, ``B [B,L,G,N]``, ``C [B,L,G,N]``, ``D [H]``,
    ``initial_state [B,H,P,N]``; outputs ``y [B,L,H,P]`` (x's dtype) and ``final_state [B,H,P,N]``
    (initial_state's dtype). ``chunk_size`` is read through an attribute reference. Internally heads
    are split as ``H = G * R`` and tensors are laid out ``[B, G, R, nc, cs, ...]`` (``nc`` chunks of
    ``cs = chunk_size``), so ``B``/``C`` are never repeated per head.

    Args:
        opset: Default-domain opset of the body (the model's).

    Returns:
        The `FunctionProto` (domain ``hybridtrt``, name ``Mamba2ChunkScan``).
    """
    f = _Body(CHUNK_SCAN)
    fp32 = TensorProto.FLOAT
    x, dt, A, B, C, D, s0 = (f.op("Cast", [n], f"{n}_f32", to=fp32) for n in CHUNK_SCAN_INPUTS)

    # Sizes: b, L, H, P from x; G, N from B; R = H / G; cs; nc = ceil(L / cs); pad = nc * cs - L.
    shape_x = f.op("Shape", ["x"], "shape_x")
    shape_b = f.op("Shape", ["B"], "shape_B")
    d_b = f.dims(shape_x, [0], "dim_batch")
    d_l = f.dims(shape_x, [1], "dim_L")
    d_h = f.dims(shape_x, [2], "dim_H")
    d_p = f.dims(shape_x, [3], "dim_P")
    d_g = f.dims(shape_b, [2], "dim_G")
    d_n = f.dims(shape_b, [3], "dim_N")
    d_r = f.op("Div", [d_h, d_g], "dim_R")
    cs_scalar = f.const_from_attr("chunk_size_scalar", "chunk_size")
    axis0 = f.const("axis_0", np.array([0], dtype=np.int64))
    # A chunk longer than L only adds padded work (L = 1 on the unified graph's decode step would
    # otherwise compute a full chunk): cs = min(chunk_size, L). Same math, any chunk length.
    d_cs_attr = f.op("Unsqueeze", [cs_scalar, axis0], "dim_cs_attr")
    d_cs = f.op("Min", [d_cs_attr, d_l], "dim_cs")
    one = f.const("one_i64", np.array([1], dtype=np.int64))
    cs_m1 = f.op("Sub", [d_cs, one], "cs_minus_1")
    l_up = f.op("Add", [d_l, cs_m1], "L_plus_cs_minus_1")
    d_nc = f.op("Div", [l_up, d_cs], "dim_nc")
    d_lp = f.op("Mul", [d_nc, d_cs], "dim_L_padded")
    d_pad = f.op("Sub", [d_lp, d_l], "dim_pad")
    d_nc1 = f.op("Add", [d_nc, one], "dim_nc_plus_1")
    d_pn = f.op("Mul", [d_p, d_n], "dim_PN")

    # Zero-pad L (axis 1) to nc * cs: exact, a padded step has dt = x = B = C = 0.
    z1 = f.const("pads_zero_1", np.zeros(1, dtype=np.int64))
    z2 = f.const("pads_zero_2", np.zeros(2, dtype=np.int64))
    pads4 = f.op("Concat", [z1, z1, z2, z1, d_pad, z2], "pads_rank4", axis=0)
    pads3 = f.op("Concat", [z1, z1, z1, z1, d_pad, z1], "pads_rank3", axis=0)
    x_p = f.op("Pad", [x, pads4], "x_padded")
    dt_p = f.op("Pad", [dt, pads3], "dt_padded")
    b_p = f.op("Pad", [B, pads4], "B_padded")
    c_p = f.op("Pad", [C, pads4], "C_padded")

    # To chunks: x -> [b, G, R, nc, cs, P], dt -> [b, G, R, nc, cs], B/C -> [b, G, 1, nc, cs, N].
    shp = f.op("Concat", [d_b, d_nc, d_cs, d_g, d_r, d_p], "shape_x_chunks", axis=0)
    x_c = f.op("Transpose", [f.op("Reshape", [x_p, shp], "x_chunks_blhp")], "x_chunks", perm=[0, 3, 4, 1, 2, 5])
    shp = f.op("Concat", [d_b, d_nc, d_cs, d_g, d_r], "shape_dt_chunks", axis=0)
    dt_c = f.op("Transpose", [f.op("Reshape", [dt_p, shp], "dt_chunks_blh")], "dt_chunks", perm=[0, 3, 4, 1, 2])
    shp = f.op("Concat", [d_b, d_nc, d_cs, d_g, one, d_n], "shape_BC_chunks", axis=0)
    b_c = f.op("Transpose", [f.op("Reshape", [b_p, shp], "B_chunks_blgn")], "B_chunks", perm=[0, 3, 4, 1, 2, 5])
    c_c = f.op("Transpose", [f.op("Reshape", [c_p, shp], "C_chunks_blgn")], "C_chunks", perm=[0, 3, 4, 1, 2, 5])
    shp = f.op("Concat", [d_g, d_r, one, one], "shape_A_groups", axis=0)
    a_gr = f.op("Reshape", [A, shp], "A_groups")  # [G, R, 1, 1]

    a = f.op("Mul", [dt_c, a_gr], "a")  # [b, G, R, nc, cs], <= 0
    last = f.const("axis_last", np.array([-1], dtype=np.int64))
    x_dt = f.op("Mul", [x_c, f.op("Unsqueeze", [dt_c, last], "dt_chunks_col")], "x_dt")  # [b,G,R,nc,cs,P]
    axis_last_scalar = f.const("axis_last_scalar", np.array(-1, dtype=np.int64))
    a_cum = f.op("CumSum", [a, axis_last_scalar], "a_cumsum")  # [b, G, R, nc, cs]

    # 1. Within each chunk: (C_l · B_s) * exp(segsum) @ x_dt.
    decay = f.segment_decay(a, d_cs, "decay_in_chunk")  # [b, G, R, nc, cs(l), cs(s)]
    b_t = f.op("Transpose", [b_c], "B_chunks_T", perm=[0, 1, 2, 3, 5, 4])  # [b, G, 1, nc, N, cs]
    cb = f.op("MatMul", [c_c, b_t], "CB")  # [b, G, 1, nc, cs, cs]
    scores = f.op("Mul", [cb, decay], "scores")
    y_diag = f.op("MatMul", [scores, x_dt], "y_diag")  # [b, G, R, nc, cs, P]

    # 2. Each chunk's state at its end: sum_l exp(segsum[last, l]) * x_dt[l] ⊗ B[l].
    start_last = f.const("slice_last_start", np.array([-1], dtype=np.int64))
    end_max = f.const("slice_end_max", np.array([_INT64_MAX], dtype=np.int64))
    axis_m2 = f.const("axis_minus_2", np.array([-2], dtype=np.int64))
    to_end = f.op("Slice", [decay, start_last, end_max, axis_m2], "decay_to_end")  # [b,G,R,nc,1,cs]
    x_dt_t = f.op("Transpose", [x_dt], "x_dt_T", perm=[0, 1, 2, 3, 5, 4])  # [b, G, R, nc, P, cs]
    weighted = f.op("Mul", [x_dt_t, to_end], "x_dt_T_decayed")
    chunk_states = f.op("MatMul", [weighted, b_c], "chunk_states")  # [b, G, R, nc, P, N]

    # 3. Carry states across chunks: [initial, chunk_0..] -> start state of every chunk and final.
    shp = f.op("Concat", [d_b, d_g, d_r, one, d_pn], "shape_state_flat_1", axis=0)
    s0_flat = f.op("Reshape", [s0, shp], "initial_state_flat")  # [b, G, R, 1, PN]
    shp = f.op("Concat", [d_b, d_g, d_r, d_nc, d_pn], "shape_state_flat", axis=0)
    cs_flat = f.op("Reshape", [chunk_states, shp], "chunk_states_flat")  # [b, G, R, nc, PN]
    states = f.op("Concat", [s0_flat, cs_flat], "states", axis=3)  # [b, G, R, nc+1, PN]
    a_last = f.op("Slice", [a_cum, start_last, end_max, last], "a_chunk_total")  # [b,G,R,nc,1]
    sq_last = f.op("Squeeze", [a_last, last], "a_chunk_total_sq")  # [b, G, R, nc]
    pads_front = f.const("pads_chunk_front", np.array([0, 0, 0, 1, 0, 0, 0, 0], dtype=np.int64))
    a_chunks = f.op("Pad", [sq_last, pads_front], "a_chunk_total_padded")  # [b, G, R, nc+1]
    chunk_decay = f.segment_decay(a_chunks, d_nc1, "decay_across_chunks")  # [b,G,R,nc+1,nc+1]
    carried = f.op("MatMul", [chunk_decay, states], "states_carried")  # [b, G, R, nc+1, PN]
    zero = f.const("zero_i64", np.array([0], dtype=np.int64))
    start_flat = f.op("Slice", [carried, zero, d_nc, f.const("axis_3", np.array([3], dtype=np.int64))], "start_flat")
    shp = f.op("Concat", [d_b, d_g, d_r, d_nc, d_p, d_n], "shape_start_states", axis=0)
    start = f.op("Reshape", [start_flat, shp], "start_states")  # [b, G, R, nc, P, N]
    final_flat = f.op("Gather", [carried, f.op("Squeeze", [d_nc, axis0], "nc_scalar")], "final_flat", axis=3)
    shp = f.op("Concat", [d_b, d_h, d_p, d_n], "shape_state", axis=0)
    final = f.op("Reshape", [final_flat, shp], "final_state_f32")  # [b, H, P, N]

    # 4. What each position reads from its chunk's start state: exp(a_cum_l) * C_l · s_start.
    start_t = f.op("Transpose", [start], "start_states_T", perm=[0, 1, 2, 3, 5, 4])  # [b,G,R,nc,N,P]
    c_s = f.op("MatMul", [c_c, start_t], "C_start")  # [b, G, R, nc, cs, P]
    decay_in = f.op("Unsqueeze", [f.op("Exp", [a_cum], "decay_from_start"), last], "decay_from_start_col")
    y_off = f.op("Mul", [c_s, decay_in], "y_off")

    # Back to [b, L, H, P], plus the D skip.
    y_sum = f.op("Add", [y_diag, y_off], "y_chunks")
    y_t = f.op("Transpose", [y_sum], "y_chunks_T", perm=[0, 3, 4, 1, 2, 5])  # [b, nc, cs, G, R, P]
    shp = f.op("Concat", [d_b, d_lp, d_h, d_p], "shape_y_padded", axis=0)
    y_p = f.op("Reshape", [y_t, shp], "y_padded")
    axis1 = f.const("axis_1", np.array([1], dtype=np.int64))
    y_ssm = f.op("Slice", [y_p, zero, d_l, axis1], "y_ssm")  # [b, L, H, P]
    d_col = f.op("Unsqueeze", [D, last], "D_col")  # [H, 1]
    y = f.op("Add", [y_ssm, f.op("Mul", [x, d_col], "D_x")], "y_f32")
    f.op("CastLike", [y, "x"], "y")
    f.op("CastLike", [final, "initial_state"], "final_state")
    return _function(
        CHUNK_SCAN,
        CHUNK_SCAN_INPUTS,
        CHUNK_SCAN_OUTPUTS,
        CHUNK_SCAN_ATTRS,
        f,
        opset,
        "Mamba-2 chunked SSD scan in standard ONNX (hybridtrt v1). See hybridtrt/ops/onnx_functions.py.",
    )


def state_update_function(opset: int = 18) -> FunctionProto:
    """Body of ``hybridtrt::Mamba2StateUpdate`` as a model-local function (fp32 math).

    Inputs ``x [B,H,P]``, ``dt [B,H]``, ``A [H]``, ``B [B,G,N]``, ``C [B,G,N]``, ``D [H]``,
    ``state [B,H,P,N]``; outputs ``y [B,H,P]`` (x's dtype) and ``new_state [B,H,P,N]`` (state's
    dtype). Heads are split as ``H = G * R`` so ``B``/``C`` broadcast over the ``R`` heads of a group.

    Args:
        opset: Default-domain opset of the body (the model's).

    Returns:
        The `FunctionProto` (domain ``hybridtrt``, name ``Mamba2StateUpdate``).
    """
    f = _Body(STATE_UPDATE)
    fp32 = TensorProto.FLOAT
    x, dt, A, B, C, D, s = (f.op("Cast", [n], f"{n}_f32", to=fp32) for n in STATE_UPDATE_INPUTS)

    shape_x = f.op("Shape", ["x"], "shape_x")
    shape_b = f.op("Shape", ["B"], "shape_B")
    d_b = f.dims(shape_x, [0], "dim_batch")
    d_h = f.dims(shape_x, [1], "dim_H")
    d_p = f.dims(shape_x, [2], "dim_P")
    d_g = f.dims(shape_b, [1], "dim_G")
    d_n = f.dims(shape_b, [2], "dim_N")
    d_r = f.op("Div", [d_h, d_g], "dim_R")
    one = f.const("one_i64", np.array([1], dtype=np.int64))

    x_g = f.op("Reshape", [x, f.op("Concat", [d_b, d_g, d_r, d_p, one], "shape_x_g", axis=0)], "x_g")
    dt_g = f.op("Reshape", [dt, f.op("Concat", [d_b, d_g, d_r, one, one], "shape_dt_g", axis=0)], "dt_g")
    a_g = f.op("Reshape", [A, f.op("Concat", [d_g, d_r, one, one], "shape_A_g", axis=0)], "A_g")
    b_g = f.op("Reshape", [B, f.op("Concat", [d_b, d_g, one, one, d_n], "shape_B_g", axis=0)], "B_g")
    c_g = f.op("Reshape", [C, f.op("Concat", [d_b, d_g, one, d_n, one], "shape_C_g", axis=0)], "C_g")
    shp_s = f.op("Concat", [d_b, d_g, d_r, d_p, d_n], "shape_state_g", axis=0)
    s_g = f.op("Reshape", [s, shp_s], "state_g")  # [b, G, R, P, N]

    decay = f.op("Exp", [f.op("Mul", [dt_g, a_g], "a")], "decay")  # [b, G, R, 1, 1]
    x_dt = f.op("Mul", [x_g, dt_g], "x_dt")  # [b, G, R, P, 1]
    new = f.op(
        "Add",
        [f.op("Mul", [s_g, decay], "state_decayed"), f.op("Mul", [x_dt, b_g], "x_dt_B")],
        "new_state_g",
    )  # [b, G, R, P, N]
    y_ssm = f.op("MatMul", [new, c_g], "y_ssm_g")  # [b, G, R, P, 1]
    shp_y = f.op("Concat", [d_b, d_h, d_p], "shape_y", axis=0)
    y_ssm = f.op("Reshape", [y_ssm, shp_y], "y_ssm")  # [b, H, P]
    d_col = f.op("Unsqueeze", [D, f.const("axis_last", np.array([-1], dtype=np.int64))], "D_col")
    y = f.op("Add", [y_ssm, f.op("Mul", [x, d_col], "D_x")], "y_f32")
    shp_s = f.op("Concat", [d_b, d_h, d_p, d_n], "shape_state", axis=0)
    new_flat = f.op("Reshape", [new, shp_s], "new_state_f32")
    f.op("CastLike", [y, "x"], "y")
    f.op("CastLike", [new_flat, "state"], "new_state")
    return _function(
        STATE_UPDATE,
        STATE_UPDATE_INPUTS,
        STATE_UPDATE_OUTPUTS,
        STATE_UPDATE_ATTRS,
        f,
        opset,
        "Mamba-2 one-token state update in standard ONNX (hybridtrt v1). See hybridtrt/ops/onnx_functions.py.",
    )


#: op_type -> body builder (a registry, not an if/elif chain).
FUNCTION_BUILDERS: dict[str, Callable[[int], FunctionProto]] = {CHUNK_SCAN: chunk_scan_function, STATE_UPDATE: state_update_function}


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[NodeProto]:
    """All nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies), in file order."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk_nodes(g)


def _default_opset(model: ModelProto) -> int:
    """The model's default-domain opset version; refuse a model that imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ExportError(
        "the model imports no default-domain ('' / ai.onnx) opset, so the hybridtrt function bodies "
        "cannot pick one",
        fix=f"add opset_import {{domain: '', version: {MIN_OPSET}}} (or export with an explicit opset)",
    )


def _check_node(node: NodeProto) -> None:
    """Refuse a hybridtrt node whose op is unknown or whose ``chunk_size`` is missing or < 1."""
    label = node.name or node.op_type
    if node.op_type not in FUNCTION_BUILDERS:
        raise ExportError(
            f"unknown op {DOMAIN}::{node.op_type} in node {label!r}",
            fix=f"the {DOMAIN} domain (version {DOMAIN_VERSION}) defines only {sorted(FUNCTION_BUILDERS)}; "
            "re-export with this version of hybridtrt",
        )
    if node.op_type == CHUNK_SCAN:
        attrs = {a.name: a for a in node.attribute}
        chunk = attrs.get("chunk_size")
        if chunk is None or chunk.type != AttributeProto.INT or chunk.i < 1:
            got = "missing" if chunk is None else helper.get_attribute_value(chunk)
            raise ExportError(
                f"node {label!r} ({DOMAIN}::{CHUNK_SCAN}) needs an int attribute chunk_size >= 1, got {got!r}",
                fix="set chunk_size from the model config (Nemotron-H: chunk_size, e.g. 128)",
            )


def _scoped(function: FunctionProto) -> FunctionProto:
    """Prefix the function's internal value names with ``<op_type>/``.

    Generated bodies name temporaries ``tmp``, ``tmp_1``…, and so may the calling graph: TensorRT's
    parser before 10.8 confuses a function-internal value with an outer tensor of the same name
    (hybridtrt.engine.trt_rules). Formal inputs and outputs keep their names.
    """
    formal = set(function.input) | set(function.output) | {""}
    rename = {v: f"{function.name}/{v}" for n in function.node for v in (*n.input, *n.output) if v not in formal}
    for node in function.node:
        node.input[:] = [rename.get(v, v) for v in node.input]
        node.output[:] = [rename.get(v, v) for v in node.output]
    return function


def attach_functions(model: ModelProto) -> ModelProto:
    """Attach the standard-ONNX bodies of every ``hybridtrt`` op the main graph uses.

    Modifies ``model`` in place (no copy of possibly large initializers) and returns it. Each used
    op gets exactly one `FunctionProto`, built at the model's default-domain opset; an existing
    function of the same domain/name (e.g. an exporter stub) is replaced where it stands, new ones
    are appended in op-name order, so the call is idempotent and deterministic. The model's
    ``opset_import`` gains ``hybridtrt`` version `DOMAIN_VERSION` when it uses a hybridtrt op and
    lacks the import. A model without hybridtrt ops is returned unchanged.

    Args:
        model: The exported model.

    Returns:
        ``model``.

    Raises:
        ExportError: an unknown ``hybridtrt`` op, a ``Mamba2ChunkScan`` without a valid
            ``chunk_size``, a different ``hybridtrt`` domain version, or an unsupported opset.
    """
    used: set[str] = set()
    for node in _walk_nodes(model.graph):
        if node.domain == DOMAIN:
            _check_node(node)
            used.add(node.op_type)

    domain_entries = [e for e in model.opset_import if e.domain == DOMAIN]
    if any(e.version != DOMAIN_VERSION for e in domain_entries):
        raise ExportError(
            f"the model imports domain {DOMAIN!r} at version {[e.version for e in domain_entries]}, "
            f"but these function bodies implement version {DOMAIN_VERSION}",
            fix=f"re-export with opset_import {{domain: {DOMAIN!r}, version: {DOMAIN_VERSION}}}",
        )
    if not used:
        return model
    opset = _default_opset(model)
    if not domain_entries:
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))

    for op_type in sorted(used):
        function = _scoped(FUNCTION_BUILDERS[op_type](opset))
        matches = [i for i, fn in enumerate(model.functions) if fn.domain == DOMAIN and fn.name == op_type]
        if matches:
            model.functions[matches[0]].CopyFrom(function)
            for i in reversed(matches[1:]):
                del model.functions[i]
        else:
            model.functions.append(function)
    return model


# The MoE bodies (hybridtrt/ops/moe_onnx.py) add themselves to FUNCTION_BUILDERS; imported last
# because that module imports this one.
import hybridtrt.ops.moe_onnx  # noqa: E402,F401
