"""Chunked SSD and the one-token update against their sequential `_ref` twins, and the
torch.library registration (eager + fake)."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.ops import (
    mamba2_chunk_scan,
    mamba2_chunk_scan_eager,
    mamba2_chunk_scan_ref,
    mamba2_state_update,
    mamba2_state_update_eager,
    mamba2_state_update_ref,
)


def random_inputs(batch, length, heads, head_dim, groups, d_state, *, dtype=torch.float32, seed=0, zero_state=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g).to(dtype)
    dt = torch.rand(batch, length, heads, generator=g) * 0.5
    dt[:, : length // 4] = 0.0  # padding-like steps: dt = 0 must be exact no-ops
    A = -(1 + 7 * torch.rand(heads, generator=g))
    B = torch.randn(batch, length, groups, d_state, generator=g).to(dtype)
    C = torch.randn(batch, length, groups, d_state, generator=g).to(dtype)
    D = torch.randn(heads, generator=g)
    s0 = torch.zeros(batch, heads, head_dim, d_state) if zero_state else torch.randn(batch, heads, head_dim, d_state, generator=g)
    return x, dt, A, B, C, D, s0


def _scaled_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


CHUNK = 16


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 1, 200])
@pytest.mark.parametrize("zero_state", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_matches_sequential(length, zero_state, groups):
    args = random_inputs(2, length, 4, 16, groups, 8, zero_state=zero_state, seed=length)
    y, s = mamba2_chunk_scan_eager(*args, CHUNK)
    y_ref, s_ref = mamba2_chunk_scan_ref(*args, CHUNK)
    assert y.shape == args[0].shape and s.shape == args[-1].shape
    assert _scaled_err(y, y_ref) <= 1e-5
    assert _scaled_err(s, s_ref) <= 1e-5


def test_chunk_size_does_not_change_the_result():
    args = random_inputs(1, 50, 4, 16, 2, 8, seed=3)
    outs = [mamba2_chunk_scan_eager(*args, cs) for cs in (1, 7, 16, 64)]
    for y, s in outs[1:]:
        assert _scaled_err(y, outs[0][0]) <= 1e-5 and _scaled_err(s, outs[0][1]) <= 1e-5


def test_half_inputs_give_fp32_y_and_accumulate_in_fp32():
    x, dt, A, B, C, D, s0 = random_inputs(2, 33, 4, 16, 2, 8, dtype=torch.float16, seed=4)
    y, s = mamba2_chunk_scan_eager(x, dt, A, B, C, D, s0, CHUNK)
    assert y.dtype == torch.float32 and s.dtype == torch.float32  # y is fp32 whatever x's dtype
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0, CHUNK)
    assert _scaled_err(y, y_ref) <= 1e-5 and _scaled_err(s, s_ref) <= 1e-5
    y1, _ = mamba2_state_update_eager(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, s0)
    assert y1.dtype == torch.float32
    y, s = mamba2_chunk_scan_eager(x, dt, A, B, C, D, s0.to(torch.bfloat16), CHUNK)
    assert s.dtype == torch.bfloat16


def test_fp64_runs_in_fp64():
    """The fp64 yardstick of the fp32 gates is fp64 throughout: y and the state stay fp64."""
    args = random_inputs(2, 40, 4, 16, 2, 8, seed=6)
    x, dt, A, B, C, D, s0 = (t.double() for t in args)
    y, s = mamba2_chunk_scan_eager(x, dt, A, B, C, D, s0, CHUNK)
    y_ref, s_ref = mamba2_chunk_scan_ref(x, dt, A, B, C, D, s0, CHUNK)
    assert y.dtype == s.dtype == y_ref.dtype == torch.float64
    assert _scaled_err(y, y_ref) <= 1e-12 and _scaled_err(s, s_ref) <= 1e-12


def test_state_update_matches_ref_and_one_step_scan():
    x, dt, A, B, C, D, s0 = random_inputs(3, 1, 8, 16, 4, 16, seed=5)
    y, s = mamba2_state_update_eager(x[:, 0], dt[:, 0] + 0.1, A, B[:, 0], C[:, 0], D, s0)
    y_ref, s_ref = mamba2_state_update_ref(x[:, 0], dt[:, 0] + 0.1, A, B[:, 0], C[:, 0], D, s0)
    assert _scaled_err(y, y_ref) <= 1e-6 and _scaled_err(s, s_ref) <= 1e-6
    y_scan, s_scan = mamba2_chunk_scan_eager(x, dt + 0.1, A, B, C, D, s0, CHUNK)
    assert _scaled_err(y, y_scan[:, 0]) <= 1e-5 and _scaled_err(s, s_scan) <= 1e-5


def test_zero_dt_is_an_exact_no_op():
    x, dt, A, B, C, D, s0 = random_inputs(1, 1, 4, 16, 1, 8, seed=6)
    _, s = mamba2_state_update_eager(x[:, 0], torch.zeros_like(dt[:, 0]), A, B[:, 0], C[:, 0], D, s0)
    assert torch.equal(s, s0)


def test_custom_ops_are_registered_and_real():
    args = random_inputs(1, 20, 4, 16, 2, 8, seed=7)
    y, s = mamba2_chunk_scan(*args, CHUNK)
    assert y.abs().sum() > 0 and s.abs().sum() > 0
    assert torch.ops.hybridtrt.mamba2_chunk_scan.default is not None
    assert torch.ops.hybridtrt.mamba2_state_update.default is not None
    torch.library.opcheck(torch.ops.hybridtrt.mamba2_chunk_scan.default, (*args, CHUNK), test_utils=("test_schema", "test_faketensor"))
    one = (args[0][:, 0], args[1][:, 0], args[2], args[3][:, 0], args[4][:, 0], args[5], args[6])
    torch.library.opcheck(torch.ops.hybridtrt.mamba2_state_update.default, one, test_utils=("test_schema", "test_faketensor"))
    y1, s1 = mamba2_state_update(*one)
    assert y1.shape == one[0].shape and s1.shape == one[-1].shape
