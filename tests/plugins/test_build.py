"""Build plugins/ with nvcc for sm_89 + sm_90, check the ptxas report, load the library with ctypes."""

from __future__ import annotations

import pytest

from hybridtrt.plugins.build import BuildResult
from hybridtrt.plugins.kernels import (
    ABI_VERSION,
    STATUS_NAMES,
    KernelLibrary,
    KernelStatusError,
    chunk_length,
    scan_workspace_bytes,
)
from hybridtrt.plugins.ptxas import HOT_KERNELS, format_table, hot_kernels, parse_ptxas

STATUS = {name: code for code, name in STATUS_NAMES.items()}


@pytest.fixture(scope="module")
def lib(plugin_build: BuildResult) -> KernelLibrary:
    return KernelLibrary(plugin_build.kernels_library)


def test_build_produces_kernels_library(plugin_build: BuildResult) -> None:
    assert plugin_build.kernels_library.is_file()
    assert plugin_build.cuda_archs == "89;90"
    print(f"\nkernels library built in {plugin_build.seconds:.1f} s ({plugin_build.cuda_archs})")


def test_ptxas_hot_kernels_do_not_spill(plugin_build: BuildResult, lib: KernelLibrary) -> None:
    report = hot_kernels(parse_ptxas(plugin_build.ptxas_log.read_text()))
    print("\n" + format_table(report))
    for dtype in ("float32", "float16", "bfloat16"):
        for n in (64, 128):
            state_smem, output_smem = lib.shared_memory(dtype, n)
            print(f"dynamic smem {dtype:>8} N={n:<3}: chunkStateKernel {state_smem} B, "
                  f"chunkOutputKernel {output_smem} B")
            assert output_smem <= 99 * 1024  # fits the sm_89 opt-in limit (sm_90 allows 227 KiB)
    for kernel in HOT_KERNELS:
        for arch in ("sm_89", "sm_90"):
            assert any(r.kernel == kernel and r.arch == arch for r in report), f"{kernel} not compiled for {arch}"
    spilling = [f"{r.name} {r.arch}: {r.spill_stores}/{r.spill_loads} B" for r in report if r.spills]
    assert not spilling, "local-memory spills in hot kernels: " + "; ".join(spilling)
    assert all(r.stack_bytes == 0 for r in report), "hot kernels use a stack frame"
    assert all(r.registers <= 128 for r in report)


def test_library_loads_with_ctypes(lib: KernelLibrary) -> None:
    assert lib.abi_version() == ABI_VERSION == 4  # 3: y is float32; 4: fp16 start states fp32
    assert [lib.chunk_length(c) for c in (0, 1, 64, 65, 128, 256, 4096)] == [0, 64, 64, 128, 128, 256, 256]
    assert all(lib.chunk_length(c) == chunk_length(c) for c in range(-1, 600))
    assert lib.status_string(0) == "success"
    assert "d_state" in lib.status_string(STATUS["UNSUPPORTED_D_STATE"])


@pytest.mark.parametrize(
    ("batch", "seq_len", "heads", "head_dim", "groups", "d_state"),
    [
        (1, 1, 4, 64, 1, 16),
        (2, 127, 8, 64, 2, 64),
        (2, 128, 8, 80, 2, 128),
        (3, 129, 8, 128, 1, 128),
        (1, 16384, 128, 80, 8, 128),  # Nemotron-Nano-9B-v2 prefill
        (32, 2048, 128, 80, 8, 128),
    ],
)
def test_chunk_scan_workspace_size(lib: KernelLibrary, batch, seq_len, heads, head_dim, groups, d_state) -> None:
    for chunk_size in (8, 128, 256):
        for act, state in [("float32", "float32"), ("float16", "float32"), ("bfloat16", "bfloat16")]:
            size = lib.chunk_scan_workspace_size(batch, seq_len, heads, head_dim, groups, d_state, chunk_size, act, act, state)
            assert size == scan_workspace_bytes(batch, seq_len, heads, head_dim, d_state, chunk_size, act)
            assert size > 0 and size % 256 == 0
            chunks = -(-seq_len // chunk_length(chunk_size))
            assert size >= batch * heads * chunks * head_dim * d_state * (4 if act == "float32" else 2)


def test_state_update_needs_no_workspace(lib: KernelLibrary) -> None:
    assert lib.state_update_workspace_status(32, 128, 80, 8, 128, "bfloat16", "float32", "float32") == (0, 0)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        ((1, 16, 4, 72, 1, 64), "UNSUPPORTED_HEAD_DIM"),  # head_dim not a multiple of 16
        ((1, 16, 4, 8, 1, 64), "UNSUPPORTED_HEAD_DIM"),
        ((1, 16, 4, 64, 1, 32), "UNSUPPORTED_D_STATE"),
        ((1, 16, 4, 64, 1, 256), "UNSUPPORTED_D_STATE"),
        ((1, 0, 4, 64, 1, 64), "INVALID_SHAPE"),  # L = 0
        ((0, 16, 4, 64, 1, 64), "INVALID_SHAPE"),
        ((1, 16, 6, 64, 4, 64), "INVALID_SHAPE"),  # H % G != 0
    ],
)
def test_bad_shapes_return_error_codes(lib: KernelLibrary, args, status: str) -> None:
    code, size = lib.chunk_scan_workspace_status(*args, chunk_size=128)
    assert code == STATUS[status] and size == 0
    batch, _, heads, head_dim, groups, d_state = args
    if status != "INVALID_SHAPE":
        assert lib.state_update_workspace_status(batch, heads, head_dim, groups, d_state)[0] == STATUS[status]


def test_bad_dtype_returns_error_code(lib: KernelLibrary) -> None:
    assert lib.chunk_scan_workspace_status(1, 16, 4, 64, 1, 64, act_dtype="int8")[0] == STATUS["UNSUPPORTED_DTYPE"]
    assert lib.chunk_scan_workspace_status(1, 16, 4, 64, 1, 64, chunk_size=0)[0] == STATUS["INVALID_SHAPE"]
    # more than 65535 chunks (grid.y of the output kernel) is refused before any launch
    assert lib.chunk_scan_workspace_status(1, 65536 * 64 + 1, 4, 64, 1, 64, chunk_size=64)[0] == STATUS["INVALID_SHAPE"]
    # batch x heads is grid.x (2^31 - 1): batch 512 at 128 heads is fine, 2^24 at 128 heads is not
    assert lib.chunk_scan_workspace_status(512, 16, 128, 64, 8, 64)[0] == 0
    assert lib.chunk_scan_workspace_status(1 << 24, 16, 128, 64, 8, 64)[0] == STATUS["INVALID_SHAPE"]
    assert lib.state_update_workspace_status(1, 4, 64, 1, 64, state_dtype="fp8")[0] == STATUS["UNSUPPORTED_DTYPE"]


def test_status_errors_raise_typed_error(lib: KernelLibrary) -> None:
    with pytest.raises(KernelStatusError, match="UNSUPPORTED_D_STATE"):
        lib.chunk_scan_workspace_size(1, 16, 4, 64, 1, 48, 128)


def test_launchers_validate_before_touching_the_gpu(lib: KernelLibrary) -> None:
    """Bad shapes and NULL pointers are refused on the host: no CUDA call, so this runs without a GPU."""
    raw = lib._lib
    bad_head_dim = raw.hybridtrtMamba2StateUpdate(*([None] * 9), 1, 4, 72, 1, 64, 0, 0, 0, None)
    assert bad_head_dim == STATUS["UNSUPPORTED_HEAD_DIM"]
    assert raw.hybridtrtMamba2StateUpdate(*([None] * 9), 1, 4, 64, 1, 64, 0, 0, 0, None) == STATUS["NULL_POINTER"]
    assert (
        raw.hybridtrtMamba2ChunkScan(*([None] * 9), 1, 16, 4, 64, 1, 64, 128, 0, 0, 0, None, 0, None)
        == STATUS["NULL_POINTER"]
    )
    fake = 1 << 20  # an aligned, never dereferenced address
    ptrs = [fake] * 9
    assert (
        raw.hybridtrtMamba2ChunkScan(*ptrs, 1, 16, 4, 64, 1, 64, 128, 0, 0, 0, fake, 16, None)
        == STATUS["WORKSPACE_TOO_SMALL"]
    )
    assert (
        raw.hybridtrtMamba2ChunkScan(*ptrs, 1, 16, 4, 64, 1, 64, 128, 0, 0, 0, fake + 16, 1 << 30, None)
        == STATUS["MISALIGNED_POINTER"]
    )
