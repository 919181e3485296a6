"""Mamba-2 SSD math in eager PyTorch: the chunked scan, the one-token update, and `_ref` twins.

Contract (DESIGN.md §5). Heads ``h`` use group ``h // (H // G)``. Accumulation is fp32; ``y`` has
``x``'s dtype; the returned state has the incoming state's dtype.

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
    "mamba2_chunk_scan_eager",
    "mamba2_chunk_scan_ref",
    "mamba2_state_update_eager",
    "mamba2_state_update_ref",
]


def _heads_from_groups(t: Tensor, num_heads: int) -> Tensor:
    """[..., G, N] -> [..., H, N] in fp32 (head h reads group h // (H // G))."""
    groups = t.shape[-2]
    return t.float().repeat_interleave(num_heads // groups, dim=-2)


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
        chunk_size: Chunk length; ``L`` is zero-padded to a multiple internally (exact: a padded
            step has ``dt = 0``).

    Returns:
        ``y [B, L, H, P]`` in ``x.dtype`` and ``final_state [B, H, P, N]`` in
        ``initial_state.dtype``.
    """
    batch, length, heads, head_dim = x.shape
    pad = (-length) % chunk_size
    xf = x.float()
    dtf = dt.float()
    Bh = _heads_from_groups(B, heads)
    Ch = _heads_from_groups(C, heads)
    if pad:
        xf_p = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    else:
        xf_p = xf
    chunks = (length + pad) // chunk_size

    def to_chunks(t: Tensor) -> Tensor:
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    x_dt = to_chunks(xf_p * dtf[..., None])  # [b, c, l, h, p]
    Bc, Cc = to_chunks(Bh), to_chunks(Ch)  # [b, c, l, h, n]
    a = to_chunks(dtf * A.float()).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Within each chunk: causal "attention" C_l·B_s weighted by the decay from s to l.
    decay = torch.exp(_segment_sum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, x_dt)

    # 3. Carry states across chunks: start state of chunk c, plus the final state.
    states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(_segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. What each position reads from its chunk's start state.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, start_states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    y = y + D.float()[:, None] * xf
    return y.to(x.dtype).contiguous(), final_state.to(initial_state.dtype).contiguous()


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
    return torch.stack(ys, dim=1).to(x.dtype), state.to(initial_state.dtype)


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
        ``y [B, H, P]`` in ``x.dtype`` and ``new_state [B, H, P, N]`` in ``state.dtype``.
    """
    batch, heads, head_dim = x.shape
    xf, dtf = x.float(), dt.float()
    Bh = _heads_from_groups(B, heads)  # [b, h, n]
    Ch = _heads_from_groups(C, heads)
    decay = torch.exp(dtf * A.float())[..., None, None]  # [b, h, 1, 1]
    new_state = torch.addcmul(state.float() * decay, (xf * dtf[..., None])[..., None], Bh[:, :, None, :])
    y = torch.matmul(new_state, Ch[..., None]).squeeze(-1) + D.float()[:, None] * xf
    return y.to(x.dtype), new_state.to(state.dtype)


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
    b_h = B.float()[:, group_of_head]  # [b, h, n]
    c_h = C.float()[:, group_of_head]
    dtf = dt.float()
    s = state.float()
    s = torch.exp(dtf * A.float())[:, :, None, None] * s + dtf[:, :, None, None] * (
        x.float()[:, :, :, None] * b_h[:, :, None, :]
    )
    y = (s * c_h[:, :, None, :]).sum(-1) + D.float()[None, :, None] * x.float()
    if _keep_fp32:
        return y, s
    return y.to(x.dtype), s.to(state.dtype)
