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
    return make_export("tiny-nemotron-h", ExportOptions(split=True, opset=22))[1]  # opset 22: parsable by TensorRT 10.2+


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


# -- --check-tensorrt: the version gates and the emulated parser, without TensorRT ---------------------------


@pytest.fixture
def no_built_plugins(monkeypatch, tmp_path):
    """Hide any libhybridtrt_trt.so built in the checkout, so that the default is "no plugin library"."""
    import hybridtrt.plugins as plugins

    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(tmp_path / "none"))
    monkeypatch.setattr(plugins, "default_build_dir", lambda: tmp_path / "none")


@pytest.fixture
def lib(tmp_path, no_built_plugins):
    path = tmp_path / "libhybridtrt_trt.so"
    path.write_bytes(b"plugin")
    return path


def test_check_tensorrt_11_with_plugins(export_dir, tmp_path, capsys, lib):
    assert main(["build", str(export_dir), "--plugins", str(lib), "--check-tensorrt", "11.1"]) == 0
    out = capsys.readouterr().out
    assert "hybridtrt::Mamba2ChunkScan" in out and "│ plugin " in out and "plugins registered" in out
    assert "would build model.onnx as asked" in out
    assert [p.name for p in tmp_path.iterdir()] == ["libhybridtrt_trt.so"]  # a check writes nothing


def test_check_tensorrt_10_6_refuses_plugins(export_dir, capsys, lib):
    assert main(["build", str(export_dir), "--plugins", str(lib), "--check-tensorrt", "10.6.0"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT 10.6.0" in err and "NVIDIA/TensorRT#4113" in err and "--allow-function-bodies" in err
    assert main(["build", str(export_dir), "--plugins", str(lib), "--check-tensorrt", "10.6.0", "--allow-function-bodies"]) == 0
    assert "local function" in capsys.readouterr().out


def test_check_tensorrt_10_1_refuses_opset_22(export_dir, capsys, no_built_plugins):
    assert main(["build", str(export_dir), "--check-tensorrt", "10.1", "--graph", "decode"]) == 2
    assert "documents ONNX opsets up to 20" in capsys.readouterr().err


def test_build_without_output_or_check_is_refused(export_dir, capsys):
    assert main(["build", str(export_dir)]) == 2
    assert "-o/--output" in capsys.readouterr().err


def test_build_help_does_not_import_torch():
    """`hybridtrt build --help` must stay light (issue 10: `hybridtrt --help` < 0.5 s)."""
    code = (
        "import argparse, sys\n"
        "import hybridtrt.cli.build as b\n"
        "p = argparse.ArgumentParser(); b.add_arguments(p); p.format_help()\n"
        "print(sorted(m for m in ('torch', 'onnx', 'tensorrt') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
