"""`torch.library` custom ops ``hybridtrt::mamba2_chunk_scan`` and ``hybridtrt::mamba2_state_update``.

Eager kernels are the real math of `hybridtrt.ops.ssd`; the fake kernels give shapes so the ops
trace through ``torch.export``. They are functional (no aliasing): the in-place update of the decode
state is a property of the TensorRT plugin, not of the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridtrt.ops.ssd import acc_dtype, mamba2_chunk_scan_eager, mamba2_state_update_eager

__all__ = ["mamba2_chunk_scan", "mamba2_state_update"]


@torch.library.custom_op("hybridtrt::mamba2_chunk_scan", mutates_args=())
def mamba2_chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, initial_state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan. See `hybridtrt.ops.ssd.mamba2_chunk_scan_eager` for shapes."""
    return mamba2_chunk_scan_eager(x, dt, A, B, C, D, initial_state, chunk_size)


@mamba2_chunk_scan.register_fake
def _mamba2_chunk_scan_fake(x, dt, A, B, C, D, initial_state, chunk_size):
    return torch.empty_like(x, dtype=acc_dtype(x)), torch.empty_like(initial_state)


@torch.library.custom_op("hybridtrt::mamba2_state_update", mutates_args=())
def mamba2_state_update(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One-token state update. See `hybridtrt.ops.ssd.mamba2_state_update_eager` for shapes."""
    return mamba2_state_update_eager(x, dt, A, B, C, D, state)


@mamba2_state_update.register_fake
def _mamba2_state_update_fake(x, dt, A, B, C, D, state):
    return torch.empty_like(x, dtype=acc_dtype(x)), torch.empty_like(state)
