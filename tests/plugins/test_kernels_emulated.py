"""The kernels' sources run on the CPU (HYBRIDTRT_CPU_EMULATION) against the PyTorch ``_ref`` ops.

plugins/tests/emulation/cudaEmulation.h runs each CUDA thread as a std::thread with real barriers and
shuffles, and stands a scalar tile (T operands, fp32 accumulation) in for the WMMA tensor-core tile. So
the grid / block decomposition, the shared-memory plans and their aliasing, indexing, masking, the
chunk recurrences and the dtype handling are checked without a GPU; the WMMA intrinsics themselves, the
GPU memory model and performance are not (tests/plugins/test_kernels_gpu.py, benchmarks/gpu/run.py).
Outputs and shared memory start poisoned (NaN bit patterns), so an unwritten element or a read of
uninitialised shared memory that matters fails the test.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from hybridtrt.ops import mamba2_chunk_scan_ref, mamba2_state_update_ref
from hybridtrt.plugins.kernels import KernelLibrary, scan_workspace_bytes

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: rel L2 gates against the fp32 reference, by the least precise dtype involved.
REL_L2 = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def emu(emulated_kernels: Path) -> ctypes.CDLL:
    return KernelLibrary(emulated_kernels)._lib  # ctypes signatures set by KernelLibrary


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str, got: torch.Tensor, want: torch.Tensor, gate: float) -> None:
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} unwritten / non-finite elements"
    err = rel_l2(got.float(), want.float())
    assert err <= gate, f"{name}: rel L2 {err:.3g} > {gate:.1g}"


def inputs(batch, length, heads, head_dim, groups, d_state, dtype, state_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g).to(dtype)
    dt = (torch.rand(batch, length, heads, generator=g) * 0.2 + 0.01).to(dtype)
    A = -torch.rand(heads, generator=g) * 4 - 0.5
    B = (torch.randn(batch, length, groups, d_state, generator=g) * 0.5).to(dtype)
    C = (torch.randn(batch, length, groups, d_state, generator=g) * 0.5).to(dtype)
    D = torch.randn(heads, generator=g)
    s0 = torch.randn(batch, heads, head_dim, d_state, generator=g).to(state_dtype)
    return x, dt, A, B, C, D, s0


SCAN_CASES = [
    # (batch, L, H, P, G, N)
    (1, 1, 2, 16, 1, 16),  # L = 1 through the scan kernels
    (2, 63, 4, 32, 2, 16),  # one short chunk, two groups
    (1, 64, 2, 64, 1, 16),  # exactly one chunk
    (1, 65, 2, 80, 2, 16),  # chunk + 1 token; P = 80 -> two P tiles
    (1, 129, 2, 128, 1, 64),  # three chunks, P = 128
    (1, 70, 2, 48, 1, 128),  # N = 128
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "B{}_L{}_H{}_P{}_G{}_N{}".format(*c))
def test_chunk_scan_emulated_matches_ref(emu, dtype, case) -> None:
    batch, length, heads, head_dim, groups, d_state = case
    with_init = length != 65  # one case with initialState = NULL
    x, dt, A, B, C, D, s0 = inputs(*case, dtype, torch.float32, seed=sum(case))
    if not with_init:
        s0.zero_()
    y = torch.full_like(x, float("nan"))
    final = torch.full_like(s0, float("nan"))
    size = scan_workspace_bytes(batch, length, heads, head_dim, d_state)
    ws = torch.full((size + 256,), 0xFF, dtype=torch.uint8)
    ws_ptr = (ws.data_ptr() + 255) // 256 * 256
    status = emu.hybridtrtMamba2ChunkScan(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(),
        s0.data_ptr() if with_init else None, y.data_ptr(), final.data_ptr(),
        batch, length, heads, head_dim, groups, d_state, CODES[dtype], CODES[dtype], 0, ws_ptr, size, None,
    )  # fmt: skip
    assert status == 0
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    check("y", y, y_ref, REL_L2[dtype])
    check("final_state", final, s_ref, REL_L2[dtype])


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunk_scan_emulated_half_state_fp32_dt(emu, state_dtype) -> None:
    x, dt, A, B, C, D, s0 = inputs(1, 100, 2, 32, 1, 64, torch.bfloat16, state_dtype, seed=7)
    dt = dt.float()  # dt in its own dtype
    y = torch.full_like(x, float("nan"))
    final = torch.full_like(s0, float("nan"))
    size = scan_workspace_bytes(1, 100, 2, 32, 64)
    ws = torch.empty(size + 256, dtype=torch.uint8)
    status = emu.hybridtrtMamba2ChunkScan(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), None, s0.data_ptr(),
        y.data_ptr(), final.data_ptr(), 1, 100, 2, 32, 1, 64, CODES[torch.bfloat16], CODES[torch.float32],
        CODES[state_dtype], (ws.data_ptr() + 255) // 256 * 256, size, None,
    )  # fmt: skip
    assert status == 0
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, torch.zeros_like(D), s0)  # D = NULL -> no skip
    check("y", y, y_ref, REL_L2[torch.bfloat16])
    check("final_state", final, s_ref, REL_L2[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["x_fp32", "x_fp16", "x_bf16"])
@pytest.mark.parametrize(
    "state_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["s_fp32", "s_fp16", "s_bf16"]
)
@pytest.mark.parametrize("d_state", [16, 64, 128])
@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_state_update_emulated_matches_ref(emu, dtype, state_dtype, d_state, in_place) -> None:
    batch, heads, head_dim, groups = 3, 4, 80, 2
    x, dt, A, B, C, D, s0 = inputs(batch, 1, heads, head_dim, groups, d_state, dtype, state_dtype, seed=d_state)
    x, dt, B, C = x[:, 0].contiguous(), dt[:, 0].contiguous(), B[:, 0].contiguous(), C[:, 0].contiguous()
    y_ref, s_ref = mamba2_state_update_ref(x, dt, A, B, C, D, s0)
    state = s0.clone()
    y = torch.full_like(x, float("nan"))
    out = state if in_place else torch.full_like(state, float("nan"))
    status = emu.hybridtrtMamba2StateUpdate(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(), state.data_ptr(),
        y.data_ptr(), out.data_ptr(), batch, heads, head_dim, groups, d_state,
        CODES[dtype], CODES[dtype], CODES[state_dtype], None,
    )  # fmt: skip
    assert status == 0
    gate = max(REL_L2[dtype], REL_L2[state_dtype])
    check("y", y, y_ref, gate)
    check("new_state", out, s_ref, gate)
