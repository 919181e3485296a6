"""Building blocks of the reference model: RMSNorm, gated RMSNorm, Mamba-2 mixer, attention, MLP.

Module attribute names mirror HF transformers' so checkpoint keys map one-to-one
(``mixer.in_proj.weight``, ``mixer.conv1d.weight``, ``mixer.A_log`` ...).
Forward passes are pure functions of (inputs, states) -> (outputs, new states): no Python branch on
tensor values, so ``torch.export`` traces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridtrt.models.config import HybridConfig
from hybridtrt.ops import mamba2_chunk_scan, mamba2_state_update
from hybridtrt.ops.kv_cache import kv_cache_update
from hybridtrt.ops.ssd import acc_dtype


def wide(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype: fp32 for fp32/fp16/bf16 (what ``.float()`` gives), fp64 for
    fp64, so that an fp64 reference run (the fp32 gates' yardstick) is fp64 throughout."""
    return t.to(acc_dtype(t))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32.

    Args:
        weight_in_fp32: Multiply the weight in fp32 before casting back (Nemotron-H) or after
            casting back to the input dtype (Mamba-2). Identical in fp32.
    """

    def __init__(self, hidden_size: int, eps: float, weight_in_fp32: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]`` in x's dtype."""
        dtype = x.dtype
        h = wide(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (wide(self.weight) * h).to(dtype)
        return self.weight * h.to(dtype)


class GatedRMSNorm(nn.Module):
    """``RMSNorm_grouped(y * silu(z)) * weight`` — gating before the norm, per group of
    ``group_size = d_inner / n_groups`` channels (the reference's ``norm_before_gate=False``)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """``y, z [B, L, d_inner] -> [B, L, d_inner]`` in y's dtype (y is the scan's fp32 output, so
        the result is fp32, as in HF's NemotronH; the mixer casts it for ``out_proj``)."""
        dtype = y.dtype
        h = wide(y) * F.silu(wide(z))
        b, l, d = h.shape
        g = h.reshape(b, l, d // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.reshape(b, l, d).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (DESIGN.md §3).

    ``in_proj`` → split ``z | xBC | dt`` → causal depthwise conv1d over ``[conv_state, xBC]`` → SiLU →
    split ``x | B | C`` → SSD (custom op) → gated RMSNorm(y, z) → ``out_proj``.
    ``dt = clamp(softplus(dt_raw + dt_bias), time_step_limit)`` on every token, prefill and decode alike
    (DESIGN.md §3 gives the sources), zeroed on padding; ``A = -exp(A_log)``.
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        c = config
        self.num_heads = c.mamba_num_heads
        self.head_dim = c.mamba_head_dim
        self.n_groups = c.n_groups
        self.d_state = c.ssm_state_size
        self.d_inner = c.d_inner
        self.conv_dim = c.conv_dim
        self.conv_kernel = c.conv_kernel
        self.chunk_size = c.chunk_size
        self.dt_min, self.dt_max = c.time_step_limit
        self.in_proj = nn.Linear(c.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=c.mamba_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim, bias=c.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, c.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=c.mamba_bias)

    def forward(
        self,
        h: Tensor,
        mask: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        use_state_update: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One mixer pass.

        Args:
            h: ``[B, L, hidden]`` normed hidden states.
            mask: ``[B, L]`` 1 for real tokens, 0 for (left) padding, in h's dtype.
            conv_state: ``[B, conv_dim, K]``.
            ssm_state: ``[B, H, P, N]``.
            use_state_update: Use ``mamba2_state_update`` (requires L == 1) instead of the scan.

        Returns:
            ``out [B, L, hidden]``, ``conv_state``, ``ssm_state`` (new tensors).
        """
        b, l, _ = h.shape
        m = mask[..., None]
        proj = self.in_proj(h * m)
        z, xbc, dt_raw = proj.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)

        # Causal depthwise conv over the last K inputs; padded positions feed zeros.
        window = torch.cat([conv_state, (xbc * m).transpose(1, 2)], dim=-1)  # [B, conv_dim, K + L]
        new_conv_state = window[:, :, -self.conv_kernel :]
        # One token: K multiply-adds, 6.5× faster than a grouped Conv on ORT. fp64 (the fp32 gates'
        # yardstick, never exported): torch's fp64 grouped conv1d costs 9 ms at L = 1 and 18 ms at
        # L = 512 where the shifted form costs 0.04 and 3.4 ms (conv_dim 1536, 2 cores; issue 29).
        if use_state_update or window.dtype == torch.float64:
            xbc = depthwise_causal_conv(window, self.conv1d.weight, self.conv1d.bias)
        else:  # any L: the grouped Conv, 2.8× faster than the shifted form at L = 512 (README)
            xbc = F.conv1d(window[:, :, 1:], self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        xbc = F.silu(xbc).transpose(1, 2) * m
        x, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)

        dt = clamp_dt(F.softplus(wide(dt_raw) + wide(self.dt_bias)), self.dt_min, self.dt_max) * wide(m)
        A = -torch.exp(wide(self.A_log))
        D = wide(self.D)

        x = x.reshape(b, l, self.num_heads, self.head_dim)
        B = B.reshape(b, l, self.n_groups, self.d_state)
        C = C.reshape(b, l, self.n_groups, self.d_state)
        if use_state_update:
            y, new_ssm_state = mamba2_state_update(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, ssm_state)
            y = y[:, None]
        else:
            y, new_ssm_state = mamba2_chunk_scan(x, dt, A, B, C, D, ssm_state, self.chunk_size)

        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y.to(h.dtype)), new_conv_state, new_ssm_state


def clamp_dt(dt: Tensor, lo: float, hi: float) -> Tensor:
    """``dt`` (after softplus) clamped to ``time_step_limit = (lo, hi)``, the same on every token.

    mamba_ssm's chunked kernels clamp to ``dt_limit`` (``_chunk_cumsum_fwd_kernel``); with the
    ``(0, inf)`` of every published Nemotron-H config the clamp is the identity (softplus > 0), and
    no node is emitted. Decode clamps too, so that prefill + decode == prefill (DESIGN.md §3, §4).
    """
    if lo > 0:
        dt = torch.clamp(dt, min=lo)
    if hi < float("inf"):
        dt = torch.clamp(dt, max=hi)
    return dt


def depthwise_causal_conv(window: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The mixer's depthwise conv1d as ``K`` shifted multiply-adds (same math as
    ``F.conv1d(window[:, :, 1:], weight, bias, groups=C)``).

    The decode path (one token, ``mamba2_state_update``) uses it instead of ``Conv(group=C)``:
    ONNX Runtime's grouped Conv costs 6.5× more at L = 1 on small-nemotron-h (README "Long
    context"), while at prefill lengths the grouped Conv is the faster one.

    Args:
        window: ``[B, C, K + L]``: the conv state (last K inputs) followed by the L new inputs.
        weight: ``[C, 1, K]``.
        bias: ``[C]`` or None.

    Returns:
        ``[B, C, L]``: output ``t`` reads inputs ``t + 1 .. t + K`` of the window.
    """
    k = weight.shape[-1]
    w = weight[:, 0, :]
    out = None
    for j in range(k):
        stop = j + 1 - k  # slice window[:, :, j + 1 : j + 1 + L] without reading L
        term = window[:, :, j + 1 : stop if stop else None] * w[:, j : j + 1]
        out = term if out is None else out + term
    return out if bias is None else out + bias[:, None]


class Attention(nn.Module):
    """Causal GQA self-attention without RoPE (Nemotron-H), with a KV cache.

    GQA is ``scaled_dot_product_attention(enable_gqa=True)``: K/V keep their ``H_kv`` heads (the
    export becomes one standard ``Attention`` node; nothing is repeated per head). The KV cache
    either grows (``past + L`` positions, concatenated) or is a fixed-capacity buffer written in
    place at ``write_index`` (static-cache flavour, ``hybridtrt::kv_cache_update``).
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.attention_head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(
        self, h: Tensor, allowed: Tensor, past_key: Tensor, past_value: Tensor, write_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One attention pass.

        Args:
            h: ``[B, L, hidden]``.
            allowed: ``[B, 1, L, T]`` bool, True where query ``l`` attends to cache position ``t``
                (``T = S + L`` for a growing cache, ``T = N`` for a static one).
            past_key, past_value: ``[B, H_kv, S, D]`` (growing) or ``[B, H_kv, N, D]`` (static).
            write_index: ``[B]`` int64 first cache position of the new tokens (static cache), or
                None to concatenate.

        Returns:
            ``out [B, L, hidden]``, ``key``, ``value`` (``[B, H_kv, S+L, D]`` or ``[B, H_kv, N, D]``).
        """
        b, l, _ = h.shape
        q = self.q_proj(h).reshape(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).reshape(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).reshape(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if write_index is None:
            key = torch.cat([past_key, k], dim=2)
            value = torch.cat([past_value, v], dim=2)
        else:
            key = kv_cache_update(past_key, k, write_index)
            value = kv_cache_update(past_value, v, write_index)
        out = F.scaled_dot_product_attention(
            q, key, value, attn_mask=allowed, scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads
        )
        out = out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)
        return self.o_proj(out), key, value


class MLP(nn.Module):
    """``down(relu(up(x))²)``."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, h: Tensor) -> Tensor:
        """``[B, L, hidden] -> [B, L, hidden]``."""
        return self.down_proj(torch.relu(self.up_proj(h)).square())
