"""Accuracy contract of the CUDA kernels: what they are compared with, and the gates (``tolerances.json``).

The truth is the sequential PyTorch ``_ref`` op run in fp32 math on the kernel's own (rounded) inputs:
`expected_chunk_scan` / `expected_state_update`, y float32 as the kernels write it (C ABI 3), states in the
state's dtype; for the MoE experts `expected_moe_experts` / `expected_moe_experts_fp8` (y float32 against the
kernels' y in x's dtype). The gates are rel L2 per kernel output (``scan_y``, ``update_y``, ``state``, ``moe_y``)
and dtype (``moe_y`` also has ``float8_e4m3fn``, the FP8 experts). The CPU-emulated and GPU kernel tests and
``benchmarks/gpu/run.py`` use both.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "KernelOutput",
    "expected_chunk_scan",
    "expected_moe_experts",
    "expected_moe_experts_fp8",
    "expected_state_update",
    "kernel_gate",
]

_TABLE = Path(__file__).with_name("tolerances.json")

#: Outputs with their own gates: the scan's y, the update's y, any state output, the MoE experts' y.
KernelOutput = Literal["scan_y", "update_y", "state", "moe_y"]


@cache
def _gates() -> dict[str, dict[str, float]]:
    table = json.loads(_TABLE.read_text())
    return {**table["gates"], **table["moe_gates"]}


def kernel_gate(output: KernelOutput, *dtypes: Any) -> float:
    """The rel L2 gate of ``output`` for a check involving ``dtypes`` (torch dtypes or names): the largest.

    Example: ``kernel_gate("state", torch.bfloat16, torch.float32)`` is the bf16 state gate;
    ``kernel_gate("moe_y", torch.bfloat16, torch.float8_e4m3fn)`` the gate of FP8 experts on bf16 activations.
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


def _skip_invalid_pairs(topk_indices: Tensor, topk_weights: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """The kernels' rule for an index outside ``[0, E)``: its pair adds nothing. Such a pair is pointed at an expert
    some valid pair chose (so no unchosen expert is read) with weight 0."""
    import torch

    idx = topk_indices.long()
    valid = (idx >= 0) & (idx < num_experts)
    if bool(valid.all()):
        return idx, topk_weights.float()
    stand_in = idx[valid][0] if bool(valid.any()) else torch.zeros((), dtype=torch.long)
    return torch.where(valid, idx, stand_in), torch.where(valid, topk_weights.float(), 0.0)


def expected_moe_experts(x: Tensor, topk_indices: Tensor, topk_weights: Tensor, up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """What hybridtrtMoeExperts must compute: `moe_experts_grouped` in fp32 math on the same inputs.

    Shapes: ``x [T,D]``, ``topk_indices [T,K]`` (int64 or int32), ``topk_weights [T,K]``, ``up_proj [E,I,D]``,
    ``down_proj [E,D,I]`` -> ``y [T,D]`` float32. Only the chosen experts are read; pairs whose index is outside
    ``[0, E)`` add nothing (the kernels skip them). The kernels round h and each expert output to x's dtype as
    `moe_experts_grouped` does in x's dtype, and y once: the gate ``moe_y`` covers those roundings.
    """
    from hybridtrt.ops.moe import moe_experts_grouped

    experts = up_proj.shape[0]
    idx, weights = _skip_invalid_pairs(topk_indices, topk_weights, experts)
    return moe_experts_grouped(x.float(), idx, weights, experts, lambda e: (up_proj[e].float(), down_proj[e].float()))


def expected_moe_experts_fp8(
    x: Tensor,
    topk_indices: Tensor,
    topk_weights: Tensor,
    up_proj: Tensor,
    up_weight_scale: Tensor,
    up_input_scale: Tensor,
    down_proj: Tensor,
    down_weight_scale: Tensor,
    down_input_scale: Tensor,
) -> Tensor:
    """What hybridtrtMoeExpertsFp8 must compute: the arithmetic of the ``MoeExpertsFp8`` body
    (`hybridtrt.ops.moe_onnx`) and of `hybridtrt.exporter.fp8_reference` (``_fp8_experts_forward``), in fp32.

    Shapes: ``x [T,D]``, ``topk_indices / topk_weights [T,K]``, ``up_proj [E,I,D]`` and ``down_proj [E,D,I]``
    float8_e4m3fn, ``up_weight_scale [E,1|I]``, ``down_weight_scale [E,1|D]``, ``up_input_scale / down_input_scale
    [E]`` fp32 -> ``y [T,D]`` float32. Per chosen expert e: ``h = relu(fq(x, up_input_scale[e]) . W_up^T)^2``,
    ``out = fq(h, down_input_scale[e]) . W_down^T`` with ``W = codes * weight_scale[e, out channel]`` and
    ``fq`` = `hybridtrt.exporter.fp8_reference.fake_quantize` (fp32 division, clamp to +-448, round to nearest
    even); y = the fp32 sum over k of ``w[t,k] * out``. Pairs whose index is outside ``[0, E)`` add nothing.
    """
    import torch

    from hybridtrt.exporter.fp8_reference import fake_quantize
    from hybridtrt.ops.moe import group_by_expert, relu2

    experts = up_proj.shape[0]
    idx, weights = _skip_invalid_pairs(topk_indices, topk_weights, experts)
    order, groups = group_by_expert(idx, experts)
    token_of = order // idx.shape[1]
    xs = x[token_of].float()
    out = torch.empty(xs.shape[0], x.shape[1], dtype=torch.float32)
    for e, rows in groups:
        up = up_proj[e].float() * up_weight_scale[e].float()[:, None]
        down = down_proj[e].float() * down_weight_scale[e].float()[:, None]
        h = relu2(fake_quantize(xs[rows], up_input_scale[e].float()) @ up.t())
        out[rows] = fake_quantize(h, down_input_scale[e].float()) @ down.t()
    weighted = out * weights.reshape(-1)[order][:, None]
    return torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32).index_add_(0, token_of, weighted)
