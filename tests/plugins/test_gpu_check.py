"""benchmarks/gpu/check.sh on a machine without a GPU: every GPU step skipped with its reason, exit 0; a planted
failing step and a planted step that outlives its budget fail the check, exit 1.

The real run (one H100, from a clean checkout, at most ten minutes) is GPU-unverified until a device runs it; these
tests guard its driver: the JSON's form, the skip logic, the per-step timeout, the table, the parsers, and the scan
timing path (run.py's EagerStandIn on CPU in place of the kernels).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import load_script

GPU_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
STEPS = ["build", "pytest", "engines", "double_load", "static", "timing"]


@pytest.fixture(scope="module")
def check():
    return load_script("hybridtrt_gpu_check", GPU_DIR / "check.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "HYBRIDTRT_GPU_CHECK_PLANT")}
    # No GPU, even on a machine that has one: the heavy steps must not run inside the test suite.
    return {**env, "CUDA_VISIBLE_DEVICES": "", "HYBRIDTRT_PYTHON": sys.executable, **extra}


def _well_formed(doc: dict, steps: list[str]) -> None:
    assert doc["schema"] == 1
    for fact in ("date", "torch", "python", "commit", "cuda_driver", "nvcc", "tensorrt"):
        assert fact in doc["device"]
    assert list(doc["steps"]) == steps
    for record in doc["steps"].values():
        assert record["status"] in ("pass", "fail", "skipped")
        assert record["status"] == "pass" or (isinstance(record["reason"], str) and record["reason"])
        assert isinstance(record["seconds"], float) and isinstance(record["budget_s"], int)
    s = doc["summary"]
    assert s["passed"] + s["failed"] + s["skipped"] == len(steps)
    assert s["exit_code"] == (1 if s["failed"] else 0)


def test_without_gpu_every_step_is_skipped_with_its_reason(tmp_path, check) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        ["bash", str(GPU_DIR / "check.sh"), "--out", str(out), "--total-budget", "60"],
        capture_output=True, text=True, env=_env(), timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    _well_formed(doc, STEPS)
    assert {r["status"] for r in doc["steps"].values()} == {"skipped"}
    for name, record in doc["steps"].items():
        assert "no CUDA GPU" in record["reason"], (name, record["reason"])
        assert record["seconds"] == 0.0
    if importlib.util.find_spec("tensorrt") is None:
        for name in ("engines", "double_load", "static"):
            assert "no TensorRT Python bindings" in doc["steps"][name]["reason"]
    assert doc["summary"]["skip_reasons"][next(r for r in doc["summary"]["skip_reasons"] if r.startswith("no CUDA GPU"))] == STEPS
    table = proc.stdout[proc.stdout.index("step "):]
    assert all(len(line) <= 80 for line in table.splitlines() if not line.startswith(("GPU check:", "results:")))
    assert "GPU check: 0 passed, 0 failed, 6 skipped (" in proc.stdout
    assert out.with_suffix(".log").is_file()
    section = check.render(doc)  # the RESULTS.md section of such a run
    assert "GPU check on no GPU" in section and "| engines | skipped | 0 | no CUDA GPU" in section


def test_a_failing_or_overrunning_step_fails_the_check(tmp_path) -> None:
    """Planted steps (HYBRIDTRT_GPU_CHECK_PLANT): one passes, one raises, one outlives its 1 s budget; $OUT names
    the JSON."""
    proc = subprocess.run(
        [sys.executable, str(GPU_DIR / "check.py"), "--only", "planted_pass,planted_fail,planted_timeout"],
        capture_output=True, text=True, env=_env(OUT=str(tmp_path), HYBRIDTRT_GPU_CHECK_PLANT="pass,fail,timeout"),
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    _well_formed(doc, [*STEPS, "planted_pass", "planted_fail", "planted_timeout"])
    assert all(doc["steps"][s]["reason"].startswith("not selected (--only") for s in STEPS)
    passed = doc["steps"]["planted_pass"]
    assert passed["status"] == "pass" and passed["summary"] == "planted pass" and passed["planted"] is True
    failed, overran = doc["steps"]["planted_fail"], doc["steps"]["planted_timeout"]
    assert failed["status"] == "fail" and "planted failure" in failed["reason"] and failed["planted"] is True
    assert overran["status"] == "fail" and overran["reason"] == "timed out after 1 s (budget 1 s)"
    assert overran["seconds"] < 15
    assert doc["summary"]["failed"] == 2 and doc["summary"]["exit_code"] == 1
    assert "GPU check: 1 passed, 2 failed, 6 skipped" in proc.stdout


def test_pytest_counts_from_junit_summary_or_progress(tmp_path, check) -> None:
    suite = ET.Element("testsuite")
    for name, child in [("a", None), ("b", "failure"), ("c", "skipped"), ("d", "skipped"), ("e", "error")]:
        case = ET.SubElement(suite, "testcase", classname="tests.x", name=name)
        if child:
            ET.SubElement(case, child, message="needs a CUDA GPU")
    junit = tmp_path / "junit.xml"
    ET.ElementTree(suite).write(junit)
    counts = check.pytest_counts("", junit)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 2, 1)
    assert counts["failed_tests"] == ["tests.x::b", "tests.x::e"] and counts["skip_reasons"] == {"needs a CUDA GPU": 2}
    counts = check.pytest_counts("...\n3 failed, 600 passed, 12 skipped, 1 error in 80.1s", None)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (600, 3, 12, 1)
    counts = check.pytest_counts("2 passed, 1 skipped in 1.0s\nwarning printed on stderr after it", None)
    assert (counts["passed"], counts["skipped"]) == (2, 1)
    counts = check.pytest_counts("$ pytest\n..F.s.. [ 10%]\n.E..", None)  # killed mid-run
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (8, 1, 1, 1)


def test_scan_timing_path_on_cpu(monkeypatch, check) -> None:
    """The timing step's code with run.py's EagerStandIn in place of the kernels (measures nothing)."""
    monkeypatch.syspath_prepend(str(GPU_DIR))
    import run

    monkeypatch.setattr(run, "DEVICE", "cpu")
    shape = {"heads": 4, "head_dim": 16, "d_state": 16, "groups": 2, "chunk_size": 64}
    rows = check.time_scans(run.EagerStandIn(), lengths=[130], dtypes=["bf16", "fp16"], shape=shape)
    assert [(r["act"], r["L"]) for r in rows] == [("bf16", 130), ("fp16", 130)]
    for r in rows:
        assert r["check"] == "ok" and r["rel_l2_y"] <= r["gate_y"] and r["ms"] > 0 and r["workspace_MiB"] >= 0

    class Broken(run.EagerStandIn):
        def chunk_scan(self, *args, **kwargs):
            raise RuntimeError("planted kernel error")

    seen = []
    rows = check.time_scans(Broken(), lengths=[64, 65], dtypes=["fp16"], shape=shape, progress=seen.append)
    assert [r["check"] for r in rows] == ["FAIL: RuntimeError: planted kernel error"] * 2 and seen == rows


def test_scan_rows_render_into_results_markdown(check) -> None:
    doc = {
        "device": {"date": "2026-01-01 00:00 UTC", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "sm_90"},
        "seconds": 300.0, "total_budget_s": 590,
        "steps": {"timing": {"status": "fail", "reason": "fp16 L=65536: FAIL", "seconds": 40.0, "shape": "Nano", "scan": [
            {"act": "bf16", "L": 2048, "ms": 0.1234, "Mtok_s": 16.6, "workspace_MiB": 10.0, "model_GBps": 2000.0,
             "rel_l2_y": 1e-3, "rel_l2_state": 2e-3, "check": "ok"},
            {"act": "fp16", "L": 65536, "check": "FAIL: KernelStatusError: INVALID_SHAPE"},
        ]}},
        "summary": {"passed": 0, "failed": 1, "skipped": 0, "skip_reasons": {}, "exit_code": 1},
    }  # fmt: skip
    text = check.render(doc)
    assert "GPU check on NVIDIA H100 80GB HBM3 (sm_90)" in text and "| timing | fail | 40 | fp16 L=65536: FAIL |" in text
    assert "| bf16 | 2048 | 0.123 | 16.6 | 10 | 2000 | 1.00e-03 | 2.00e-03 | ok |" in text
    assert "| fp16 | 65536 | - | - | - | - | - | - | FAIL: KernelStatusError: INVALID_SHAPE |" in text
