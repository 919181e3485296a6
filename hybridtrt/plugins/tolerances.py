"""Accuracy contract of the CUDA kernels: what they are compared with, and the gates (``tolerances.json``).

The truth is the sequential PyTorch ``_ref`` op run in fp32 math on the kernel's own (rounded) inputs:
`expected_chunk_scan` / `expected_state_update`, y float32 as the kernels write it (C ABI 3), states in the
state's dtype. The gates are rel L2 per kernel output (``scan_y``, ``update_y``, ``state``) and dtype. The
CPU-emulated and GPU kernel tests and ``benchmarks/gpu/run.py`` use both.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["KernelOutput", "expected_chunk_scan", "expected_state_update", "kernel_gate"]

_TABLE = Path(__file__).with_name("tolerances.json")

#: Outputs with their own gates: the scan's y, the update's y, any state output.
KernelOutput = Literal["scan_y", "update_y", "state"]


@cache
def _gates() -> dict[str, dict[str, float]]:
    return json.loads(_TABLE.read_text())["gates"]


def kernel_gate(output: KernelOutput, *dtypes: Any) -> float:
    """The rel L2 gate of ``output`` for a check involving ``dtypes`` (torch dtypes or names): the largest.

    Example: ``kernel_gate("state", torch.bfloat16, torch.float32)`` is the bf16 state gate.
    """
    table = _gates()[output]
    names = [str(d).removeprefix("torch.") for d in dtypes]
    unknown = [n for n in names if n not in table]
    if not names or unknown:
        raise KeyError(f"kernel gate {output!r} needs dtypes among {sorted(table)}, got {names}")
    return max(table[n] for n in names)


def expected_chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """What hybridtrtMamba2ChunkScan must compute: `mamba2_chunk_scan_ref` in fp32 math on the same inputs.

    Shapes: ``x [B,L,H,P]``, ``dt [B,L,H]``, ``A [H]``, ``B, C [B,L,G,N]``, ``D [H]``, ``initial_state [B,H,P,N]``
    -> ``y [B,L,H,P]`` float32, ``final_state [B,H,P,N]`` in ``initial_state``'s dtype.
    """
    from hybridtrt.ops import mamba2_chunk_scan_ref

    return mamba2_chunk_scan_ref(x.float(), dt.float(), A, B.float(), C.float(), D, initial_state)


def expected_state_update(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """What hybridtrtMamba2StateUpdate must compute: `mamba2_state_update_ref` in fp32 math on the same inputs.

    Shapes: ``x [B,H,P]``, ``dt [B,H]``, ``A [H]``, ``B, C [B,G,N]``, ``D [H]``, ``state [B,H,P,N]``
    -> ``y [B,H,P]`` float32, ``new_state [B,H,P,N]`` in ``state``'s dtype.
    """
    from hybridtrt.ops import mamba2_state_update_ref

    return mamba2_state_update_ref(x.float(), dt.float(), A, B.float(), C.float(), D, state)
