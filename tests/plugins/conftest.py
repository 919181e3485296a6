"""Session fixtures of the plugin tests, each built once into a temp dir.

- ``plugin_build``: CMake build of plugins/ (nvcc, sm_89 + sm_90). With ``$TENSORRT_ROOT`` set (headers of
  a TensorRT install or of github.com/NVIDIA/TensorRT) it also compiles libhybridtrt_trt.so and its
  host-only self tests.
- ``emulated_kernels``: the same kernel sources compiled for the CPU (``HYBRIDTRT_CPU_EMULATION``), a
  library with the same C ABI that runs the kernels on CPU threads.
- ``trt_test_build``: the TensorRT plugin libraries compiled with g++ on the emulated kernels, against the
  stub headers (always) and TensorRT's own (with ``$TENSORRT_ROOT``), plus the fake libnvinfer harness.

Each is built once per run, shared by the xdist workers (`tests.conftest.made_once`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybridtrt.plugins.build import BuildResult, build_plugins, find_nvcc, source_dir
from tests.conftest import made_once

PLUGINS = source_dir()


@pytest.fixture(scope="session")
def plugin_build() -> BuildResult:
    """The kernels (and, with $TENSORRT_ROOT, plugins) built for sm_89 and sm_90."""
    if find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA compiler) to build plugins/")
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake (>= 3.24) to build plugins/")
    with made_once("plugins-build", os.environ.get("TENSORRT_ROOT") or "") as (out, _):  # a second worker's build is incremental: nothing to do
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
def emulated_kernels() -> Path:
    """libhybridtrt_kernels compiled for the CPU (HYBRIDTRT_CPU_EMULATION, plugins/tests/emulation)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_fp16.h) for the CPU emulation")
    with made_once("emulated-kernels", str(include)) as (folder, done):
        out = folder / "libhybridtrt_kernels_emulated.so"
        if not done:
            _compile_emulated(cxx, include, out)
    return out


def _compile_emulated(cxx: str, include: Path, out: Path) -> None:
    cmd = [
        cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-DHYBRIDTRT_CPU_EMULATION",
        f"-I{PLUGINS / 'kernels' / 'include'}", f"-I{PLUGINS / 'tests' / 'emulation'}", f"-I{include}",
        "-x", "c++", str(PLUGINS / "kernels" / "src" / "chunkScan.cu"), str(PLUGINS / "kernels" / "src" / "stateUpdate.cu"),
        str(PLUGINS / "kernels" / "src" / "moeExperts.cu"),
        "-x", "none", str(PLUGINS / "kernels" / "src" / "abi.cpp"), str(PLUGINS / "tests" / "emulation" / "emulationHooks.cpp"),
        "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


#: The sources of libhybridtrt_trt.so (plugins/CMakeLists.txt's hybridtrt_trt target).
TRT_SOURCES = ("mamba2ChunkScanPlugin.cpp", "mamba2StateUpdatePlugin.cpp", "moeExpertsPlugin.cpp", "pluginRegistration.cpp")

#: Header sets the TensorRT plugin sources compile against in the tests: the stub of the plugin ABI written for
#: these tests (always; CI has no TensorRT) and TensorRT's own include/ when $TENSORRT_ROOT is set.
HEADER_SETS = ["stub"] + (["tensorrt"] if os.environ.get("TENSORRT_ROOT") else [])


@dataclass(frozen=True)
class TrtTestBuild:
    """The plugin libraries built with g++ on the CPU-emulated kernels, plus the fake libnvinfer and its harness.

    Attributes:
        headers: ``"stub"`` or ``"tensorrt"``.
        include: The TensorRT include dir compiled against.
        trt_library: ``libhybridtrt_trt.so`` (getCreators / setLoggerFinder only).
        autoreg_library: ``libhybridtrt_trt_autoreg.so`` (registers at load).
        fake_nvinfer: ``libnvinfer.so.11`` (plugins/tests/fakeNvinfer/fakeNvinfer.cpp).
        harness: ``registryHarness`` executable.
        flags: Compiler flags to build more test programs against these libraries.
    """

    headers: str
    include: Path
    trt_library: Path
    autoreg_library: Path
    fake_nvinfer: Path
    harness: Path
    flags: tuple[str, ...]


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-6000:]


@pytest.fixture(scope="session", params=HEADER_SETS)
def trt_test_build(request, emulated_kernels: Path) -> TrtTestBuild:
    """libhybridtrt_trt.so + libhybridtrt_trt_autoreg.so (g++, linked to the emulated kernels), the fake
    libnvinfer and the registry harness, compiled against one header set."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    cuda_include = _cuda_include_dir()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++17 compiler and the CUDA headers (cuda_runtime_api.h)")
    headers = request.param
    include = PLUGINS / "tests" / "trtStub" if headers == "stub" else Path(os.environ["TENSORRT_ROOT"]) / "include"
    with made_once(f"trt-{headers}", str(include)) as (out, done):
        return _trt_test_build(cxx, cuda_include, headers, include, emulated_kernels, out, done)


def _trt_test_build(cxx: str, cuda_include: Path, headers: str, include: Path, emulated_kernels: Path, out: Path, done: bool) -> TrtTestBuild:
    kernels_dir = emulated_kernels.parent
    flags = (
        "-std=c++17", "-O1", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
        f"-I{include}", f"-I{PLUGINS / 'trt'}", f"-I{PLUGINS / 'kernels' / 'include'}", f"-I{cuda_include}",
    )  # fmt: skip
    kernels = (f"-L{kernels_dir}", f"-l:{emulated_kernels.name}", f"-Wl,-rpath,{kernels_dir}")
    trt, autoreg, fake, harness = (out / n for n in ("libhybridtrt_trt.so", "libhybridtrt_trt_autoreg.so", "libnvinfer.so.11", "registryHarness"))
    if not done:
        _compile([cxx, *flags, "-shared", "-fvisibility=hidden",
                  *(str(PLUGINS / "trt" / f) for f in TRT_SOURCES),
                  *kernels, "-o", str(trt)])  # fmt: skip
        _compile([cxx, *flags, "-shared", "-fvisibility=hidden", str(PLUGINS / "trt" / "autoRegister.cpp"),
                  f"-L{out}", "-l:libhybridtrt_trt.so", "-Wl,--no-as-needed", "-Wl,-rpath,$ORIGIN", "-ldl", "-o", str(autoreg)])  # fmt: skip
        _compile([cxx, *flags, "-shared", "-Wl,-soname,libnvinfer.so.11",
                  str(PLUGINS / "tests" / "fakeNvinfer" / "fakeNvinfer.cpp"), "-ldl", "-o", str(fake)])  # fmt: skip
        runner_dir = PLUGINS.parent / "examples" / "cpp"  # plugin_libraries.h: the C++ runner's one-load rule
        _compile([cxx, *flags, f"-I{runner_dir}", str(PLUGINS / "tests" / "fakeNvinfer" / "registryHarness.cpp"), "-ldl", "-o", str(harness)])
    return TrtTestBuild(headers, include, trt, autoreg, fake, harness, (*flags, *kernels, f"-L{out}", "-l:libhybridtrt_trt.so", f"-Wl,-rpath,{out}", "-ldl"))
