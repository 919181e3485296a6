"""Mamba-2 custom ops: eager math, sequential `_ref` twins, and the ``torch.library`` registration.

Public names:
    mamba2_chunk_scan(x, dt, A, B, C, D, initial_state, chunk_size) -> (y, final_state)
    mamba2_state_update(x, dt, A, B, C, D, state) -> (y, new_state)
    mamba2_chunk_scan_ref / mamba2_state_update_ref: sequential references, same signatures.
"""

from hybridtrt.ops.library import mamba2_chunk_scan, mamba2_state_update
from hybridtrt.ops.ssd import (
    mamba2_chunk_scan_eager,
    mamba2_chunk_scan_ref,
    mamba2_state_update_eager,
    mamba2_state_update_ref,
)

__all__ = [
    "mamba2_chunk_scan",
    "mamba2_chunk_scan_eager",
    "mamba2_chunk_scan_ref",
    "mamba2_state_update",
    "mamba2_state_update_eager",
    "mamba2_state_update_ref",
]
