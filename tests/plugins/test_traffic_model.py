"""benchmarks/gpu/traffic.py: the byte-traffic model of the scan, ours vs mamba_ssm's 5-kernel SSD (no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "traffic.py"


@pytest.fixture(scope="module")
def traffic():
    return load_script("traffic", SCRIPT)


def nano(traffic, chunk=128, length=2048):
    n = traffic.NANO
    return traffic.Shapes(n["heads"], n["head_dim"], n["d_state"], n["groups"], chunk, length)


@pytest.mark.parametrize("chunk", [64, 128, 256])
def test_state_round_trips(traffic, chunk):
    s = nano(traffic, chunk)
    elements = 128 * 80 * 128
    _, ours = traffic.totals(traffic.ours(s))
    _, mamba = traffic.totals(traffic.mamba_ssm(s))
    _, before = traffic.totals(traffic.ours_before(s))
    assert ours == pytest.approx(2 * elements * 2 / chunk)  # start states written once, read once, in bf16
    assert mamba == pytest.approx(elements * (4 + 4 + 2 + 2) / chunk)  # fp32 out, fp32 in, bf16 out, bf16 in
    assert before == pytest.approx(4 * elements * 4 / 64)  # fp32, 64-token chunks, four passes
    assert ours < mamba < before


@pytest.mark.parametrize("act", [2, 4])
def test_our_y_is_float32_for_every_activation_dtype(traffic, act):
    """C ABI 3: our y is 4 bytes per element whatever x's dtype; mamba_ssm's y has x's dtype."""
    n = traffic.NANO
    s = traffic.Shapes(n["heads"], n["head_dim"], n["d_state"], n["groups"], 128, 2048, act=act)
    elements = n["heads"] * n["head_dim"]  # y elements per token
    assert traffic.y_bytes(traffic.ours(s)) == elements * 4
    assert traffic.y_bytes(traffic.mamba_ssm(s)) == elements * act
    (_, output_kernel), = [k for k in traffic.ours(s) if k[0] == "chunkOutputKernel"]
    assert output_kernel["y"] == elements * 4 and output_kernel["x"] == elements * act


def test_model_uses_the_kernels_workspace(traffic, emulated_kernels):
    """Our start-state bytes per token are the C ABI's workspace query divided by the tokens."""
    from hybridtrt.plugins.kernels import KernelLibrary

    lib = KernelLibrary(emulated_kernels)
    s = nano(traffic, 128, 2048)
    workspace = lib.chunk_scan_workspace_size(1, 2048, 128, 80, 8, 128, 128, "bfloat16", "bfloat16", "float32")
    (_, state_kernel), _ = traffic.ours(s)
    assert state_kernel["start states (write)"] * 2048 == workspace


def test_script_prints_the_comparison():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chunk", "128", "--length", "2048"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "### Summary" in out and "mamba_ssm 5-kernel SSD" in out and "hybridtrt (2 kernels)" in out
    summary = out.split("### Summary")[1]
    ours = next(line for line in summary.splitlines() if line.startswith("| hybridtrt (2 kernels)"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == f"{128 * 80 * 4:,}"  # y: fp32 at bf16 activations
    assert float(cells[5]) < 0.5 and float(cells[6]) < 1.0  # state and total below mamba_ssm's
