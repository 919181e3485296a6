"""hybridtrt.plugins.kernels without a GPU: the ABI version gate and the output checks of the launchers.

The launchers write raw bytes through the C ABI, so a library of another ABI version, or a preallocated ``y``
that is not float32 (C ABI 3: y is float32 whatever x's dtype), would corrupt memory instead of failing. The MoE
launchers (y in x's dtype) check their contract the same way, and their workspace queries are host code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hybridtrt.errors import InputError, PluginBuildError
from hybridtrt.plugins.kernels import ABI_VERSION, MOE_ABI_VERSION, MOE_WORKSPACE_SECTIONS, STATUS_NAMES, KernelLibrary


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


def _moe_inputs(dtype: torch.dtype = torch.bfloat16):
    x = torch.zeros(4, 32, dtype=dtype)
    idx, w = torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2)
    up, down = torch.zeros(8, 48, 32, dtype=dtype), torch.zeros(8, 32, 48, dtype=dtype)
    return x, idx, w, up, down


def test_moe_binding_checks_the_contract_before_any_pointer(lib: KernelLibrary) -> None:
    """The MoE launchers write raw bytes too: shapes, dtypes, the tactic and a preallocated y are checked first (on CPU
    tensors, then refused as not CUDA)."""
    x, idx, w, up, down = _moe_inputs()
    with pytest.raises(InputError, match=r"down_proj is \(8, 48, 32\), the MoE contract needs \(8, 32, 48\)"):
        lib.moe_experts(x, idx, w, up, up)
    with pytest.raises(InputError, match="topk_indices is torch.int16"):
        lib.moe_experts(x, idx.short(), w, up, down)
    with pytest.raises(InputError, match="experts are torch.float16"):
        lib.moe_experts(x, idx, w, up.half(), down.half())
    with pytest.raises(InputError, match=r"y is \(4, 32\) torch.float32, the kernel writes \(4, 32\) torch.bfloat16"):
        lib.moe_experts(x, idx, w, up, down, y=torch.zeros(4, 32))
    with pytest.raises(InputError, match="unknown MoE tactic 'fast'"):
        lib.moe_experts(x, idx, w, up, down, tactic="fast")
    with pytest.raises(InputError, match="contiguous CUDA tensors"):
        lib.moe_experts(x, idx.int(), w, up, down, tactic="decode")

    fp8_up, fp8_down = up.to(torch.float8_e4m3fn), down.to(torch.float8_e4m3fn)
    per_expert, inputs = torch.ones(8, 1), torch.ones(8)
    with pytest.raises(InputError, match=r"up_weight_scale is \(8, 32\) torch.float32, the contract needs one of \[\(8, 1\), \(8, 48\)\]"):
        lib.moe_experts_fp8(x, idx, w, fp8_up, torch.ones(8, 32), inputs, fp8_down, per_expert, inputs)
    with pytest.raises(InputError, match="down_input_scale is .* torch.float16"):
        lib.moe_experts_fp8(x, idx, w, fp8_up, per_expert, inputs, fp8_down, torch.ones(8, 32), inputs.half())
    with pytest.raises(InputError, match="the FP8 experts are torch.bfloat16"):
        lib.moe_experts_fp8(x, idx, w, up, per_expert, inputs, down, per_expert, inputs)
    with pytest.raises(InputError, match="contiguous CUDA tensors"):
        lib.moe_experts_fp8(x, idx, w, fp8_up, torch.ones(8, 48), inputs, fp8_down, torch.ones(8, 32), inputs)


def test_moe_workspace_queries(lib: KernelLibrary) -> None:
    """The MoE part of the ABI has its own version; a library without it says how to rebuild. The workspace layout's
    end is the size query's answer, grows with T (a profile's max T fits every smaller T) and carries the FP8
    quantized inputs only for FP8 experts; sizes past the limits are refused, not wrapped."""
    assert lib.moe_abi_version() == MOE_ABI_VERSION == 1
    nano = (128, 6, 2688, 1856)  # Nemotron-3 Nano-30B-A3B: E, K, D, I
    sizes = [lib.moe_workspace_size(t, nano[1], nano[0], nano[2], nano[3], "bfloat16") for t in (1, 7, 64, 2048, 16384)]
    assert sizes == sorted(sizes) and all(s % 256 == 0 for s in sizes)
    layout = lib.moe_workspace_layout(2048, 6, 128, 2688, 1856, "bfloat16")
    assert list(layout) == [*MOE_WORKSPACE_SECTIONS, "end"] and layout["end"] == sizes[3]
    assert layout["h"] == layout["x_quant"]  # no quantized inputs for experts in x's dtype
    assert layout["out"] - layout["h"] >= 2048 * 6 * 1856 * 2 and layout["end"] - layout["out"] >= 2048 * 6 * 2688 * 2
    fp8 = lib.moe_workspace_layout(2048, 6, 128, 2688, 1856, "bfloat16", "float8_e4m3fn")
    assert fp8["h"] - fp8["x_quant"] >= 2048 * 6 * 2688 and fp8["end"] - fp8["out"] >= 2048 * 6 * 2688 * 4
    assert STATUS_NAMES[lib.moe_workspace_status(2**31, 1, 8, 32, 32)[0]] == "INVALID_SHAPE"
    assert STATUS_NAMES[lib.moe_workspace_status(4, 2, 8, 32, 32, "bfloat16", "float16")[0]] == "UNSUPPORTED_DTYPE"
    lib.has_moe = False
    try:
        with pytest.raises(PluginBuildError, match="has no MoE kernels, this hybridtrt needs version 1"):
            lib.moe_tactic(1, 1, 1)
    finally:
        lib.has_moe = True
