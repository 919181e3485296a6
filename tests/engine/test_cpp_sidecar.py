"""The C++ runner's sidecar reader agrees with the Python buffer plan (compiled with g++; no TensorRT)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtrt.engine.profiles import engine_profiles
from hybridtrt.engine.sidecar import make_sidecar, write_sidecar
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.runtime.buffers import BufferPlan

CPP_DIR = Path(__file__).resolve().parents[2] / "examples" / "cpp"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile examples/cpp/sidecar_check.cpp")


@pytest.fixture(scope="module")
def sidecar_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cpp") / "sidecar_check"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", str(CPP_DIR / "sidecar_check.cpp"), "-o", str(exe)], check=True, timeout=120)
    return exe


@pytest.mark.parametrize("graph", ["unified", "decode"])
def test_cpp_reads_what_python_plans(make_export, sidecar_check, tmp_path, graph):
    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, graph=graph, max_batch=3, max_input_len=8, max_cache_len=20)
    sidecar = make_sidecar(
        manifest, out, profiles, graph=graph, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={}
    )
    path = write_sidecar(sidecar, tmp_path / "model.engine")
    lines = subprocess.run([str(sidecar_check), str(path)], check=True, capture_output=True, text=True, timeout=60).stdout.splitlines()
    plan = BufferPlan.from_sidecar(sidecar)
    expected = [
        f"profile {i} {p.name} batch {p.dims['batch'].max} seq {p.dims['seq'].max} past {p.dims['past'].max}" for i, p in enumerate(plan.profiles)
    ]
    expected += [f"state {s.past_name} {s.present_name} {plan.state_bytes(s)}" for s in plan.states]
    expected += ["plugins none"]
    assert lines == expected
