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
  ``DequantizeLinear`` computes step for step; nothing changes.
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
    w32 = w.to(dtype).to(torch.float32)
    if pre_scale is not None:
        w32 = w32 / pre_scale.to(torch.float32)
    blocks = w32.reshape(out, k // block, block)
    tiny = torch.finfo(torch.float16 if dtype == torch.float16 else torch.float32).tiny
    scale = torch.clamp(blocks.abs().amax(dim=-1, keepdim=True) / INT4_BOUND, min=tiny).to(dtype)
    q = torch.round(blocks / scale.to(torch.float32)).clamp(-8, 7)
    return (q * scale.to(torch.float32)).to(dtype).reshape(out, k)


def _int4_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    block, dtype, pre_scale = self._int4  # type: ignore[attr-defined]
    if pre_scale is not None:  # the graph's pre_quant_scale Mul, in x's dtype
        x = x * pre_scale.to(x.dtype)
    return F.linear(x, int4_dequantized(self.weight, block, dtype, pre_scale).to(x.dtype), self.bias)


def emulate_weight_only(model: nn.Module, recipe: Mapping[str, Any], dtype: torch.dtype) -> Callable[[], None]:
    """Make ``model`` compute with the weights the W4A16 export of ``recipe`` dequantizes, in place.

    Args:
        model: A `HybridLM` (eager or lazy) in any dtype.
        recipe: ``hybridtrt.json``'s ``"weight_only"`` (`hybridtrt.graphs.weight_only.WeightOnlyRecipe`).
        dtype: The export's dtype (INT4 scales and dequantized weights are in it).

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

    def restore() -> None:
        for module in patched:
            del module.forward, module._int4

    return restore


__all__ = ["INT4_BOUND", "emulate_weight_only", "int4_dequantized"]
