"""onnxscript translations of the ``hybridtrt::`` torch ops into ONNX domain ``hybridtrt`` nodes,
and of the two attention pieces into the standard ops TensorRT builds natively.

The Mamba nodes carry ``plugin_namespace``/``plugin_version`` so TensorRT's ONNX parser picks our
plugin when its library is loaded, and fall back to the model-local function body otherwise.
``hybridtrt::kv_cache_update`` becomes ``TensorScatter`` (opset 24 → ``IKVCacheUpdateLayer``) and
``scaled_dot_product_attention`` becomes one ``Attention`` node (opset ≥ 23 → ``IAttention``), see
`hybridtrt.exporter.attention`.
"""

from __future__ import annotations

from typing import Any

import onnxscript
import torch

from hybridtrt.ops import collectives, library, moe  # noqa: F401  (registers torch.ops.hybridtrt.*)
from hybridtrt.ops.moe_onnx import MOE_EXPERTS, RELU2
from hybridtrt.ops.onnx_functions import CHUNK_SCAN, DOMAIN, DOMAIN_VERSION, STATE_UPDATE
from hybridtrt.ops.onnx_schema import register_schemas

PLUGIN_NAMESPACE = "hybridtrt"
PLUGIN_VERSION = "1"


def _opset() -> Any:
    register_schemas()
    return onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _chunk_scan(x, dt, A, B, C, D, initial_state, chunk_size: int):
    return getattr(_opset(), CHUNK_SCAN)(
        x,
        dt,
        A,
        B,
        C,
        D,
        initial_state,
        chunk_size=chunk_size,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
    )


def _state_update(x, dt, A, B, C, D, state):
    return getattr(_opset(), STATE_UPDATE)(
        x, dt, A, B, C, D, state, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION
    )


def _moe_experts(x, topk_indices, topk_weights, up_proj, down_proj):
    return getattr(_opset(), MOE_EXPERTS)(
        x,
        topk_indices,
        topk_weights,
        up_proj,
        down_proj,
        activation=RELU2,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
    )


def _dist_collective(x, operation: str, ranks: list[int], world: int):
    collectives.register_schema()
    trt = onnxscript.values.Opset(collectives.TRT_DOMAIN, 1)
    return getattr(trt, collectives.DIST_COLLECTIVE)(x, **collectives.node_attributes(operation, ranks, world))


def _all_reduce(x, ranks: list[int], world: int):
    return _dist_collective(x, collectives.ALL_REDUCE, list(ranks), world)


def _all_gather(x, world: int):
    return _dist_collective(x, collectives.ALL_GATHER, [], world)


def translation_table(opset: int) -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` at ``opset``."""
    from hybridtrt.exporter.attention import attention_translations

    register_schemas()
    return {
        torch.ops.hybridtrt.mamba2_chunk_scan.default: _chunk_scan,
        torch.ops.hybridtrt.mamba2_state_update.default: _state_update,
        torch.ops.hybridtrt.moe_experts.default: _moe_experts,
        torch.ops.hybridtrt.all_reduce.default: _all_reduce,
        torch.ops.hybridtrt.all_gather.default: _all_gather,
        **attention_translations(opset),
    }
