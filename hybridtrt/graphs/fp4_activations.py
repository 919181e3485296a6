"""Pass: FP4 activations for a Blackwell target (NVFP4 W4A4, ``export --fp4-activations``; DESIGN.md §7).

Pattern: each MatMul that the NVFP4 weight pass gave 4-bit weights (`hybridtrt.graphs.weight_only`,
scheme ``nvfp4``, a ModelOpt NVFP4 checkpoint as it is), with the checkpoint's own ``input_scale``.
Routed experts (``MoeExpertsNvfp4``) keep their activations in the model dtype: what a grouped MoE
plugin does with them is that plugin's contract (issue 26), not a graph rewrite.

Rewrite of its input ``x`` (model dtype, ``[B, T, K]``; ``P`` the layer's scope, ``p`` its dotted name)::

    x ─ P/input_quantizer/TRT_FP4DynamicQuantize (domain trt; axis -1, block_size 16, scale_type float8e4m3fn)
        p.input_scale [] : float ┘  ├─ x_fp4 [B, T, K] float4e2m1
                                    └─ x_block_scale [B, T, K/16] float8e4m3fn
    x_block_scale ─ P/input_quantizer/scale/DequantizeLinear (p.input_scale) ─ [B, T, K/16] float ─┐
    x_fp4 ─────────────── P/input_quantizer/DequantizeLinear (axis -1, block_size 16) ──────────────┘
        ─ [B, T, K] float ─ P/input_quantizer/Cast (model dtype; absent in fp32) ─ P/MatMul

This is the graph ModelOpt's ONNX exporter writes for NVFP4 activations
(``modelopt/torch/quantization/export_onnx.py``, ``export_fp4`` with the "dynamic" quantizer type:
``trt::TRT_FP4DynamicQuantize(x, amax / 6 / 448; axis -1, block_size 16, scale_type FLOAT8E4M3FN)``, the
block scale dequantized by the same per-tensor scale, then the blocked ``DequantizeLinear``), with the
checkpoint's ``input_scale`` as the per-tensor scale: ModelOpt writes it as ``amax / (6 · 448)``
(``NVFP4QTensor.get_activation_scaling_factor``), the very value its exporter passes. TensorRT's parser
builds the node with its own importer (onnx-tensorrt ``onnxOpImporters.cpp``,
``DEFINE_BUILTIN_OP_IMPORTER(TRT_FP4DynamicQuantize)``: ``addDynamicQuantize(x, axis, 16, kFP4, kFP8)``
with the scale as the layer's second input), never from the function body below; the rules it
enforces are `hybridtrt.engine.trt_rules.TENSORRT_OPS`.

**The definition** (`function_proto`, the model-local function ``trt::TRT_FP4DynamicQuantize`` the
export carries, so that the graph is complete ONNX and ONNX's reference evaluator runs it). Per block
of 16 along the last axis, in fp32, with ``s`` the per-tensor scale:

- ``x_block_scale = float8e4m3fn(amax(|x|) / (6 · s))`` (round to nearest even, saturating at 448);
- ``d = x_block_scale · s`` (its ``DequantizeLinear``);
- ``x_fp4 = float4e2m1(x / d)`` (``QuantizeLinear``: round to nearest even, saturating at ±6);
  a block whose ``d`` is 0 (its scale underflowed float8) is quantized against 1 instead, and its
  dequantized values are 0 whatever the codes (``code · 0``).

That is ModelOpt's NVFP4 fake quantization (``fp8_quantize_scale`` and ``fp4_round_magnitude`` in
``modelopt/torch/kernels/quantization/common/nvfp4_quant.py``, the public statement of what the kernels
compute), with one difference said plainly: ModelOpt's kernel divides by 1.0 whenever ``d < 1e-5``
and multiplies back by that 1.0, while the ONNX chain multiplies the codes by ``d``; the two differ
only in blocks whose ``d`` is below 1e-5 (values under 6·10⁻⁵). TensorRT's own kernels are not public.

ONNX Runtime's CPU provider has neither the ``trt`` op nor float4e2m1 Q/DQ: `hybridtrt.graphs.fp4_emulation`
computes the same chain with standard float ops, checked bit for bit against this body under ONNX's
reference evaluator (tests/graphs/test_fp4_activations.py), and the torch reference
(`hybridtrt.exporter.weight_only_reference.fp4_activation`) is a third, independent formulation.

Refusals (`QuantizationError`): a MatMul without 4-bit NVFP4 weights, a non-positive or non-finite
input scale, an opset below 23 (float4e2m1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.fp8_qdq import _opset, _prefixes, float_tensor, splice_before_matmuls

#: TensorRT's domain for its own ONNX ops (ModelOpt writes ``trt::TRT_FP4DynamicQuantize``).
TRT_DOMAIN = "trt"
FP4_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
#: NVFP4: 16 values per FP8 block scale (the importer: "Only block_size == 16 is supported for now.").
BLOCK = 16
#: E2M1's largest magnitude (ModelOpt's E2M1_MAX); float8e4m3fn's 448 is the saturating Cast's.
E2M1_MAX = 6.0
#: float4e2m1 first appears in QuantizeLinear/DequantizeLinear-23 (onnx/docs/Changelog.md).
MIN_OPSET = 23


def function_proto(opset: int) -> onnx.FunctionProto:
    """``trt::TRT_FP4DynamicQuantize(x, scale) -> (x_fp4, x_block_scale)``: the module docstring's
    definition, along the last axis in blocks of 16 (the only form the pass writes; the attributes are
    TensorRT's and are not read by the body)."""
    nodes = [
        *(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)) for name, value in constants().items() if name in _BODY_CONSTANTS),
        *block_scale_nodes("x", "scale", "x_block_scale"),
        helper.make_node("DequantizeLinear", ["x_block_scale", "scale"], ["d"]),
        helper.make_node("Equal", ["d", "zero"], ["underflow"]),
        helper.make_node("Where", ["underflow", "one", "d"], ["divisor"]),
        helper.make_node("QuantizeLinear", ["xf", "divisor"], ["x_fp4"], axis=-1, block_size=BLOCK, output_dtype=TensorProto.FLOAT4E2M1),
    ]
    return helper.make_function(
        TRT_DOMAIN,
        FP4_DYNAMIC_QUANTIZE,
        ["x", "scale"],
        ["x_fp4", "x_block_scale"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["axis", "block_size", "scale_type"],
    )


#: The constants the body reads (the emulation's E2M1 rounding reads the others too).
_BODY_CONSTANTS = ("blocked_tail", "last", "six", "zero", "one")


def constants(prefix: str = "") -> dict[str, np.ndarray]:
    """The constants the definition (and its ONNX Runtime emulation) reads, by name."""
    return {
        f"{prefix}blocked_tail": np.array([-1, BLOCK], np.int64),
        f"{prefix}last": np.array([-1], np.int64),
        **{f"{prefix}{name}": np.array(value, np.float32) for name, value in
           (("zero", 0.0), ("one", 1.0), ("two", 2.0), ("half", 0.5), ("four", 4.0), ("six", E2M1_MAX))},
    }  # fmt: skip


def block_scale_nodes(x: str, scale: str, block_scale: str, *, prefix: str = "", constant: str = "", name: str = "") -> list[onnx.NodeProto]:
    """The definition's block scale: ``{prefix}xf`` (``x`` in fp32), ``{prefix}blocks`` (``[..., K/16,
    16]``) and ``block_scale = float8e4m3fn(amax(|blocks|) / (6 · scale))`` with saturation; the
    constants are `constants` under the ``constant`` prefix; the last node is named ``name``. Shared by
    the function body and the ONNX Runtime emulation (`hybridtrt.graphs.fp4_emulation`)."""
    p, c = prefix, constant
    return [
        helper.make_node("Cast", [x], [f"{p}xf"], to=TensorProto.FLOAT),
        helper.make_node("Shape", [f"{p}xf"], [f"{p}lead"], end=-1),
        helper.make_node("Concat", [f"{p}lead", f"{c}blocked_tail"], [f"{p}blocked_shape"], axis=0),
        helper.make_node("Reshape", [f"{p}xf", f"{p}blocked_shape"], [f"{p}blocks"]),
        helper.make_node("Abs", [f"{p}blocks"], [f"{p}magnitudes"]),
        helper.make_node("ReduceMax", [f"{p}magnitudes", f"{c}last"], [f"{p}amax"], keepdims=0),
        helper.make_node("Mul", [f"{c}six", scale], [f"{p}six_scale"]),
        helper.make_node("Div", [f"{p}amax", f"{p}six_scale"], [f"{p}block_scale_f"]),
        helper.make_node("Cast", [f"{p}block_scale_f"], [block_scale], name=name, to=TensorProto.FLOAT8E4M3FN, saturate=1),
    ]


def insert_fp4_activations(model: onnx.ModelProto, input_scales: Mapping[str, float]) -> list[str]:
    """Give the MatMuls of ``input_scales`` (``{MatMul node: the checkpoint's input_scale}``) FP4
    activations, in place (module docstring). Returns the MatMul nodes, in graph order.

    Raises:
        QuantizationError: See the module docstring.
    """
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise QuantizationError(f"FP4 activations need default-domain opset ≥ {MIN_OPSET}, the graph has opset {opset}", fix=f"export with --opset {MIN_OPSET} or newer")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    elem = {n.name: _matmul_dtype(n, producers, inits) for n in graph.node if n.op_type == "MatMul" and n.name in input_scales}
    absent = sorted(set(input_scales) - set(elem))
    if absent:
        raise QuantizationError(f"FP4 activations for {len(absent)} layer(s) the graph has no MatMul for: {absent[:4]}", fix="report this with the checkpoint's config.json")
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    done: list[str] = []
    for node in graph.node:
        if node.name not in elem:
            continue
        scale = input_scales[node.name]
        if not (math.isfinite(scale) and scale > 0):
            raise QuantizationError(f"{node.name}: the checkpoint's input_scale is {scale!r}; a dynamic FP4 quantizer needs a positive finite scale",
                                    fix="re-download the checkpoint, or export without --fp4-activations")  # fmt: skip
        if elem[node.name] is None:
            raise QuantizationError(f"{node.name} has no NVFP4 weights (FP4 activations pair with the checkpoint's FP4 weights)", fix="export without --fp4-activations")
        scope, dotted = _prefixes(node.name)
        q = f"{scope}/input_quantizer"
        s_name = f"{dotted}.input_scale"
        graph.initializer.append(float_tensor(s_name, np.asarray(scale, np.float32), TensorProto.FLOAT))
        x_fp4, x_bs = f"{q}/{FP4_DYNAMIC_QUANTIZE}_output_0", f"{q}/{FP4_DYNAMIC_QUANTIZE}_output_1"
        d_out, dq_out = f"{q}/scale/DequantizeLinear_output_0", f"{q}/DequantizeLinear_output_0"
        nodes = [
            helper.make_node(FP4_DYNAMIC_QUANTIZE, [node.input[0], s_name], [x_fp4, x_bs], name=f"{q}/{FP4_DYNAMIC_QUANTIZE}", domain=TRT_DOMAIN,
                             axis=-1, block_size=BLOCK, scale_type=TensorProto.FLOAT8E4M3FN),  # fmt: skip
            helper.make_node("DequantizeLinear", [x_bs, s_name], [d_out], name=f"{q}/scale/DequantizeLinear"),
            helper.make_node("DequantizeLinear", [x_fp4, d_out], [dq_out], name=f"{q}/DequantizeLinear", axis=-1, block_size=BLOCK),
        ]
        out = dq_out
        if elem[node.name] != TensorProto.FLOAT:
            out = f"{q}/Cast_output_0"
            nodes.append(helper.make_node("Cast", [dq_out], [out], name=f"{q}/Cast", to=elem[node.name]))
        node.input[0] = out
        new_nodes[node.name] = nodes
        done.append(node.name)
    splice_before_matmuls(graph, new_nodes, set())
    if not any(f.domain == TRT_DOMAIN and f.name == FP4_DYNAMIC_QUANTIZE for f in model.functions):
        model.functions.append(function_proto(opset))
    if not any(o.domain == TRT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    return done


def activations_recipe(input_scales: Mapping[str, float]) -> dict[str, object]:
    """The recipe's ``"activations"`` entry (`hybridtrt.graphs.weight_only.WeightOnlyRecipe`)."""
    return {
        "format": "float4e2m1",
        "quantizer": f"{TRT_DOMAIN}::{FP4_DYNAMIC_QUANTIZE} (dynamic, blocks of {BLOCK} on the last axis, float8e4m3fn block scales)",
        "target": "Blackwell (SM100+): FP4 GEMMs",
        "input_scales": {node: float(s) for node, s in input_scales.items()},
    }


def _matmul_dtype(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto], inits: Mapping[str, TensorProto]) -> int | None:
    """The model dtype of a MatMul whose weight is the NVFP4 chain (`hybridtrt.graphs.weight_only`):
    its Cast's ``to``, or float when the chain ends at the float DequantizeLinear; None otherwise."""
    w = producers.get(node.input[1])
    if w is not None and w.op_type == "Cast":
        to = next(a.i for a in w.attribute if a.name == "to")
        w = producers.get(w.input[0])
    else:
        to = TensorProto.FLOAT
    if w is None or w.op_type != "DequantizeLinear" or w.input[0] not in inits or inits[w.input[0]].data_type != TensorProto.FLOAT4E2M1:
        return None
    return to


__all__ = ["BLOCK", "FP4_DYNAMIC_QUANTIZE", "MIN_OPSET", "TRT_DOMAIN", "activations_recipe", "block_scale_nodes", "constants", "function_proto", "insert_fp4_activations"]
