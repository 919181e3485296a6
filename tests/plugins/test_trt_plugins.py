"""TensorRT plugin library: compiled against $TENSORRT_ROOT headers and checked without a GPU or libnvinfer.

- hybridtrt_trt_selftest (plugins/tests/trtPluginSelfTest.cpp): getCreators, creators and the
  build/runtime interfaces (names, fields, serialization, dtypes, formats, shape checks, workspace,
  aliasing);
- hybridtrt_trt_registry_selftest: registration at dlopen against a fake getPluginRegistry;
- plugins/tests/trtPluginEnqueueTest.cpp: enqueue() of both plugins against direct C ABI calls with the
  kernels in CPU emulation.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtrt.plugins.build import BuildResult, source_dir

pytestmark = pytest.mark.skipif(
    not os.environ.get("TENSORRT_ROOT"),
    reason="needs TENSORRT_ROOT (TensorRT headers, e.g. include/ of github.com/NVIDIA/TensorRT)",
)


def test_trt_library_exports_entry_points(plugin_build: BuildResult) -> None:
    assert plugin_build.trt_library is not None and plugin_build.trt_library.is_file()
    lib = ctypes.CDLL(str(plugin_build.trt_library))
    assert hasattr(lib, "getCreators") and hasattr(lib, "setLoggerFinder")


def test_trt_plugin_self_test(plugin_build: BuildResult) -> None:
    exe = plugin_build.build_dir / "hybridtrt_trt_selftest"
    proc = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ", 0 failures" in proc.stdout


def test_trt_plugins_register_at_load_time(plugin_build: BuildResult) -> None:
    """A plain dlopen (polygraphy --plugins) registers the creators when TensorRT is in the process."""
    exe = plugin_build.build_dir / "hybridtrt_trt_registry_selftest"
    proc = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_get_creators_lists_both_without_tensorrt_in_process(plugin_build: BuildResult) -> None:
    """Without libnvinfer loaded, nothing registers at load time: loadLibrary gets both creators."""
    code = (
        "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); n = ctypes.c_int32(); "
        "lib.getCreators(ctypes.byref(n)); print(n.value)"
    )
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code, str(plugin_build.trt_library)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


def test_trt_plugin_enqueue_on_emulated_kernels(tmp_path: Path, cuda_include_dir: Path) -> None:
    """enqueue() of both plugins == direct C ABI calls, with the kernels in CPU emulation (no GPU, no
    libnvinfer): argument plumbing, the L == 1 dispatch, workspace alignment, in-place update."""
    plugins = source_dir()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler")
    exe = tmp_path / "trt_enqueue_test"
    cmd = [
        cxx, "-std=c++20", "-O2", "-pthread", "-Wno-deprecated-declarations", "-DHYBRIDTRT_CPU_EMULATION",
        f"-I{plugins / 'trt'}", f"-I{plugins / 'kernels' / 'include'}", f"-I{plugins / 'tests' / 'emulation'}",
        f"-I{cuda_include_dir}", f"-I{Path(os.environ['TENSORRT_ROOT']) / 'include'}",
        "-x", "c++", str(plugins / "kernels" / "src" / "chunkScan.cu"), str(plugins / "kernels" / "src" / "stateUpdate.cu"),
        "-x", "none", str(plugins / "kernels" / "src" / "abi.cpp"),
        *(str(plugins / "trt" / f) for f in ("mamba2ChunkScanPlugin.cpp", "mamba2StateUpdatePlugin.cpp",
                                             "pluginRegistration.cpp")),
        str(plugins / "tests" / "trtPluginEnqueueTest.cpp"), "-ldl", "-o", str(exe),
    ]  # fmt: skip
    build = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    proc = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
