"""Pass: FP8 ``QuantizeLinear``/``DequantizeLinear`` on the linear layers (DESIGN.md §7).

Pattern: a ``MatMul`` whose input[1] is a 2-D initializer ``W [in, out]`` and whose name is a
quantizable projection ``/model/layers.{i}/mixer/{in,out,q,k,v,o,up,down}_proj/MatMul``.

Rewrite (``P`` = ``/model/layers.0/mixer/in_proj``, ``p`` = ``model.layers.0.mixer.in_proj``)::

    x ─ P/input_quantizer/QuantizeLinear ─ P/input_quantizer/DequantizeLinear ─┐
                (p.input_scale = amax/448, p.input_zero_point = 0 : fp8)       ├─ P/MatMul
    p.weight_t_fp8 [in, out] : float8e4m3fn ─ P/weight_quantizer/DequantizeLinear ┘
                (p.weight_scale: [] per tensor, or [out] with axis=1 per output channel)

MoE layers (Nemotron-3): the shared expert's and the latent projections' MatMuls are linears like
the others; the router (``mixer/gate/MatMul``) stays in high precision. Each routed-experts node
``/model/layers.{i}/mixer/experts/MoeExperts`` becomes ``MoeExpertsFp8`` (contract in
`hybridtrt.ops.moe_onnx`): FP8 ``up_proj`` / ``down_proj`` initializers with a scale per expert
(``[E, 1]``; per expert and output channel ``[E, out]`` with ``--weight-scale channel``) and per-expert
activation scales for the up and the down input (calibration amax / 448). An expert that no
calibration token reached gets the **fallback** scale: the largest scale of its layer's reached
experts (it clips nothing that its neighbours saw; never zero); the recipe lists the tokens each
expert saw and which experts fell back.

Scales have the model dtype (the DequantizeLinear output type is the scale type), so an fp16/bf16
graph stays fp16/bf16 around the MatMul. Weights are cast with saturation (clipped to ±448 before
the cast). Everything else is left alone: embeddings, norms, conv1d and the scan ops are not
MatMuls with weights; attention's score/value MatMuls multiply two activations; the LM head
(``/model/MatMul``) is excluded by default. Every MatMul that is not quantized is listed with the
reason in the returned `FP8Recipe`.

Refusals (`QuantizationError`): default-domain opset < 19 (no FP8 types), a graph that already
has Q/DQ nodes, a bad ``--exclude`` regex, a quantizable layer without calibration amax, a non-finite amax, weights in external data
that cannot be read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.quantized_types import quantized_tensor
from hybridtrt.ops.moe_onnx import MOE_EXPERTS, MOE_EXPERTS_FP8
from hybridtrt.ops.onnx_functions import DOMAIN, attach_functions

#: Largest finite float8e4m3fn value.
FP8_E4M3_MAX = 448.0
#: Elements a quantizer converts at a time (16 MiB of fp32): a weight's temporaries stay bounded
#: whatever its size, with the same bits as one pass (the FP8 and the 4-bit quantizers).
CHUNK_ELEMENTS = 4 << 20
#: Oldest default-domain opset with float8 types in QuantizeLinear/DequantizeLinear.
MIN_FP8_OPSET = 19
#: The projections that get Q/DQ (DESIGN.md §7); MoE shared-expert up/down and latent projections too.
QUANTIZABLE_PROJECTIONS = (
    "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "fc1_latent_proj", "fc2_latent_proj",
)  # fmt: skip
_QUANTIZABLE = re.compile(r"^/model/layers\.\d+/mixer/(shared_experts/)?(" + "|".join(QUANTIZABLE_PROJECTIONS) + r")/MatMul$")
_EXPERT_WEIGHT = re.compile(r"\.experts\.(up|down)_proj(_fp8)?$")
_ROUTER = re.compile(r"^/model/layers\.\d+/mixer/gate/MatMul$")
LM_HEAD_NODE = "/model/MatMul"
#: Never quantized by default (DESIGN.md §7); recorded in the recipe.
DEFAULT_EXCLUSIONS = ("embeddings", "norms", "conv1d", "scan ops", "attention score/value BMMs", "lm_head", "MoE router (gate)")
#: How an expert that no calibration token reached gets its activation scales (recorded in the recipe).
EXPERT_FALLBACK = "largest activation scale among the reached experts of the same layer"

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}

WeightScale = Literal["tensor", "channel"]

#: ``quantize(w) -> (w_fp8, scale)`` on a weight's values (`quantize_weight` with its mode and scale
#: type bound, as a ``functools.partial``).
Quantize = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``quantizer(weight, fp8_name, quantize) -> (fp8 initializer named fp8_name, scale)``: how a weight
#: initializer becomes its FP8 initializer and scale. The default reads the weight's values
#: (`in_memory_quantizer`); a streaming exporter passes one that returns a deferred FP8 initializer
#: (`hybridtrt.graphs.external_data`) instead, whose bytes ``quantize`` produces when it is written.
WeightQuantizer = Callable[[TensorProto, str, Quantize], tuple[TensorProto, np.ndarray]]


@dataclass
class FP8Recipe:
    """What the pass did; written into ``hybridtrt.json`` under ``"quantization"``.

    Attributes:
        scheme: ``"fp8"``.
        format: ``"float8e4m3fn"``.
        activation_scale: ``"tensor"`` (per-tensor, static, from calibration amax / 448).
        weight_scale: ``"tensor"`` or ``"channel"`` (per output channel, DequantizeLinear axis 1).
        activation_scales: ``{MatMul node: scale}``.
        weight_scales: ``{MatMul node: scale}`` for per-tensor weights (empty per channel).
        quantized: MatMul nodes that got Q/DQ, in graph order, then the MoeExpertsFp8 nodes.
        excluded: ``{MatMul node: reason}`` for every other MatMul.
        default_exclusions: What is never quantized by default.
        exclude_patterns: The user's ``--exclude`` regexes (matched with ``re.search`` on node names).
        calibration: Filled by the caller (``{"hash": ..., "sequences": ..., ...}``).
        experts: ``{MoeExperts node: {"tokens": [E], "fallback_experts": [...], "up_input_scale": [E],
            "down_input_scale": [E], "up_weight_scale"/"down_weight_scale": [E] (per tensor)}}``.
        expert_fallback: The rule for experts no calibration token reached.
        source: ``"calibration"`` (our scales), or what the checkpoint's own scales were read from
            (``"checkpoint: FP8 per-tensor from hf_quant_config.json (modelopt 0.47.0): ..."``).
    """

    scheme: str = "fp8"
    format: str = "float8e4m3fn"
    activation_scale: str = "tensor"
    weight_scale: str = "tensor"
    activation_scales: dict[str, float] = field(default_factory=dict)
    weight_scales: dict[str, float] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    default_exclusions: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUSIONS))
    exclude_patterns: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    expert_fallback: str = EXPERT_FALLBACK
    source: str = "calibration"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExpertAmax:
    """Calibration of the routed experts of one MoE layer (one ``MoeExperts`` node).

    Attributes:
        tokens: ``[E]`` (token, k) pairs routed to each expert.
        up_input: ``[E]`` max ``|x|`` over the tokens routed to each expert (0 when none).
        down_input: ``[E]`` max ``relu(up_e x)²`` over the same tokens (0 when none).
    """

    tokens: list[int]
    up_input: list[float]
    down_input: list[float]

    def merge(self, other: ExpertAmax) -> ExpertAmax:
        """Counts add up, amax take the maximum."""
        return ExpertAmax(
            [a + b for a, b in zip(self.tokens, other.tokens)],
            [max(a, b) for a, b in zip(self.up_input, other.up_input)],
            [max(a, b) for a, b in zip(self.down_input, other.down_input)],
        )

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.up_input + self.down_input)


@dataclass(frozen=True)
class ExpertScales:
    """A quantized checkpoint's own scales of one MoE layer's routed experts, one per expert (fp32).

    Attributes:
        up_input / down_input: Activation scales of each expert's up and down inputs.
        up_weight / down_weight: Per-tensor weight scales of each expert's up and down matrices.
    """

    up_input: tuple[float, ...]
    down_input: tuple[float, ...]
    up_weight: tuple[float, ...]
    down_weight: tuple[float, ...]


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _compile(patterns: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for p in patterns:
        try:
            out.append((p, re.compile(p)))
        except re.error as e:
            raise QuantizationError(f"--exclude {p!r} is not a valid regular expression ({e})", fix="escape it, e.g. 'layers\\.3/'") from None
    return out


def _prefixes(node_name: str) -> tuple[str, str]:
    """``/model/layers.0/mixer/in_proj/MatMul`` -> (``/model/layers.0/mixer/in_proj``, ``model.layers.0.mixer.in_proj``)."""
    scope = node_name.rsplit("/", 1)[0]
    return scope, scope.lstrip("/").replace("/", ".")


def _exclusion_reason(
    node: onnx.NodeProto, inits: Mapping[str, TensorProto], patterns: list[tuple[str, re.Pattern[str]]]
) -> str | None:
    """Why ``node`` (a MatMul) is not quantized, or None when it is."""
    if node.name == LM_HEAD_NODE:
        return "lm_head (excluded by default, DESIGN.md §7)"
    if _ROUTER.match(node.name):
        return "MoE router (gate): kept in high precision, it decides the routing"
    if len(node.input) < 2 or node.input[1] not in inits:
        return "input[1] is an activation, not a weight (activation x activation matmul)"
    if not _QUANTIZABLE.match(node.name):
        return "not a quantizable linear projection (" + ", ".join(QUANTIZABLE_PROJECTIONS) + ")"
    w = inits[node.input[1]]
    if len(w.dims) != 2:
        return f"weight {w.name} is {len(w.dims)}-D, expected [in, out]"
    if w.data_type not in _FLOAT_TYPES:
        return f"weight {w.name} has type {TensorProto.DataType.Name(w.data_type)}, not fp32/fp16/bf16"
    for text, rx in patterns:
        if rx.search(node.name):
            return f"matches --exclude {text!r}"
    return None


def _load_array(t: TensorProto, base_dir: str | None) -> np.ndarray:
    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            raise QuantizationError(
                f"weight {t.name} lives in external data and no base_dir was given",
                fix="load the model with onnx.load(path) (loads external data) or pass base_dir=<model directory>",
            )
        try:
            return numpy_helper.to_array(t, base_dir)
        except (OSError, ValueError) as e:
            raise QuantizationError(f"cannot read external data of {t.name} from {base_dir} ({e})", fix="check weights.data is beside the model") from None
    return numpy_helper.to_array(t)


def _scalar(name: str, value: float, elem_type: int) -> TensorProto:
    arr = np.asarray(value, dtype=_FLOAT_TYPES[elem_type])
    return float_tensor(name, arr, elem_type)


def float_tensor(name: str, arr: np.ndarray, elem_type: int) -> TensorProto:
    """An fp32/fp16/bf16 initializer (``arr`` already in that dtype; bf16 as ``ml_dtypes.bfloat16``)."""
    if elem_type == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem_type, arr.shape, arr.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(arr, name)


def fp8_tensor(name: str, arr: np.ndarray) -> TensorProto:
    """An ``float8e4m3fn`` initializer from an ``ml_dtypes.float8_e4m3fn`` array."""
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, arr.shape, arr.view(np.uint8).tobytes(), raw=True)


def fp8_saturating_cast(x: np.ndarray) -> np.ndarray:
    """Round to ``float8e4m3fn`` with saturation: values beyond ±448 become ±448, never NaN."""
    return np.clip(np.asarray(x, dtype=np.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def _row_chunks(w: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """``w`` (any float dtype, any strides) as fp32 copies of `CHUNK_ELEMENTS` along its first axis."""
    rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(w.shape[1:])))
    for r in range(0, w.shape[0], rows):
        yield slice(r, r + rows), np.array(w[r : r + rows], dtype=np.float32, order="C")


def _abs_max(w: np.ndarray, axis: int | tuple[int, ...] | None) -> np.ndarray:
    """``max |w|`` over ``axis`` (None: all; 0 or (1, 2): the axes kept are the later / the first),
    a chunk of rows at a time."""
    if axis is None or axis == 0:
        parts = [np.abs(c).max(axis=axis) for _, c in _row_chunks(w)]
        return np.max(np.stack(parts), axis=0)
    return np.concatenate([np.abs(c).max(axis=axis) for _, c in _row_chunks(w)])


def fp8_divided(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``float8e4m3fn(w / scale)`` with saturation (`fp8_saturating_cast`), a chunk of rows at a time so
    the fp32 temporaries stay bounded whatever ``w``'s size; ``scale`` broadcasts against ``w`` (fp32)
    and may vary along the first axis (then it has that axis' full length)."""
    out = np.empty(w.shape, dtype=ml_dtypes.float8_e4m3fn)
    s = np.asarray(scale, dtype=np.float32)
    per_row = s.ndim == w.ndim and s.shape[0] == w.shape[0] and w.shape[0] > 1
    for rows, chunk in _row_chunks(w):
        np.divide(chunk, s[rows] if per_row else s, out=chunk)
        np.clip(chunk, -FP8_E4M3_MAX, FP8_E4M3_MAX, out=chunk)
        out[rows] = chunk.astype(ml_dtypes.float8_e4m3fn)
    return out


def _round_scale(scale: np.ndarray, elem_type: int) -> np.ndarray:
    """Scales as stored (model dtype), floored so no scale rounds to zero."""
    tiny = np.finfo(np.float16).tiny if elem_type == TensorProto.FLOAT16 else np.finfo(np.float32).tiny
    return np.maximum(np.asarray(scale, dtype=np.float32), tiny).astype(_FLOAT_TYPES[elem_type])


def quantize_weight(w: np.ndarray, mode: WeightScale, elem_type: int) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight and its scale.

    Args:
        w: ``[in, out]`` weight (any float dtype).
        mode: ``"tensor"`` -> scale ``[]``; ``"channel"`` -> scale ``[out]`` (per output channel).
        elem_type: ONNX type of the scale (the model dtype).

    Returns:
        ``(w_fp8 [in, out] float8_e4m3fn, scale)`` with ``w ≈ w_fp8 * scale``.
    """
    amax = _abs_max(w, 0 if mode == "channel" else None)
    scale = _round_scale(amax / FP8_E4M3_MAX, elem_type)
    return fp8_divided(w, scale.astype(np.float32)), scale


def quantize_weight_with_scale(w: np.ndarray, scale: float, elem_type: int) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight of a given per-tensor ``scale`` (a quantized checkpoint's own, rounded to the model
    dtype as stored): ``saturate(round(w / scale))``. For a weight dequantized from FP8 with that
    scale this gives back the FP8 values bit for bit (tests/exporter/test_modelopt_export.py)."""
    stored = _round_scale(np.float32(scale), elem_type)
    return fp8_divided(w, stored.astype(np.float32)), stored


#: The amax of the unsharded weight a tensor-parallel rank holds a part of (`insert_fp8_qdq`'s
#: ``weight_amax``): a float per tensor, a tuple over the rank's output channels per channel; for routed
#: experts one per expert, or per expert a tuple over its output channels. Tuples, so that a deferred
#: FP8 weight's identity (`hybridtrt.exporter.streaming.DeferredFP8`) stays hashable.
WeightAmax = float | tuple


def quantize_weight_of_amax(w: np.ndarray, amax: WeightAmax, elem_type: int) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight whose scale comes from a given ``amax`` (`quantize_weight`'s rule, ``amax / 448``
    rounded to the model dtype), not from ``w``'s own values: a rank's slice of a weight quantized with
    the whole tensor's scale, so that its FP8 values are the slice of the one-device export's."""
    scale = _round_scale(np.asarray(amax, dtype=np.float32) / FP8_E4M3_MAX, elem_type)
    return fp8_divided(w, scale.astype(np.float32)), scale


def in_memory_quantizer(base_dir: str | None = None) -> WeightQuantizer:
    """The default `WeightQuantizer`: reads the weight (inline, or external under ``base_dir``)."""

    def quantizer(w: TensorProto, fp8_name: str, quantize: Quantize) -> tuple[TensorProto, np.ndarray]:
        w_q, scale = quantize(_load_array(w, base_dir))
        return quantized_tensor(fp8_name, w_q), scale

    return quantizer


def insert_fp8_qdq(
    model: onnx.ModelProto,
    act_amax: Mapping[str, float | ExpertAmax],
    *,
    exclude: Sequence[str] = (),
    weight_scale: WeightScale = "tensor",
    base_dir: str | None = None,
    quantizer: WeightQuantizer | None = None,
    fixed: Mapping[str, tuple[float, float] | ExpertScales] | None = None,
    source: str = "calibration",
    weight_amax: Mapping[str, WeightAmax | Mapping[str, WeightAmax]] | None = None,
) -> FP8Recipe:
    """Insert FP8 Q/DQ on the linear layers of ``model``, in place.

    Args:
        model: An exported hybridtrt graph (weights loaded, or external data under ``base_dir``).
        act_amax: ``{MatMul node name: amax}`` of the activation input, from `calibrate` (unused
            with ``fixed``).
        exclude: Regexes; a MatMul whose name matches any (``re.search``) is left in high precision.
        weight_scale: ``"tensor"`` (default, DESIGN.md §7) or ``"channel"``.
        base_dir: Directory of the model file, for weights still in external data.
        quantizer: How weights become FP8 initializers (default `in_memory_quantizer`).
        fixed: A quantized checkpoint's own scales, ``{MatMul node: (input_scale, weight_scale)}``
            (per tensor) and ``{MoeExperts node: ExpertScales}``: exactly these nodes are quantized,
            with these scales, and every other one is left as the checkpoint left it; no default
            exclusion applies.
        source: The recipe's `FP8Recipe.source`.
        weight_amax: A tensor-parallel rank's graph (DESIGN.md §12): ``{MatMul node: amax}`` and
            ``{MoeExperts node: {"up": amax, "down": amax}}`` of the unsharded weights its weights are
            parts of (`WeightAmax`, restricted to the rank's output channels per channel). Their scales
            are the unsharded tensors' rather than the parts' own, so every rank's FP8 weights are
            slices of the one-device export's and the ranks' partial sums add up to its MatMuls.

    Returns:
        The `FP8Recipe`.

    Raises:
        QuantizationError: See the module docstring.
    """
    if weight_scale not in ("tensor", "channel"):
        raise QuantizationError(f"weight scale mode {weight_scale!r} is unknown", fix="use 'tensor' or 'channel'")
    opset = _opset(model)
    if opset < MIN_FP8_OPSET:
        raise QuantizationError(
            f"FP8 Q/DQ needs default-domain opset ≥ {MIN_FP8_OPSET} (float8e4m3fn), the graph has opset {opset}",
            fix=f"export with --opset {MIN_FP8_OPSET} or newer (the default is fine)",
        )
    patterns = _compile(exclude)
    graph = model.graph
    existing = [n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if existing:
        raise QuantizationError(
            f"the graph already has {len(existing)} Q/DQ node(s) (e.g. {existing[0]!r}); it is quantized already",
            fix="quantize the unquantized export (run the pass once per graph)",
        )
    inits = {t.name: t for t in graph.initializer}
    quantize = quantizer or in_memory_quantizer(base_dir)
    recipe = FP8Recipe(weight_scale=weight_scale, exclude_patterns=list(exclude), source=source)
    if fixed is not None:
        if weight_scale != "tensor" or exclude:
            raise QuantizationError("a quantized checkpoint's own scales are per tensor and its exclusions its own", fix="drop --weight-scale and --exclude")
        recipe.default_exclusions = []
        matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
        moe = {n.name for n in graph.node if n.domain == DOMAIN and n.op_type == MOE_EXPERTS}
        absent = sorted(set(fixed) - matmuls - moe)
        if absent:
            raise QuantizationError(
                f"the checkpoint quantizes {len(absent)} linear layer(s) the graph has no MatMul for: {absent[:4]}",
                fix="report this with the checkpoint's config.json (the layer was not traced as a MatMul)",
            )
        act_amax = {}

    plan: list[onnx.NodeProto] = []
    experts_plan: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == MOE_EXPERTS and fixed is not None:
            if node.name in fixed:
                experts_plan.append(node)
            else:
                recipe.excluded[node.name] = "not quantized in the checkpoint"
            continue
        if node.domain == DOMAIN and node.op_type == MOE_EXPERTS:
            matched = next((text for text, rx in patterns if rx.search(node.name)), None)
            if matched is None:
                experts_plan.append(node)
            else:
                recipe.excluded[node.name] = f"matches --exclude {matched!r}"
            continue
        if node.op_type != "MatMul":
            continue
        if fixed is not None:
            if node.name in fixed:
                plan.append(node)
            else:
                recipe.excluded[node.name] = "not quantized in the checkpoint"
            continue
        reason = _exclusion_reason(node, inits, patterns)
        if reason is None:
            plan.append(node)
        else:
            recipe.excluded[node.name] = reason
    missing = [n.name for n in plan if n.name not in act_amax and fixed is None]
    missing += [n.name for n in experts_plan if not isinstance(act_amax.get(n.name), ExpertAmax) and fixed is None]
    if missing:
        raise QuantizationError(
            f"no calibration amax for {len(missing)} layer(s): {missing[:4]}{' …' if len(missing) > 4 else ''}",
            fix="calibrate the same model that was traced (calibrate(model, batches) keys by MatMul node name)",
        )
    given = {n.name: fixed[n.name] for n in plan} if fixed is not None else {n.name: (act_amax[n.name] / FP8_E4M3_MAX, None) for n in plan}
    if fixed is not None:
        given.update({n.name: tuple(x for scales in astuple(fixed[n.name]) for x in scales) for n in experts_plan})
    bad = {name: v for name, v in given.items() if not all(x is None or (np.isfinite(x) and x >= 0) for x in v)}
    if bad:
        if fixed is not None:
            raise QuantizationError(f"non-finite or negative scales in the checkpoint: {bad}", fix="re-download the checkpoint")
        raise QuantizationError(f"non-finite or negative calibration amax: {bad}", fix="re-run calibration in fp32")

    weight_users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            weight_users[name] = weight_users.get(name, 0) + 1

    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # MatMul name -> nodes to insert before it
    dropped: set[str] = set()
    for node in plan:
        scope, dotted = _prefixes(node.name)
        w_init = inits[node.input[1]]
        elem = w_init.data_type
        # Activation Q/DQ.
        a_scale = float(_round_scale(np.float32(given[node.name][0]) if fixed is not None else np.float32(act_amax[node.name]) / FP8_E4M3_MAX, elem).astype(np.float32))
        s_name, zp_name = f"{dotted}.input_scale", f"{dotted}.input_zero_point"
        q_out, dq_out = f"{scope}/input_quantizer/QuantizeLinear_output_0", f"{scope}/input_quantizer/DequantizeLinear_output_0"
        graph.initializer.extend([_scalar(s_name, a_scale, elem), fp8_tensor(zp_name, np.zeros((), ml_dtypes.float8_e4m3fn))])
        q = helper.make_node("QuantizeLinear", [node.input[0], s_name, zp_name], [q_out], name=f"{scope}/input_quantizer/QuantizeLinear", saturate=1)
        dq = helper.make_node("DequantizeLinear", [q_out, s_name, zp_name], [dq_out], name=f"{scope}/input_quantizer/DequantizeLinear")
        # Weight: FP8 initializer + DQ.
        fp8_name, ws_name, wzp_name = f"{dotted}.weight_t_fp8", f"{dotted}.weight_scale", f"{dotted}.weight_zero_point"
        if fixed is not None:
            how = partial(quantize_weight_with_scale, scale=float(fixed[node.name][1]), elem_type=elem)
        elif weight_amax is not None and node.name in weight_amax:
            how = partial(quantize_weight_of_amax, amax=weight_amax[node.name], elem_type=elem)
        else:
            how = partial(quantize_weight, mode=weight_scale, elem_type=elem)
        w_fp8, w_scale = quantize(w_init, fp8_name, how)
        wdq_out = f"{scope}/weight_quantizer/DequantizeLinear_output_0"
        graph.initializer.extend(
            [w_fp8, float_tensor(ws_name, w_scale, elem), fp8_tensor(wzp_name, np.zeros(w_scale.shape, ml_dtypes.float8_e4m3fn))]
        )
        wdq_attrs = {"axis": 1} if weight_scale == "channel" else {}
        wdq = helper.make_node("DequantizeLinear", [fp8_name, ws_name, wzp_name], [wdq_out], name=f"{scope}/weight_quantizer/DequantizeLinear", **wdq_attrs)
        new_nodes[node.name] = [q, dq, wdq]
        weight_users[w_init.name] -= 1
        if weight_users[w_init.name] == 0:
            dropped.add(w_init.name)
        node.input[0], node.input[1] = dq_out, wdq_out
        recipe.quantized.append(node.name)
        recipe.activation_scales[node.name] = a_scale
        if weight_scale == "tensor":
            recipe.weight_scales[node.name] = float(w_scale.astype(np.float32))
    for node in experts_plan:
        old_weights = list(node.input[3:])  # replaced by FP8 copies
        stats = fixed[node.name] if fixed is not None else act_amax[node.name]
        amax = (weight_amax or {}).get(node.name) if fixed is None else None
        recipe.experts[node.name] = _quantize_experts(graph, node, stats, inits, weight_scale, quantize, amax)
        for name in old_weights:
            weight_users[name] -= 1
            if weight_users[name] == 0:
                dropped.add(name)
        recipe.quantized.append(node.name)

    splice_before_matmuls(graph, new_nodes, dropped)
    if experts_plan:
        attach_used_functions(model)
    return recipe


def splice_before_matmuls(graph: onnx.GraphProto, new_nodes: Mapping[str, Sequence[onnx.NodeProto]], dropped: set[str]) -> None:
    """Put each MatMul's new nodes right before it (keeps topological order) and remove the
    initializers (and their value_info) in ``dropped``: the last step of the quantization passes."""
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        ordered.extend(new_nodes.get(node.name, []) if node.op_type == "MatMul" else [])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    if dropped:
        kept = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        kept_vi = [v for v in graph.value_info if v.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)


def expert_input_scales(amax: list[float], tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    """Per-expert activation scales ``amax / 448`` (fp32, never zero) and the experts that fell back.

    An expert that saw no calibration token gets `EXPERT_FALLBACK`: the largest scale among the
    layer's reached experts.
    """
    reached = [a for a, n in zip(amax, tokens) if n]
    fallback = max(reached) if reached else 0.0
    fell_back = [e for e, n in enumerate(tokens) if not n]
    values = np.array([a if n else fallback for a, n in zip(amax, tokens)], dtype=np.float32)
    return _round_scale(values / FP8_E4M3_MAX, TensorProto.FLOAT), fell_back


def quantize_expert_weights(w: np.ndarray, mode: WeightScale, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """FP8 expert weights ``[E, out, in]`` and their fp32 scale: ``[E, 1]`` per expert (``"tensor"``,
    each expert's matrix is one tensor) or ``[E, out]`` per expert and output channel. (``first``, the
    index of ``w``'s first expert in its layer, is what streaming expert by expert passes; unused.)"""
    amax = _abs_max(w, 2) if mode == "channel" else _abs_max(w, (1, 2))[:, None]
    scale = _round_scale(amax / FP8_E4M3_MAX, TensorProto.FLOAT)
    return fp8_divided(w, scale[:, :, None]), scale


def quantize_expert_weights_with_scales(w: np.ndarray, scales: tuple[float, ...], first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """FP8 expert weights ``[E', out, in]`` with a checkpoint's own per-expert scales (``scales`` for
    the whole layer; ``w`` holds experts ``first`` … ``first + E' - 1``), as `quantize_expert_weights`'s."""
    scale = np.asarray(scales[first : first + w.shape[0]], dtype=np.float32)[:, None]
    return fp8_divided(w, scale[:, :, None]), scale


def quantize_expert_weights_of_amax(w: np.ndarray, amax: tuple, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """FP8 expert weights ``[E', out, in]`` (experts ``first`` … of the layer) whose scales come from the
    given per-expert ``amax`` (``[E]`` per expert, ``[E][out]`` per expert and output channel), as
    `quantize_expert_weights` computes them from the weights: a rank's rows of the unsharded experts'."""
    a = np.asarray(amax, dtype=np.float32)[first : first + w.shape[0]]
    scale = _round_scale((a if a.ndim == 2 else a[:, None]) / FP8_E4M3_MAX, TensorProto.FLOAT)
    return fp8_divided(w, scale[:, :, None]), scale


def _quantize_experts(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    stats: ExpertAmax | ExpertScales,
    inits: Mapping[str, TensorProto],
    weight_scale: WeightScale,
    quantizer: WeightQuantizer,
    weight_amax: Mapping[str, WeightAmax] | None = None,
) -> dict[str, Any]:
    """Turn one ``MoeExperts`` node into ``MoeExpertsFp8`` in place; returns its recipe entry. With a
    checkpoint's `ExpertScales`, its scales as they are (no token counts: nothing was calibrated); with
    ``weight_amax`` (``{"up": …, "down": …}``: a rank's experts), the unsharded experts' weight scales."""
    _, dotted = _prefixes(node.name)  # model.layers.{i}.mixer.experts
    given = isinstance(stats, ExpertScales)
    entry: dict[str, Any] = {"tokens": [] if given else list(stats.tokens)}
    inputs = list(node.input[:3])
    for proj, w_name in (("up", node.input[3]), ("down", node.input[4])):
        names = (f"{dotted}.{proj}_proj_fp8", f"{dotted}.{proj}_weight_scale", f"{dotted}.{proj}_input_scale")
        if given:
            how = partial(quantize_expert_weights_with_scales, scales=tuple(getattr(stats, f"{proj}_weight")))
            in_scale, fell_back = np.asarray(getattr(stats, f"{proj}_input"), dtype=np.float32), []
        else:
            if weight_amax is not None:
                how = partial(quantize_expert_weights_of_amax, amax=weight_amax[proj])
            else:
                how = partial(quantize_expert_weights, mode=weight_scale)
            in_scale, fell_back = expert_input_scales(getattr(stats, f"{proj}_input"), stats.tokens)
        w_fp8, w_scale = quantizer(inits[w_name], names[0], how)
        graph.initializer.extend([w_fp8, numpy_helper.from_array(w_scale, names[1]), numpy_helper.from_array(in_scale, names[2])])
        inputs += names
        entry[f"{proj}_input_scale"] = in_scale.tolist()
        if weight_scale == "tensor":
            entry[f"{proj}_weight_scale"] = w_scale[:, 0].tolist()
        entry["fallback_experts"] = fell_back
    node.op_type = MOE_EXPERTS_FP8
    node.name = node.name.rsplit("/", 1)[0] + "/" + MOE_EXPERTS_FP8
    del node.input[:]
    node.input.extend(inputs)
    return entry


def attach_used_functions(model: onnx.ModelProto) -> None:
    """Attach the bodies of the hybridtrt ops now in the graph and drop those no node uses."""
    attach_functions(model)
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    kept = [f for f in model.functions if f.domain != DOMAIN or f.name in used]
    del model.functions[:]
    model.functions.extend(kept)


def quantized_weight_bytes(model: onnx.ModelProto, base_dir: str | Path | None = None) -> dict[str, int]:
    """Bytes of the linear-layer weights by storage type: ``{"fp8": n, "high_precision": n}``.

    Counts initializers named ``*.weight_t`` / ``*.weight_t_fp8`` of the quantizable projections and
    the routed experts' ``*.experts.{up,down}_proj`` / ``*_proj_fp8`` (works on in-memory or
    external-data models: sizes come from dims and element size).
    """
    out = {"fp8": 0, "high_precision": 0}
    for t in model.graph.initializer:
        if not any(f".{p}.weight_t" in t.name for p in QUANTIZABLE_PROJECTIONS) and not _EXPERT_WEIGHT.search(t.name):
            continue
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type == TensorProto.FLOAT8E4M3FN:
            out["fp8"] += n
        else:
            out["high_precision"] += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return out


__all__ = [
    "CHUNK_ELEMENTS",
    "attach_used_functions",
    "fp8_divided",
    "DEFAULT_EXCLUSIONS",
    "EXPERT_FALLBACK",
    "ExpertAmax",
    "FP8Recipe",
    "FP8_E4M3_MAX",
    "MIN_FP8_OPSET",
    "Quantize",
    "WeightQuantizer",
    "QUANTIZABLE_PROJECTIONS",
    "fp8_saturating_cast",
    "float_tensor",
    "fp8_tensor",
    "in_memory_quantizer",
    "insert_fp8_qdq",
    "expert_input_scales",
    "quantize_expert_weights",
    "quantize_expert_weights_of_amax",
    "quantize_weight",
    "quantize_weight_of_amax",
    "quantized_weight_bytes",
    "WeightAmax",
]
