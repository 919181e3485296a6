"""Free-routing agreement of MoE layers: the fraction of tokens whose top-k expert set is identical to
the reference's, each subject having chosen its own experts all the way (used by
``benchmarks/fp8_accuracy.py``). Validation itself holds routing to the truth's and gates each layer's
own choices instead (DESIGN.md §8, `hybridtrt.judge.routing`).

FP8 keeps the routers in high precision but changes the hidden states they see, and a small change
can swap an expert. For every MoE layer ``i`` the reference model's fp32 router runs on the input of
that layer as each subject computed it — ``layer_output.{i-1}`` from the per-layer outputs (for
layer 0 the embeddings, which are never quantized) — through the layer's own RMSNorm, and the
chosen expert sets are compared over real (not padding) tokens. Every backend computes the router
with exactly these fp32 ops (it is never quantized), so this is the routing the backend performs,
up to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hybridtrt.models.config import MOE
from hybridtrt.models.model import HybridLM

__all__ = ["RoutingFn", "expert_sets", "routing_agreement", "routing_for"]

#: ``(reference layer outputs, backend layer outputs) -> {MoE layer: agreement}``.
RoutingFn = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[int, float]]


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value


@torch.no_grad()
def expert_sets(model: HybridLM, layer: int, layer_input: torch.Tensor) -> torch.Tensor:
    """Sorted top-k expert ids ``[B·L, K]`` that MoE ``layer`` picks for ``layer_input [B, L, hidden]``."""
    block = model.layers[layer]
    normed, _ = block.normed(layer_input.to(model.dtype))
    _, indices = block.mixer.gate(normed.reshape(-1, normed.shape[-1]))
    return indices.sort(dim=-1).values


@torch.no_grad()
def routing_agreement(
    model: HybridLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    reference_layers: Mapping[str, Any],
    backend_layers: Mapping[str, Any],
) -> dict[int, float]:
    """Per MoE layer, the fraction of real tokens whose expert set is the same for both subjects.

    Args:
        model: The reference model (its routers and norms are used for both subjects).
        input_ids: ``[B, L]`` (for layer 0's input, the embeddings).
        attention_mask: ``[B, L]``, 0 on left padding (excluded).
        reference_layers / backend_layers: ``{"layer_output.{i}": [B, L, hidden]}`` of each subject.

    Returns:
        ``{layer: agreement in [0, 1]}`` for every ``E`` layer, in layer order.
    """
    real = attention_mask[:, -input_ids.shape[1] :].reshape(-1) != 0
    embeddings = model.embed(input_ids)
    out: dict[int, float] = {}
    for layer in model.config.layers_of(MOE):
        key = f"layer_output.{layer - 1}"
        ref_in = embeddings if layer == 0 else _tensor(reference_layers[key])
        got_in = embeddings if layer == 0 else _tensor(backend_layers[key])
        same = (expert_sets(model, layer, ref_in) == expert_sets(model, layer, got_in)).all(dim=-1)
        out[layer] = float(same[real].float().mean())
    return out


def routing_for(model: HybridLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> RoutingFn | None:
    """The `RoutingFn` for `hybridtrt.validation.runner.validate` (None when the model has no MoE)."""
    if MOE not in model.config.layer_types:
        return None
    return lambda ref, got: routing_agreement(model, input_ids, attention_mask, ref, got)
