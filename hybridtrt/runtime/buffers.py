"""Backend-independent device-buffer bookkeeping for engine runtimes (pure; no TensorRT, no CUDA).

An engine runtime allocates every state buffer **once**, at its largest shape (``max_batch`` rows,
``max_cache_len`` KV positions), twice: a *ping* and a *pong* buffer per state (once for a state the engine
updates in place: its output aliases its input, ``ICudaEngine::getAliasedInputTensor``). At step ``k`` one of
the pair is bound as the ``past_*`` input and the other as the ``present_*`` output; after the step
they swap roles, so the output of step ``k`` is the input of step ``k + 1`` with no copy and no
allocation. A TensorRT tensor of shape ``[B, H, past, D]`` is bound as a contiguous block at the
start of its buffer, so a buffer sized for the maximum shape holds every smaller shape.

This module answers, from the engine sidecar alone:

- how many bytes each buffer needs (`BufferPlan.state_bytes`, `BufferPlan.total_bytes`);
- which profile a call uses (`choose_profile`: ``seq > 1`` or ``past == 0`` → prefill, else decode);
- the input shapes to set for a call (`BufferPlan.binding_shapes`) and the output shapes to expect;
- which buffer of a pair is "past" at step ``k`` (`PingPong`).

The C++ runner in ``examples/cpp`` implements the same rules from the same sidecar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hybridtrt.engine.profiles import DECODE, PREFILL, ProfileSpec, resolve_shape
from hybridtrt.engine.sidecar import sidecar_profiles
from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.io import ATTENTION_MASK, BATCH, INPUT_IDS, PAST, SEQ
from hybridtrt.exporter.io import LOGITS as LOGITS_NAME

#: Bytes per element of the dtype names used in manifests and sidecars.
ITEMSIZE: dict[str, int] = {
    "fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "bool": 1, "fp8": 1, "float8e4m3fn": 1, "uint8": 1, "int8": 1,
}  # fmt: skip

#: Manifest precision names -> the ONNX/TensorRT-style names used for I/O dtypes.
TENSOR_DTYPE: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _itemsize(dtype: str) -> int:
    if dtype not in ITEMSIZE:
        raise ArtefactError(f"unknown tensor dtype {dtype!r} in the sidecar", fix="rebuild the engine with this hybridtrt")
    return ITEMSIZE[dtype]



@dataclass(frozen=True)
class StateSlot:
    """One state of the engine: a ping-pong pair of device buffers.

    Attributes:
        past_name / present_name: Engine input / output tensor names.
        kind: ``"conv" | "ssm" | "key" | "value"``.
        shape: Symbolic input-side shape (``batch``, ``past`` or ints).
        dtype: Tensor dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``).
    """

    past_name: str
    present_name: str
    kind: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def grows(self) -> bool:
        """True for KV states (their ``past`` dim grows by ``seq`` every call)."""
        return PAST in self.shape

    def shape_at(self, batch: int, past: int) -> tuple[int, ...]:
        """Concrete shape with ``batch`` rows and ``past`` cached positions."""
        return resolve_shape(self.shape, {BATCH: batch, PAST: past, SEQ: 0}, name=self.past_name)

    def nbytes(self, batch: int, past: int) -> int:
        return math.prod(self.shape_at(batch, past)) * _itemsize(self.dtype)


def choose_profile(profiles: list[ProfileSpec], seq: int, past: int) -> int:
    """Index of the optimization profile for a call of ``seq`` new tokens on ``past`` cached ones.

    Rule (DESIGN.md §9): ``seq > 1`` or ``past == 0`` → the prefill profile; ``seq == 1`` and
    ``past > 0`` → the decode profile. An engine with a single profile (decode graph) uses it for
    every call it can take.

    Raises:
        InputError: No profile of this engine takes such a call.
    """
    names = [p.name for p in profiles]
    want = PREFILL if (seq > 1 or past == 0) else DECODE
    if want in names:
        return names.index(want)
    if want == PREFILL and seq == 1 and DECODE in names:
        return names.index(DECODE)  # decode-only engine: one token from zero states is a decode step
    raise InputError(
        f"this engine has profiles {names} and cannot run seq={seq} on past={past}",
        fix="feed the prompt one token at a time, or build the engine from the unified graph (`hybridtrt build --graph unified`)",
    )


@dataclass(frozen=True)
class BufferPlan:
    """Device buffers an engine runtime preallocates, derived from the sidecar.

    Attributes:
        states: State slots in graph order.
        profiles: Optimization profiles in engine order.
        max_batch: Largest batch any profile takes.
        max_cache_len: Most KV positions after a call (``past + seq``) any profile allows.
        outputs: Non-state engine outputs (``logits``, per-layer outputs) -> (symbolic shape, dtype).
        input_dtypes: ``{input_name: dtype}``.
    """

    states: tuple[StateSlot, ...]
    profiles: tuple[ProfileSpec, ...]
    max_batch: int
    max_cache_len: int
    outputs: dict[str, tuple[tuple[int | str, ...], str]] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> BufferPlan:
        """Build the plan from a sidecar dict (`hybridtrt.engine.sidecar.read_sidecar`)."""
        profiles = sidecar_profiles(sidecar)
        if not profiles:
            raise ArtefactError("the sidecar lists no optimization profiles", fix="rebuild the engine")
        dtypes = {"model": TENSOR_DTYPE[sidecar["dtype"]], "state": TENSOR_DTYPE[sidecar["state_dtype"]]}
        io_dtype = {t["name"]: t["dtype"] for t in sidecar["inputs"]}
        states = tuple(
            StateSlot(s["past_name"], s["present_name"], s["kind"], tuple(s["shape"]), io_dtype.get(s["past_name"], dtypes[s["dtype"]]))
            for s in sidecar["states"]
        )
        presents = {s.present_name for s in states}
        outputs = {o["name"]: (tuple(o["shape"]), o["dtype"]) for o in sidecar["outputs"] if o["name"] not in presents}
        max_batch = max(p.dims[BATCH].max for p in profiles)
        max_cache = max(p.dims[PAST].max + p.dims[SEQ].max for p in profiles)
        return cls(states, tuple(profiles), max_batch, max_cache, outputs, io_dtype)

    # -- sizes ----------------------------------------------------------------------------------
    def state_bytes(self, slot: StateSlot) -> int:
        """Bytes of one buffer of ``slot`` at ``max_batch`` rows and ``max_cache_len`` positions."""
        return slot.nbytes(self.max_batch, self.max_cache_len)

    def output_max_shape(self, name: str) -> tuple[int, ...]:
        """Largest shape of a non-state output over all profiles (its preallocated buffer)."""
        shape, _ = self.outputs[name]
        best: tuple[int, ...] = ()
        for p in self.profiles:
            s = resolve_shape(shape, {k: v.max for k, v in p.dims.items()}, name=name)
            if math.prod(s) > math.prod(best) or not best:
                best = s
        return best

    def output_bytes(self, name: str) -> int:
        return math.prod(self.output_max_shape(name)) * _itemsize(self.outputs[name][1])

    def total_bytes(self, in_place: frozenset[str] | set[str] = frozenset()) -> int:
        """All preallocated bytes: two buffers per state (one for the states in ``in_place``, by past name, that the
        engine updates in place) plus one per other output."""
        states = sum(self.state_bytes(s) * (1 if s.past_name in in_place else 2) for s in self.states)
        return states + sum(self.output_bytes(n) for n in self.outputs)

    # -- calls ----------------------------------------------------------------------------------
    def check_call(self, batch: int, seq: int, past: int) -> int:
        """Validate a call against the limits and return its profile index.

        Raises:
            InputError: Batch, prompt or cache beyond what the engine was built for (names the flag to raise).
        """
        if batch > self.max_batch:
            raise InputError(f"batch {batch} > the engine's max batch {self.max_batch}", fix=f"rebuild with `hybridtrt build --max-batch {batch}` or split the batch")
        if past + seq > self.max_cache_len:
            raise InputError(
                f"{past} cached + {seq} new tokens exceed the engine's max cache length {self.max_cache_len}",
                fix=f"rebuild with `hybridtrt build --max-cache-len {past + seq}` or generate fewer tokens",
            )
        index = choose_profile(list(self.profiles), seq, past)
        limit = self.profiles[index].dims[SEQ].max
        if seq > limit:
            raise InputError(f"prompt of {seq} tokens > the engine's max input length {limit}", fix=f"rebuild with `hybridtrt build --max-input-len {seq}`")
        return index

    def binding_shapes(self, batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
        """Input shapes to set for a call: ``input_ids [B, seq]``, ``attention_mask [B, past+seq]``, states."""
        dims = {BATCH: batch, SEQ: seq, PAST: past}
        shapes: dict[str, tuple[int, ...]] = {INPUT_IDS: (batch, seq), ATTENTION_MASK: (batch, past + seq)}
        for s in self.states:
            shapes[s.past_name] = resolve_shape(s.shape, dims, name=s.past_name)
        return shapes

    def present_shapes(self, batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
        """Expected state output shapes of a call (KV grows to ``past + seq``)."""
        return {s.present_name: s.shape_at(batch, past + seq) for s in self.states}

    @property
    def logits_name(self) -> str:
        return LOGITS_NAME


@dataclass
class PingPong:
    """Which buffer of every ping-pong pair is ``past`` at the current step.

    ``parity`` 0: buffer 0 is past, buffer 1 receives present; after `swap` the roles flip. ``past``
    counts the cached positions the past buffers hold, ``batch`` their rows.
    """

    batch: int
    past: int = 0
    parity: int = 0
    steps: int = 0

    @property
    def past_index(self) -> int:
        """Buffer index bound as the ``past_*`` input now."""
        return self.parity

    @property
    def present_index(self) -> int:
        """Buffer index bound as the ``present_*`` output now."""
        return 1 - self.parity

    def swap(self, seq: int) -> None:
        """After a call of ``seq`` tokens: the present buffers become past, ``past += seq``."""
        self.parity = 1 - self.parity
        self.past += seq
        self.steps += 1

    def reset(self, batch: int) -> None:
        """Zero states for ``batch`` rows (the caller zeroes the conv/SSM past buffers)."""
        self.batch, self.past, self.parity, self.steps = batch, 0, 0, 0
