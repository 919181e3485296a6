"""The kernels' sources run on the CPU (HYBRIDTRT_CPU_EMULATION) against the PyTorch ``_ref`` ops.

plugins/tests/emulation/cudaEmulation.h runs each CUDA thread as a std::thread with real barriers and
shuffles, and stands a scalar tile (T operands, fp32 accumulation) in for the WMMA tensor-core tile. So
the grid / block decomposition, the shared-memory plans and their aliasing, indexing, masking, the
chunk recurrences and the dtype handling are checked without a GPU; the WMMA intrinsics themselves, the
GPU memory model and performance are not (tests/plugins/test_kernels_gpu.py, benchmarks/gpu/run.py).
Outputs and shared memory start poisoned (NaN bit patterns), so an unwritten element or a read of
uninitialised shared memory that matters fails the test. y is float32 for every activation dtype (C ABI 3); the
expected values come from the ``_ref`` ops run in fp32 math on the same rounded inputs (`expected_chunk_scan`,
`expected_state_update`), gated by `hybridtrt.plugins.tolerances` (tolerances.json).

Every launch is also validated the way the GPU would (grid limits, dynamic shared memory against sm_89's
opt-in limit, the opt-in itself): a configuration the GPU would refuse fails here as a CUDA error. Tests drive that
validator directly: Nemotron-Nano-9B-v2 shapes at batch 512 (launches checked, not run), a grid.y over 65535, too
much shared memory, and the rule that no attribute call runs inside a stream capture.

Real-scale shapes run on virtual memory (`VirtualTensor`, MAP_NORESERVE): the emulator launches the full grid but
runs only the blocks a test selects (a block filter), so 65,536 tokens at Nemotron-H 47B widths, where offsets pass
2^31 elements, cost the memory and time of one head. Faults the tests must catch are planted through emulation
hooks (32-bit offsets, fp16 chunk start states), and each such test shows that its checks fail with the fault.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from pathlib import Path

import pytest
import torch

from hybridtrt.plugins.kernels import STATUS_NAMES, KernelLibrary, chunk_length, scan_workspace_bytes
from hybridtrt.plugins.tolerances import expected_chunk_scan, expected_state_update, kernel_gate

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STATUS = {name: code for code, name in STATUS_NAMES.items()}
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
    lib.hybridtrtEmulationAddBlockFilter.argtypes = [ctypes.c_int64] * 6
    lib.hybridtrtEmulationPlant.argtypes = [ctypes.c_int32, ctypes.c_int32]
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


def run_scan(
    emu, x, dt, A, B, C, D, s0, *, chunk_size, state_dtype=torch.float32, final=None, poison=True, ws=None
):
    """hybridtrtMamba2ChunkScan on CPU tensors; ``s0=None`` = zero state; returns (status, y fp32, final_state).

    ``ws``: a uint8 tensor of at least the workspace size + 256 bytes (the scan uses it from its first 256-byte
    aligned address), to read the chunk start states back; allocated (and poisoned) when None."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    y = torch.full(x.shape, float("nan"), dtype=torch.float32)
    if final is None:
        final = torch.full((batch, heads, head_dim, d_state), float("nan"), dtype=state_dtype)
    size = scan_workspace_bytes(batch, length, heads, head_dim, d_state, chunk_size, NAMES[x.dtype])
    if ws is None:
        ws = torch.full((size + 256,), 0xFF if poison else 0, dtype=torch.uint8)
    assert ws.numel() >= size + 256
    status = emu.hybridtrtMamba2ChunkScan(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
        D.data_ptr() if D is not None else None, s0.data_ptr() if s0 is not None else None,
        y.data_ptr(), final.data_ptr(), batch, length, heads, head_dim, groups, d_state, chunk_size,
        CODES[x.dtype], CODES[dt.dtype], CODES[final.dtype], (ws.data_ptr() + 255) // 256 * 256, size, None,
    )  # fmt: skip
    return status, y, final


# -- correctness: fp32 / fp16 / bf16 x head_dim 64 / 80 / 128 x L in {1, 127, 128, 129}, and L = 2048 -------------

#: L = 2048 (16 chunks) once per dtype and once per head_dim: the chunk recurrence is the same code for every
#: (dtype, head_dim), which L = 129 (two chunks) already runs for all nine; fp32 at 2048 costs 7-15 s each here.
LONG = [(torch.float32, 128, 2048), (torch.float16, 80, 2048), (torch.bfloat16, 64, 2048)]
_DTYPES, _HEAD_DIMS, _LENGTHS = (torch.float32, torch.float16, torch.bfloat16), (64, 80, 128), (1, 127, 128, 129)
#: Every (dtype, head_dim) with two of the four lengths, so that every pair of (dtype, head_dim, length)
#: values runs (a covering array: 18 cases instead of the 36 of the full grid, which the GPU test runs,
#: tests/plugins/test_kernels_gpu.py): the lengths are the chunk boundaries, the same code for each pair.
GRID = [
    (dtype, head_dim, _LENGTHS[(i + j + shift) % 4])
    for i, dtype in enumerate(_DTYPES)
    for j, head_dim in enumerate(_HEAD_DIMS)
    for shift in (0, 2)
]


def _case_id(case) -> str:
    dtype, head_dim, length = case
    return f"{ {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}[dtype]}-{head_dim}-{length}"


def test_the_emulated_grids_cover_every_pair() -> None:
    """The reduced grids still run every pair of values of every two factors (what they stand in for)."""
    import itertools

    def pairs_covered(cases, values) -> bool:
        return all(
            {(c[a], c[b]) for c in cases} == set(itertools.product(values[a], values[b])) for a, b in itertools.combinations(range(len(values)), 2)
        )

    assert pairs_covered(GRID, [_DTYPES, _HEAD_DIMS, _LENGTHS])
    assert pairs_covered(UPDATE_CASES, [_DTYPES, _DTYPES, (16, 64, 128), (False, True)])
    planted = [c for c in GRID if not (c[0] is torch.float32 and c[2] == 1)]  # fp32 never at L = 1
    assert not pairs_covered(planted, [_DTYPES, _HEAD_DIMS, _LENGTHS])


@pytest.mark.parametrize(("dtype", "head_dim", "length"), GRID + LONG, ids=[_case_id(c) for c in GRID + LONG])
def test_chunk_scan_emulated_matches_ref(emu, dtype, head_dim, length) -> None:
    """Nemotron's chunk_size 128 (the kernels' chunk is 128: two sub-tiles), G = 2 groups over 4 heads for
    the short sequences (batch > 1: the in-place and update tests), one head and N = 128 for L = 2048 (32 sub-tiles, 16 chunks) to keep the CPU time."""
    batch, heads, groups, d_state = (1, 4, 2, 64) if length < 2048 else (1, 1, 1, 128)
    x, dt, A, B, C, D, s0 = inputs(batch, length, heads, head_dim, groups, d_state, dtype, torch.float32, seed=length + head_dim)
    status, y, final = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=NANO["chunk_size"])
    assert status == 0, emu.hybridtrtEmulationLastError()
    assert y.dtype == torch.float32
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    check("y", y, y_ref, kernel_gate("scan_y", dtype))
    check("final_state", final, s_ref, kernel_gate("state", dtype))
    assert all(launch["ok"] for launch in launches(emu))


@pytest.mark.parametrize("chunk_size", [8, 64, 100, 128, 256, 1000])
def test_chunk_scan_emulated_honours_any_chunk_size(emu, chunk_size) -> None:
    """Chunks of 64 / 128 / 192 / 256 tokens (chunk_size rounded up to 64, capped at 256) compute the same
    recurrence; L = 300 ends in a partial chunk and a partial sub-tile; no initial state (NULL) and no D."""
    assert chunk_length(chunk_size) == min(-(-chunk_size // 64) * 64, 256) == emu.hybridtrtMamba2ChunkScanChunkLength(chunk_size)
    x, dt, A, B, C, _, s0 = inputs(1, 300, 2, 32, 1, 16, torch.float16, torch.float32, seed=chunk_size)
    status, y, final = run_scan(emu, x, dt, A, B, C, None, None, chunk_size=chunk_size)
    assert status == 0, emu.hybridtrtEmulationLastError()
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, torch.zeros(2), torch.zeros_like(s0))
    check("y", y, y_ref, kernel_gate("scan_y", torch.float16))
    check("final_state", final, s_ref, kernel_gate("state", torch.float16))
    chunks = -(-300 // chunk_length(chunk_size))
    state_kernel, output_kernel = launches(emu)
    assert state_kernel["grid"] == (2, 1, 1)  # (B*H, P tiles): one pass over the sequence per head
    assert output_kernel["grid"] == (2, chunks, 1)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunk_scan_emulated_half_state_fp32_dt(emu, state_dtype) -> None:
    x, dt, A, B, C, D, s0 = inputs(1, 100, 2, 32, 1, 64, torch.bfloat16, state_dtype, seed=7)
    status, y, final = run_scan(emu, x, dt.float(), A, B, C, None, s0, chunk_size=128, state_dtype=state_dtype)
    assert status == 0
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, torch.zeros_like(D), s0)  # D = NULL -> no skip
    check("y", y, y_ref, kernel_gate("scan_y", torch.bfloat16))  # start states are kept in x's dtype
    check("final_state", final, s_ref, kernel_gate("state", torch.bfloat16, state_dtype))


def test_chunk_scan_emulated_in_place_state(emu) -> None:
    """final_state == initial_state (one buffer): each state tile is read by the block that writes it, and
    the outputs read start states from the workspace only."""
    x, dt, A, B, C, D, s0 = inputs(2, 200, 4, 48, 2, 64, torch.float16, torch.float32, seed=3)
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    state = s0.clone()
    status, y, _ = run_scan(emu, x, dt, A, B, C, D, state, chunk_size=128, final=state)
    assert status == 0
    check("y", y, y_ref, kernel_gate("scan_y", torch.float16))
    check("in-place state", state, s_ref, kernel_gate("state", torch.float16))


#: Taguchi's L9 orthogonal array: 9 runs of four 3-level factors in which every pair of levels of every
#: two factors appears once. The factors: x dtype, state dtype, d_state, and copy / in place (levels 0 and
#: 2 are "copy"), so every pair of values runs (the full 54-case grid runs on a GPU: test_kernels_gpu.py).
_L9 = [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1), (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0)]
UPDATE_CASES = [(_DTYPES[a], _DTYPES[b], (16, 64, 128)[c], d == 1) for a, b, c, d in _L9]


def _update_id(case) -> str:
    dtype, state_dtype, d_state, in_place = case
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return f"{'in_place' if in_place else 'copy'}-{d_state}-s_{name[state_dtype]}-x_{name[dtype]}"


@pytest.mark.parametrize(("dtype", "state_dtype", "d_state", "in_place"), UPDATE_CASES, ids=[_update_id(c) for c in UPDATE_CASES])
def test_state_update_emulated_matches_ref(emu, dtype, state_dtype, d_state, in_place) -> None:
    batch, heads, head_dim, groups = 3, 4, 80, 2
    x, dt, A, B, C, D, s0 = inputs(batch, 1, heads, head_dim, groups, d_state, dtype, state_dtype, seed=d_state)
    x, dt, B, C = x[:, 0].contiguous(), dt[:, 0].contiguous(), B[:, 0].contiguous(), C[:, 0].contiguous()
    y_ref, s_ref = expected_state_update(x, dt, A, B, C, D, s0)
    state = s0.clone()
    y = torch.full(x.shape, float("nan"), dtype=torch.float32)
    out = state if in_place else torch.full_like(state, float("nan"))
    status = emu.hybridtrtMamba2StateUpdate(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(), state.data_ptr(),
        y.data_ptr(), out.data_ptr(), batch, heads, head_dim, groups, d_state,
        CODES[dtype], CODES[dtype], CODES[state_dtype], None,
    )  # fmt: skip
    assert status == 0
    # y comes from the fp32 new state before its rounding to the state dtype: fp32 arithmetic for every dtype.
    check("y", y, y_ref, kernel_gate("update_y", dtype, state_dtype))
    check("new_state", out, s_ref, kernel_gate("state", dtype, state_dtype))


def test_y_beyond_the_fp16_range_is_finite(emu) -> None:
    """fp16 activations whose y exceeds 65504 (as on scaled Nemotron-Nano-9B-v2 with random weights: |y| up to
    1.9e5): y in x's dtype would be inf there, y in fp32 is finite and within the fp16 scan gate, while every
    fp16 operand inside the scan (x, B, C, the weighted C.B^T) stays in range. The same for the update kernel.
    Start states past 65504: `test_fp16_start_states_beyond_the_fp16_range`."""
    x, dt, A, B, C, D, s0 = inputs(1, 300, 4, 80, 2, 128, torch.float32, torch.float32, seed=11)
    x, dt, B, C, s0 = (x * 30).half(), dt.half(), (B * 30).half(), (C * 30).half(), s0 * 100
    status, y, final = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=128)
    assert status == 0
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    assert y_ref.abs().max() > 65504 and torch.isinf(y_ref.half()).sum() > 100  # the regime: half y overflows
    check("scan y", y, y_ref, kernel_gate("scan_y", torch.float16))
    check("scan final_state", final, s_ref, kernel_gate("state", torch.float16))

    x1, dt1, B1, C1 = (t[:, 0].contiguous() for t in (x, dt, B, C))
    state = s0 * 10
    y1_ref, st_ref = expected_state_update(x1, dt1, A, B1, C1, D, state)
    y1 = torch.full(x1.shape, float("nan"))
    out = torch.full_like(state, float("nan"))
    status = emu.hybridtrtMamba2StateUpdate(
        x1.data_ptr(), dt1.data_ptr(), A.data_ptr(), B1.data_ptr(), C1.data_ptr(), D.data_ptr(), state.data_ptr(),
        y1.data_ptr(), out.data_ptr(), 1, 4, 80, 2, 128, CODES[torch.float16], CODES[torch.float16], 0, None,
    )  # fmt: skip
    assert status == 0
    assert torch.isinf(y1_ref.half()).any()
    check("update y", y1, y1_ref, kernel_gate("update_y", torch.float16))
    check("update new_state", out, st_ref, kernel_gate("state", torch.float32))


def test_scan_refuses_a_misaligned_y(emu) -> None:
    """y is written in 16-byte vectors: a y pointer off a 16-byte boundary is refused before any launch."""
    x, dt, A, B, C, D, s0 = inputs(1, 64, 2, 32, 1, 16, torch.float16, torch.float32, seed=2)
    y = torch.zeros(x.numel() + 4, dtype=torch.float32)
    final = torch.zeros_like(s0)
    size = scan_workspace_bytes(1, 64, 2, 32, 16, 64, "float16")
    ws = torch.zeros(size + 256, dtype=torch.uint8)
    status = emu.hybridtrtMamba2ChunkScan(
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(), s0.data_ptr(),
        y.data_ptr() + 4, final.data_ptr(), 1, 64, 2, 32, 1, 16, 64, 1, 1, 0, (ws.data_ptr() + 255) // 256 * 256, size,
        None,
    )  # fmt: skip
    assert status == STATUS["MISALIGNED_POINTER"]
    assert emu.hybridtrtEmulationLaunchCount() == 0


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
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    check("y", y, y_ref, kernel_gate("scan_y", torch.bfloat16))
    check("final_state", final, s_ref, kernel_gate("state", torch.bfloat16))
    emu.hybridtrtEmulationSetCapturing(0)


# -- fp16 chunk start states beyond 65504 ----------------------------------------------------------------------


def outlier_inputs(dtype: torch.dtype):
    """Nemotron-Nano-9B-v2 head widths (P = 80, N = 128, chunk 128) on 300 tokens, four heads in two groups, with
    the regime that makes the fp32 recurrence pass fp16's range: a persistent outlier channel in x (+400 on four
    channels of every token, as the massive activations of LLM layers are) against a same-sign component of B (+8
    on eight of its N entries), and slow decay (A dt of about -2e-3, Mamba-2's long-memory heads). |state| reaches
    5.8e4 at token 128, 1.0e5 at the start of chunk 2 and |y| 3.6e5; every input is an ordinary fp16 value."""
    g = torch.Generator().manual_seed(5)
    length, heads, head_dim, groups, d_state = 300, 4, 80, 2, 128
    x = torch.randn(1, length, heads, head_dim, generator=g) * 2
    x[..., :4] += 400
    dt = torch.rand(1, length, heads, generator=g) * 0.2 + 0.05
    A = -torch.rand(heads, generator=g) * 0.02 - 0.005
    B = torch.randn(1, length, groups, d_state, generator=g) * 0.5
    B[..., :8] += 8
    C = torch.randn(1, length, groups, d_state, generator=g) * 0.5
    D = torch.randn(heads, generator=g)
    s0 = torch.zeros(1, heads, head_dim, d_state)
    return x.to(dtype), dt.to(dtype), A, B.to(dtype), C.to(dtype), D, s0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp16_start_states_beyond_the_fp16_range(emu, dtype) -> None:
    """The chunk start states of a fp16 scan are kept in fp32 (the workspace) and scaled into fp16 range by a power
    of two for the output GEMM: where the start state of chunk 2 passes 65504, y and the final state stay within the
    fp16 gates. The test of the test: with the fp16 storage planted back (the start states rounded to fp16 before
    they are stored, as up to C ABI 3), y holds infs and the same check fails. bf16 keeps bf16 start states (bf16
    has fp32's exponent range): the same inputs give a finite y within the bf16 gate."""
    x, dt, A, B, C, D, s0 = outlier_inputs(dtype)
    heads, head_dim, d_state = 4, 80, 128
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    _, start2_ref = expected_chunk_scan(x[:, :256], dt[:, :256], A, B[:, :256], C[:, :256], D, s0)
    assert start2_ref.abs().max() > 65504 and torch.isinf(start2_ref.half()).sum() >= 100  # the regime
    assert torch.isfinite(y_ref).all()

    size = scan_workspace_bytes(1, 300, heads, head_dim, d_state, 128, NAMES[dtype])
    ws = torch.full((size + 256,), 0xFF, dtype=torch.uint8)
    status, y, final = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=128, ws=ws)
    assert status == 0, emu.hybridtrtEmulationLastError()
    check("y", y, y_ref, kernel_gate("scan_y", dtype))
    check("final_state", final, s_ref, kernel_gate("state", dtype))
    if dtype == torch.bfloat16:
        return

    # The workspace holds [B*H, chunks, P, N] fp32 start states; chunk 2's is the state after 256 tokens.
    offset = (-ws.data_ptr()) % 256
    starts = ws[offset : offset + size].view(torch.float32)[: heads * 3 * head_dim * d_state]
    start2 = starts.view(heads, 3, head_dim, d_state)[:, 2]
    check("start state of chunk 2 (fp32)", start2, start2_ref[0], kernel_gate("state", dtype))

    emu.hybridtrtEmulationPlant(0, 1)  # the old storage: start states rounded to fp16
    status, y_planted, _ = run_scan(emu, x, dt, A, B, C, D, s0, chunk_size=128)
    assert status == 0
    with pytest.raises(AssertionError, match="non-finite"):
        check("y with fp16 start states", y_planted, y_ref, kernel_gate("scan_y", dtype))


# -- 64-bit offsets: long context and large batch at Nemotron-H 47B widths ------------------------------------

#: Nemotron-H 47B / 56B's Mamba-2 mixer (hybridtrt/models/architectures.py, from the public HF configs
#: nvidia/Nemotron-H-47B-Base-8K and -56B-Base-8K): mamba_num_heads 256, mamba_head_dim 64, n_groups 8, chunk_size
#: 128. Their ssm_state_size is 256, which the kernels refuse (d_state 16 / 64 / 128: UNSUPPORTED_D_STATE); the
#: offsets are checked with the largest d_state they take.
NEMOTRON_H_47B = {"heads": 256, "head_dim": 64, "groups": 8, "d_state": 128, "chunk_size": 128}

_MAP_NORESERVE = 0x4000  # <sys/mman.h> on Linux; Python's mmap module does not name it


class VirtualTensor:
    """A dense tensor of a real-scale shape on lazily backed memory (MAP_NORESERVE): only the pages written (by the
    test or the kernels) take memory, untouched elements read 0. The 2^31 elements before it are mapped as well, so
    that an offset wrapped to a negative 32-bit value lands there instead of crashing the test.

    Attributes:
        ptr: Address of element 0 (page-aligned).
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.guard = (1 << 31) * self.itemsize
        size = self.guard + math.prod(shape) * self.itemsize
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(self._map)) + self.guard

    def span(self, *index: int) -> torch.Tensor:
        """The sub-tensor ``t[index]`` (leading indices), sharing memory."""
        inner = self.shape[len(index) :]
        flat = sum(i * math.prod(self.shape[d + 1 :]) for d, i in enumerate(index))
        count = math.prod(inner)
        offset = self.guard + flat * self.itemsize
        return torch.frombuffer(self._map, dtype=self.dtype, count=count, offset=offset).view(inner)


def head_reference(x, dt, A, B, C, D, s0, chunk):
    """One head's chunk start states and final state in fp64 (the chunk recurrence written out), and the fp32
    `_ref` y of its last two chunks from its start state.

    Shapes: ``x [L, P]``, ``dt [L]``, ``A, D`` scalars, ``B, C [L, N]``, ``s0 [P, N]`` -> ``starts [L/chunk, P, N]``
    fp64, ``final [P, N]`` fp64, ``y [2 chunk, P]`` fp32."""
    length, head_dim = x.shape
    chunks = length // chunk
    xd, dtd, Bd = x.double(), dt.double(), B.double()
    a = (dtd * float(A)).view(chunks, chunk).cumsum(-1)
    weight = dtd.view(chunks, chunk) * torch.exp(a[:, -1:] - a)  # decay of each token to its chunk's end
    inputs = torch.einsum("cl,clp,cln->cpn", weight, xd.view(chunks, chunk, head_dim), Bd.view(chunks, chunk, -1))
    decay = torch.exp(a[:, -1])
    starts, state = [], s0.double()
    for c in range(chunks):
        starts.append(state)
        state = decay[c] * state + inputs[c]
    tail = slice(length - 2 * chunk, length)
    y, _ = expected_chunk_scan(
        x[None, tail, None], dt[None, tail, None], A.view(1), B[None, tail, None], C[None, tail, None], D.view(1),
        starts[-2].float()[None, None],
    )  # fmt: skip
    return torch.stack(starts), state, y[0, :, 0]


def test_long_context_offsets_are_64_bit(emu) -> None:
    """16,384 tokens (128 chunks of 128) at Nemotron-H 47B widths, batch 16, fp16 — the offsets of 65,536 tokens at
    batch 4 (the same [B*L, H, P] and [B*H, chunks, P, N] extents, at a quarter of the emulated walk): the last
    head's offsets into x / y (15 * 2^28 + ...) and into the start states (4095 * 2^20 + ...) pass 2^31 elements,
    where a 32-bit product wraps. x, y and the 16 GiB workspace are virtual; the emulator validates the full grids and runs
    the blocks of the last (batch, head) only: the state kernel over the whole sequence, the output kernel on the
    last two chunks. Every start state, the final state and y of the last two chunks must land where the reference
    puts them, and nothing else in their rows of y or in other heads' states may change.

    The test of the test: with 32-bit offsets planted, the output kernel is run again on the same two chunks (the
    state kernel's 65,536-token walk is skipped to save time; `test_large_batch_offsets_are_64_bit` plants the
    fault in all three kernels): its y goes to the wrapped offsets and the same y check fails."""
    n = NEMOTRON_H_47B
    batch, length, heads, head_dim, groups, d_state, chunk = 16, 16384, n["heads"], n["head_dim"], n["groups"], n["d_state"], n["chunk_size"]  # fmt: skip
    b, h, g = batch - 1, heads - 1, groups - 1
    chunks = length // chunk
    row = b * heads + h
    assert row * chunks * head_dim * d_state >= 2**31 and b * length * heads * head_dim >= 2**31
    x = VirtualTensor((batch, length, heads, head_dim), torch.float16)
    dt = VirtualTensor((batch, length, heads), torch.float16)
    Bv = VirtualTensor((batch, length, groups, d_state), torch.float16)
    Cv = VirtualTensor((batch, length, groups, d_state), torch.float16)
    y = VirtualTensor((batch, length, heads, head_dim), torch.float32)
    size = scan_workspace_bytes(batch, length, heads, head_dim, d_state, chunk, "float16")
    ws = VirtualTensor((batch * heads, chunks, head_dim, d_state), torch.float32)  # fp32 start states of fp16
    assert size == math.prod(ws.shape) * 4 == 2**34  # 16 GiB

    gen = torch.Generator().manual_seed(47)
    xs = torch.randn(length, head_dim, generator=gen).half()
    dts = (torch.rand(length, generator=gen) * 0.2 + 0.01).half()
    Bs = (torch.randn(length, d_state, generator=gen) * 0.5).half()
    Cs = (torch.randn(length, d_state, generator=gen) * 0.5).half()
    A = -torch.rand(heads, generator=gen) * 4 - 0.5
    D = torch.randn(heads, generator=gen)
    s0 = torch.zeros(batch, heads, head_dim, d_state)
    s0[b, h] = torch.randn(head_dim, d_state, generator=gen)
    final = torch.full_like(s0, float("nan"))
    x.span(b)[:, h] = xs
    dt.span(b)[:, h] = dts
    Bv.span(b)[:, g] = Bs
    Cv.span(b)[:, g] = Cs
    y_tail = y.span(b)[length - 2 * chunk :]  # [2 chunks, H, P]: only head h may change, from NaN
    y_tail[:, h] = float("nan")

    def scan() -> int:
        return emu.hybridtrtMamba2ChunkScan(
            x.ptr, dt.ptr, A.data_ptr(), Bv.ptr, Cv.ptr, D.data_ptr(), s0.data_ptr(), y.ptr, final.data_ptr(),
            batch, length, heads, head_dim, groups, d_state, chunk, CODES[torch.float16], CODES[torch.float16], 0,
            ws.ptr, size, None,
        )  # fmt: skip

    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, 0, 1, 0, 1)  # state kernel: (B*H, P tiles = 1)
    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, chunks - 2, chunks, 0, 1)  # output kernel: (B*H, chunks, 1)
    assert scan() == 0, emu.hybridtrtEmulationLastError()
    state_kernel, output_kernel = launches(emu)
    assert state_kernel["ok"] and output_kernel["ok"] and output_kernel["grid"] == (batch * heads, chunks, 1)

    starts_ref, final_ref, y_ref = head_reference(xs, dts, A[h], Bs, Cs, D[h], s0[b, h], chunk)
    gate_y, gate_state = kernel_gate("scan_y", torch.float16), kernel_gate("state", torch.float16)
    check("start states", ws.span(row), starts_ref, gate_state)
    check("final_state", final[b, h], final_ref, gate_state)
    check("y of the last two chunks", y_tail[:, h], y_ref, gate_y)
    assert not torch.cat([y_tail[:, :h], y_tail[:, h + 1 :]], dim=1).any(), "y of another head was written"
    assert torch.isnan(final[:b]).all() and torch.isnan(final[b, :h]).all(), "another head's final state was written"

    y_tail[:, h] = float("nan")
    emu.hybridtrtEmulationReset(89, 0)
    emu.hybridtrtEmulationAddBlockFilter(0, 0, 0, 0, 0, 0)  # no state kernel block
    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, chunks - 2, chunks, 0, 1)
    emu.hybridtrtEmulationPlant(1, 0)
    assert scan() == 0
    with pytest.raises(AssertionError, match="non-finite"):
        check("y of the last two chunks, 32-bit offsets planted", y_tail[:, h], y_ref, gate_y)


@pytest.mark.parametrize("plant", [False, True], ids=["int64", "planted_int32"])
def test_large_batch_offsets_are_64_bit(emu, plant) -> None:
    """Batch 2048 at Nemotron-H 47B widths, one chunk of 128 tokens: x / y, the start states and the
    [B, H, P, N] state (2^32 elements) pass 2^31 elements at the last (batch, head) — for the scan and for the
    one-token update on the scan's final state (in place). Tensors are virtual; the blocks of the last
    (batch, head) run. The test of the test: with 32-bit offsets planted, the same checks fail."""
    n = NEMOTRON_H_47B
    batch, length, heads, head_dim, groups, d_state, chunk = 2048, 128, n["heads"], n["head_dim"], n["groups"], n["d_state"], n["chunk_size"]  # fmt: skip
    b, h, g = batch - 1, heads - 1, groups - 1
    row = b * heads + h
    assert row * head_dim * d_state >= 2**31
    x = VirtualTensor((batch, length, heads, head_dim), torch.bfloat16)
    dt = VirtualTensor((batch, length, heads), torch.float32)
    Bv = VirtualTensor((batch, length, groups, d_state), torch.bfloat16)
    Cv = VirtualTensor((batch, length, groups, d_state), torch.bfloat16)
    y = VirtualTensor((batch, length, heads, head_dim), torch.float32)
    state = VirtualTensor((batch, heads, head_dim, d_state), torch.float32)  # initial -> final -> new, in place
    size = scan_workspace_bytes(batch, length, heads, head_dim, d_state, chunk, "bfloat16")
    ws = VirtualTensor((batch * heads, 1, head_dim, d_state), torch.bfloat16)
    assert size == math.prod(ws.shape) * 2

    gen = torch.Generator().manual_seed(2048)
    xs, dts, Bs, Cs, s0 = (
        torch.randn(length, head_dim, generator=gen).bfloat16(),
        torch.rand(length, generator=gen) * 0.2 + 0.01,
        (torch.randn(length, d_state, generator=gen) * 0.5).bfloat16(),
        (torch.randn(length, d_state, generator=gen) * 0.5).bfloat16(),
        torch.randn(head_dim, d_state, generator=gen),
    )
    A = -torch.rand(heads, generator=gen) * 4 - 0.5
    D = torch.randn(heads, generator=gen)
    x.span(b)[:, h] = xs
    dt.span(b)[:, h] = dts
    Bv.span(b)[:, g] = Bs
    Cv.span(b)[:, g] = Cs
    state.span(b, h)[:] = s0
    y.span(b)[:, h] = float("nan")

    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, 0, 1, 0, 1)  # state kernel
    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, 0, 1, 0, 1)  # output kernel
    emu.hybridtrtEmulationAddBlockFilter(row, row + 1, 0, 1 << 20, 0, 1)  # update kernel: (B*H, P row tiles)
    emu.hybridtrtEmulationPlant(int(plant), 0)
    code = CODES[torch.bfloat16]
    status = emu.hybridtrtMamba2ChunkScan(
        x.ptr, dt.ptr, A.data_ptr(), Bv.ptr, Cv.ptr, D.data_ptr(), state.ptr, y.ptr, state.ptr,
        batch, length, heads, head_dim, groups, d_state, chunk, code, 0, 0, ws.ptr, size, None,
    )  # fmt: skip
    assert status == 0, emu.hybridtrtEmulationLastError()
    scan_state = state.span(b, h).clone()

    # The update's own [B, H, P] / [B, G, N] inputs (token 0's values in the last row) and y.
    x1 = VirtualTensor((batch, heads, head_dim), torch.bfloat16)
    dt1 = VirtualTensor((batch, heads), torch.float32)
    B1 = VirtualTensor((batch, groups, d_state), torch.bfloat16)
    C1 = VirtualTensor((batch, groups, d_state), torch.bfloat16)
    y1 = VirtualTensor((batch, heads, head_dim), torch.float32)
    x1.span(b, h)[:] = xs[0]
    dt1.span(b)[h] = dts[0]
    B1.span(b, g)[:] = Bs[0]
    C1.span(b, g)[:] = Cs[0]
    y1.span(b, h)[:] = float("nan")
    status = emu.hybridtrtMamba2StateUpdate(
        x1.ptr, dt1.ptr, A.data_ptr(), B1.ptr, C1.ptr, D.data_ptr(), state.ptr, y1.ptr, state.ptr,
        batch, heads, head_dim, groups, d_state, code, 0, 0, None,
    )  # fmt: skip
    assert status == 0, emu.hybridtrtEmulationLastError()
    assert all(launch["ok"] for launch in launches(emu))

    y_ref, s_ref = expected_chunk_scan(
        xs[None, :, None], dts[None, :, None], A[h].view(1), Bs[None, :, None], Cs[None, :, None], D[h].view(1),
        s0[None, None],
    )  # fmt: skip
    y1_ref, s1_ref = expected_state_update(
        xs[None, None, 0], dts[None, None, 0], A[h].view(1), Bs[None, None, 0], Cs[None, None, 0], D[h].view(1),
        scan_state[None, None],
    )  # fmt: skip

    bf16 = torch.bfloat16
    checks = [
        lambda: check("scan y", y.span(b)[:, h], y_ref[0, :, 0], kernel_gate("scan_y", bf16)),
        lambda: check("scan final_state", scan_state, s_ref[0, 0], kernel_gate("state", bf16)),
        lambda: check("update y", y1.span(b, h), y1_ref[0, 0], kernel_gate("update_y", bf16)),
        lambda: check("update new_state", state.span(b, h), s1_ref[0, 0], kernel_gate("state", bf16)),
    ]
    for verify in checks:
        if not plant:
            verify()
        else:  # every output of every kernel is caught
            with pytest.raises(AssertionError):
                verify()
    assert not y.span(b)[:, :h].any() and not state.span(b, h - 1).any(), "another head's output was written"


def test_workspace_sizes_are_64_bit_and_refused_past_size_t(emulated_kernels) -> None:
    """The workspace formula is a size_t product: 16 GiB at the long-context test's shapes (no 32-bit wrap), the
    Python mirror's exact integer everywhere, and a shape whose size would not fit 64 bits (B*H = 2^31 - 1 rows,
    65,535 chunks, P = 4096) is refused as INVALID_SHAPE instead of wrapping to a small size."""
    lib = KernelLibrary(emulated_kernels)
    n = NEMOTRON_H_47B
    heads, head_dim, groups, d_state, chunk = n["heads"], n["head_dim"], n["groups"], n["d_state"], n["chunk_size"]
    for batch, length, act in ((4, 65536, "float16"), (512, 65536, "bfloat16"), (1, 2048, "float32")):
        status, size = lib.chunk_scan_workspace_status(batch, length, heads, head_dim, groups, d_state, chunk, act)
        assert status == 0 and size == scan_workspace_bytes(batch, length, heads, head_dim, d_state, chunk, act)
    assert lib.chunk_scan_workspace_status(4, 65536, 256, 64, 8, 128, 128, "float16")[1] == 2**34
    status, size = lib.chunk_scan_workspace_status(32767, 65535 * 256, 65535, 4096, 1, 128, 256, "float32")
    assert (STATUS_NAMES[status], size) == ("INVALID_SHAPE", 0)
