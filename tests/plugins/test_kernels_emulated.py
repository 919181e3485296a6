"""The kernels' sources run on the CPU (HYBRIDTRT_CPU_EMULATION) against the PyTorch ``_ref`` ops.

plugins/tests/emulation/cudaEmulation.h runs each CUDA thread as a std::thread with real barriers and
shuffles, and stands a scalar tile (T operands, fp32 accumulation) in for the WMMA tensor-core tile. So
the grid / block decomposition, the shared-memory plans and their aliasing, indexing, masking, the
chunk recurrences and the dtype handling are checked without a GPU; the WMMA intrinsics themselves, the
GPU memory model and performance are not (tests/plugins/test_kernels_gpu.py, benchmarks/gpu/run.py).
Outputs and shared memory start poisoned (NaN bit patterns), so an unwritten element or a read of
uninitialised shared memory that matters fails the test.

Every launch is also validated the way the GPU would (grid limits, dynamic shared memory against sm_89's
opt-in limit, the opt-in itself): a configuration the GPU would refuse fails here as a CUDA error. The last
tests drive that validator directly: Nemotron-Nano-9B-v2 shapes at batch 512 (launches checked, not run),
a grid.y over 65535, too much shared memory, and the rule that no attribute call runs inside a stream capture.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from hybridtrt.ops import mamba2_chunk_scan_ref, mamba2_state_update_ref
from hybridtrt.plugins.kernels import STATUS_NAMES, KernelLibrary, chunk_length, scan_workspace_bytes

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STATUS = {name: code for code, name in STATUS_NAMES.items()}
#: rel L2 gates against the fp32 reference, by the least precise dtype involved.
REL_L2 = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
#: Nemotron-Nano-9B-v2's Mamba-2 mixer.
NANO = {"heads": 128, "head_dim": 80, "groups": 8, "d_state": 128, "chunk_size": 128}


@pytest.fixture(scope="module")
def emu(emulated_kernels: Path) -> ctypes.CDLL:
    lib = KernelLibrary(emulated_kernels)._lib  # ctypes signatures of the C ABI set by KernelLibrary
    lib.hybridtrtEmulationReset.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.hybridtrtEmulationSetCapturing.argtypes = [ctypes.c_int32]
    lib.hybridtrtEmulationSetDevice.argtypes = [ctypes.c_int32]
    lib.hybridtrtEmulationLaunchCount.restype = ctypes.c_int64
    lib.hybridtrtEmulationLaunch.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.hybridtrtEmulationViolations.restype = ctypes.c_int64
    lib.hybridtrtEmulationLastError.restype = ctypes.c_char_p
    lib.hybridtrtEmulationCheckLaunch.restype = ctypes.c_char_p
    lib.hybridtrtEmulationCheckLaunch.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_size_t]
    return lib


@pytest.fixture(autouse=True)
def _fresh_emulation(request) -> None:
    """Every test starts on device 0 of an sm_89, running its launches, with no opt-in or error recorded."""
    if "emu" in request.fixturenames:
        emu = request.getfixturevalue("emu")
        emu.hybridtrtEmulationReset(89, 0)


def launches(emu) -> list[dict]:
    out = []
    for i in range(emu.hybridtrtEmulationLaunchCount()):
        v = (ctypes.c_int64 * 8)()
        assert emu.hybridtrtEmulationLaunch(i, v) == 0
        out.append({"grid": tuple(v[0:3]), "block": tuple(v[3:6]), "smem": v[6], "ok": bool(v[7])})
    return out


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


def run_scan(emu, x, dt, A, B, C, D, s0, *, chunk_size, state_dtype=torch.float32, final=None, poison=True):
    """hybridtrtMamba2ChunkScan on CPU tensors; ``s0=None`` = zero state; returns (status, y, final_state)."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    y = torch.full_like(x, float("nan"))
    if final is None:
        final = torch.full((batch, heads, head_dim, d_state), float("nan"), dtype=state_dtype)
    size = scan_workspace_bytes(batch, length, heads, head_dim, d_state, chunk_size, NAMES[x.dtype])
    ws = torch.full((size + 256,), 0xFF if poison else 0, dtype=torch.uint8)
    status = emu.hybridtrtMamba2ChunkScan(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
        D.data_ptr() if D is not None else None, s0.data_ptr() if s0 is not None else None,
        y.data_ptr(), final.data_ptr(), batch, length, heads, head_dim, groups, d_state, chunk_size,
        CODES[x.dtype], CODES[dt.dtype], CODES[final.dtype], (ws.data_ptr() + 255) // 256 * 256, size, None,
    )  # fmt: skip
    return status, y, final


# -- correctness: fp32 / fp16 / bf16 x head_dim 64 / 80 / 128 x L in {1, 127, 128, 129, 2048} ------------------


@pytest.mark.parametrize("length", [1, 127, 128, 129, 2048])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_chunk_scan_emulated_matches_ref(emu, dtype, head_dim, length) -> None:
    """Nemotron's chunk_size 128 (the kernels' chunk is 128: two sub-tiles), G = 2 groups over 4 heads for
    the short sequences (batch > 1: the in-place and update tests), one head and N = 128 for L = 2048 (32 sub-tiles, 16 chunks) to keep the CPU time."""
    batch, heads, groups, d_state = (1, 4, 2, 64) if length < 2048 else (1, 1, 1, 128)
    x, dt, A, B, C, D, s0 = inputs(batch, length, heads, head_dim, groups, d_state, dtype, torch.float32, seed=length + head_dim)
    status, y, final = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=NANO["chunk_size"])
    assert status == 0, emu.hybridtrtEmulationLastError()
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    check("y", y, y_ref, REL_L2[dtype])
    check("final_state", final, s_ref, REL_L2[dtype])
    assert all(launch["ok"] for launch in launches(emu))


@pytest.mark.parametrize("chunk_size", [8, 64, 100, 128, 256, 1000])
def test_chunk_scan_emulated_honours_any_chunk_size(emu, chunk_size) -> None:
    """Chunks of 64 / 128 / 192 / 256 tokens (chunk_size rounded up to 64, capped at 256) compute the same
    recurrence; L = 300 ends in a partial chunk and a partial sub-tile; no initial state (NULL) and no D."""
    assert chunk_length(chunk_size) == min(-(-chunk_size // 64) * 64, 256) == emu.hybridtrtMamba2ChunkScanChunkLength(chunk_size)
    x, dt, A, B, C, _, s0 = inputs(1, 300, 2, 32, 1, 16, torch.float16, torch.float32, seed=chunk_size)
    status, y, final = run_scan(emu, x, dt, A, B, C, None, None, chunk_size=chunk_size)
    assert status == 0, emu.hybridtrtEmulationLastError()
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, torch.zeros(2), torch.zeros_like(s0))
    check("y", y, y_ref, REL_L2[torch.float16])
    check("final_state", final, s_ref, REL_L2[torch.float16])
    chunks = -(-300 // chunk_length(chunk_size))
    state_kernel, output_kernel = launches(emu)
    assert state_kernel["grid"] == (2, 1, 1)  # (B*H, P tiles): one pass over the sequence per head
    assert output_kernel["grid"] == (2, chunks, 1)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunk_scan_emulated_half_state_fp32_dt(emu, state_dtype) -> None:
    x, dt, A, B, C, D, s0 = inputs(1, 100, 2, 32, 1, 64, torch.bfloat16, state_dtype, seed=7)
    status, y, final = run_scan(emu, x, dt.float(), A, B, C, None, s0, chunk_size=128, state_dtype=state_dtype)
    assert status == 0
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt.float(), A, B, C, torch.zeros_like(D), s0)  # D = NULL -> no skip
    check("y", y, y_ref, REL_L2[torch.bfloat16])
    check("final_state", final, s_ref, REL_L2[torch.bfloat16])


def test_chunk_scan_emulated_in_place_state(emu) -> None:
    """final_state == initial_state (one buffer): each state tile is read by the block that writes it, and
    the outputs read start states from the workspace only."""
    x, dt, A, B, C, D, s0 = inputs(2, 200, 4, 48, 2, 64, torch.float16, torch.float32, seed=3)
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    state = s0.clone()
    status, y, _ = run_scan(emu, x, dt, A, B, C, D, state, chunk_size=128, final=state)
    assert status == 0
    check("y", y, y_ref, REL_L2[torch.float16])
    check("in-place state", state, s_ref, REL_L2[torch.float16])


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


# -- launch configurations --------------------------------------------------------------------------------------

FAKE = 1 << 20  # an aligned address that validate-only launches never dereference


@pytest.mark.parametrize("act", ["float32", "float16", "bfloat16"])
def test_nano_launch_configs_at_batch_512_are_valid(emu, act) -> None:
    """Batch 512 x 128 heads = 65536 (batch, head) rows: the old state-passing kernel put them in grid.y
    (limit 65535). Every kernel keeps batch x heads in grid.x now; validated, not run."""
    emu.hybridtrtEmulationReset(89, 1)
    n = NANO
    code = {"float32": 0, "float16": 1, "bfloat16": 2}[act]
    size = scan_workspace_bytes(512, 2048, n["heads"], n["head_dim"], n["d_state"], n["chunk_size"], act)
    status = emu.hybridtrtMamba2ChunkScan(
        *([FAKE] * 9), 512, 2048, n["heads"], n["head_dim"], n["groups"], n["d_state"], n["chunk_size"],
        code, code, 0, FAKE, size, None,
    )  # fmt: skip
    assert status == 0, emu.hybridtrtEmulationLastError()
    status = emu.hybridtrtMamba2StateUpdate(
        *([FAKE] * 9), 512, n["heads"], n["head_dim"], n["groups"], n["d_state"], code, code, 0, None
    )
    assert status == 0, emu.hybridtrtEmulationLastError()
    state_kernel, output_kernel, update_kernel = launches(emu)
    assert state_kernel["grid"][0] == output_kernel["grid"][0] == update_kernel["grid"][0] == 512 * 128
    assert output_kernel["grid"][1] == 2048 // 128
    for launch in (state_kernel, output_kernel):
        assert launch["ok"] and launch["smem"] <= 99 * 1024 and launch["block"] == (128, 1, 1)
    assert emu.hybridtrtEmulationViolations() == 0


def test_validator_refuses_what_the_gpu_refuses(emu) -> None:
    check_launch = emu.hybridtrtEmulationCheckLaunch
    assert check_launch(65536, 1, 1, 128, 1, 1, 0) == b""
    assert b"65535" in check_launch(2, 512 * 128, 1, 256, 1, 1, 0)  # the old statePassingKernel at batch 512
    assert b"1024" in check_launch(1, 1, 1, 2048, 1, 1, 0)
    assert b"no cudaFuncSetAttribute opt-in" in check_launch(1, 1, 1, 128, 1, 1, 64 * 1024)
    assert check_launch(1, 1, 1, 128, 1, 1, 48 * 1024) == b""


def test_scan_over_the_architecture_shared_memory_limit_fails(emu) -> None:
    """On sm_75 (64 KiB opt-in at most) the output kernel's 88 KiB plan is refused by the opt-in itself, as
    cudaFuncSetAttribute would: the C ABI returns CUDA_ERROR and launches nothing."""
    emu.hybridtrtEmulationReset(75, 0)
    x, dt, A, B, C, D, s0 = inputs(1, 64, 2, 64, 1, 128, torch.float16, torch.float32, seed=0)
    status, y, _ = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=128)
    assert status == STATUS["CUDA_ERROR"]
    assert emu.hybridtrtEmulationLaunchCount() == 0 and torch.isnan(y).all()


def test_no_attribute_call_inside_a_stream_capture(emu) -> None:
    """Captured scans make no cudaFuncSetAttribute call: before Prepare on that device they are refused
    (NOT_PREPARED), after it they run. The opt-in is per device: device 0's does not count on device 7."""
    x, dt, A, B, C, D, s0 = inputs(1, 70, 2, 32, 1, 64, torch.bfloat16, torch.float32, seed=1)
    assert run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=64)[0] == 0  # uncaptured on device 0: opts in itself
    emu.hybridtrtEmulationSetDevice(7)
    emu.hybridtrtEmulationSetCapturing(1)
    assert run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=64)[0] == STATUS["NOT_PREPARED"]
    emu.hybridtrtEmulationSetCapturing(0)
    assert emu.hybridtrtMamba2ChunkScanPrepare(2, 64) == 0  # bf16, d_state 64, on device 7
    emu.hybridtrtEmulationSetCapturing(1)
    status, y, final = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=64)
    assert status == 0
    assert emu.hybridtrtEmulationViolations() == 0  # no attribute call was made while capturing
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    check("y", y, y_ref, REL_L2[torch.bfloat16])
    check("final_state", final, s_ref, REL_L2[torch.bfloat16])
    emu.hybridtrtEmulationSetCapturing(0)
