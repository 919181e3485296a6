"""State snapshots: prefill a shared prompt prefix once, continue from it many times.

A `Snapshot` is the full hybrid state after a prefix — every conv and SSM state and the KV cache up
to the prefix's last position (DESIGN.md §4 layouts, ``present_*`` names) — plus the prefix's
attention mask, as CPU tensors that belong to no backend: a snapshot taken on one runtime restores
on any other with the same model (reference, ONNX Runtime of either KV flavour, TensorRT).

Backends implement two methods next to the `Stepper` protocol::

    snapshot(state, attention_mask [B, past]) -> Snapshot
    restore(snapshot) -> state          # a fresh state; the snapshot stays valid

``generate(..., snapshot=snap)`` then continues after the prefix. For a Mamba layer this is the
prefix caching that peers offer for SSM states: the state after the prefix is all there is to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from hybridtrt.errors import InputError

MASK_KEY = "__attention_mask__"


@dataclass(frozen=True)
class Snapshot:
    """The state of ``batch`` rows after ``past`` positions.

    Attributes:
        states: ``{present_name: CPU tensor}``: conv ``[B, conv_dim, K]``, SSM ``[B, H, P, N]``,
            KV ``[B, H_kv, past, D]``.
        attention_mask: ``[B, past]`` int64 (left padding of the prefix).
    """

    states: dict[str, Tensor]
    attention_mask: Tensor

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def past(self) -> int:
        return int(self.attention_mask.shape[1])

    def rows(self, batch: int) -> Snapshot:
        """This snapshot for ``batch`` rows: itself, or a one-row snapshot repeated.

        Raises:
            InputError: A multi-row snapshot asked for a different number of rows.
        """
        if batch == self.batch:
            return self
        if self.batch != 1:
            raise InputError(
                f"the snapshot has {self.batch} rows, the continuation has {batch}",
                fix="continue with as many rows as the snapshot, or snapshot a single-row prefix (it repeats to any batch)",
            )
        expand = lambda t: t.expand(batch, *t.shape[1:]).contiguous()  # noqa: E731
        return Snapshot({k: expand(v) for k, v in self.states.items()}, expand(self.attention_mask))

    def save(self, path: str | Path) -> Path:
        """Write the snapshot as one safetensors file (states by name, plus the mask)."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file({**{k: v.contiguous() for k, v in self.states.items()}, MASK_KEY: self.attention_mask.contiguous()}, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a file written by `save`."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if MASK_KEY not in tensors:
            raise InputError(f"{path} is not a hybridtrt snapshot (no {MASK_KEY})", fix="write snapshots with Snapshot.save")
        mask = tensors.pop(MASK_KEY)
        return cls(tensors, mask)


def supports_snapshots(stepper: Any) -> bool:
    return callable(getattr(stepper, "snapshot", None)) and callable(getattr(stepper, "restore", None))


def take_snapshot(stepper: Any, state: Any, attention_mask: Tensor) -> Snapshot:
    """``stepper.snapshot(state, attention_mask)``, with a typed error for backends without it."""
    if not supports_snapshots(stepper):
        raise InputError(f"{type(stepper).__name__} cannot take state snapshots", fix="use the reference, ONNX Runtime or TensorRT backend")
    return stepper.snapshot(state, attention_mask)


def snapshot_prompt(stepper: Any, input_ids: Tensor, attention_mask: Tensor | None = None, *, prefill_chunk: int | None = None) -> Snapshot:
    """Prefill ``input_ids [B, L]`` (chunked) from zero states and snapshot the result."""
    from hybridtrt.runtime.generation import DEFAULT_PREFILL_CHUNK, check_prompt, prefill

    ids, mask = check_prompt(stepper, input_ids, attention_mask)
    _, state = prefill(stepper, ids, mask, stepper.zero_state(ids.shape[0]), prefill_chunk or DEFAULT_PREFILL_CHUNK)
    return take_snapshot(stepper, state, mask)
