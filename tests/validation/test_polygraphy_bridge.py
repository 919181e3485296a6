"""The polygraphy bridge: files polygraphy reads unmodified, and the printed command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridtrt.cli.main import main
from hybridtrt.validation.polygraphy_bridge import compare_with_polygraphy, write_polygraphy_data
from tests.validation.faults import perturb_weight


def _run_printed(cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("polygraphy", path=env["PATH"]), "polygraphy CLI must be installed beside hybridtrt"
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h")


def test_printed_onnxrt_command_passes(exported, tmp_path):
    _, out = exported
    files = write_polygraphy_data(out, None, tmp_path / "pg")
    assert compare_with_polygraphy(files) == {"onnxrt": True}
    proc = _run_printed(files.commands["onnxrt"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_printed_command_fails_on_planted_fault(exported, tmp_path):
    _, out = exported
    faulty = shutil.copytree(out, tmp_path / "faulty")
    files = write_polygraphy_data(faulty, None, tmp_path / "pg")  # reference from the intact checkpoint
    perturb_weight(faulty, "model.layers.2.mixer.out_proj.weight_t", 1.2)
    assert compare_with_polygraphy(files) == {"onnxrt": False}
    proc = _run_printed(files.commands["onnxrt"])
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_compare_cli_prints_commands(exported, tmp_path, capsys):
    _, out = exported
    assert main(["compare", str(out), "--out", str(tmp_path / "pg")]) == 0
    text = capsys.readouterr().out
    assert "polygraphy run" in text and "--onnxrt" in text and "--trt --strongly-typed" in text
    assert (tmp_path / "pg" / "inputs.json").is_file() and (tmp_path / "pg" / "reference.json").is_file()
