"""TensorRT plugin library: the plugin classes checked without a GPU or libnvinfer.

Compiled with g++ against the stub headers of plugins/tests/trtStub (always, so CI runs them) and against
TensorRT's own include/ when $TENSORRT_ROOT is set; the kernels run in CPU emulation:

- plugins/tests/trtPluginSelfTest.cpp: getCreators, creators and the build/runtime interfaces (names,
  fields as the ONNX parser passes them, serialization, dtypes, formats, shape checks incl. batch / L
  agreement, workspace, no aliasing) of the SSD plugins and of MoeExperts / MoeExpertsFp8 (activation attribute,
  y in x's dtype, int64 / int32 indices, FP8 stacks and scales, T / K / E / D / I agreement and the kernels' limits,
  the workspace at the profile's max T, no custom tactic, the MoE kernels' C ABI version refused at creation);
- plugins/tests/trtPluginEnqueueTest.cpp: enqueue() of the four plugins against direct C ABI calls.

With $TENSORRT_ROOT the CMake build (nvcc) is checked too: exported entry points of both libraries and its
own build of the self test. Registration through the loaders: test_trt_registration.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtrt.plugins.build import BuildResult, source_dir
from tests.plugins.conftest import TrtTestBuild

PLUGINS = source_dir()


def _build_and_run(build: TrtTestBuild, source: str, exe: Path) -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or "g++"
    cmd = [cxx, str(PLUGINS / "tests" / source), *build.flags, "-o", str(exe)]
    compiled = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_trt_plugin_self_test(trt_test_build: TrtTestBuild, tmp_path: Path) -> None:
    out = _build_and_run(trt_test_build, "trtPluginSelfTest.cpp", tmp_path / "selftest")
    assert ", 0 failures" in out


def test_trt_plugin_enqueue_on_emulated_kernels(trt_test_build: TrtTestBuild, tmp_path: Path) -> None:
    """enqueue() of the SSD and MoE plugins == direct C ABI calls, with the kernels in CPU emulation (no GPU, no
    libnvinfer): argument plumbing, chunk_size, the L == 1 dispatch, workspace alignment, onShapeChange; MoE: y in
    x's dtype, int64 / int32 indices, FP8 scales, AUTO on the decode (T = 3) and prefill (T = 70) paths."""
    out = _build_and_run(trt_test_build, "trtPluginEnqueueTest.cpp", tmp_path / "enqueue")
    assert "enqueue test: 0 failures" in out
    moe = [line for line in out.splitlines() if line.startswith("ok: MoeExperts") and line.endswith(": y == direct call")]
    assert len(moe) == 7 and sum("AUTO = decode" in line for line in moe) == 3, moe


needs_tensorrt = pytest.mark.skipif(
    not os.environ.get("TENSORRT_ROOT"),
    reason="needs TENSORRT_ROOT (TensorRT headers, e.g. include/ of github.com/NVIDIA/TensorRT) for the nvcc build",
)


@needs_tensorrt
def test_cmake_build_exports_one_registration_path_per_library(plugin_build: BuildResult) -> None:
    """libhybridtrt_trt.so exports getCreators / setLoggerFinder; the autoreg shim exports neither and needs
    libhybridtrt_trt.so beside it."""
    assert plugin_build.trt_library is not None
    shim = plugin_build.trt_library.with_name("libhybridtrt_trt_autoreg.so")
    assert shim.is_file()

    def exported(lib: Path) -> set[str]:
        nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}

    assert {"getCreators", "setLoggerFinder"} <= exported(plugin_build.trt_library)
    assert not {"getCreators", "setLoggerFinder", "getPluginCreators"} & exported(shim)
    needed = subprocess.run(["readelf", "-d", str(shim)], capture_output=True, text=True, check=True).stdout
    assert "libhybridtrt_trt.so" in needed


@needs_tensorrt
def test_cmake_self_test(plugin_build: BuildResult) -> None:
    proc = subprocess.run([str(plugin_build.build_dir / "hybridtrt_trt_selftest")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and ", 0 failures" in proc.stdout, proc.stdout + proc.stderr
