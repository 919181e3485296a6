"""benchmarks/gpu/run.py end to end without a GPU (--dry-run: eager PyTorch stands in for the kernels).

Guards the script that a GPU session will run once: argument parsing, every check and timing path,
the tables. The real run (kernels on a GPU, results appended to benchmarks/RESULTS.md) needs a GPU.
"""

from __future__ import annotations

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
    assert (results.read_text() if results.exists() else None) == before  # a dry run writes nothing
