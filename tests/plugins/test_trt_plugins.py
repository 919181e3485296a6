"""TensorRT plugin library: compiled against $TENSORRT_ROOT headers and checked by its host-only self test.

The self test (plugins/tests/trtPluginSelfTest.cpp) needs neither a GPU nor libnvinfer: it calls
getCreators and drives the creators and the build/runtime interfaces (names, fields, serialization,
dtypes, formats, shape checks, workspace size, aliasing).
"""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

from hybridtrt.plugins.build import BuildResult

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
