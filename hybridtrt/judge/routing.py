"""Judging MoE routing: how many expert choices differ from the truth's (DESIGN.md §8).

A router picks ``K`` of ``E`` experts per token. Two correct runs that round differently pick a
different expert wherever the ``K``-th and ``K+1``-th biased scores are closer than their rounding;
with 128 experts and top-6 (Nemotron-3 Nano) a few percent of the choices in bf16 sit that close.
The choice is discrete, so one flip moves the layer's output by a whole expert's contribution — a
jump that neither run is wrong to make and that no rel-L2 bound on the continuous math should have
to absorb. Validation therefore holds every subject to the truth's routing
(`hybridtrt.models.moe.RoutingHold`, `hybridtrt.graphs.held_routing`) and judges the choices here,
on their own:

- a **flip** is one of a token's ``K`` experts that is not among the truth's ``K`` for that token
  (set difference; the order of the ``K`` does not matter), counted over real (not padding) tokens;
  with routing held, each MoE layer's choices are made on inputs that saw the truth's routing
  upstream, so the count is the layer's *own* flips, not the cascade of earlier ones;
- the gate: the artefact's flip fraction ≤ ``max(max_flips, ratio × the yardstick's)`` per MoE
  layer (and always at least ``min_flips`` flipped choices: a few dozen tokens cannot resolve a
  fraction below one flip), where the yardstick is the same run that scales the rel-L2 gates (the same-dtype
  reference for fp16/bf16, fp64 for fp32) and ``max_flips`` (tolerances.json ``routing``) is the
  floor for layers the yardstick routes exactly; FP8 (no yardstick) is gated by the floor alone.
  A planted fault in the router moves most choices (measured: ``benchmarks/moe_routing.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridtrt.judge.tolerances import _entry

if TYPE_CHECKING:
    import torch

__all__ = ["RoutingGate", "RoutingTally", "flips", "judge_tallies", "per_layer_text", "routing_gate"]


def flips(chosen: torch.Tensor, truth: torch.Tensor, real: torch.Tensor | None = None) -> tuple[int, int]:
    """``(flipped choices, choices)``: experts of ``chosen [B, L, K]`` not among ``truth [B, L, K]``'s
    for the same token, over the tokens where ``real [B, L]`` is true (all when None)."""
    if chosen.shape != truth.shape:
        raise ValueError(f"routing shapes differ: {tuple(chosen.shape)} vs {tuple(truth.shape)}")
    matched = (chosen[..., :, None] == truth[..., None, :]).any(-1)  # [B, L, K]
    if real is not None:
        matched = matched[real.bool()]
    return int((~matched).sum()), int(matched.numel())


@dataclass
class RoutingTally:
    """Flip counts of one MoE layer over a validation, for the judged subject and its yardstick."""

    flipped: int = 0
    choices: int = 0
    yardstick_flipped: int | None = None
    yardstick_choices: int | None = None

    def add(self, got: tuple[int, int], yard: tuple[int, int] | None = None) -> None:
        """Count ``(flipped, choices)`` of the judged subject (and of its yardstick)."""
        self.flipped += got[0]
        self.choices += got[1]
        if yard is not None:
            self.add_yardstick(yard)

    def add_yardstick(self, yard: tuple[int, int]) -> None:
        self.yardstick_flipped = (self.yardstick_flipped or 0) + yard[0]
        self.yardstick_choices = (self.yardstick_choices or 0) + yard[1]

    @property
    def fraction(self) -> float:
        return self.flipped / self.choices if self.choices else 0.0

    @property
    def yardstick_fraction(self) -> float | None:
        if self.yardstick_flipped is None or not self.yardstick_choices:
            return None
        return self.yardstick_flipped / self.yardstick_choices


@dataclass(frozen=True)
class RoutingGate:
    """``max_flips`` floor and the yardstick ``ratio`` of one precision (tolerances.json ``routing``)."""

    max_flips: float
    min_flips: int = 0
    ratio: float | None = None

    def bound(self, yardstick_fraction: float | None) -> float:
        """The flip fraction allowed (before `min_flips`)."""
        if self.ratio is None or yardstick_fraction is None:
            return self.max_flips
        return max(self.max_flips, self.ratio * yardstick_fraction)

    def allowed(self, tally: RoutingTally) -> int:
        """The number of flipped choices allowed for ``tally``."""
        return max(int(self.bound(tally.yardstick_fraction) * tally.choices), self.min_flips)

    def failures(self, tally: RoutingTally) -> list[str]:
        bound = self.bound(tally.yardstick_fraction)
        if tally.flipped <= self.allowed(tally):
            return []
        why = f"{tally.flipped} of {tally.choices} expert choices differ from the truth's ({tally.fraction:.1%} > {bound:.1%}"
        if bound != self.max_flips:
            why += f": {self.ratio:g}× the yardstick's {tally.yardstick_fraction:.1%}"
        return [why + ")"]


def routing_gate(precision: str) -> RoutingGate:
    """The routing gate of ``precision``."""
    entry = _entry(precision)
    routing = entry["routing"]
    return RoutingGate(float(routing["max_flips"]), int(routing.get("min_flips", 0)), entry.get("yardstick", {}).get("ratio"))


def judge_tallies(gate: RoutingGate, tallies: dict[int, RoutingTally]) -> tuple[dict[int, dict[str, int | None]], list[str]]:
    """``({MoE layer: {"flipped", "choices", "yardstick_flipped", "yardstick_choices", "allowed"}},
    failures)``: every layer's counts and the gate's verdicts, in layer order, one line per failing layer."""
    records, failures = {}, []
    for layer, t in sorted(tallies.items()):
        records[layer] = {
            "flipped": t.flipped, "choices": t.choices, "yardstick_flipped": t.yardstick_flipped,
            "yardstick_choices": t.yardstick_choices, "allowed": gate.allowed(t),
        }
        failures += [f"MoE layer {layer}: {why}" for why in gate.failures(t)]
    return records, failures


def per_layer_text(records: Mapping[Any, Mapping[str, Any]], yardstick: bool) -> str:
    """``layer: flipped/choices (yardstick's flipped) ≤ allowed, …`` of per-layer routing records
    (`judge_tallies`, or a verification record's), in layer order."""
    return ", ".join(
        f"{layer}: {r['flipped']}/{r['choices']}" + (f" ({r['yardstick_flipped']})" if yardstick else "") + f" ≤ {r['allowed']}"
        for layer, r in sorted(records.items(), key=lambda kv: int(kv[0]))
    )
