"""One CMake build of plugins/ per test session (into a temp dir), shared by the plugin tests.

With ``$TENSORRT_ROOT`` set (headers of a TensorRT install or of github.com/NVIDIA/TensorRT) the build
also compiles libhybridtrt_trt.so and its host-only self test.
"""

from __future__ import annotations

import os

import pytest

from hybridtrt.plugins.build import BuildResult, build_plugins, find_nvcc


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The kernels (and, with $TENSORRT_ROOT, plugins) built for sm_89 and sm_90."""
    if find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA compiler) to build plugins/")
    out = tmp_path_factory.mktemp("plugins_build")
    return build_plugins(build_dir=out, tensorrt_root=os.environ.get("TENSORRT_ROOT") or None, cuda_archs="89;90")
