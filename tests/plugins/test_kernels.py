"""hybridtrt.plugins.kernels without a GPU: the ABI version gate and the output checks of the launchers.

The launchers write raw bytes through the C ABI, so a library of another ABI version, or a preallocated ``y``
that is not float32 (C ABI 3: y is float32 whatever x's dtype), would corrupt memory instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hybridtrt.errors import InputError, PluginBuildError
from hybridtrt.plugins.kernels import ABI_VERSION, KernelLibrary


@pytest.fixture(scope="module")
def lib(emulated_kernels: Path) -> KernelLibrary:
    return KernelLibrary(emulated_kernels)


def test_library_reports_the_binding_abi_version(lib: KernelLibrary) -> None:
    assert lib.abi_version() == ABI_VERSION == 4


def test_library_of_another_abi_version_is_refused(tmp_path: Path) -> None:
    """A kernels library of an older C ABI (3: fp16 start states in fp16, half the workspace) is refused at load,
    naming both versions."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    source = tmp_path / "old.c"
    source.write_text('int hybridtrtKernelsAbiVersion(void) { return 3; }\n')
    old = tmp_path / "libhybridtrt_kernels.so"
    subprocess.run([cxx, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(old)], check=True)
    with pytest.raises(PluginBuildError) as err:
        KernelLibrary(old)
    text = str(err.value)
    assert "version 3" in text and "needs 4" in text and "hybridtrt plugins build" in text


def _scan_inputs(dtype: torch.dtype):
    x = torch.zeros(1, 8, 2, 16, dtype=dtype)
    dt = torch.zeros(1, 8, 2, dtype=dtype)
    A, D = torch.zeros(2), torch.zeros(2)
    B = C = torch.zeros(1, 8, 1, 16, dtype=dtype)
    s0 = torch.zeros(1, 2, 16, 16)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_chunk_scan_refuses_a_y_that_is_not_float32(lib: KernelLibrary, dtype: torch.dtype) -> None:
    """Checked before any pointer is taken (so on CPU tensors too): y must be [B, L, H, P] float32."""
    x, dt, A, B, C, D, s0 = _scan_inputs(dtype)
    wrong = [torch.zeros(x.shape, dtype=torch.float16), torch.zeros(1, 8, 2, 8)]
    for y in wrong:
        with pytest.raises(InputError, match=r"y is .* the kernel writes \(1, 8, 2, 16\) torch.float32"):
            lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=torch.zeros_like(s0))
    with pytest.raises(InputError, match="final_state"):
        lib.chunk_scan(x, dt, A, B, C, D, s0, y=torch.zeros(x.shape), final_state=s0.half())
    # float32 y and a state of the right dtype pass the checks and reach the pointer check (CPU tensors)
    with pytest.raises(InputError, match="contiguous CUDA tensors"):
        lib.chunk_scan(x, dt, A, B, C, D, s0, y=torch.zeros(x.shape), final_state=torch.zeros_like(s0))


def test_state_update_refuses_a_y_that_is_not_float32(lib: KernelLibrary) -> None:
    x, dt, A, B, C, D, s0 = _scan_inputs(torch.bfloat16)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    with pytest.raises(InputError, match=r"y is \(1, 2, 16\) torch.bfloat16"):
        lib.state_update(x, dt, A, B, C, D, s0, y=torch.zeros(x.shape, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="new_state"):
        lib.state_update(x, dt, A, B, C, D, s0, y=torch.zeros(x.shape), new_state=s0.bfloat16())
    with pytest.raises(InputError, match="contiguous CUDA tensors"):
        lib.state_update(x, dt, A, B, C, D, s0)  # y allocated float32, then the CPU tensors are refused
