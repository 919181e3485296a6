"""Pass: run float4e2m1 ``DequantizeLinear`` on an executor without it (ONNX Runtime's CPU provider
has no kernel for it: "Could not find an implementation for DequantizeLinear(24)"), bit for bit.

Pattern: a ``DequantizeLinear`` whose input[0] is a ``float4e2m1`` initializer (an NVFP4 export's
weights, `hybridtrt.graphs.weight_only`), with a per-tensor, per-axis or blocked scale, no zero
point (or an initializer of zeros) and no ``output_dtype`` other than the scale's type.

Rewrite: the initializer is read as the bytes it is (``uint8``, two codes a byte, the first in the
low nibble: onnx/docs/docs/technical/float4.md), unpacked and looked up in the E2M1 table, then
multiplied by the scale repeated over its block::

    before:  w:float4e2m1 [K, N] ─ DequantizeLinear(s [K/B, N], axis 0, block_size B) ─ y:float
    after:   w/fp4_packed:uint8 [K·N/2] ─ BitwiseAnd 15 ─┐
                                      └─ BitShift 4 ─────┴─ interleave ─ Gather(E2M1 table) ─ [K, N]
             ─ Reshape [K/B, B, N] ─ Mul(Unsqueeze(s, 1)) ─ Reshape [K, N] ─ y:float

ONNX's definition is ``y = x · x_scale`` computed in the output type, here the scale's type: the E2M1
values are exact in it, and ``Mul`` is that one multiplication, so the result is the definition's
bit for bit (tests/graphs/test_fp4_emulation.py checks it against ONNX's reference evaluator). The
initializer keeps its bytes and its external-data location (the pass reads no weights); ONNX
Runtime folds the subgraph once at session creation, into one float copy of those weights.

Pattern 2: FP4 activations (`hybridtrt.graphs.fp4_activations`): ``trt::TRT_FP4DynamicQuantize(x, s)
-> (x_fp4, x_block_scale)`` and the blocked ``DequantizeLinear(x_fp4, d)`` that reads its codes
(``d`` = the block scale's own DequantizeLinear, which ONNX Runtime runs: float8e4m3fn is supported).

Rewrite: the block scale as the definition computes it (standard ops: ``ReduceMax``, ``Cast`` to
float8e4m3fn with saturation), and the codes never materialised: the DequantizeLinear's output is
``sign(v) · e2m1(|v|) · d`` with ``v = x / d`` (``d`` 0 → 1) per block, where ``e2m1`` rounds to
nearest even on E2M1's grid with ``Round`` (half to even) at the grid's three spacings::

    e2m1(a) = Round(2a) / 2        a < 2    (0, 0.5, 1, 1.5)
              Round(a)             a < 4    (2, 3)
              min(2 Round(a/2), 6) else     (4, 6; saturating)

Each spacing's even multiples are E2M1's even codes, so the ties go where float4e2m1's round to
nearest even sends them; the products are exact in fp32. Bit for bit the chain the function body
defines under ONNX's reference evaluator (tests/graphs/test_fp4_activations.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybridtrt.graphs.fp4_activations import BLOCK, FP4_DYNAMIC_QUANTIZE, TRT_DOMAIN, block_scale_nodes, constants

#: E2M1 value of each code (sign bit 3, 2 exponent bits, 1 mantissa bit; subnormal 0.5), from the
#: ONNX spec's float4e2m1 table (onnx/docs/docs/technical/float4.md); code 8 is -0.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
PACKED_SUFFIX = "/fp4_packed"


def graph_has_fp4(model: onnx.ModelProto) -> bool:
    return any(t.data_type == TensorProto.FLOAT4E2M1 for t in model.graph.initializer) or any(
        n.domain == TRT_DOMAIN and n.op_type == FP4_DYNAMIC_QUANTIZE for n in model.graph.node
    )


def _as_packed(t: TensorProto) -> TensorProto:
    """``t`` re-typed as its bytes: ``uint8 [ceil(n/2)]``, same raw data or external location."""
    out = TensorProto()
    out.CopyFrom(t)
    out.name = t.name + PACKED_SUFFIX
    out.data_type = TensorProto.UINT8
    del out.dims[:]
    out.dims.append((int(np.prod(t.dims)) + 1) // 2)
    return out


def emulate_fp4(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose float4e2m1 DequantizeLinear nodes are computed as the module
    docstring shows. A float4e2m1 initializer read by anything else, an ``output_dtype`` other than
    the scale's type, a non-zero zero point or a partial last block are refused (ValueError)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    fp4 = {t.name: t for t in g.initializer if t.data_type == TensorProto.FLOAT4E2M1}
    if not graph_has_fp4(out):
        return out
    inits = {t.name: t for t in g.initializer}
    c = "/fp4_emulation"  # the shared constants
    table = f"{c}/e2m1_table"
    consts = [
        numpy_helper.from_array(E2M1_TABLE, table),
        numpy_helper.from_array(np.array(15, np.uint8), f"{c}/low"),
        numpy_helper.from_array(np.array(4, np.uint8), f"{c}/shift"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{c}/flat"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{c}/last_axis"),
    ] if fp4 else []  # fmt: skip
    nodes: list[onnx.NodeProto] = []
    dynamic = {n.output[0]: n for n in g.node if n.domain == TRT_DOMAIN and n.op_type == FP4_DYNAMIC_QUANTIZE}
    if dynamic:
        consts += [numpy_helper.from_array(value, name) for name, value in constants(f"{c}/").items()]
    for node in g.node:
        if node.domain == TRT_DOMAIN and node.op_type == FP4_DYNAMIC_QUANTIZE:
            nodes += _dynamic_block_scale(node, c)
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in dynamic:
            nodes += _dynamic_dequantize(node, dynamic[node.input[0]], c)
            continue
        if any(i in dynamic for i in node.input):
            raise ValueError(f"{node.name}: the codes of an FP4 dynamic quantizer read by a {node.op_type}, not a DequantizeLinear")
        if not (node.op_type == "DequantizeLinear" and node.input[0] in fp4):
            if any(i in fp4 for i in node.input):
                raise ValueError(f"{node.name}: float4e2m1 initializer read by a {node.op_type}, not a DequantizeLinear")
            nodes.append(node)
            continue
        w = fp4[node.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or any(numpy_helper.to_array(zp).astype(np.float32).reshape(-1)):
                raise ValueError(f"{node.name}: a float4e2m1 zero point other than constant zeros")
        scale = node.input[1]
        dims = list(w.dims)
        p = f"{node.name or node.output[0]}/fp4_emulation"
        n = int(np.prod(dims))
        nodes += [
            helper.make_node("BitwiseAnd", [w.name + PACKED_SUFFIX, f"{c}/low"], [f"{p}/low"]),
            helper.make_node("BitShift", [w.name + PACKED_SUFFIX, f"{c}/shift"], [f"{p}/high"], direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}/low", f"{c}/last_axis"], [f"{p}/low2"]),
            helper.make_node("Unsqueeze", [f"{p}/high", f"{c}/last_axis"], [f"{p}/high2"]),
            helper.make_node("Concat", [f"{p}/low2", f"{p}/high2"], [f"{p}/pairs"], axis=-1),
            helper.make_node("Reshape", [f"{p}/pairs", f"{c}/flat"], [f"{p}/codes_all"]),
        ]
        shape_name = f"{p}/shape"
        consts.append(numpy_helper.from_array(np.array(dims, np.int64), shape_name))
        codes = f"{p}/codes_all"
        if n % 2:
            consts += [numpy_helper.from_array(np.array([0], np.int64), f"{p}/start"), numpy_helper.from_array(np.array([n], np.int64), f"{p}/stop")]
            nodes.append(helper.make_node("Slice", [codes, f"{p}/start", f"{p}/stop"], [f"{p}/codes_n"]))
            codes = f"{p}/codes_n"
        nodes += [
            helper.make_node("Reshape", [codes, shape_name], [f"{p}/codes"]),
            helper.make_node("Cast", [f"{p}/codes"], [f"{p}/index"], to=TensorProto.INT32),
            helper.make_node("Gather", [table, f"{p}/index"], [f"{p}/values"], axis=0),
        ]
        values = f"{p}/values"
        block = attrs.get("block_size", 0)
        axis = attrs.get("axis", 1) % len(dims) if dims else 0
        if block:
            if dims[axis] % block:
                raise ValueError(f"{node.name}: axis {axis} ({dims[axis]}) is not a multiple of block_size {block}")
            blocked = dims[:axis] + [dims[axis] // block, block] + dims[axis + 1 :]
            consts += [
                numpy_helper.from_array(np.array(blocked, np.int64), f"{p}/blocked"),
                numpy_helper.from_array(np.array([axis + 1], np.int64), f"{p}/block_axis"),
            ]
            nodes += [
                helper.make_node("Reshape", [values, f"{p}/blocked"], [f"{p}/values_blocked"]),
                helper.make_node("Unsqueeze", [scale, f"{p}/block_axis"], [f"{p}/scale_blocked"]),
                helper.make_node("CastLike", [f"{p}/values_blocked", f"{p}/scale_blocked"], [f"{p}/values_typed"]),
                helper.make_node("Mul", [f"{p}/values_typed", f"{p}/scale_blocked"], [f"{p}/product"]),
                helper.make_node("Reshape", [f"{p}/product", shape_name], [node.output[0]], name=node.name),
            ]
        else:
            scaled = scale
            if scale in inits and len(inits[scale].dims) == 1 and len(dims) > 1:  # per axis
                axes = [a for a in range(len(dims)) if a != axis]
                consts.append(numpy_helper.from_array(np.array(axes, np.int64), f"{p}/axes"))
                nodes.append(helper.make_node("Unsqueeze", [scale, f"{p}/axes"], [f"{p}/scale_axis"]))
                scaled = f"{p}/scale_axis"
            nodes += [
                helper.make_node("CastLike", [values, scaled], [f"{p}/values_typed"]),
                helper.make_node("Mul", [f"{p}/values_typed", scaled], [node.output[0]], name=node.name),
            ]
        if "output_dtype" in attrs and attrs["output_dtype"] and scale in inits and attrs["output_dtype"] != inits[scale].data_type:
            raise ValueError(f"{node.name}: output_dtype {attrs['output_dtype']} differs from the scale's type")
    kept = [t for t in g.initializer if t.name not in fp4]
    del g.initializer[:]
    g.initializer.extend(kept + [_as_packed(t) for t in fp4.values()] + consts)
    del g.node[:]
    g.node.extend(nodes)
    if dynamic:  # the trt op's body (float4e2m1 QuantizeLinear) is no longer called
        functions = [f for f in out.functions if not (f.domain == TRT_DOMAIN and f.name == FP4_DYNAMIC_QUANTIZE)]
        del out.functions[:]
        out.functions.extend(functions)
        if not any(n.domain == TRT_DOMAIN for n in g.node):  # a tensor-parallel rank's DistCollective nodes keep the domain
            opsets = [o for o in out.opset_import if o.domain != TRT_DOMAIN]
            del out.opset_import[:]
            out.opset_import.extend(opsets)
    if not any(i.domain in ("", "ai.onnx") and i.version >= 18 for i in out.opset_import):
        raise ValueError("the fp4 emulation needs default-domain opset ≥ 18 (BitwiseAnd)")
    return out


def _dynamic_block_scale(node: onnx.NodeProto, c: str) -> list[onnx.NodeProto]:
    """The trt op's ``x_block_scale`` (float8e4m3fn ``[..., K/16]``) and ``{p}/blocks`` (x in fp32,
    ``[..., K/16, 16]``) for its DequantizeLinear, as the definition computes them; its codes are not."""
    p = f"{node.name or node.output[0]}/fp4_emulation/"
    return block_scale_nodes(node.input[0], node.input[1], node.output[1], prefix=p, constant=f"{c}/", name=node.name)


def _dynamic_dequantize(dq: onnx.NodeProto, quantizer: onnx.NodeProto, c: str) -> list[onnx.NodeProto]:
    """``dq`` (DequantizeLinear of the trt op's codes by ``d``) as ``sign(v) · e2m1(|v|) · d``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    if attrs.get("block_size") != BLOCK or attrs.get("axis", 1) != -1 or (len(dq.input) > 2 and dq.input[2]):
        raise ValueError(f"{dq.name}: the FP4 dynamic quantizer's codes dequantized other than along the last axis in blocks of {BLOCK} without a zero point")
    q = f"{quantizer.name or quantizer.output[0]}/fp4_emulation"
    p = f"{dq.name or dq.output[0]}/fp4_emulation"
    return [
        helper.make_node("Unsqueeze", [dq.input[1], f"{c}/last"], [f"{p}/d"]),
        helper.make_node("Equal", [f"{p}/d", f"{c}/zero"], [f"{p}/underflow"]),
        helper.make_node("Where", [f"{p}/underflow", f"{c}/one", f"{p}/d"], [f"{p}/divisor"]),
        helper.make_node("Div", [f"{q}/blocks", f"{p}/divisor"], [f"{p}/v"]),
        helper.make_node("Abs", [f"{p}/v"], [f"{p}/a"]),
        helper.make_node("Sign", [f"{p}/v"], [f"{p}/sign"]),
        # spacing 0.5 below 2
        helper.make_node("Mul", [f"{p}/a", f"{c}/two"], [f"{p}/a2"]),
        helper.make_node("Round", [f"{p}/a2"], [f"{p}/r2"]),
        helper.make_node("Mul", [f"{p}/r2", f"{c}/half"], [f"{p}/fine"]),
        # spacing 1 below 4
        helper.make_node("Round", [f"{p}/a"], [f"{p}/mid"]),
        # spacing 2 from 4, saturating at 6
        helper.make_node("Mul", [f"{p}/a", f"{c}/half"], [f"{p}/a_half"]),
        helper.make_node("Round", [f"{p}/a_half"], [f"{p}/r_half"]),
        helper.make_node("Mul", [f"{p}/r_half", f"{c}/two"], [f"{p}/coarse_unsat"]),
        helper.make_node("Min", [f"{p}/coarse_unsat", f"{c}/six"], [f"{p}/coarse"]),
        helper.make_node("Less", [f"{p}/a", f"{c}/two"], [f"{p}/is_fine"]),
        helper.make_node("Less", [f"{p}/a", f"{c}/four"], [f"{p}/is_mid"]),
        helper.make_node("Where", [f"{p}/is_mid", f"{p}/mid", f"{p}/coarse"], [f"{p}/upper"]),
        helper.make_node("Where", [f"{p}/is_fine", f"{p}/fine", f"{p}/upper"], [f"{p}/magnitude"]),
        helper.make_node("Mul", [f"{p}/sign", f"{p}/magnitude"], [f"{p}/code_value"]),
        helper.make_node("Mul", [f"{p}/code_value", f"{p}/d"], [f"{p}/product"]),
        helper.make_node("Shape", [f"{q}/xf"], [f"{p}/shape"]),
        helper.make_node("Reshape", [f"{p}/product", f"{p}/shape"], [dq.output[0]], name=dq.name),
    ]


__all__ = ["E2M1_TABLE", "emulate_fp4", "graph_has_fp4"]
