"""Session fixtures of the plugin tests, each built once into a temp dir.

- ``plugin_build``: CMake build of plugins/ (nvcc, sm_89 + sm_90). With ``$TENSORRT_ROOT`` set (headers of
  a TensorRT install or of github.com/NVIDIA/TensorRT) it also compiles libhybridtrt_trt.so and its
  host-only self tests.
- ``emulated_kernels``: the same kernel sources compiled for the CPU (``HYBRIDTRT_CPU_EMULATION``), a
  library with the same C ABI that runs the kernels on CPU threads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtrt.plugins.build import BuildResult, build_plugins, find_nvcc, source_dir

PLUGINS = source_dir()


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The kernels (and, with $TENSORRT_ROOT, plugins) built for sm_89 and sm_90."""
    if find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA compiler) to build plugins/")
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake (>= 3.24) to build plugins/")
    out = tmp_path_factory.mktemp("plugins_build")
    return build_plugins(build_dir=out, tensorrt_root=os.environ.get("TENSORRT_ROOT") or None, cuda_archs="89;90")


def _cuda_include_dir() -> Path | None:
    nvcc = find_nvcc()
    roots = [nvcc.resolve().parent.parent] if nvcc else []
    roots += [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if p]
    return next((r / "include" for r in roots if (r / "include" / "cuda_fp16.h").is_file()), None)


@pytest.fixture(scope="session")
def cuda_include_dir() -> Path:
    """The CUDA toolkit's include/ (cuda_fp16.h, ...)."""
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("needs the CUDA headers (cuda_fp16.h)")
    return include


@pytest.fixture(scope="session")
def emulated_kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libhybridtrt_kernels compiled for the CPU (HYBRIDTRT_CPU_EMULATION, plugins/tests/emulation)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_fp16.h) for the CPU emulation")
    out = tmp_path_factory.mktemp("emulated") / "libhybridtrt_kernels_emulated.so"
    cmd = [
        cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-DHYBRIDTRT_CPU_EMULATION",
        f"-I{PLUGINS / 'kernels' / 'include'}", f"-I{PLUGINS / 'tests' / 'emulation'}", f"-I{include}",
        "-x", "c++", str(PLUGINS / "kernels" / "src" / "chunkScan.cu"), str(PLUGINS / "kernels" / "src" / "stateUpdate.cu"),
        "-x", "none", str(PLUGINS / "kernels" / "src" / "abi.cpp"), str(PLUGINS / "tests" / "emulation" / "emulationHooks.cpp"),
        "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out
