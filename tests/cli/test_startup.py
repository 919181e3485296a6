"""`hybridtrt --help` and argument errors must be instant: no torch/onnx import before a command runs.

Measured by the interpreter's own import timer (``python -X importtime``), not wall time, so a loaded
CI machine does not make the test flaky.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybridtrt.cli.main import COMMANDS

#: Budget for everything imported before a subcommand runs (the issue's figure).
IMPORT_BUDGET_S = 0.5
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "polygraphy", "transformers", "matplotlib", "tensorrt")


def import_profile(*args: str) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run ``hybridtrt ARGS`` under ``-X importtime``: the process and ``{module: self seconds}``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hybridtrt.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    times: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            times[name] = times.get(name, 0.0) + int(self_us) / 1e6
    return proc, times


@pytest.mark.parametrize("args", [("--help",), *[(cmd, "--help") for cmd in COMMANDS], ("export",), ("validate", "--steps")])
def test_help_and_argument_errors_import_little(args):
    proc, times = import_profile(*args)
    assert proc.returncode in (0, 2), proc.stderr[-2000:]
    heavy = sorted(m for m in times if m.split(".")[0] in HEAVY)
    assert not heavy, f"`hybridtrt {' '.join(args)}` imports {heavy[:5]}"
    total = sum(times.values())
    assert total < IMPORT_BUDGET_S, f"imports took {total:.3f} s: " + ", ".join(
        f"{m} {t * 1e3:.0f} ms" for m, t in sorted(times.items(), key=lambda kv: -kv[1])[:5]
    )
