"""Mamba-2 SSD math in eager PyTorch: the chunked scan, the one-token update, and `_ref` twins.

Contract (DESIGN.md §5). Heads ``h`` use group ``h // (H // G)``. Accumulation is fp32 (fp64 for an
fp64 reference run); ``y`` is fp32 whatever ``x``'s dtype (it feeds the gated RMSNorm, which
normalises in fp32 — HF's NemotronH keeps the scan output fp32 too — and in fp16 |y| exceeds 65504
on real shapes); the returned state has the incoming state's dtype.

    s_t = exp(dt_t * A) * s_{t-1} + dt_t * (x_t ⊗ B_t)
    y_t = s_t · C_t + D * x_t

``dt`` is the final step size (bias, softplus, clamp and padding mask already applied): a padded
position has ``dt = 0`` and ``x = B = C = 0``, so it neither decays nor feeds the state.

The fast functions are real math (the chunked SSD of Mamba-2 for the scan); every one of them has a
sequential ``_ref`` twin with the same signature that tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "acc_dtype",
    "mamba2_chunk_scan_eager",
    "mamba2_chunk_scan_ref",
    "mamba2_state_update_eager",
    "mamba2_state_update_ref",
]


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype for activations of ``x``'s dtype: fp32 for fp32/fp16/bf16, fp64 for an
    fp64 run (the fp32 gates' yardstick). ``y`` of both ops has this dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _segment_sum(a: Tensor) -> Tensor:
    """Stable segment sums.

    Args:
        a: ``[..., T]``.

    Returns:
        ``[..., T, T]`` with ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``i >= j`` and ``-inf``
        above the diagonal. Built with a masked cumsum (no differences of large cumsums).
    """
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)  # [..., i, j] = a_i
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    out = torch.cumsum(a.masked_fill(~strict, 0.0), dim=-2)
    lower = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def mamba2_chunk_scan_eager(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    initial_state: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2), any ``L >= 1``.

    Args:
        x: ``[B, L, H, P]`` activations.
        dt: ``[B, L, H]`` final step sizes.
        A: ``[H]`` fp32, negative.
        B: ``[B, L, G, N]``.
        C: ``[B, L, G, N]``.
        D: ``[H]`` fp32 skip.
        initial_state: ``[B, H, P, N]``.
        chunk_size: Chunk length. The chunk actually used is ``min(chunk_size, L)`` (as in the ONNX
            body: a chunk longer than the sequence only adds padded work), and ``L`` is zero-padded
            to a multiple of it internally (exact: a padded step has ``dt = 0``).

    Returns:
        ``y [B, L, H, P]`` fp32 and ``final_state [B, H, P, N]`` in
        ``initial_state.dtype``.

    ``B``/``C`` stay per group: heads are split ``H = G * R`` (head ``h = g * R + r`` reads group
    ``g``), so nothing is repeated per head.
    """
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[-2], B.shape[-1]
    rep = heads // groups
    cs = min(chunk_size, length)
    pad = (-length) % cs
    chunks = (length + pad) // cs
    acc = acc_dtype(x)
    xf = x.to(acc)

    def to_chunks(t: Tensor) -> Tensor:  # [b, L, ...] -> [b, c, l, ...] (zero-padded)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
        return t.reshape(batch, chunks, cs, *t.shape[2:])

    dtf = dt.to(acc)
    x_dt = to_chunks((xf * dtf[..., None]).reshape(batch, length, groups, rep, head_dim))  # [b,c,l,g,r,p]
    Bc, Cc = to_chunks(B.to(acc)), to_chunks(C.to(acc))  # [b, c, l, g, n]
    a = to_chunks((dtf * A.to(acc)).reshape(batch, length, groups, rep)).permute(0, 3, 4, 1, 2)  # [b,g,r,c,l]
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Within each chunk: causal "attention" C_l·B_s weighted by the decay from s to l.
    decay = torch.exp(_segment_sum(a))  # [b, g, r, c, l, s]
    cb = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)[:, :, None]  # [b, g, 1, c, l, s]
    y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", cb * decay, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, g, r, c, l]
    chunk_states = torch.einsum("bclgn,bgrcl,bclgrp->bcgrpn", Bc, decay_to_end, x_dt)

    # 3. Carry states across chunks: start state of chunk c, plus the final state.
    s0 = initial_state.to(acc).reshape(batch, 1, groups, rep, head_dim, d_state)
    states = torch.cat([s0, chunk_states], dim=1)  # [b, c+1, g, r, p, n]
    chunk_decay = torch.exp(_segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # [b, g, r, c+1, c+1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. What each position reads from its chunk's start state.
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, start_states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(batch, chunks * cs, heads, head_dim)[:, :length]
    y = y + D.to(acc)[:, None] * xf
    final_state = final_state.reshape(batch, heads, head_dim, d_state)
    return y.contiguous(), final_state.to(initial_state.dtype).contiguous()


def mamba2_chunk_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    initial_state: Tensor,
    chunk_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sequential twin of `mamba2_chunk_scan_eager` (same signature; ``chunk_size`` is ignored).

    Shapes: ``x [B,L,H,P]``, ``dt [B,L,H]``, ``A [H]``, ``B, C [B,L,G,N]``, ``D [H]``,
    ``initial_state [B,H,P,N]`` -> ``y [B,L,H,P]``, ``final_state [B,H,P,N]``.
    """
    state = initial_state
    ys = []
    for t in range(x.shape[1]):
        y, state = mamba2_state_update_ref(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state, _keep_fp32=True)
        ys.append(y)
    return torch.stack(ys, dim=1), state.to(initial_state.dtype)


def mamba2_state_update_eager(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One-token state update (decode).

    Args:
        x: ``[B, H, P]``.
        dt: ``[B, H]`` final step size.
        A: ``[H]`` fp32.
        B: ``[B, G, N]``.
        C: ``[B, G, N]``.
        D: ``[H]`` fp32.
        state: ``[B, H, P, N]``.

    Returns:
        ``y [B, H, P]`` fp32 and ``new_state [B, H, P, N]`` in ``state.dtype``. Heads are
        split ``H = G * R`` so ``B``/``C`` broadcast over the ``R`` heads of their group.
    """
    batch, heads, head_dim = x.shape
    groups, d_state = B.shape[-2], B.shape[-1]
    rep = heads // groups
    acc = acc_dtype(x)
    xf = x.to(acc).reshape(batch, groups, rep, head_dim)
    dtf = dt.to(acc).reshape(batch, groups, rep)
    decay = torch.exp(dtf * A.to(acc).reshape(groups, rep))[..., None, None]  # [b, g, r, 1, 1]
    s = state.to(acc).reshape(batch, groups, rep, head_dim, d_state)
    Bg = B.to(acc)[:, :, None, None, :]  # [b, g, 1, 1, n]
    new_state = torch.addcmul(s * decay, (xf * dtf[..., None])[..., None], Bg)
    y = torch.matmul(new_state, C.to(acc)[:, :, None, :, None]).squeeze(-1)  # [b, g, r, p]
    y = y.reshape(batch, heads, head_dim) + D.to(acc)[:, None] * x.to(acc)
    return y, new_state.reshape(batch, heads, head_dim, d_state).to(state.dtype)


def mamba2_state_update_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    state: Tensor,
    *,
    _keep_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """Literal twin of `mamba2_state_update_eager`, written from the recurrence.

    Shapes: ``x [B,H,P]``, ``dt [B,H]``, ``A [H]``, ``B, C [B,G,N]``, ``D [H]``,
    ``state [B,H,P,N]`` -> ``y [B,H,P]``, ``new_state [B,H,P,N]``.
    """
    heads = x.shape[1]
    groups = B.shape[1]
    group_of_head = torch.arange(heads, device=x.device) // (heads // groups)
    acc = acc_dtype(x)
    b_h = B.to(acc)[:, group_of_head]  # [b, h, n]
    c_h = C.to(acc)[:, group_of_head]
    dtf = dt.to(acc)
    s = state.to(acc)
    s = torch.exp(dtf * A.to(acc))[:, :, None, None] * s + dtf[:, :, None, None] * (
        x.to(acc)[:, :, :, None] * b_h[:, :, None, :]
    )
    y = (s * c_h[:, :, None, :]).sum(-1) + D.to(acc)[None, :, None] * x.to(acc)
    if _keep_fp32:
        return y, s
    return y, s.to(state.dtype)
