"""ONNX forms of the attention pieces, chosen so TensorRT builds its native layers for them.

=====================================  ========================  ===============================
torch (reference model)                ONNX node                 TensorRT ≥ 10.15 (onnx-tensorrt)
=====================================  ========================  ===============================
``scaled_dot_product_attention``       ``Attention`` (opset 23)  ``IAttention`` (fused kernel)
``hybridtrt::kv_cache_update``         ``TensorScatter`` (24)    ``IKVCacheUpdateLayer`` kLINEAR
=====================================  ========================  ===============================

The ``Attention`` node has exactly one output and no ``past_key``/``past_value``/
``nonpad_kv_seqlen`` inputs: TensorRT's importer refuses the first two and ignores the third, so
padding and causality travel in the boolean ``attn_mask`` ``[B, 1, L, T]`` (True = attend), never
in ``is_causal`` (ONNX and TensorRT align it upper-left, wrong for a query block after a cache).
GQA is native (``K``/``V`` keep ``H_kv`` heads). No attribute asks for the softmax precision:
TensorRT's static checker refuses the node when ``softmax_precision`` is present at all, whatever its
value (onnx-tensorrt ``onnxOpCheckers.cpp`` ``DEFINE_OP_CHECKER(Attention)``, TensorRT 10.14–11.1),
and ONNX Runtime's results are bitwise the same without it (fp16, bf16 and static-cache exports:
``tests/engine/test_parser_rules.py``). ``softcap`` stays 0 (refused otherwise, same checker).

Below opset 23 there is no ``Attention`` op; the fallback computes GQA by reshaping the query to
``[B, H_kv, R·L, D]`` (``R = H / H_kv``) instead of repeating K/V per head.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch
from onnxscript.onnx_opset import opset18 as op18
from onnxscript.onnx_opset import opset23 as op23
from onnxscript.onnx_opset import opset24 as op24

from hybridtrt.ops import kv_cache  # noqa: F401  (registers torch.ops.hybridtrt.kv_cache_update)

#: First opsets of the standard ops used here.
ATTENTION_OPSET = 23
TENSOR_SCATTER_OPSET = 24

def _sdpa_attention_op(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False):
    """``scaled_dot_product_attention`` → one standard ``Attention`` node (opset ≥ 23)."""
    _check_sdpa(attn_mask, dropout_p, is_causal)
    y, _, _, _ = op23.Attention(query, key, value, attn_mask, scale=scale)
    return y


def _sdpa_grouped(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False):
    """``scaled_dot_product_attention`` below opset 23: GQA by reshaping the query, fp32 softmax.

    ``query [B, H, L, D]`` → ``[B, H_kv, R·L, D]`` (head ``h = g·R + r`` reads K/V head ``g``);
    scores ``[B, H_kv, R, L, T]`` get the mask ``[B, 1, 1, L, T]``; nothing is repeated per head.
    """
    _check_sdpa(attn_mask, dropout_p, is_causal)
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    rep = heads // kv_heads
    batch = op18.Shape(query, start=0, end=1)
    length = op18.Shape(query, start=2, end=3)
    total = op18.Shape(key, start=2, end=3)
    q = op18.Reshape(query, op18.Concat(batch, op18.Constant(value_ints=[kv_heads, -1, head_dim]), axis=0))
    scores = op18.MatMul(q, op18.Transpose(key, perm=[0, 1, 3, 2]))  # [B, H_kv, R·L, T]
    scores = op18.Mul(op18.Cast(scores, to=ir.DataType.FLOAT), op18.Constant(value_float=scale if scale is not None else head_dim**-0.5))
    scores = op18.Reshape(scores, op18.Concat(batch, op18.Constant(value_ints=[kv_heads, rep]), length, total, axis=0))
    allowed = op18.Unsqueeze(attn_mask, op18.Constant(value_ints=[2]))  # [B, 1, 1, L, T]
    scores = op18.Where(allowed, scores, op18.Constant(value_float=float("-inf")))
    probs = op18.CastLike(op18.Softmax(scores, axis=-1), query)
    probs = op18.Reshape(probs, op18.Concat(batch, op18.Constant(value_ints=[kv_heads, -1]), total, axis=0))
    out = op18.MatMul(probs, value)  # [B, H_kv, R·L, D]
    return op18.Reshape(out, op18.Concat(batch, op18.Constant(value_ints=[heads, -1, head_dim]), axis=0))


def _check_sdpa(attn_mask: Any, dropout_p: float, is_causal: bool) -> None:
    # Internal invariants of the reference model's attention, not user input.
    if attn_mask is None or is_causal or dropout_p:
        raise AssertionError("hybridtrt attention passes an explicit boolean mask, no is_causal, no dropout")


def _kv_cache_update(cache, update, write_index):
    """``hybridtrt::kv_cache_update`` → ``TensorScatter(mode="linear", axis=-2)`` (opset 24)."""
    return op24.TensorScatter(cache, update, write_index, axis=-2, mode="linear")


def attention_translations(opset: int) -> dict[Any, Any]:
    """Entries of the exporter's ``custom_translation_table`` for the attention pieces at ``opset``.

    ``kv_cache_update`` only exists in static-cache graphs, which need opset ≥ 24 (checked by the
    exporter before tracing).
    """
    sdpa = _sdpa_attention_op if opset >= ATTENTION_OPSET else _sdpa_grouped
    return {
        torch.ops.aten.scaled_dot_product_attention.default: sdpa,
        torch.ops.hybridtrt.kv_cache_update.default: _kv_cache_update,
    }
