"""Backend-independent state bookkeeping: which ``past_*`` inputs a graph takes, their zero
values, and how ``present_*`` outputs feed back (DESIGN.md §4, §6). Built from ``hybridtrt.json``
alone, so ONNX Runtime, TensorRT and the C++ runner agree on it by construction.

Static-cache graphs (``--kv-cache static``) take the positions of a call as ``cache_position [B]``
and ``padding_length [B]`` instead of the growing ``attention_mask``; `static_positions` derives
them from the mask the generation loop keeps, so every backend speaks the same `Stepper` API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from hybridtrt.errors import InputError
from hybridtrt.exporter.io import BATCH, PAST
from hybridtrt.exporter.manifest import Manifest

_NP = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


@dataclass(frozen=True)
class StateBuffer:
    """One state tensor: names, shape template and numpy dtype."""

    past_name: str
    present_name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype
    kind: str = ""

    def concrete_shape(self, batch: int, past: int = 0) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else past if d == PAST else int(d) for d in self.shape)

    @property
    def is_kv(self) -> bool:
        return self.kind in ("key", "value")


@dataclass(frozen=True)
class StatePlan:
    """All states of a model, in graph order."""

    buffers: tuple[StateBuffer, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StatePlan:
        dtypes = {"model": _NP[manifest.dtype], "state": _NP[manifest.state_dtype]}
        return cls(
            tuple(
                StateBuffer(s["past_name"], s["present_name"], tuple(s["shape"]), np.dtype(dtypes[s["dtype"]]), s.get("kind", ""))
                for s in manifest.states
            )
        )

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        """``{past_name: zeros}`` for ``batch`` rows before any token (KV with ``past = 0``, or the
        zero buffers of a static cache)."""
        return {b.past_name: np.zeros(b.concrete_shape(batch), dtype=b.dtype) for b in self.buffers}

    def feed_back(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``present_*`` outputs -> the next call's ``past_*`` inputs."""
        return {b.past_name: outputs[b.present_name] for b in self.buffers}

    def kv_bytes_per_position(self, batch: int) -> int:
        """Bytes every cached position adds to the KV states of ``batch`` rows."""
        return sum(
            batch * int(np.prod([int(d) for i, d in enumerate(b.shape) if i not in (0, 2)])) * b.dtype.itemsize
            for b in self.buffers
            if b.is_kv
        )


@dataclass
class StaticState:
    """The states of a static-cache graph: one buffer per state (KV at full capacity), which the
    next call may overwrite in place, and how many cache positions hold tokens.

    Attributes:
        arrays: ``{past_name: array}``.
        past: Positions written so far (left padding included).
    """

    arrays: dict[str, np.ndarray]
    past: int = 0


def static_positions(attention_mask: torch.Tensor, length: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``cache_position [B]`` and ``padding_length [B]`` of a call, from the generation loop's mask.

    A row's leading zeros are its left padding, which occupies cache positions. Zeros after a real
    token in the earlier positions are **holes**, the positions a speculative verify call wrote and
    the row rejected (`hybridtrt.runtime.speculative`): they occupy no cache position (the row's
    next call writes over what the verify call left there, which no query reads: a query attends
    to positions at or before its own), so rows advance by their own counts.

    Args:
        attention_mask: ``[B, past + L]``: left padding, then ones, with holes before the new tokens.
        length: ``L``, the new tokens of this call (zeros among them only as left padding).
        capacity: The graph's ``max_cache_len``.

    Raises:
        InputError: Padding after a real token among the new tokens, or more positions than the
            cache holds.
    """
    mask = attention_mask.long().cpu()
    total = mask.shape[1]
    started = mask.cummax(dim=1).values  # 1 from each row's first real token on
    if bool(((started[:, total - length :] == 1) & (mask[:, total - length :] == 0)).any()):
        raise InputError(
            "attention_mask has padding after a real token; a static-cache export takes left padding only",
            fix="left-pad the batch (zeros first, then ones in every row)",
        )
    padding = (started == 0).sum(1)
    before = started[:, : total - length]
    cache_position = (before == 0).sum(1) + mask[:, : total - length].sum(1)  # padding + real tokens, holes skipped
    need = int((cache_position + length).max()) if mask.shape[0] else 0
    if need > capacity:
        raise InputError(
            f"{need} cache positions (prompt, padding and generated tokens so far) exceed this export's "
            f"--max-cache-len {capacity}",
            fix=f"re-export with `--kv-cache static --max-cache-len {need}` or more, or generate fewer tokens",
        )
    return cache_position.numpy().astype(np.int64), padding.numpy().astype(np.int64)


def physical_memory_bytes() -> int | None:
    """Physical RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
