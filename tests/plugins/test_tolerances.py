"""hybridtrt.plugins.tolerances: the kernels' accuracy gates as data."""

from __future__ import annotations

import json

import pytest
import torch

from hybridtrt.plugins import tolerances
from hybridtrt.plugins.tolerances import kernel_gate

DTYPES = ("float32", "float16", "bfloat16")


def test_table_covers_every_output_and_dtype_and_says_why() -> None:
    table = json.loads(tolerances._TABLE.read_text())
    assert set(table["gates"]) == set(table["why"]) == {"scan_y", "update_y", "state"}
    for output, gates in table["gates"].items():
        assert set(gates) == set(DTYPES), output
        assert all(0 < g < 0.1 for g in gates.values())


def test_gate_is_the_largest_among_the_dtypes_involved() -> None:
    assert kernel_gate("state", torch.float32) == 1e-5
    assert kernel_gate("state", torch.bfloat16, torch.float32) == kernel_gate("state", "bfloat16") == 3e-2
    assert kernel_gate("state", torch.float16, torch.bfloat16) == 3e-2


def test_float32_y_is_gated_tighter_than_the_half_states() -> None:
    """y is float32 (C ABI 3): the scan's y carries only its internal half rounding (gates below the 5e-3 / 3e-2
    that held while y was rounded to x's dtype), the update's y is fp32 arithmetic for every dtype."""
    for half, before in (("float16", 5e-3), ("bfloat16", 3e-2)):
        assert kernel_gate("scan_y", half) < before and kernel_gate("scan_y", half) < kernel_gate("state", half)
    assert all(kernel_gate("update_y", d) == kernel_gate("state", "float32") for d in DTYPES)


def test_unknown_dtype_is_an_error() -> None:
    with pytest.raises(KeyError, match="float64"):
        kernel_gate("scan_y", torch.float64)
    with pytest.raises(KeyError):
        kernel_gate("scan_y")
