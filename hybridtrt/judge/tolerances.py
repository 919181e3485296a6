"""Tolerances as data: ``tolerances.json`` holds one table per precision (DESIGN.md §8).

Every artefact is judged against the fp32 reference (the truth). A precision may name a
*yardstick*: a second PyTorch run on the same inputs (fp64 for fp32 artefacts, the same-dtype
reference for fp16/bf16) whose own distance from the truth is the rounding that precision causes
anyway. A gate then allows ``max(max_rel_l2, ratio × yardstick rel L2)`` on each tensor: the
artefact may add a bounded multiple of its dtype's unavoidable rounding, at any prompt length, and
``max_rel_l2`` is the floor (and the whole gate where no yardstick ran).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hybridtrt.judge.metrics import Comparison

_TABLE = Path(__file__).with_name("tolerances.json")
KINDS = ("call", "steps", "layer", "state")


@dataclass(frozen=True)
class Gate:
    """Thresholds for one kind of comparison; None = reported, not gated.

    Attributes:
        max_rel_l2: Allowed rel L2 (the floor when a yardstick scales it).
        min_cosine: Allowed cosine (FP8).
        min_token_agreement: Greedy token agreement (``steps`` gates only).
        yardstick_ratio: With a yardstick comparison, allow ``ratio ×`` its rel L2 when that is larger.
    """

    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_token_agreement: float | None = None
    yardstick_ratio: float | None = None

    def bound(self, yardstick: Comparison | None = None) -> float | None:
        """The rel L2 this gate allows, given the yardstick's comparison with the truth."""
        if self.yardstick_ratio is None or yardstick is None or not yardstick.finite:
            return self.max_rel_l2
        scaled = self.yardstick_ratio * yardstick.rel_l2
        return scaled if self.max_rel_l2 is None else max(self.max_rel_l2, scaled)

    def failures(self, c: Comparison, yardstick: Comparison | None = None) -> list[str]:
        """Why ``c`` fails this gate (empty when it passes). Non-finite values fail first."""
        if not c.shape_ok:
            return ["shape mismatch"]
        if not c.finite:
            return ["non-finite values (NaN/Inf)"]
        out = []
        bound = self.bound(yardstick)
        if bound is not None and not c.rel_l2 <= bound:
            why = f"rel L2 {c.rel_l2:.2e} > {bound:.2g}"
            if bound != self.max_rel_l2:
                why += f" ({self.yardstick_ratio:g}× the yardstick's {yardstick.rel_l2:.2e})"
            out.append(why)
        if self.min_cosine is not None and not c.cosine >= self.min_cosine:
            out.append(f"cosine {c.cosine:.6f} < {self.min_cosine:g}")
        return out


@cache
def _table() -> dict:
    return json.loads(_TABLE.read_text())


def precisions() -> list[str]:
    return [k for k in _table() if not k.startswith("_")]


def _entry(precision: str) -> dict:
    table = _table()
    if precision not in table or precision.startswith("_"):
        raise KeyError(f"no tolerances for precision {precision!r}; known: {precisions()}")
    return table[precision]


def gate(precision: str, kind: str) -> Gate:
    """The gate of ``kind`` (``"call" | "steps" | "layer" | "state"``) for ``precision``."""
    entry = _entry(precision)
    if kind not in KINDS:
        raise KeyError(f"no gate kind {kind!r}; known: {KINDS}")
    ratio = entry.get("yardstick", {}).get("ratio")
    return Gate(**entry[kind], yardstick_ratio=ratio)


def yardstick_of(precision: str) -> str | None:
    """The yardstick run of ``precision``: a dtype (``"fp64" | "fp16" | "bf16"``), ``"export"`` (FP8:
    the FP8 reference in the export's dtype), ``"fp8-dynamic"`` (the recipe's cost: ideal scales),
    ``"int4-rtn"`` (an INT4 recipe's cost: round to nearest), or None."""
    return _entry(precision).get("yardstick", {}).get("subject")


def polygraphy_tolerance(precision: str) -> tuple[float, float]:
    """``(atol, rtol)`` for polygraphy's elementwise comparison at ``precision``."""
    entry = _entry(precision)["polygraphy"]
    return float(entry["atol"]), float(entry["rtol"])


def precision_of(manifest) -> str:
    """``fp8`` for an FP8 artefact, ``nvfp4-w4a4`` for one with FP4 activations, else its dtype
    (4-bit weights alone compute in the model dtype)."""
    if manifest.quantization:
        return str(manifest.quantization.get("scheme", "fp8"))
    if (getattr(manifest, "weight_only", None) or {}).get("activations"):
        return "nvfp4-w4a4"
    return manifest.dtype
