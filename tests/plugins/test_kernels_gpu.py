"""The CUDA kernels against the PyTorch ``_ref`` ops (needs a CUDA GPU of sm_89 / sm_90).

Outputs are poisoned with NaN before every launch so that an element the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from hybridtrt.ops import mamba2_chunk_scan_ref, mamba2_state_update_ref
from hybridtrt.plugins.build import BuildResult
from hybridtrt.plugins.kernels import KernelLibrary

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: Gates on rel L2 = |a - b| / |b| against the fp32 reference (tolerances are data).
REL_L2 = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def lib(plugin_build: BuildResult) -> KernelLibrary:
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"kernels are built for sm_89/sm_90, this GPU is sm_{major}{minor}")
    return KernelLibrary(plugin_build.kernels_library)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def where(got: torch.Tensor, want: torch.Tensor) -> str:
    err = (got.float() - want.float()).abs().nan_to_num(float("inf"))
    index = tuple(int(i) for i in torch.unravel_index(err.argmax().cpu(), got.shape))
    nan = int((~torch.isfinite(got)).sum())
    return f"{nan} non-finite of {got.numel()}, worst |err| {float(err.max()):.3g} at {index}"


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(got).all(), f"{name}: unwritten or overflowed elements: {where(got, want)}"
    err = rel_l2(got, want)
    assert err <= REL_L2[dtype], f"{name}: rel L2 {err:.3g} > {REL_L2[dtype]:.1g}; {where(got, want)}"


def inputs(batch, length, heads, head_dim, groups, d_state, dtype, state_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    x = rnd(batch, length, heads, head_dim)
    dt = (torch.rand(batch, length, heads, generator=g, device=dev) * 0.2 + 0.01).to(dtype)
    A = -torch.rand(heads, generator=g, device=dev) * 4 - 0.5
    B = rnd(batch, length, groups, d_state, scale=0.5)
    C = rnd(batch, length, groups, d_state, scale=0.5)
    D = torch.randn(heads, generator=g, device=dev)
    s0 = (torch.randn(batch, heads, head_dim, d_state, generator=g, device=dev)).to(state_dtype)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 127, 128, 129, 300])
@pytest.mark.parametrize("with_initial_state", [True, False])
@pytest.mark.parametrize("chunk_size", [64, 128, 256])
def test_chunk_scan_matches_ref(lib, dtype, head_dim, length, with_initial_state, chunk_size) -> None:
    state_dtype = torch.float32
    x, dt, A, B, C, D, s0 = inputs(2, length, 4, head_dim, 2, 128, dtype, state_dtype)
    init = s0 if with_initial_state else None
    y = torch.full_like(x, float("nan"))
    final = torch.full_like(s0, float("nan"))
    lib.chunk_scan(x, dt, A, B, C, D, init, y=y, final_state=final, chunk_size=chunk_size)
    torch.cuda.synchronize()
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0 if init is not None else torch.zeros_like(s0))
    check("y", y.float(), y_ref.float(), dtype)
    check("final_state", final.float(), s_ref.float(), dtype)


@pytest.mark.parametrize("d_state", [16, 64])
@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_chunk_scan_half_state_and_small_d_state(lib, d_state, state_dtype) -> None:
    x, dt, A, B, C, D, s0 = inputs(1, 200, 4, 64, 1, d_state, torch.bfloat16, state_dtype, seed=1)
    y = torch.full_like(x, float("nan"))
    final = torch.full_like(s0, float("nan"))
    lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=final, chunk_size=128)
    torch.cuda.synchronize()
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    check("y", y.float(), y_ref.float(), torch.bfloat16)
    check("final_state", final.float(), s_ref.float(), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("d_state", [16, 64, 128])
@pytest.mark.parametrize("in_place", [False, True])
def test_state_update_matches_ref(lib, dtype, state_dtype, head_dim, d_state, in_place) -> None:
    x, dt, A, B, C, D, s0 = inputs(33, 1, 8, head_dim, 2, d_state, dtype, state_dtype, seed=2)
    x, dt, B, C = x[:, 0].contiguous(), dt[:, 0].contiguous(), B[:, 0].contiguous(), C[:, 0].contiguous()
    y_ref, s_ref = mamba2_state_update_ref(x, dt, A, B, C, D, s0)
    state = s0.clone()
    y = torch.full_like(x, float("nan"))
    new_state = state if in_place else torch.full_like(state, float("nan"))
    lib.state_update(x, dt, A, B, C, D, state, y=y, new_state=new_state)
    torch.cuda.synchronize()
    gate = max(dtype, state_dtype, key=lambda t: REL_L2[t])
    check("y", y.float(), y_ref.float(), gate)
    check("new_state", new_state.float(), s_ref.float(), gate)


def test_state_update_is_cuda_graph_safe(lib) -> None:
    x, dt, A, B, C, D, s0 = inputs(4, 1, 8, 64, 2, 128, torch.float16, torch.float32, seed=3)
    x, dt, B, C = x[:, 0].contiguous(), dt[:, 0].contiguous(), B[:, 0].contiguous(), C[:, 0].contiguous()
    y_ref, s_ref = mamba2_state_update_ref(x, dt, A, B, C, D, s0)
    state, y = s0.clone(), torch.empty_like(x)
    lib.state_update(x, dt, A, B, C, D, state, y=y, new_state=state)  # warm-up: module load outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lib.state_update(x, dt, A, B, C, D, state, y=y, new_state=state)
    state.copy_(s0)
    graph.replay()
    torch.cuda.synchronize()
    check("y", y.float(), y_ref.float(), torch.float16)
    check("state", state.float(), s_ref.float(), torch.float16)


def test_chunk_scan_is_cuda_graph_safe(lib) -> None:
    x, dt, A, B, C, D, s0 = inputs(2, 200, 8, 80, 2, 128, torch.bfloat16, torch.float32, seed=4)
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0)
    y, final = torch.empty_like(x), torch.empty_like(s0)
    size = lib.chunk_scan_workspace_size(2, 200, 8, 80, 2, 128, 128, "bfloat16", "bfloat16", "float32")
    workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
    lib.prepare("bfloat16", 128)  # shared-memory opt-in outside the capture; the captured launch makes no attribute call
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=final, workspace=workspace, chunk_size=128)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check("y", y.float(), y_ref.float(), torch.bfloat16)
    check("final_state", final, s_ref, torch.bfloat16)
