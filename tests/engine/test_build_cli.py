"""``hybridtrt build`` without TensorRT: exit code 2, a message naming TensorRT, nothing written."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridtrt.cli.main import main
from hybridtrt.engine.build import build_engine, plan_build
from hybridtrt.errors import EngineError, MissingDependencyError
from hybridtrt.exporter.export import ExportOptions

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: these tests check its absence")


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))[1]


def test_cli_exit_code_2_and_nothing_written(export_dir, tmp_path, capsys):
    before = sorted(p.name for p in export_dir.iterdir())
    cache = tmp_path / "timing.cache"
    rc = main(["build", str(export_dir), "-o", str(tmp_path / "model.engine"), "--max-batch", "2", "--max-input-len", "16", "--max-cache-len", "32", "--timing-cache", str(cache)])
    out = capsys.readouterr()
    assert rc == 2
    assert "TensorRT" in out.err and "fix:" in out.err
    assert "prefill" in out.out and "decode" in out.out  # profiles were shown first
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in export_dir.iterdir()) == before


def test_cli_subprocess(export_dir, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "hybridtrt.cli.main", "build", str(export_dir), "-o", str(tmp_path / "m.engine")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "TensorRT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_api_raises_missing_dependency(export_dir, tmp_path):
    with pytest.raises(MissingDependencyError, match="TensorRT 11"):
        build_engine(export_dir, tmp_path / "m.engine", max_batch=1, max_input_len=4, max_cache_len=8)
    assert list(tmp_path.iterdir()) == []


def test_plan_checks_arguments_first(export_dir, tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        plan_build(export_dir, tmp_path / "nodir" / "m.engine")
    with pytest.raises(EngineError, match="timing cache directory"):
        plan_build(export_dir, tmp_path / "m.engine", timing_cache=tmp_path / "nodir" / "t.cache")
    with pytest.raises(EngineError, match="--plugins"):
        plan_build(export_dir, tmp_path / "m.engine", plugins=tmp_path / "missing.so")
    with pytest.raises(EngineError, match="max-cache-len"):
        plan_build(export_dir, tmp_path / "m.engine", max_input_len=10, max_cache_len=5)
    plan = plan_build(export_dir, tmp_path / "m.engine", graph="decode", max_batch=1, max_input_len=1, max_cache_len=8)
    assert plan.onnx_path == Path(export_dir) / "decode.onnx"
    assert [p.name for p in plan.profiles] == ["decode"]
    assert plan.flags["strongly_typed"] is True


def test_cli_bad_limits_exit_2(export_dir, tmp_path, capsys):
    rc = main(["build", str(export_dir), "-o", str(tmp_path / "m.engine"), "--max-input-len", "100", "--max-cache-len", "10"])
    assert rc == 2
    assert "max-cache-len" in capsys.readouterr().err
