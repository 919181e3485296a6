"""Backend-independent state bookkeeping: which ``past_*`` inputs a graph takes, their zero
values, and how ``present_*`` outputs feed back (DESIGN.md §4, §6). Built from ``hybridtrt.json``
alone, so ONNX Runtime, TensorRT and the C++ runner agree on it by construction."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

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

    def concrete_shape(self, batch: int, past: int = 0) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else past if d == PAST else int(d) for d in self.shape)


@dataclass(frozen=True)
class StatePlan:
    """All states of a model, in graph order."""

    buffers: tuple[StateBuffer, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StatePlan:
        dtypes = {"model": _NP[manifest.dtype], "state": _NP[manifest.state_dtype]}
        return cls(
            tuple(
                StateBuffer(s["past_name"], s["present_name"], tuple(s["shape"]), np.dtype(dtypes[s["dtype"]]))
                for s in manifest.states
            )
        )

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        """``{past_name: zeros}`` for ``batch`` rows before any token (KV with ``past = 0``)."""
        return {b.past_name: np.zeros(b.concrete_shape(batch), dtype=b.dtype) for b in self.buffers}

    def feed_back(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``present_*`` outputs -> the next call's ``past_*`` inputs."""
        return {b.past_name: outputs[b.present_name] for b in self.buffers}
