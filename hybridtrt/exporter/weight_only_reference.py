"""The 4-bit weights' reference: our model computing with the weights a W4A16 export dequantizes
(DESIGN.md §7, §8), so the artefact is judged against the function it is meant to compute, and the
recipe's cost separately against the unquantized truth.

From the recipe written in ``hybridtrt.json`` (``"weight_only"``) and the checkpoint's own weights,
never from the export's files, after the standards the export is written in:

- INT4 (ONNX ``DequantizeLinear``, int4, blocked along the GEMM's K): the weight in the export's
  dtype, per block of ``block`` inputs ``scale = amax / 7`` computed in fp32 and stored in the export's
  dtype (never zero), ``q = clamp(round_half_even(w / scale), -8, 7)``, and ``y = q · scale`` in the
  scale's type (the DequantizeLinear output type, "which also determines the precision of the
  multiplication": onnx/docs/Operators.md). torch's ``round`` (half to even) and arithmetic are the
  implementation: independent of the exporter's (numpy, ``ml_dtypes``) and of ONNX Runtime's.
- AWQ (``"awq"`` in the recipe): the input times ``pre_quant_scale`` ``p`` (decoded from the recipe;
  in x's dtype, as the graph's ``Mul``), the weight ``w / p`` (fp32) through the same INT4.
- NVFP4 from a checkpoint: the loader's weights are ModelOpt's own dequantization already
  (`hybridtrt.models.modelopt`, checked against ModelOpt's hashes), which the export's chained
  ``DequantizeLinear`` (and ``MoeExpertsNvfp4``'s body, for routed experts) computes step for step;
  nothing changes.
- NVFP4 with FP4 activations (``"activations"`` in the recipe, `hybridtrt.graphs.fp4_activations`):
  each such linear's input goes through `fp4_activation` with the recorded ``input_scale``, then back
  to x's dtype, as the graph's ``Cast``. `fp4_activation` is written from ModelOpt's fake quantization
  (``nvfp4_quant.py``: the block scale through float8e4m3fn, E2M1 by its decision thresholds), not
  from the graph's ``QuantizeLinear`` or the ONNX Runtime emulation's ``Round`` arithmetic; the three
  agree bit for bit (tests/graphs/test_fp4_activations.py).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from types import MethodType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.naming import scope_path

#: ModelOpt's INT4 bound (``INT4QTensor._get_quant_maxbound(4)``), written out here on purpose.
INT4_BOUND = 7.0


def int4_dequantized(w: Tensor, block: int, dtype: torch.dtype, pre_scale: Tensor | None = None) -> Tensor:
    """``w [out, in]`` through blocked symmetric INT4 (blocks of ``block`` inputs), in ``dtype``;
    with an AWQ ``pre_scale [in]`` (model-dtype values), of ``w / pre_scale`` (divided in fp32)."""
    out, k = w.shape
    if k % block:
        raise QuantizationError(f"a weight with {k} inputs cannot take blocks of {block}", fix="re-export (the recipe does not match the checkpoint)")
    w32 = w.to(dtype).to(torch.float32, copy=True).contiguous()  # one working copy, every step in place (verification's peak)
    if pre_scale is not None:
        w32.div_(pre_scale.to(torch.float32))
    blocks = w32.view(out, k // block, block)
    tiny = torch.finfo(torch.float16 if dtype == torch.float16 else torch.float32).tiny
    amax = torch.maximum(blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True).neg_())  # |w|'s max, no |w| copy
    scale = torch.clamp(amax / INT4_BOUND, min=tiny).to(dtype).to(torch.float32)
    blocks.div_(scale).round_().clamp_(-8, 7).mul_(scale)
    return w32.to(dtype)


#: E2M1 by decision thresholds (ModelOpt's ``fp4_round_magnitude``): ``|v|`` up to each bound (``<=``
#: where the tie goes down to the even code, ``<`` where it goes up) takes the value beside it; above
#: the last, 6 (saturation).
E2M1_THRESHOLDS = ((0.25, True, 0.0), (0.75, False, 0.5), (1.25, True, 1.0), (1.75, False, 1.5), (2.5, True, 2.0), (3.5, False, 3.0), (5.0, True, 4.0))
#: NVFP4 activation block (values per float8e4m3fn scale) and the two formats' largest magnitudes.
FP4_BLOCK, E2M1_LARGEST, E4M3_LARGEST = 16, 6.0, 448.0


def fp4_activation(x: Tensor, scale: float) -> Tensor:
    """``x`` through NVFP4 dynamic quantization and back, in fp32: per block of 16 on the last axis,
    ``b = float8e4m3fn(min(amax / (6 · scale), 448))``, ``d = b · scale``, each value rounded to E2M1
    times ``d`` in units of ``d`` (``d`` = 0: the block is 0)."""
    xf = x.to(torch.float32)
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // FP4_BLOCK, FP4_BLOCK)
    s = torch.tensor(scale, dtype=torch.float32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = (amax / (E2M1_LARGEST * s)).clamp(max=E4M3_LARGEST).to(torch.float8_e4m3fn).to(torch.float32) * s
    v = blocks / torch.where(d == 0, torch.ones_like(d), d)
    a = v.abs()
    q = torch.full_like(a, E2M1_LARGEST)
    for bound, inclusive, value in reversed(E2M1_THRESHOLDS):
        q = torch.where(a <= bound if inclusive else a < bound, torch.tensor(value), q)
    return (torch.sign(v) * q * d).reshape(xf.shape)


def _fp4_activation_forward(self: nn.Linear, x: Tensor) -> Tensor:
    from hybridtrt.exporter.fp8_reference import _dithered  # the fp32 yardstick's dither, as FP8's

    return F.linear(fp4_activation(_dithered(self, x), self._fp4_input_scale).to(x.dtype), self.weight, self.bias)  # type: ignore[attr-defined]


def _int4_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    block, dtype, pre_scale = self._int4  # type: ignore[attr-defined]
    if pre_scale is not None:  # the graph's pre_quant_scale Mul, in x's dtype
        x = x * pre_scale.to(x.dtype)
    return F.linear(x, int4_dequantized(self.weight, block, dtype, pre_scale).to(x.dtype), self.bias)


def emulate_weight_only(model: nn.Module, recipe: Mapping[str, Any], dtype: torch.dtype, *, dither: float | None = None) -> Callable[[], None]:
    """Make ``model`` compute with the weights the W4A16 export of ``recipe`` dequantizes (and its FP4
    activations, W4A4), in place.

    Args:
        model: A `HybridLM` (eager or lazy) in any dtype.
        recipe: ``hybridtrt.json``'s ``"weight_only"`` (`hybridtrt.graphs.weight_only.WeightOnlyRecipe`).
        dtype: The export's dtype (INT4 scales and dequantized weights are in it).
        dither: W4A4: dither each activation before its quantizer by this relative amount (the fp32
            yardstick, `hybridtrt.exporter.fp8_reference.set_dither`).

    Returns:
        A function that restores the model's own forward passes.

    Raises:
        QuantizationError: An unknown scheme, or a layer the model does not have.
    """
    scheme = recipe.get("scheme")
    if scheme not in ("int4", "nvfp4"):
        raise QuantizationError(f"cannot emulate the weight-only recipe {scheme!r}", fix="validate with the hybridtrt that made the export")
    linears = {scope_path(n, wrapper_prefix="") + "/MatMul": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    patched: list[nn.Module] = []
    for node in recipe.get("quantized", []):
        if node.endswith("/MoeExpertsNvfp4"):  # routed experts as the checkpoint has them: the loader's weights are the definition
            continue
        module = linears.get(node)
        if module is None:
            raise QuantizationError(f"the 4-bit recipe quantizes {node}, which this model does not have", fix="validate with the checkpoint the export was made from")
        if scheme == "int4":
            encoded = (recipe.get("awq") or {}).get("pre_quant_scales", {}).get(node)
            pre_scale = torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype="<f4").astype(np.float32)) if encoded else None
            if pre_scale is not None and pre_scale.numel() != module.in_features:
                raise QuantizationError(f"the AWQ scale of {node} has {pre_scale.numel()} values for {module.in_features} inputs", fix="re-export")
            module._int4 = (int(recipe.get("blocks", {}).get(node, recipe["block_size"])), dtype, pre_scale)
            module.forward = MethodType(_int4_linear_forward, module)
            patched.append(module)
        elif node in (recipe.get("activations") or {}).get("input_scales", {}):
            module._fp4_input_scale = float(recipe["activations"]["input_scales"][node])
            module.forward = MethodType(_fp4_activation_forward, module)
            patched.append(module)

    fp4_patched = [m for m in patched if hasattr(m, "_fp4_input_scale")]
    if fp4_patched:
        from hybridtrt.exporter.fp8_reference import set_dither

        model._fp4_activation_patched = fp4_patched
        set_dither(model, dither)

    def restore() -> None:
        for module in patched:
            del module.forward
            for attr in ("_int4", "_fp4_input_scale", "_fp8_dither"):
                if hasattr(module, attr):
                    delattr(module, attr)
        if fp4_patched:
            del model._fp4_activation_patched

    return restore


__all__ = ["INT4_BOUND", "emulate_weight_only", "fp4_activation", "int4_dequantized"]
