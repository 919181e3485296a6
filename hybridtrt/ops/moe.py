"""Routed experts of a Nemotron-3 MoE layer: ``hybridtrt::moe_experts`` (eager, ``_ref`` twin, fake).

Op contract (DESIGN.md §5; ONNX domain ``hybridtrt`` version 1, op ``MoeExperts``; TensorRT plugin
name ``MoeExperts``, namespace ``hybridtrt``, version ``1``). The router is not in the op: it stays
plain ONNX in the graph and hands the op the selected experts and their weights.

    y[t] = Σ_k  w[t, k] · down[e] @ relu(up[e] @ x[t])²,   e = topk_indices[t, k]

    ====  ==============  ============  ==========================================================
    idx   input           shape         dtype
    ====  ==============  ============  ==========================================================
    0     x               [T, D]        fp32 | fp16 | bf16 (T tokens; D = hidden, or latent size)
    1     topk_indices    [T, K]        int64, each in [0, E); the K experts of a token distinct
    2     topk_weights    [T, K]        fp32 (normalised and scaled by the router)
    3     up_proj         [E, I, D]     x's dtype (HF layout: [experts, out, in])
    4     down_proj       [E, D, I]     x's dtype
    ====  ==============  ============  ==========================================================

    output 0: ``y [T, D]`` in x's dtype. Attributes: ``activation`` (string, ``"relu2"``),
    ``plugin_namespace`` (``"hybridtrt"``), ``plugin_version`` (``"1"``).

Precision (as HF's ``NemotronHExperts``): the two expert matmuls and the activation run in x's
dtype; each expert output is multiplied by its fp32 weight and summed over ``k`` in fp32; the sum is
cast back to x's dtype. No state, no aliasing. A grouped-GEMM plugin takes the node as is: the
weights keep the checkpoint's ``[out, in]`` layout of every expert.

Index constants `kIN_*` / `kOUT_*` mirror the (future) plugin header.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ExpertWeights", "group_by_expert", "moe_experts", "moe_experts_eager", "moe_experts_grouped", "moe_experts_ref", "relu2"]

kIN_X, kIN_TOPK_INDICES, kIN_TOPK_WEIGHTS, kIN_UP_PROJ, kIN_DOWN_PROJ = range(5)
kOUT_Y = 0


def relu2(h: Tensor) -> Tensor:
    """``relu(h)²`` (HF's ``ReLUSquaredActivation``), in h's dtype."""
    return torch.relu(h).square()


def moe_experts_eager(x: Tensor, topk_indices: Tensor, topk_weights: Tensor, up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Routed experts, grouped by expert (each selected expert runs once on all of its tokens).

    Args:
        x: ``[T, D]``.
        topk_indices: ``[T, K]`` int64 expert ids.
        topk_weights: ``[T, K]`` fp32 routing weights.
        up_proj: ``[E, I, D]``.
        down_proj: ``[E, D, I]``.

    Returns:
        ``y [T, D]`` in x's dtype. Work is proportional to ``T * K`` (experts nobody chose never run).
    """
    return moe_experts_grouped(x, topk_indices, topk_weights, up_proj.shape[0], lambda e: (up_proj[e], down_proj[e]))


#: ``expert -> (up [I, D], down [D, I])``: one expert's weights.
ExpertWeights = Callable[[int], tuple[Tensor, Tensor]]


def moe_experts_grouped(x: Tensor, topk_indices: Tensor, topk_weights: Tensor, num_experts: int, weights: ExpertWeights) -> Tensor:
    """`moe_experts_eager` with each chosen expert's weights from ``weights(expert)``, asked once
    per expert some token chose (a lazy reference reads one expert at a time this way)."""
    order, groups = group_by_expert(topk_indices, num_experts)
    token_of = order // topk_indices.shape[1]
    xs = x[token_of]
    out = torch.empty(xs.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    for expert, rows in groups:
        up, down = weights(expert)
        out[rows] = relu2(xs[rows] @ up.t()) @ down.t()
        del up, down
    weighted = out.float() * topk_weights.reshape(-1)[order].float()[:, None]
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of, weighted).to(x.dtype)


def group_by_expert(topk_indices: Tensor, num_experts: int) -> tuple[Tensor, list[tuple[int, slice]]]:
    """The ``P = T·K`` (token, k) pairs grouped by expert.

    Args:
        topk_indices: ``[T, K]`` int64.
        num_experts: ``E``.

    Returns:
        ``order [P]``: pair indices ``p = t·K + k`` sorted by expert (tokens ascending within an
        expert), and ``(expert, rows)`` for every expert that some pair chose: ``order[rows]`` are
        that expert's pairs.
    """
    flat = topk_indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    groups, start = [], 0
    for expert, n in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if n:
            groups.append((expert, slice(start, start + n)))
            start += n
    return order, groups


def moe_experts_ref(x: Tensor, topk_indices: Tensor, topk_weights: Tensor, up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Sequential twin of `moe_experts_eager`: token by token, expert by expert, from the formula.

    Shapes: ``x [T, D]``, ``topk_indices [T, K]``, ``topk_weights [T, K]``, ``up_proj [E, I, D]``,
    ``down_proj [E, D, I]`` -> ``y [T, D]``.
    """
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(down_proj.shape[1], dtype=torch.float32, device=x.device)
        for k in range(topk_indices.shape[1]):
            e = int(topk_indices[t, k])
            h = relu2(torch.mv(up_proj[e], x[t]))
            acc = acc + topk_weights[t, k].float() * torch.mv(down_proj[e], h).float()
        rows.append(acc)
    return torch.stack(rows).to(x.dtype) if rows else x.new_zeros(0, down_proj.shape[1])


@torch.library.custom_op("hybridtrt::moe_experts", mutates_args=())
def moe_experts(x: Tensor, topk_indices: Tensor, topk_weights: Tensor, up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Routed experts of an MoE layer. See `moe_experts_eager` for shapes."""
    return moe_experts_eager(x, topk_indices, topk_weights, up_proj, down_proj)


@moe_experts.register_fake
def _moe_experts_fake(x, topk_indices, topk_weights, up_proj, down_proj):
    return torch.empty_like(x)
