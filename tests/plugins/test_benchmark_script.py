"""benchmarks/gpu/run.py end to end without a GPU (--dry-run: eager PyTorch stands in for the kernels).

Guards the script that a GPU session will run once: argument parsing, every check and timing path,
the tables (the SSD sections, and the MoE section of moe_bench.py with its tables at most 80 columns wide).
The real run (kernels on a GPU, results appended to benchmarks/RESULTS.md) needs a GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "run.py"


def test_benchmark_script_dry_run() -> None:
    results = SCRIPT.parents[1] / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run finished: all checks passed" in proc.stdout
    for title in ("Mamba2ChunkScan vs mamba2_chunk_scan_ref", "Mamba2StateUpdate vs", "fraction of copy", "Mtok/s"):
        assert title in proc.stdout
    for title in ("MoE correctness, nano-30b-a3b", "MoE correctness, super-120b-a12b", "MoE timing, nano-30b-a3b",
                  "MoE timing, super-120b-a12b", "MoE CUDA graph: a decode call"):  # fmt: skip
        assert f"## {title}" in proc.stdout
    moe = proc.stdout[proc.stdout.index("## MoE correctness") :]
    for path in ("decode", "prefill"):  # the auto tactic takes both paths on the shrunk shapes
        assert re.search(rf"\bauto +{path}\b", moe), f"no auto-tactic row ran the {path} path"
    for fmt in ("bf16", "fp8"):
        assert re.search(rf"^{fmt} ", moe, re.MULTILINE), f"no {fmt} row"
    assert "FAIL" not in moe
    assert all(len(line) <= 80 for line in moe.splitlines() if not line.startswith("## ")), "MoE tables wider than 80"
    assert (results.read_text() if results.exists() else None) == before  # a dry run writes nothing
