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
