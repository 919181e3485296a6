"""The Nemotron-3 mixture-of-experts block (``E`` layers), copied from HF's ``NemotronHMoE``.

    out = fc2_latent(Σ_k w_k · expert_{e_k}(fc1_latent(h))) + shared_expert(h)

Router (``gate``, HF ``NemotronHTopkRouter``), always in fp32: ``scores = sigmoid(h @ W_gate^T)``;
experts are *chosen* on ``scores + e_score_correction_bias``, limited to the ``topk_group`` groups
(of ``n_group``) whose two best biased scores sum highest; the routing *weights* are the unbiased
scores of the chosen experts, normalised to sum to 1 when ``norm_topk_prob`` (denominator
``+ 1e-20``) and multiplied by ``routed_scaling_factor``. Routed experts are relu² MLPs without
biases (``hybridtrt::moe_experts``); the shared expert is the Nemotron-H MLP
(``moe_shared_expert_intermediate_size``, ``mlp_bias``); latent MoE (``moe_latent_size``) wraps the
routed experts in ``fc1_latent_proj`` / ``fc2_latent_proj``.

Parameter names mirror HF's (``mixer.gate.weight``, ``mixer.gate.e_score_correction_bias``,
``mixer.experts.up_proj [E, I, D]``, ``mixer.experts.down_proj [E, D, I]``,
``mixer.shared_experts.{up,down}_proj.weight``, ``mixer.fc{1,2}_latent_proj.weight``); the gate
weight and the correction bias stay fp32 whatever the model dtype (HF's
``_keep_in_fp32_modules_strict``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from hybridtrt.models.config import HybridConfig, MoeConfig
from hybridtrt.models.layers import MLP
from hybridtrt.ops.moe import ExpertWeights, moe_experts, moe_experts_grouped, moe_experts_ref

__all__ = [
    "FP32_PARAMETERS", "Experts", "MoE", "RoutingHold", "TopkRouter", "held_routing", "moe_forward_ref", "route", "route_ref",
    "unstack_experts",
]

#: Parameters kept in fp32 in every model dtype (regexes on parameter names), as HF does.
FP32_PARAMETERS = (r"\.mixer\.gate\.weight$", r"\.mixer\.gate\.e_score_correction_bias$")


def route(
    h: Tensor, weight: Tensor, bias: Tensor, moe: MoeConfig, held: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Group-limited top-k routing of HF's ``NemotronHTopkRouter``, vectorised.

    Args:
        h: ``[N, hidden]`` normed hidden states (any float dtype; computed in fp32).
        weight: ``[E, hidden]`` router weight.
        bias: ``[E]`` ``e_score_correction_bias`` (used to choose, not to weight).
        moe: The layer's `MoeConfig`.
        held: Maps the chosen ids ``[N, K]`` to the ids to use (validation holds routing equal
            across the runs it compares, `RoutingHold.take`); the weights are still this call's own
            scores of those experts.

    Returns:
        ``topk_weights [N, K]`` fp32 and ``topk_indices [N, K]`` int64 (the ids ``held`` returned
        when given), experts in descending order of their biased score.
    """
    scores = torch.sigmoid(h.float() @ weight.float().t())  # [N, E]
    choice = scores + bias.float()
    if moe.topk_group < moe.n_group:  # with every group allowed the group mask is all ones
        n, experts = choice.shape
        grouped = choice.reshape(n, moe.n_group, experts // moe.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        group_idx = group_scores.topk(moe.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)
        allowed = group_mask[:, :, None].expand(n, moe.n_group, experts // moe.n_group).reshape(n, experts)
        choice = choice.masked_fill(allowed == 0, float("-inf"))
    indices = choice.topk(moe.top_k, dim=-1).indices
    if held is not None:
        indices = held(indices)
    weights = scores.gather(1, indices)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, indices


def route_ref(h: Tensor, weight: Tensor, bias: Tensor, moe: MoeConfig) -> tuple[Tensor, Tensor]:
    """Sequential twin of `route`: one token at a time, groups and experts ranked with ``sorted``.

    Shapes: ``h [N, hidden]``, ``weight [E, hidden]``, ``bias [E]`` -> ``topk_weights [N, K]``
    fp32, ``topk_indices [N, K]`` int64.
    """
    size = moe.num_experts // moe.n_group
    all_weights, all_indices = [], []
    for t in range(h.shape[0]):
        scores = torch.sigmoid(torch.mv(weight.float(), h[t].float()))
        choice = (scores + bias.float()).tolist()
        group_score = [sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(moe.n_group)]
        groups = sorted(range(moe.n_group), key=lambda g: -group_score[g])[: moe.topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -choice[e])[: moe.top_k]
        w = scores[chosen]
        if moe.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        all_weights.append(w * moe.routed_scaling_factor)
        all_indices.append(torch.tensor(chosen, dtype=torch.int64))
    return torch.stack(all_weights), torch.stack(all_indices)


class TopkRouter(nn.Module):
    """The ``gate``: ``weight [E, hidden]`` and ``e_score_correction_bias [E]``, fp32."""

    def __init__(self, hidden_size: int, moe: MoeConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts))

    def forward(self, h: Tensor, held: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``h [N, hidden]`` -> ``topk_weights [N, K]`` fp32, ``topk_indices [N, K]`` int64."""
        return route(h, self.weight, self.e_score_correction_bias, self.moe, held)


class Experts(nn.Module):
    """The routed experts, stacked: ``up_proj [E, I, D]``, ``down_proj [E, D, I]`` (HF's layout)."""

    #: Set by `hybridtrt.models.lazy`: one expert's weights, read when asked (the stacks are then
    #: never read whole by the forward pass).
    expert_weights: ExpertWeights | None = None

    def __init__(self, num_experts: int, intermediate_size: int, dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.zeros(num_experts, intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, dim, intermediate_size))

    def weights_of(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(up [I, D], down [D, I])`` of one expert."""
        if self.expert_weights is not None:
            return self.expert_weights(expert)
        return self.up_proj[expert], self.down_proj[expert]

    def forward(self, x: Tensor, topk_indices: Tensor, topk_weights: Tensor) -> Tensor:
        """``x [N, D]``, ``topk_indices [N, K]``, ``topk_weights [N, K]`` -> ``[N, D]`` (custom op;
        expert by expert when the weights are lazy)."""
        if self.expert_weights is not None:
            return moe_experts_grouped(x, topk_indices, topk_weights, self.num_experts, self.expert_weights)
        return moe_experts(x, topk_indices, topk_weights, self.up_proj, self.down_proj)


class RoutingHold:
    """Routing held to given expert ids, and the ids a model would have chosen (DESIGN.md §8).

    A choice of ``K`` of ``E`` experts is discrete: two correct runs that round differently pick a
    different expert for a token whose ``K``-th and ``K+1``-th scores are closer than their rounding,
    and the layer's output then jumps. Validation therefore runs the truth with its own routing and
    every other subject *held* to the truth's ids, so the continuous math is compared on equal
    routing, and judges the choices separately (`hybridtrt.judge.routing`).

    Attributes:
        held: ``{MoE layer: [B, P, K]}`` ids to use, positions in call order (None: choose freely).
        chosen: ``{MoE layer: [[B, L, K] per call]}`` the ids this model's own router chose.
    """

    def __init__(self, held: Mapping[int, Tensor] | None = None) -> None:
        self.held = None if held is None else dict(held)
        self.chosen: dict[int, list[Tensor]] = {}
        self._cursor: dict[int, int] = {}

    def take(self, layer: int, chosen: Tensor) -> Tensor:
        """Record ``chosen [B, L, K]`` of ``layer``; the ids to use for those positions (the held
        ones, or ``chosen`` when nothing is held)."""
        held = self.held_ids(layer, chosen.shape[0], chosen.shape[1])
        self.record(layer, chosen)
        return chosen if held is None else held.to(chosen.device)

    def held_ids(self, layer: int, batch: int, length: int) -> Tensor | None:
        """The held ids ``[B, L, K]`` of ``layer``'s next ``length`` positions (None: not held)."""
        if self.held is None:
            return None
        if layer not in self.held:
            raise KeyError(f"routing of MoE layer {layer} is held, but no ids were given for it")
        start = self._cursor.get(layer, 0)
        ids = self.held[layer]
        if ids.shape[0] != batch or start + length > ids.shape[1]:
            raise ValueError(f"held routing of layer {layer} is {tuple(ids.shape)}; the call needs rows {batch}, positions {start}:{start + length}")
        self._cursor[layer] = start + length
        return ids[:, start : start + length]

    def record(self, layer: int, chosen: Tensor) -> None:
        """Record the ids ``[B, L, K]`` that ``layer``'s own router chose in one call."""
        self.chosen.setdefault(layer, []).append(torch.as_tensor(chosen).detach().cpu().long())

    def ids(self, layer: int) -> Tensor:
        """The chosen ids of ``layer`` over every call, ``[B, P, K]``."""
        return torch.cat(self.chosen[layer], dim=1)

    def all_ids(self) -> dict[int, Tensor]:
        """``{MoE layer: ids(layer)}`` for every layer that recorded a choice."""
        return {layer: self.ids(layer) for layer in self.chosen}


@contextlib.contextmanager
def held_routing(model: nn.Module, hold: RoutingHold) -> Iterator[RoutingHold]:
    """Run ``model``'s MoE layers under ``hold`` for the duration (records and holds their routing)."""
    mixers = [(i, layer.mixer) for i, layer in enumerate(model.layers) if isinstance(layer.mixer, MoE)]
    for i, mixer in mixers:
        mixer.hold = (i, hold)
    try:
        yield hold
    finally:
        for _, mixer in mixers:
            mixer.hold = None


class MoE(nn.Module):
    """Nemotron-3 MoE mixer: router, routed experts, optional shared expert and latent projections."""

    #: ``(layer index, RoutingHold)`` while `held_routing` runs (never during export).
    hold: tuple[int, RoutingHold] | None = None

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise AssertionError("MoE mixer built from a config without MoE fields")
        self.moe = moe
        dim = moe.latent_size or config.hidden_size
        self.gate = TopkRouter(config.hidden_size, moe)
        self.experts = Experts(moe.num_experts, moe.intermediate_size, dim)
        self.shared_experts = (
            MLP(dataclasses.replace(config, intermediate_size=moe.shared_intermediate_size))
            if moe.shared_intermediate_size
            else None
        )
        if moe.latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, moe.latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(moe.latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def _held(self, b: int, l: int) -> Callable[[Tensor], Tensor]:
        """The router's chosen ids ``[B·L, K]`` -> the ids to use under `hold` (validation only,
        `held_routing`): one router pass, its choice recorded and swapped for the held ids."""
        layer, hold = self.hold
        return lambda chosen: hold.take(layer, chosen.reshape(b, l, -1)).reshape(b * l, -1)

    def forward(self, h: Tensor) -> Tensor:
        """``[B, L, hidden] -> [B, L, hidden]`` in h's dtype (tokens are independent)."""
        b, l, hidden = h.shape
        weights, indices = self.gate(h.reshape(b * l, hidden), None if self.hold is None else self._held(b, l))
        # Linears on [B, L, *] (not on the flat tokens) so they export as MatMul like every other.
        x = h if self.fc1_latent_proj is None else self.fc1_latent_proj(h)
        y = self.experts(x.reshape(b * l, x.shape[-1]), indices, weights).reshape(b, l, x.shape[-1])
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        return y


def moe_forward_ref(module: MoE, h: Tensor) -> Tensor:
    """Sequential twin of `MoE.forward`: per-token routing (`route_ref`) and experts (`moe_experts_ref`).

    Shapes: ``h [B, L, hidden]`` -> ``[B, L, hidden]``.
    """
    b, l, hidden = h.shape
    weights, indices = route_ref(h.reshape(b * l, hidden), module.gate.weight, module.gate.e_score_correction_bias, module.moe)
    x = h if module.fc1_latent_proj is None else module.fc1_latent_proj(h)
    y = moe_experts_ref(x.reshape(b * l, x.shape[-1]), indices, weights, module.experts.up_proj, module.experts.down_proj)
    y = y.reshape(b, l, x.shape[-1])
    if module.fc2_latent_proj is not None:
        y = module.fc2_latent_proj(y)
    if module.shared_experts is not None:
        y = y + module.shared_experts(h)
    return y


def unstack_experts(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stacked expert tensors -> the hub's per-expert names (``…experts.up_proj [E, I, D]`` ->
    ``…experts.{e}.up_proj.weight [I, D]``); the inverse of `hybridtrt.models.loading.stack_per_expert`.
    Other tensors pass through."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        stem, _, proj = name.rpartition(".")
        if stem.endswith(".experts") and proj in ("up_proj", "down_proj"):
            out.update({f"{stem}.{e}.{proj}.weight": t[e].contiguous() for e in range(t.shape[0])})
        else:
            out[name] = t
    return out
