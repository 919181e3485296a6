"""Comparison metrics (DESIGN.md §8). Non-finite values are checked first, then the numbers.

All functions take torch tensors or numpy arrays and compare in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def _f64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float64)


@dataclass(frozen=True)
class Comparison:
    """Metrics of ``actual`` against ``expected``.

    Attributes:
        finite: Both sides are free of NaN/Inf.
        max_abs: ``max |a - b|``.
        rel_l2: ``‖a - b‖ / ‖b‖`` (0 when both are zero).
        cosine: Cosine similarity of the flattened tensors (1 when both are zero).
        top1: Fraction of rows whose argmax over the last axis agrees (logits only), else None.
        shape_ok: Shapes agree (if not, the other numbers are NaN).
    """

    finite: bool
    max_abs: float
    rel_l2: float
    cosine: float
    top1: float | None = None
    shape_ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(actual: Any, expected: Any, *, top1: bool = False) -> Comparison:
    """Compare two tensors. ``top1`` adds argmax agreement over the last axis."""
    a, b = _f64(actual), _f64(expected)
    if a.shape != b.shape:
        nan = float("nan")
        return Comparison(False, nan, nan, nan, None, shape_ok=False)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    if not finite:
        nan = float("nan")
        return Comparison(False, nan, nan, nan, None)
    diff = a - b
    nb, na = float(np.linalg.norm(b)), float(np.linalg.norm(a))
    rel = float(np.linalg.norm(diff)) / nb if nb > 0 else (0.0 if na == 0 else float("inf"))
    if na == 0 and nb == 0:
        cos = 1.0
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = float(np.dot(a.ravel(), b.ravel()) / (na * nb))
    agree = None
    if top1 and a.size:
        agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    return Comparison(True, float(np.abs(diff).max()) if diff.size else 0.0, rel, cos, agree)


def rel_l2(actual: Any, expected: Any) -> float:
    """``‖a - b‖ / ‖b‖``; inf for non-finite inputs."""
    c = compare(actual, expected)
    return c.rel_l2 if c.finite else float("inf")
