"""Tolerances as data: ``tolerances.json`` holds one table per precision (DESIGN.md §8)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hybridtrt.validation.metrics import Comparison

_TABLE = Path(__file__).with_name("tolerances.json")


@dataclass(frozen=True)
class Gate:
    """Thresholds for one kind of comparison; None = reported, not gated."""

    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_token_agreement: float | None = None

    def failures(self, c: Comparison) -> list[str]:
        """Why ``c`` fails this gate (empty when it passes). Non-finite values fail first."""
        if not c.shape_ok:
            return ["shape mismatch"]
        if not c.finite:
            return ["non-finite values (NaN/Inf)"]
        out = []
        if self.max_rel_l2 is not None and not c.rel_l2 <= self.max_rel_l2:
            out.append(f"rel L2 {c.rel_l2:.2e} > {self.max_rel_l2:g}")
        if self.min_cosine is not None and not c.cosine >= self.min_cosine:
            out.append(f"cosine {c.cosine:.6f} < {self.min_cosine:g}")
        return out


@cache
def _table() -> dict:
    return json.loads(_TABLE.read_text())


def precisions() -> list[str]:
    return [k for k in _table() if not k.startswith("_")]


def gate(precision: str, kind: str) -> Gate:
    """The gate of ``kind`` (``"call" | "steps" | "layer" | "state"``) for ``precision``."""
    table = _table()
    if precision not in table or kind not in ("call", "steps", "layer", "state"):
        raise KeyError(f"no tolerances for precision {precision!r}; known: {precisions()}")
    return Gate(**table[precision][kind])


def polygraphy_tolerance(precision: str) -> tuple[float, float]:
    """``(atol, rtol)`` for polygraphy's elementwise comparison at ``precision``."""
    entry = _table()[precision]["polygraphy"]
    return float(entry["atol"]), float(entry["rtol"])


def precision_of(manifest) -> str:
    """``fp8`` for a quantized artefact, else its dtype."""
    if manifest.quantization:
        return str(manifest.quantization.get("scheme", "fp8"))
    return manifest.dtype
