"""The explicit per-layer state cache (DESIGN.md §4), identical in every backend.

| state                 | shape                  | dtype                      |
|-----------------------|------------------------|----------------------------|
| conv, per ``M`` layer | ``[B, conv_dim, K]``   | model dtype                |
| SSM, per ``M`` layer  | ``[B, H, P, N]``       | state dtype (fp32 default) |
| KV, per ``*`` layer   | ``[B, H_kv, S, D]`` ×2 | model dtype                |

The cache is a value: a forward pass returns a new cache and never mutates the one it was given,
so a caller can branch (prefill once, continue twice) and tests can compare states directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hybridtrt.models.config import ATTENTION, MAMBA, HybridConfig


@dataclass
class HybridCache:
    """Per-layer states keyed by decoder layer index.

    Attributes:
        conv: ``{i: [B, conv_dim, K]}`` — the last K conv inputs of Mamba layer i.
        ssm: ``{i: [B, H, P, N]}``.
        key: ``{i: [B, H_kv, S, D]}`` for attention layer i.
        value: ``{i: [B, H_kv, S, D]}``.
    """

    conv: dict[int, Tensor] = field(default_factory=dict)
    ssm: dict[int, Tensor] = field(default_factory=dict)
    key: dict[int, Tensor] = field(default_factory=dict)
    value: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        config: HybridConfig,
        batch: int,
        *,
        dtype: torch.dtype = torch.float32,
        state_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 0,
    ) -> HybridCache:
        """Zero states for ``batch`` rows: empty (S = 0) KV, or zero KV buffers of ``capacity``
        positions for the static-cache flavour."""
        c = config
        cache = cls()
        for i in c.layers_of(MAMBA):
            cache.conv[i] = torch.zeros(batch, c.conv_dim, c.conv_kernel, dtype=dtype, device=device)
            cache.ssm[i] = torch.zeros(
                batch, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, dtype=state_dtype, device=device
            )
        for i in c.layers_of(ATTENTION):
            shape = (batch, c.num_key_value_heads, capacity, c.attention_head_dim)
            cache.key[i] = torch.zeros(shape, dtype=dtype, device=device)
            cache.value[i] = torch.zeros(shape, dtype=dtype, device=device)
        return cache

    @property
    def past_length(self) -> int:
        """Number of positions the KV cache holds (0 for a pure Mamba model; the capacity for a
        static cache)."""
        for k in self.key.values():
            return int(k.shape[2])
        return 0

    def select(self, rows: Tensor | list[int]) -> HybridCache:
        """The cache of a subset of batch rows (used for per-row comparisons)."""
        pick = {name: {i: t[rows] for i, t in getattr(self, name).items()} for name in ("conv", "ssm", "key", "value")}
        return HybridCache(**pick)

    def named_states(self) -> dict[str, Tensor]:
        """Flat ``{name: tensor}`` with the graph's ``present_*`` names (DESIGN.md §6)."""
        out: dict[str, Tensor] = {}
        for i in sorted(set(self.conv) | set(self.key)):
            if i in self.conv:
                out[f"present_conv_state.{i}"] = self.conv[i]
                out[f"present_ssm_state.{i}"] = self.ssm[i]
            else:
                out[f"present.{i}.key"] = self.key[i]
                out[f"present.{i}.value"] = self.value[i]
        return out
