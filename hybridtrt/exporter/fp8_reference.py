"""The FP8 reference: our model computing what an FP8 export's Q/DQ compute (DESIGN.md §7, §8).

An FP8 export is a different function from the model it was made from: every quantized linear sees
its input and its weight rounded to float8e4m3fn with the recipe's scales. Judging such an artefact
against the unquantized model mixes two questions — does the artefact compute the quantized model
(a bug when not), and how much does the recipe cost (quality, a property of the recipe). So
`emulate_fp8` makes our PyTorch model compute the quantized function **from the recipe written in
``hybridtrt.json`` and the checkpoint's own weights**, never from the export's files: the artefact
(its FP8 initializers, scales, Q/DQ nodes, MoeExpertsFp8 bodies) is judged against it with the same
truth + yardstick rule as every other precision (fp32 compute = the truth, the export's dtype = the
yardstick), and the recipe's cost is judged separately against the unquantized truth.

The rounding follows the standards the export is written in, not our exporter's code:

- ONNX ``QuantizeLinear`` (opset ≥ 19, float8 output, ``saturate=1``): ``y = saturate(round(x /
  y_scale))``, rounding to nearest even, values beyond ±448 to ±448 (onnx/docs/Operators.md,
  QuantizeLinear; "Float stored in 8 bits" in onnx/docs/docs/technical/float8.md). ``DequantizeLinear``:
  ``y = x · x_scale`` in the scale's type. The division runs in fp32 (the exports' scales are model-dtype
  values; ONNX Runtime and TensorRT divide in fp32), here in the wider of fp32 and the model dtype.
- Weights: ``w_fp8 = saturate(round(w / scale))`` (DESIGN.md §7): the per-tensor scale as recorded in
  the recipe; per output channel ``max(amax / 448, tiny)`` rounded to the export's dtype, recomputed
  here from the weights.
- Routed experts (``MoeExpertsFp8``, `hybridtrt.ops.moe_onnx`): expert ``e``'s up input
  quantized with ``up_input_scale[e]``, ``relu(up_e x)²`` with ``down_input_scale[e]``, both
  matmuls in fp32 on dequantized values, the weighted sum over k in fp32, cast once to x's dtype.

torch's ``float8_e4m3fn`` conversion (round to nearest even; NaN beyond the range, hence the clamp)
is the rounding: an implementation independent of the exporter's (``ml_dtypes``) and of ONNX Runtime's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.naming import scope_path
from hybridtrt.models.loading import parse_dtype
from hybridtrt.models.moe import Experts
from hybridtrt.ops.moe import group_by_expert, relu2

#: The E4M3 format's bound, from torch's own dtype (not the exporter's constant, nor its arithmetic);
#: and importing the graph rewrite would load onnxscript into every `validate` (1.3 s).
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

__all__ = ["FP32_DITHER", "FP8_MAX", "Dither", "as_exported", "set_dither", "dequantized_weight", "dynamic_scale", "emulate_fp8", "fake_quantize", "fp8_emulated"]

_MOE_NODES = ("MoeExperts", "MoeExpertsFp8")


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_quantize(x: Tensor, scale: Tensor | float, dtype: torch.dtype | None = None) -> Tensor:
    """``QuantizeLinear`` → ``DequantizeLinear`` (float8e4m3fn, zero point 0, saturating), computed
    in the wider of fp32 and x's dtype; the result in ``dtype`` (default x's)."""
    wide = _wide(x.dtype)
    s = torch.as_tensor(scale, dtype=wide, device=x.device)
    y = x.to(dtype=wide, copy=True)  # one working copy, every step in place: a weight's fake
    y.div_(s).clamp_(-FP8_MAX, FP8_MAX)  # quantization holds 1.25× it, not 3× (verification's peak)
    y.copy_(y.to(torch.float8_e4m3fn))
    return y.mul_(s).to(dtype or x.dtype)


def _channel_scale(w: Tensor, dim: int, scale_dtype: torch.dtype) -> Tensor:
    """Per-output-channel weight scale ``max(amax / 448, tiny)`` rounded to the export's scale dtype."""
    tiny = torch.finfo(torch.float16 if scale_dtype == torch.float16 else torch.float32).tiny
    amax = w.to(torch.float32).abs().amax(dim=dim, keepdim=True)
    return torch.clamp(amax / FP8_MAX, min=tiny).to(scale_dtype)


def dequantized_weight(w: Tensor, scale: float | None, scale_dtype: torch.dtype, dtype: torch.dtype) -> Tensor:
    """``w [out, in]`` (or ``[E, out, in]`` with ``scale`` a tensor) through float8e4m3fn with a
    per-tensor ``scale``, or per output channel when ``scale`` is None; the result in ``dtype``."""
    s = _channel_scale(w, -1, scale_dtype) if scale is None else scale
    return fake_quantize(w.to(_wide(dtype)), s if isinstance(s, Tensor) else float(s), dtype)


def dynamic_scale(x: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """The per-call per-tensor scale ``max(amax(|x|) / 448, tiny)`` rounded to the export's scale
    dtype: what a recipe with ideal static scales would hold for exactly this input."""
    return _channel_scale(x.reshape(1, -1), -1, scale_dtype).reshape(())


class Dither:
    """Relative noise of ``±amount`` (uniform, seeded) on every activation before its quantizer: a
    second, equally correct fp32 implementation of the same FP8 model. Two fp32 implementations
    differ by a few ulps wherever they sum in another order, and an FP8 rounding flips wherever a
    value sits that close to a rounding boundary: one flip moves its element by a whole FP8 step
    (6–12 %), and every later quantizer turns that perturbation into more flips. The fp64 run is no
    such yardstick (its fp32-rounded values mostly equal the fp32 run's, so it flips almost never),
    nor is a 2-ulp dither (it flips as rarely as the artefact: chance against chance); `FP32_DITHER`
    flips a few per layer."""

    def __init__(self, amount: float, seed: int = 0) -> None:
        self.amount = amount
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        wide = x.to(_wide(x.dtype))
        noise = torch.rand(wide.shape, generator=self.generator, dtype=wide.dtype).mul_(2).sub_(1).mul_(self.amount)
        return wide * (1 + noise)


#: The dither of the fp32 FP8 yardstick: 2^-16 relative (128 fp32 ulps). A flip needs a value within
#: the dither of an FP8 rounding boundary (FP8 steps are 2^-4..2^-3 relative), so about 2^-12 of
#: the quantized values flip: a handful per layer at test sizes, never the lucky run without one.
#: 2 ulps (2^-22, an honest reordering error) flip about once per model, as the artefact does, so
#: a ratio of two such counts is chance (measured: the dithered run 0, the artefact one flip,
#: logits 8.9e-3 after 5 layers; with 2^-16 the yardstick reads 3e-2 there, and 3e-7 artefacts
#: stay 3e-7). Run by tests/cli/test_fp8_cli.py and tests/exporter/test_fp8_reference.py (fp32 exports).
FP32_DITHER = 2.0**-16


def _dithered(module: nn.Module, x: Tensor) -> Tensor:
    dither = getattr(module, "_fp8_dither", None)
    return x if dither is None else dither(x)


def _fp8_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    input_scale, weight_scale, scale_dtype = self._fp8  # type: ignore[attr-defined]
    w = dequantized_weight(self.weight, weight_scale, scale_dtype, x.dtype)
    s = dynamic_scale(x, scale_dtype) if input_scale is None else input_scale
    return F.linear(fake_quantize(_dithered(self, x), s, x.dtype), w, self.bias)


def _fp8_experts_forward(self: Experts, x: Tensor, topk_indices: Tensor, topk_weights: Tensor) -> Tensor:
    """MoeExpertsFp8's arithmetic, grouped by expert (experts nobody chose never run)."""
    entry = self._fp8  # type: ignore[attr-defined]
    wide = _wide(x.dtype)
    order, groups = group_by_expert(topk_indices, self.num_experts)
    token_of = order // topk_indices.shape[1]
    xs = x[token_of].to(wide)
    out = torch.empty(xs.shape[0], x.shape[1], dtype=wide, device=x.device)
    for expert, rows in groups:
        up, down = self.weights_of(expert)
        up_w = dequantized_weight(up, entry["up_weight"][expert], torch.float32, wide)
        down_w = dequantized_weight(down, entry["down_weight"][expert], torch.float32, wide)
        x_e = xs[rows]
        up_s = entry["up_input"][expert] if entry["up_input"] else dynamic_scale(x_e, torch.float32)
        h = relu2(fake_quantize(_dithered(self, x_e), up_s) @ up_w.t())
        down_s = entry["down_input"][expert] if entry["down_input"] else dynamic_scale(h, torch.float32)
        out[rows] = fake_quantize(_dithered(self, h), down_s) @ down_w.t()
    weighted = out * topk_weights.reshape(-1)[order].to(wide)[:, None]
    y = torch.zeros(x.shape[0], x.shape[1], dtype=wide, device=x.device)
    return y.index_add_(0, token_of, weighted).to(x.dtype)


def _expert_entry(entry: Mapping[str, Any], num_experts: int, node: str) -> dict[str, list[Any]]:
    """``{"up_input", "down_input", "up_weight", "down_weight"}`` per expert (weights None per channel)."""
    out: dict[str, list[Any]] = {}
    for proj in ("up", "down"):
        scales = entry.get(f"{proj}_input_scale")
        if scales is None or len(scales) != num_experts:
            raise QuantizationError(
                f"the FP8 recipe of {node} has no {proj}_input_scale for its {num_experts} experts",
                fix="re-export with --quantize fp8 (the recipe in hybridtrt.json is incomplete)",
            )
        out[f"{proj}_input"] = [float(s) for s in scales]
        weight = entry.get(f"{proj}_weight_scale")
        out[f"{proj}_weight"] = [float(s) for s in weight] if weight is not None else [None] * num_experts
    return out


def _dynamic_experts(module: Experts, per_channel: bool) -> dict[str, list[Any]]:
    """Ideal scales of one routed-experts module: activations per call (empty lists), weights from
    each expert's own amax (per tensor) or per channel (None)."""
    n = module.num_experts
    if per_channel:
        return {"up_input": [], "down_input": [], "up_weight": [None] * n, "down_weight": [None] * n}
    up, down = [], []
    for e in range(n):
        w_up, w_down = module.weights_of(e)
        up.append(float(dynamic_scale(w_up, torch.float32)))
        down.append(float(dynamic_scale(w_down, torch.float32)))
    return {"up_input": [], "down_input": [], "up_weight": up, "down_weight": down}


def emulate_fp8(
    model: nn.Module, recipe: Mapping[str, Any], scale_dtype: torch.dtype, *, dynamic: bool = False, dither: float | None = None
) -> Callable[[], None]:
    """Make ``model`` compute what the FP8 export of ``recipe`` computes, in place.

    Args:
        model: A `HybridLM` (eager or lazy) in any dtype: fp32 is the FP8 truth, the export's dtype
            its yardstick.
        recipe: ``hybridtrt.json``'s ``"quantization"`` (`hybridtrt.graphs.fp8_qdq.FP8Recipe`).
        scale_dtype: The export's dtype: scales recomputed here (per channel) are rounded to it.
        dynamic: Quantize the same layers with **ideal** scales instead of the recipe's: every
            activation scale from the amax of the very tensor it quantizes (per call; per expert
            over its tokens), every weight scale from the weights. Nothing calibrated is used, so
            this is the yardstick of the recipe's own cost (`hybridtrt.judge` ``fp8-recipe``): the
            FP8 format's error on these layers at this depth, which a recipe with a wrong scale
            exceeds.
        dither: `Dither` every activation before its quantizer by this relative amount (the fp32
            FP8 yardstick: `FP32_DITHER`); `set_dither` changes it later.

    Returns:
        A function that restores the model's own forward passes.

    Raises:
        QuantizationError: The recipe names a layer the model lacks, or lacks a scale.
    """
    if recipe.get("scheme", "fp8") != "fp8" or recipe.get("activation_scale", "tensor") != "tensor":
        raise QuantizationError(f"cannot emulate the quantization recipe {recipe.get('scheme')!r}", fix="validate an export made with --quantize fp8")
    per_channel = recipe.get("weight_scale", "tensor") == "channel"
    linears = {scope_path(n, wrapper_prefix="") + "/MatMul": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    experts = {scope_path(n, wrapper_prefix="") + "/" + op: m for n, m in model.named_modules() if isinstance(m, Experts) for op in _MOE_NODES}
    patched: list[nn.Module] = []
    for node in recipe.get("quantized", []):
        if node in linears:
            module = linears[node]
            if dynamic:
                module._fp8 = (None, None if per_channel else float(dynamic_scale(module.weight, scale_dtype)), scale_dtype)
            elif node not in recipe.get("activation_scales", {}) or (not per_channel and node not in recipe.get("weight_scales", {})):
                raise QuantizationError(f"the FP8 recipe has no scales for {node}", fix="re-export with --quantize fp8 (the recipe in hybridtrt.json is incomplete)")
            else:
                weight_scale = None if per_channel else float(recipe["weight_scales"][node])
                module._fp8 = (float(recipe["activation_scales"][node]), weight_scale, scale_dtype)
            module.forward = MethodType(_fp8_linear_forward, module)
        elif node in experts:
            module = experts[node]
            module._fp8 = (
                _dynamic_experts(module, per_channel) if dynamic else _expert_entry(recipe.get("experts", {}).get(node, {}), module.num_experts, node)
            )
            module.forward = MethodType(_fp8_experts_forward, module)
        else:
            raise QuantizationError(
                f"the FP8 recipe quantizes {node}, which this model does not have",
                fix="validate with the checkpoint the export was made from",
            )
        patched.append(module)
    model._fp8_patched = patched
    set_dither(model, dither)

    def restore() -> None:
        set_dither(model, None)
        for module in patched:
            del module.forward, module._fp8
        del model._fp8_patched

    return restore


def set_dither(model: nn.Module, amount: float | None, seed: int = 0) -> None:
    """Dither the activations of an emulated model's quantizers by ``amount`` (None: exact), one
    seeded generator for the whole model."""
    dither = None if amount is None else Dither(amount, seed)
    for module in [*getattr(model, "_fp8_patched", []), *getattr(model, "_fp4_activation_patched", [])]:
        module._fp8_dither = dither


@contextmanager
def fp8_emulated(model: nn.Module, recipe: Mapping[str, Any] | None, scale_dtype: torch.dtype) -> Iterator[nn.Module]:
    """`emulate_fp8` for the duration of a block (nothing when ``recipe`` is None)."""
    restore = emulate_fp8(model, recipe, scale_dtype) if recipe else (lambda: None)
    try:
        yield model
    finally:
        restore()


def as_exported(model: nn.Module, manifest: Any, *, dynamic: bool = False, dither: float | None = None) -> nn.Module:
    """``model`` computing what the export of ``manifest`` computes: the FP8 reference of an FP8
    export (`emulate_fp8`, scales rounded to the export's dtype), the 4-bit weights' reference of a
    W4A16 export (`hybridtrt.exporter.weight_only_reference`), the model itself otherwise."""
    recipe = getattr(manifest, "quantization", None)
    if recipe:
        emulate_fp8(model, recipe, parse_dtype(manifest.dtype), dynamic=dynamic, dither=dither)
    weights = getattr(manifest, "weight_only", None)
    if weights:  # the 4-bit weights' reference (and FP4 activations, dithered like FP8's)
        from hybridtrt.exporter.weight_only_reference import emulate_weight_only

        emulate_weight_only(model, weights, parse_dtype(manifest.dtype), dither=dither)
    return model
