"""A plain, non-editable ``pip install`` into a fresh virtual environment runs ``hybridtrt demo``.

Editable installs hide missing package data and undeclared dependencies (the tolerance table and
matplotlib went missing that way). The package is built from the files git knows (what a fresh
clone has), installed with the lock's versions as constraints (torch pinned as the Makefile pins
it), and the demo runs from that environment with the checkout out of reach.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def _makefile_var(name: str) -> str:
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith(f"{name} :=") or line.startswith(f"{name} ?="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"the Makefile does not set {name}")


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("needs git to list the files of a fresh clone")
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    torch = f"torch=={_makefile_var('TORCH_VERSION')}"
    # --no-compile: Python compiles what the demo imports anyway; pip would byte-compile all of torch.
    proc = subprocess.run([*pip, "install", "--no-compile", "-c", str(src / "requirements.lock"), torch, str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.rmtree(src)  # nothing may be read from the source tree after install
    return venv


def test_non_editable_install_runs_the_demo(fresh_install, tmp_path):
    exe = fresh_install / "bin" / "hybridtrt"
    # The suite's trace cache stays on: its key hashes every .py and .json file of the package that
    # runs, so a wheel missing one misses the cache and traces (and fails) for itself.
    proc = subprocess.run([str(exe), "demo", "-o", str(tmp_path / "demo")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "Traceback" not in proc.stderr
    assert (tmp_path / "demo" / "report" / "errors.png").is_file()
    # The installed package is the one that ran, not the checkout.
    where = subprocess.run(
        [str(fresh_install / "bin" / "python"), "-c", "import hybridtrt, sys; print(hybridtrt.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    ).stdout.strip()
    assert str(fresh_install) in where, where


def test_plugin_build_without_a_checkout_says_where_the_sources_are(fresh_install, tmp_path):
    """The CUDA/C++ sources are not in the wheel: building the plugins from a plain install is
    refused up front (before cmake/nvcc are looked for) with the way to get them, exit 2."""
    proc = subprocess.run(
        [str(fresh_install / "bin" / "python"), "-m", "hybridtrt.plugins", "build"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "plugin sources" in proc.stderr and "--source" in proc.stderr and "Traceback" not in proc.stderr
