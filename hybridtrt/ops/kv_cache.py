"""In-place KV-cache update: ``hybridtrt::kv_cache_update``, exported as the standard ONNX
``TensorScatter`` (opset 24), which TensorRT ≥ 10.15 builds as ``IKVCacheUpdateLayer`` (kLINEAR).

Contract (the ONNX op's ``mode="linear"``, ``axis=-2``)::

    cache        [B, H_kv, N, D]   fixed capacity N
    update       [B, H_kv, L, D]   L new positions
    write_index  [B] int64         first position written, per row; write_index[b] + L <= N
    out          [B, H_kv, N, D]   out[b, :, write_index[b] + s, :] = update[b, :, s, :], else cache

In the graph the op is functional (a new output tensor); backends realise it in place: TensorRT's
layer aliases ``out`` to ``cache`` (one device buffer), ONNX Runtime's kernel skips its copy when
the output is bound to the input's buffer. The eager kernel is real math (a scatter into a copy) and
has a literal ``_ref`` twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kv_cache_update", "kv_cache_update_eager", "kv_cache_update_ref"]


def kv_cache_update_eager(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """Write ``update [B, H, L, D]`` into a copy of ``cache [B, H, N, D]`` at ``write_index [B] + s``.

    Returns:
        ``[B, H, N, D]`` in ``cache.dtype``.
    """
    b, h, l, d = update.shape
    positions = write_index.to(torch.int64)[:, None] + torch.arange(l, device=cache.device)[None, :]  # [B, L]
    index = positions[:, None, :, None].expand(b, h, l, d)
    return cache.scatter(2, index, update.to(cache.dtype))


def kv_cache_update_ref(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """Literal twin of `kv_cache_update_eager` (same signature and shapes), one row at a time."""
    out = cache.clone()
    for row in range(cache.shape[0]):
        start = int(write_index[row])
        out[row, :, start : start + update.shape[2]] = update[row].to(cache.dtype)
    return out


@torch.library.custom_op("hybridtrt::kv_cache_update", mutates_args=())
def kv_cache_update(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """In-place-capable KV cache write. See `kv_cache_update_eager` for shapes."""
    return kv_cache_update_eager(cache, update, write_index)


@kv_cache_update.register_fake
def _kv_cache_update_fake(cache, update, write_index):
    return torch.empty_like(cache)
