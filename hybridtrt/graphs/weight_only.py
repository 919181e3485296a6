"""Pass: 4-bit weights for the linear layers, activations in the model dtype (W4A16, DESIGN.md §7).

Pattern: the FP8 pass's linear layers (`hybridtrt.graphs.fp8_qdq`): a ``MatMul`` named
``/model/layers.{i}/mixer/(shared_experts/)?{in,out,q,k,v,o,up,down,...}_proj/MatMul`` whose input[1]
is a 2-D initializer ``W [in, out]``. The LM head and the MoE router stay in the model dtype.
Routed experts (``MoeExperts``) get 4-bit weights only from an NVFP4 checkpoint, as it stores them:
the node becomes ``MoeExpertsNvfp4`` (`hybridtrt.ops.moe_onnx`) with each layer's packed codes
``[E, out, in/2]`` uint8, FP8 block scales ``[E, out, in/16]`` and fp32 global scales ``[E]``
(`nvfp4_expert_codes`, checked expert by expert against the loader's weights); TensorRT builds it only
with a grouped NVFP4 MoE plugin (issue 26), so ``export --dequantize-experts`` keeps them in the model
dtype instead.

Rewrite, INT4 (``--quantize int4``; ONNX ``DequantizeLinear`` since opset 21, blocked int4)::

    p.weight_t_int4 [in, out] : int4 ─ P/weight_quantizer/DequantizeLinear (axis 0, block_size B) ─ P/MatMul
    p.weight_scale [in/B, out] : model dtype ┘   (no zero point: symmetric)

With AWQ's per-input ``pre_quant_scale`` ``p`` (`hybridtrt.exporter.awq`), the weight quantized is
``W / p`` (per input row, fp32) and the MatMul's input is multiplied by ``p`` first::

    x ─ P/pre_quant_scale/Mul (p.pre_quant_scale [in] : model dtype) ─ P/MatMul

Rewrite, NVFP4 (a ModelOpt NVFP4 checkpoint as it is; ``DequantizeLinear`` since opset 23, float4e2m1;
the two-level scale as a chained DQ)::

    p.weight_block_scale [in/16, out] : float8e4m3fn ─ P/weight_quantizer/scale/DequantizeLinear ─┐ [in/16, out] float
    p.weight_scale_2 [] : float ─────────────────────┘                                            │
    p.weight_t_fp4 [in, out] : float4e2m1 ─ P/weight_quantizer/DequantizeLinear (axis 0, block 16) ┘
        ─ [in, out] float ─ P/weight_quantizer/Cast (model dtype; absent in fp32) ─ P/MatMul

which is ModelOpt's own dequantization step for step (``NVFP4QTensor.dequantize``: the E2M1 value
times ``weight_scale.float() * weight_scale_2`` in fp32, then the model dtype;
`hybridtrt.models.modelopt`). The 4-bit initializers hold two values a byte, the first in the low
nibble (the ONNX 4-bit layout; TensorRT's is the same: "Explicit Quantization", Quantized Weights).

INT4 scales, as ModelOpt's ``INT4QTensor.quantize`` computes them
(``modelopt/torch/quantization/qtensor/int4_tensor.py``, 0.47.0: ``7 / amax`` per block, values
``round().clamp(-8, 7)``): ``scale = amax(|w| over the block) / 7`` in fp32, rounded to the model dtype
(the ``DequantizeLinear`` output type is the scale type, so the graph stays in the model dtype),
floored so no scale is zero; ``q = clip(round_half_even(w / scale), -8, 7)`` with the stored scale.
Blocks run along ``in`` (axis 0 of ``W [in, out]``, the GEMM's K).

**An ``in`` that the block size does not divide** (Nemotron-Nano-9B-v2's ``down_proj``: 15,680 inputs
= 64 · 245, not a multiple of 128): that layer takes the largest power-of-two block below the
requested one that divides it (64 there), never smaller than `MIN_BLOCK`; the recipe lists each
such layer with its block. Smaller blocks only add scales (1/B of the layer's bytes more) and lower
the error. A layer no such block divides stays in the model dtype, with the reason. No padding: a
padded K would change the GEMM's shape and the graph's meaning.

The quantizers work through a weight `CHUNK_ELEMENTS` at a time (bounded temporaries whatever its
size; the same bits as one pass) and take strided views (the streaming exporter's transposed
parameters) as they are.

Refusals (`QuantizationError`): opset below the format's, a graph with Q/DQ already, a bad
``--exclude`` regex, an unknown scheme or block size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.fp8_qdq import (
    LM_HEAD_NODE,
    WeightQuantizer,
    _compile,
    attach_used_functions,
    _exclusion_reason,
    _opset,
    _prefixes,
    _round_scale,
    CHUNK_ELEMENTS,
    float_tensor,
    fp8_tensor,
    in_memory_quantizer,
    splice_before_matmuls,
)
from hybridtrt.ops.moe_onnx import MOE_EXPERTS, MOE_EXPERTS_NVFP4

#: ``--quantize int4`` block sizes (inputs per scale); ModelOpt's INT4_AWQ uses 128.
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 128
#: The smallest block a layer falls back to when the requested one does not divide its ``in``.
MIN_BLOCK = 16
#: NVFP4's block (16 inputs per FP8 scale; ModelOpt's ``group_size``).
NVFP4_BLOCK = 16
#: Opsets that brought the formats to ``DequantizeLinear`` (onnx/docs/Changelog.md: int4 and
#: blocked quantization in DequantizeLinear-21, float4e2m1 in DequantizeLinear-23).
MIN_OPSET = {"int4": 21, "nvfp4": 23}
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}
#: The symmetric INT4 bound (ModelOpt's ``_get_quant_maxbound(4)``).
INT4_MAX = 7
SCHEMES = ("int4", "nvfp4")

@dataclass
class WeightOnlyRecipe:
    """What the pass did; written into ``hybridtrt.json`` under ``"weight_only"``.

    Attributes:
        scheme: ``"int4"`` or ``"nvfp4"``.
        format: ``"int4"`` or ``"float4e2m1"``.
        block_size: The requested block (inputs per scale).
        blocks: ``{MatMul node: block}`` for layers whose block differs from ``block_size``.
        scale: How the scales are stored (``"model dtype per block"``, ``"float8e4m3fn per block ×
            float32 per tensor"``).
        quantized: MatMul nodes that got 4-bit weights, in graph order.
        excluded: ``{MatMul node: reason}`` for every other MatMul.
        exclude_patterns: The user's ``--exclude`` regexes.
        global_scales: ``{MatMul node: weight_scale_2}`` (NVFP4).
        source: ``"round to nearest, scale = block amax / 7"`` or what a checkpoint's own scales were
            read from (``"checkpoint: NVFP4 (blocks of 16) from hf_quant_config.json …"``).
        activations: Empty for W4A16; NVFP4 with FP4 activations (W4A4): what
            `hybridtrt.graphs.fp4_activations.activations_recipe` records (format, target, the
            per-tensor ``input_scales``).
    """

    scheme: str
    format: str
    block_size: int
    scale: str
    blocks: dict[str, int] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    exclude_patterns: list[str] = field(default_factory=list)
    global_scales: dict[str, float] = field(default_factory=dict)
    source: str = "round to nearest, scale = block amax / 7"
    activations: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def block_of(self, node: str) -> int:
        return self.blocks.get(node, self.block_size)


@dataclass(frozen=True)
class NVFP4Scales:
    """A checkpoint's NVFP4 linear, read when its weight is written: ``read(name)`` returns a tensor as
    stored, ``weight`` the packed E2M1 codes (``[out, in/2]`` U8, low nibble first), ``tensor`` the block
    scales (``weight_scale``, ``[out, in/16]`` F8_E4M3); ``global_scale`` is its ``weight_scale_2``."""

    tensor: str
    global_scale: float
    read: Callable[[str], np.ndarray] = field(compare=False, hash=False)
    weight: str = ""

    def block_scale(self) -> np.ndarray:
        """``[in/16, out]`` float8e4m3fn (transposed to the graph's ``W [in, out]``)."""
        return np.ascontiguousarray(np.asarray(self.read(self.tensor)).view(ml_dtypes.float8_e4m3fn).T)

    def codes(self) -> np.ndarray:
        """``[in, out]`` float4e2m1: the checkpoint's codes, transposed."""
        packed = np.asarray(self.read(self.weight)).view(np.uint8)
        unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        return np.ascontiguousarray(unpacked.T).view(ml_dtypes.float4_e2m1fn)


@dataclass(frozen=True)
class NVFP4ExpertScales:
    """A checkpoint's NVFP4 routed experts of one MoE layer: each expert's `NVFP4Scales`, per projection."""

    up: tuple[NVFP4Scales, ...]
    down: tuple[NVFP4Scales, ...]


def nvfp4_expert_codes(w: np.ndarray, scales: tuple[NVFP4Scales, ...], first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Routed experts ``first`` … ``first + E' - 1`` of a layer's NVFP4 stack as the checkpoint stores
    them — ``(codes [E', out, in/2] uint8, block_scale [E', out, in/16] float8e4m3fn)``, the bytes
    as they are — each checked against ``w [E', out, in]`` (the loader's dequantized weights in the model
    dtype): the codes times ``block_scale · global`` in fp32, rounded to the model dtype, must be ``w``."""
    codes, blocks = [], []
    for i in range(w.shape[0]):
        s = scales[first + i]
        packed = np.ascontiguousarray(np.asarray(s.read(s.weight)).view(np.uint8))  # [out, in/2]
        block = np.ascontiguousarray(np.asarray(s.read(s.tensor)).view(ml_dtypes.float8_e4m3fn))  # [out, in/16]
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        values = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # code 8 is -0 here, +0 in ModelOpt: equal under !=
        scale = block.astype(np.float32) * np.float32(s.global_scale)
        back = (values.reshape(*block.shape, NVFP4_BLOCK) * scale[..., None]).astype(np.asarray(w).dtype).astype(np.float32)
        wrong = np.flatnonzero(back.reshape(-1) != np.asarray(w[i], dtype=np.float32).reshape(-1))
        if wrong.size:
            raise QuantizationError(
                f"{s.tensor.removesuffix('.weight_scale')}: {wrong.size} weight(s) are not the E2M1 values of the checkpoint's NVFP4 codes and "
                f"scales (first at flat index {int(wrong[0])}); the weights do not match their scales",
                fix="export in fp32 or bf16 (fp16 can flush the smallest dequantized weights to zero), or re-download the checkpoint",
            )
        codes.append(packed)
        blocks.append(block)
    return np.stack(codes), np.stack(blocks)


def layer_block(k: int, block: int) -> int | None:
    """The block a layer with ``k`` inputs gets for a requested ``block``: ``block`` when it divides
    ``k``, else the largest power of two below it (at least `MIN_BLOCK`) that does, else None."""
    b = block
    while b >= MIN_BLOCK:
        if k % b == 0:
            return b
        b //= 2
    return None


@dataclass(frozen=True, eq=False)
class PreScale:
    """An AWQ ``pre_quant_scale`` ``[in]`` (float32 holding model-dtype values), hashable by value
    (it is bound into the quantize function that names a deferred initializer)."""

    values: np.ndarray

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PreScale) and self.values.tobytes() == other.values.tobytes()

    def __hash__(self) -> int:
        return hash(self.values.tobytes())


def quantize_int4(w: np.ndarray, block: int, elem_type: int, pre_scale: PreScale | None = None) -> tuple[np.ndarray, np.ndarray]:
    """INT4 weight and its scale (module docstring).

    Args:
        w: ``[in, out]`` weight (any float dtype); ``in`` a multiple of ``block``.
        block: Inputs per scale.
        elem_type: ONNX type of the scale (the model dtype).
        pre_scale: AWQ's ``p``: the weight quantized is ``w / p`` (per input row, in fp32).

    Returns:
        ``(q [in, out] ml_dtypes.int4, scale [in / block, out])`` with ``w / p ≈ q * scale``.
    """
    k, n = w.shape
    q = np.empty((k, n), dtype=ml_dtypes.int4)
    scale = np.empty((k // block, n), dtype=_NUMPY[elem_type])
    per_chunk = max(1, CHUNK_ELEMENTS // (block * n))  # blocks of rows per chunk: bounded temporaries
    for b0 in range(0, k // block, per_chunk):
        rows = slice(b0 * block, min(k, (b0 + per_chunk) * block))
        chunk = np.array(w[rows], dtype=np.float32, order="C")  # a copy, worked on in place
        if pre_scale is not None:
            chunk /= pre_scale.values[rows].astype(np.float32)[:, None]
        blocks = chunk.reshape(-1, block, n)
        s = _round_scale(np.abs(blocks).max(axis=1) / INT4_MAX, elem_type)
        np.divide(blocks, s.astype(np.float32)[:, None, :], out=blocks)
        np.clip(np.rint(blocks, out=blocks), -8, 7, out=blocks)
        q[rows] = chunk.astype(ml_dtypes.int4)
        scale[b0 : b0 + s.shape[0]] = s
    return q, scale


def quantize_nvfp4_with_scales(w: np.ndarray, scales: NVFP4Scales) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's NVFP4 linear as it is stored: its E2M1 codes and block scales, checked against
    ``w`` (the weight the loader dequantized from them, in the model dtype): the codes times ``block_scale
    · weight_scale_2`` in fp32, rounded to the model dtype, must be ``w`` (±0 aside: ModelOpt writes -0
    as code 8 and dequantizes it to +0), else the weights and scales are refused as not belonging
    together. With ``scales.weight`` unset, the codes are found again from ``w`` (the nearest E2M1
    value of ``w / scale``, exact since the model dtype's rounding, ≤ 2^-9 relative in bf16, is far
    below half an E2M1 step, ≥ 1/6 relative).

    Returns:
        ``(codes [in, out] ml_dtypes.float4_e2m1fn, block_scale [in/16, out] float8e4m3fn)``.
    """
    block_scale = scales.block_scale()
    scale = block_scale.astype(np.float32) * np.float32(scales.global_scale)
    k, n = w.shape
    stored = scales.codes() if scales.weight else None
    codes = np.empty((k, n), dtype=ml_dtypes.float4_e2m1fn)
    per_chunk = max(1, CHUNK_ELEMENTS // (NVFP4_BLOCK * n))
    for b0 in range(0, k // NVFP4_BLOCK, per_chunk):
        rows = slice(b0 * NVFP4_BLOCK, min(k, (b0 + per_chunk) * NVFP4_BLOCK))
        s = scale[b0 : b0 + per_chunk][:, None, :]
        w32 = np.asarray(w[rows], dtype=np.float32).reshape(-1, NVFP4_BLOCK, n)
        if stored is not None:
            c = stored[rows].reshape(-1, NVFP4_BLOCK, n)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                c = np.clip(np.where(s > 0, w32 / s, 0.0), -6.0, 6.0).astype(ml_dtypes.float4_e2m1fn)
        back = (c.astype(np.float32) * s).astype(np.asarray(w).dtype).astype(np.float32)
        wrong = np.flatnonzero(back.reshape(-1) != w32.reshape(-1))
        if wrong.size:
            raise QuantizationError(
                f"{scales.tensor.removesuffix('.weight_scale')}: {wrong.size} weight(s) are not the E2M1 values of the checkpoint's NVFP4 "
                f"codes and scales (first at flat index {rows.start * n + int(wrong[0])}); the weights do not match their scales",
                fix="export in fp32 or bf16 (fp16 can flush the smallest dequantized weights to zero), or re-download the checkpoint",
            )
        codes[rows] = c.reshape(-1, n)
    return codes, block_scale


def insert_weight_only(
    model: onnx.ModelProto,
    scheme: str,
    *,
    block_size: int = DEFAULT_BLOCK,
    exclude: Sequence[str] = (),
    quantizer: WeightQuantizer | None = None,
    fixed: Mapping[str, NVFP4Scales | NVFP4ExpertScales] | None = None,
    source: str | None = None,
    pre_scales: Mapping[str, np.ndarray] | None = None,
    blocks: Mapping[str, int | None] | None = None,
) -> WeightOnlyRecipe:
    """Give the linear layers of ``model`` 4-bit weights, in place.

    Args:
        model: An exported hybridtrt graph (weights in memory, or placeholders with a matching
            ``quantizer``).
        scheme: ``"int4"`` (our own scales) or ``"nvfp4"`` (``fixed``: a checkpoint's).
        block_size: INT4 inputs per scale (`BLOCK_SIZES`).
        exclude: Regexes; a MatMul whose name matches any (``re.search``) keeps its weight.
        quantizer: How weights become their 4-bit initializers (default: read in memory).
        fixed: NVFP4: ``{MatMul node: NVFP4Scales}`` and ``{MoeExperts node: NVFP4ExpertScales}``, exactly
            these layers, as the checkpoint has them.
        source: The recipe's `WeightOnlyRecipe.source`.
        pre_scales: INT4 with AWQ: ``{MatMul node: p [in]}`` (`hybridtrt.exporter.awq`): a ``Mul`` by
            ``p`` (model dtype) on the MatMul's input, the weight quantized as ``w / p``.
        blocks: INT4, a tensor-parallel rank's graph: ``{MatMul node: block}`` chosen for the unsharded
            layer so that every rank's part of its inputs is whole blocks (`hybridtrt.exporter.
            tensor_parallel.int4_blocks`; None: no block of at least `MIN_BLOCK` does, the layer stays in the
            model dtype), instead of `layer_block` of the rank's own ``in``.

    Returns:
        The `WeightOnlyRecipe`.

    Raises:
        QuantizationError: See the module docstring.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"weight-only scheme {scheme!r} is unknown", fix=f"use one of {', '.join(SCHEMES)}")
    if scheme == "int4" and block_size not in BLOCK_SIZES:
        raise QuantizationError(f"--block-size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}", fix=f"use --block-size {DEFAULT_BLOCK}")
    if scheme == "nvfp4" and fixed is None:
        raise QuantizationError("NVFP4 weights come from an NVFP4 checkpoint's own scales", fix="export an NVFP4 checkpoint, or use --quantize int4")
    opset = _opset(model)
    if opset < MIN_OPSET[scheme]:
        raise QuantizationError(
            f"{scheme} DequantizeLinear needs default-domain opset ≥ {MIN_OPSET[scheme]}, the graph has opset {opset}",
            fix=f"export with --opset {MIN_OPSET[scheme]} or newer (the default is fine)",
        )
    graph = model.graph
    existing = [n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if existing:
        raise QuantizationError(f"the graph already has {len(existing)} Q/DQ node(s) (e.g. {existing[0]!r})", fix="quantize the unquantized export")
    patterns = _compile(exclude)
    inits = {t.name: t for t in graph.initializer}
    quantize = quantizer or in_memory_quantizer()
    if scheme == "int4":
        recipe = WeightOnlyRecipe("int4", "int4", block_size, "model dtype per block", exclude_patterns=list(exclude), source=source or WeightOnlyRecipe.source)
    else:
        recipe = WeightOnlyRecipe("nvfp4", "float4e2m1", NVFP4_BLOCK, "float8e4m3fn per block × float32 per tensor", source=source or "checkpoint")
        matmuls = {n.name for n in graph.node if n.op_type in ("MatMul", MOE_EXPERTS)}
        absent = sorted(set(fixed) - matmuls)
        if absent:
            raise QuantizationError(
                f"the checkpoint quantizes {len(absent)} linear layer(s) the graph has no MatMul for: {absent[:4]}",
                fix="report this with the checkpoint's config.json (the layer was not traced as a MatMul)",
            )

    plan: list[tuple[onnx.NodeProto, int]] = []
    experts = [n for n in graph.node if n.op_type == MOE_EXPERTS and fixed is not None and isinstance(fixed.get(n.name), NVFP4ExpertScales)]
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        if fixed is not None:
            if node.name in fixed:
                plan.append((node, NVFP4_BLOCK))
            else:
                recipe.excluded[node.name] = "not quantized in the checkpoint"
            continue
        reason = _exclusion_reason(node, inits, patterns)
        if reason is None:
            k = inits[node.input[1]].dims[0]
            block = blocks[node.name] if blocks is not None and node.name in blocks else layer_block(k, block_size)
            if block is None:
                recipe.excluded[node.name] = (
                    f"no block of at least {MIN_BLOCK} inputs divides every rank's part of its inputs" if blocks is not None and node.name in blocks
                    else f"in = {k} is not a multiple of {MIN_BLOCK} (no block divides it)"
                )  # fmt: skip
                continue
            if block != block_size:
                recipe.blocks[node.name] = block
            plan.append((node, block))
        else:
            recipe.excluded[node.name] = reason
    if not plan and not experts:
        raise QuantizationError(
            f"{scheme} was requested but no linear layer is left to quantize" + (f" (--exclude {list(exclude)} matches all of them)" if exclude else ""),
            fix="loosen --exclude, or export without --quantize",
        )

    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    for node, block in plan:
        scope, dotted = _prefixes(node.name)
        w_init = inits[node.input[1]]
        elem = w_init.data_type
        dq_name, dq_out = f"{scope}/weight_quantizer/DequantizeLinear", f"{scope}/weight_quantizer/DequantizeLinear_output_0"
        if scheme == "int4":
            q_name, s_name = f"{dotted}.weight_t_int4", f"{dotted}.weight_scale"
            p = (pre_scales or {}).get(node.name)
            pre = None if p is None else PreScale(np.asarray(p, dtype=np.float32))
            if pre is not None and pre.values.shape != (w_init.dims[0],):
                raise QuantizationError(f"the AWQ scale of {node.name} has shape {pre.values.shape}, the weight {list(w_init.dims)}", fix="re-run the export")
            w_q, scale = quantize(w_init, q_name, partial(quantize_int4, block=block, elem_type=elem, pre_scale=pre))
            graph.initializer.extend([w_q, float_tensor(s_name, scale, elem)])
            nodes = [helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out], name=dq_name, axis=0, block_size=block)]
            out = dq_out
            if pre is not None:  # x · p before the MatMul
                p_name, x_out = f"{dotted}.pre_quant_scale", f"{scope}/pre_quant_scale/Mul_output_0"
                graph.initializer.append(float_tensor(p_name, pre.values.astype(_NUMPY[elem]), elem))
                nodes.append(helper.make_node("Mul", [node.input[0], p_name], [x_out], name=f"{scope}/pre_quant_scale/Mul"))
                node.input[0] = x_out
        else:
            scales = fixed[node.name]
            q_name, bs_name, gs_name = f"{dotted}.weight_t_fp4", f"{dotted}.weight_block_scale", f"{dotted}.weight_scale_2"
            s_out = f"{scope}/weight_quantizer/scale/DequantizeLinear_output_0"
            w_q, block_scale = quantize(w_init, q_name, partial(quantize_nvfp4_with_scales, scales=scales))
            graph.initializer.extend([w_q, fp8_tensor(bs_name, block_scale), float_tensor(gs_name, np.asarray(scales.global_scale, np.float32), TensorProto.FLOAT)])
            nodes = [
                helper.make_node("DequantizeLinear", [bs_name, gs_name], [s_out], name=f"{scope}/weight_quantizer/scale/DequantizeLinear"),
                helper.make_node("DequantizeLinear", [q_name, s_out], [dq_out], name=dq_name, axis=0, block_size=NVFP4_BLOCK),
            ]
            out = dq_out
            if elem != TensorProto.FLOAT:
                out = f"{scope}/weight_quantizer/Cast_output_0"
                nodes.append(helper.make_node("Cast", [dq_out], [out], name=f"{scope}/weight_quantizer/Cast", to=elem))
            recipe.global_scales[node.name] = float(scales.global_scale)
        new_nodes[node.name] = nodes
        users[w_init.name] -= 1
        if users[w_init.name] == 0:
            dropped.add(w_init.name)
        node.input[1] = out
        recipe.quantized.append(node.name)

    for node in experts:  # routed experts as they are: MoeExpertsNvfp4 (hybridtrt.ops.moe_onnx)
        recipe.quantized.append(_nvfp4_experts(graph, node, fixed[node.name], inits, quantize, users, dropped))
    splice_before_matmuls(graph, new_nodes, dropped)
    if experts:
        attach_used_functions(model)
    return recipe


def _nvfp4_experts(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    scales: NVFP4ExpertScales,
    inits: Mapping[str, TensorProto],
    quantize: WeightQuantizer,
    users: dict[str, int],
    dropped: set[str],
) -> str:
    """Turn one ``MoeExperts`` node into ``MoeExpertsNvfp4`` with the checkpoint's packed codes, block
    scales and global scales, in place; returns its new name."""
    _, dotted = _prefixes(node.name)  # model.layers.{i}.mixer.experts
    inputs = list(node.input[:3])
    for proj, w_name, per_expert in (("up", node.input[3], scales.up), ("down", node.input[4], scales.down)):
        names = (f"{dotted}.{proj}_codes", f"{dotted}.{proj}_block_scale", f"{dotted}.{proj}_global_scale")
        if len(per_expert) != inits[w_name].dims[0]:
            raise QuantizationError(f"{node.name}: the checkpoint has {len(per_expert)} NVFP4 {proj} experts, the graph {inits[w_name].dims[0]}", fix="report this with the checkpoint's config.json")
        codes, block_scale = quantize(inits[w_name], names[0], partial(nvfp4_expert_codes, scales=per_expert))
        global_scale = np.asarray([s.global_scale for s in per_expert], np.float32)
        graph.initializer.extend([codes, fp8_tensor(names[1], block_scale), float_tensor(names[2], global_scale, TensorProto.FLOAT)])
        inputs += names
        users[w_name] -= 1
        if users[w_name] == 0:
            dropped.add(w_name)
    node.op_type = MOE_EXPERTS_NVFP4
    node.name = node.name.rsplit("/", 1)[0] + "/" + MOE_EXPERTS_NVFP4
    del node.input[:]
    node.input.extend(inputs)
    return node.name


__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_BLOCK",
    "INT4_MAX",
    "LM_HEAD_NODE",
    "MIN_BLOCK",
    "NVFP4_BLOCK",
    "NVFP4ExpertScales",
    "NVFP4Scales",
    "PreScale",
    "SCHEMES",
    "WeightOnlyRecipe",
    "insert_weight_only",
    "layer_block",
    "nvfp4_expert_codes",
    "quantize_int4",
    "quantize_nvfp4_with_scales",
]
