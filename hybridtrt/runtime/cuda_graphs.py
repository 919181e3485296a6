"""Static-cache engine steps with CUDA-graph decode: the bookkeeping, with TensorRT, CUDA and the
graph API injected (pure Python; unit-tested on the CPU with a fake TensorRT backed by ORT).

A CUDA graph replays the kernels it captured with the exact shapes and device addresses it saw.
A static-cache engine (``--kv-cache static``) makes a decode step capturable:

- **Shapes**: ``input_ids [B, 1]``, ``cache_position [B]``, ``padding_length [B]``, every state
  ``[B, ...]`` at fixed capacity: constant once the batch ``B`` is.
- **KV addresses**: one buffer per KV state, bound as ``past_*`` *and* ``present_*``: TensorRT's
  ``IKVCacheUpdateLayer`` writes the new positions in place (the engine reports the output as
  aliased to the input) — no per-step copy, one address forever.
- **Conv/SSM addresses**: TensorRT does not alias them (binding an input's memory to an output is
  undefined unless the engine declares it), so they ping-pong between two buffers: two graphs per
  batch size, one per parity. These states are O(1) in the context length.
- **Per-step inputs** (token ids, positions) are copied into fixed device buffers *before* a replay;
  the logits land in a fixed output buffer.

`DecodeGraphs` captures on the first decode step of a ``(batch, parity)`` and replays afterwards;
`StaticEngineSession` drives an execution context with these rules. ``TrtModel`` delegates to it for
static engines (hook listed in the issue-12 closing note); the GPU capture itself is unverified here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hybridtrt.errors import EngineError, InputError
from hybridtrt.exporter.io import CACHE_POSITION, INPUT_IDS, LOGITS, PADDING_LENGTH

_KV = ("key", "value")
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GraphApi(Protocol):
    """Capture and replay of device work (``torch.cuda.CUDAGraph`` on a GPU, a fake in tests)."""

    def capture(self, launch: Callable[[], None]) -> Any:
        """Run ``launch`` under stream capture; return the graph."""

    def replay(self, graph: Any) -> None:
        """Launch a captured graph on the same stream."""


class TorchCudaGraphs:
    """`GraphApi` over ``torch.cuda.CUDAGraph`` on ``stream`` (GPU-unverified in this repository)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def capture(self, launch: Callable[[], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class DecodeGraphs:
    """One captured decode step per ``(batch, parity)``; capture on first use, replay afterwards.

    Attributes:
        api: The capture/replay implementation.
        graphs: ``{(batch, parity): graph}``.
        captures / replays: Counters (for tests and logs).
    """

    api: GraphApi
    graphs: dict[tuple[int, int], Any] = field(default_factory=dict)
    captures: int = 0
    replays: int = 0

    def run(self, key: tuple[int, int], launch: Callable[[], None]) -> str:
        """Replay the graph of ``key``; on its first step run ``launch`` eagerly, then capture it.

        The eager launch computes this step and is the warm-up TensorRT wants after new input
        shapes; the capture only records (stream capture executes nothing). Running a step twice
        would be harmless anyway: it maps the past buffers and inputs to the present buffers and
        the in-place KV write stores the same values at the same positions.
        """
        graph = self.graphs.get(key)
        if graph is None:
            launch()
            self.graphs[key] = self.api.capture(launch)
            self.captures += 1
            return "captured"
        self.api.replay(graph)
        self.replays += 1
        return "replayed"

    def invalidate(self) -> None:
        """Forget every graph (after buffers moved, or a new engine context)."""
        self.graphs.clear()


@dataclass(frozen=True)
class StaticLayout:
    """The device buffers of a static-cache engine, from its state list (manifest or sidecar).

    Attributes:
        states: ``[{"past_name", "present_name", "kind", "shape", "dtype"}]`` in graph order, with
            ``"batch"`` as the only symbolic dim.
        dtypes: ``{"model": torch dtype, "state": torch dtype}``.
        max_batch / max_seq: Largest batch and call length (prefill chunk) the engine takes.
        vocab_size: Logits width.
    """

    states: tuple[dict[str, Any], ...]
    dtypes: dict[str, torch.dtype]
    max_batch: int
    max_seq: int
    vocab_size: int

    @classmethod
    def from_manifest(cls, manifest: Any, *, max_batch: int, max_seq: int) -> StaticLayout:
        if manifest.kv_cache != "static":
            raise EngineError("CUDA-graph decode needs a static-cache export", fix="re-export with `--kv-cache static --max-cache-len N`")
        dtypes = {"model": _TORCH[manifest.dtype], "state": _TORCH[manifest.state_dtype]}
        return cls(tuple(manifest.states), dtypes, max_batch, max_seq, int(manifest.model["vocab_size"]))

    def shape(self, state: dict[str, Any], batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in state["shape"])

    def in_place(self, state: dict[str, Any]) -> bool:
        """True for KV states: one buffer, ``present`` aliased to ``past`` by TensorRT."""
        return state["kind"] in _KV

    def input_shapes(self, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        shapes = {INPUT_IDS: (batch, seq), CACHE_POSITION: (batch,), PADDING_LENGTH: (batch,)}
        shapes.update({s["past_name"]: self.shape(s, batch) for s in self.states})
        return shapes


class StaticEngineSession:
    """Runs calls of a static-cache engine on preallocated buffers, decode steps as CUDA graphs.

    Args:
        context: A TensorRT ``IExecutionContext`` (``set_input_shape``, ``set_tensor_address``,
            ``execute_async_v3``).
        layout: `StaticLayout`.
        empty: ``empty(numel, dtype) -> 1-D device tensor`` (allocation, once).
        graphs: `GraphApi`, or None to run every call eagerly.
        stream: Passed to ``execute_async_v3``.
    """

    def __init__(self, context: Any, layout: StaticLayout, empty: Callable[[int, torch.dtype], torch.Tensor], graphs: GraphApi | None = None, stream: int = 0) -> None:
        self.context = context
        self.layout = layout
        self.stream = stream
        self.decode_graphs = DecodeGraphs(graphs) if graphs is not None else None
        b = layout.max_batch
        self._ids = empty(b * layout.max_seq, torch.int64)
        self._cache_position = empty(b, torch.int64)
        self._padding = empty(b, torch.int64)
        self._logits = empty(b * layout.vocab_size, torch.float32)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        for s in layout.states:
            n = math.prod(layout.shape(s, b))
            dtype = layout.dtypes[s["dtype"]]
            self._buffers[s["past_name"]] = [empty(n, dtype)] if layout.in_place(s) else [empty(n, dtype), empty(n, dtype)]
        self.batch = 0
        self.past = 0
        self.parity = 0

    def _view(self, flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return flat[: math.prod(shape)].view(shape)

    def reset(self, batch: int) -> None:
        """Zero every state for ``batch`` rows (KV too: a static cache is read at every position)."""
        if not 1 <= batch <= self.layout.max_batch:
            raise InputError(f"batch {batch} is outside the engine's 1..{self.layout.max_batch}")
        self.batch, self.past, self.parity = batch, 0, 0
        for s in self.layout.states:
            self._view(self._buffers[s["past_name"]][0], self.layout.shape(s, batch)).zero_()

    def addresses(self) -> dict[str, int]:
        """Tensor name -> device address for the current parity (what a graph captures)."""
        addr = {INPUT_IDS: self._ids.data_ptr(), CACHE_POSITION: self._cache_position.data_ptr(), PADDING_LENGTH: self._padding.data_ptr(), LOGITS: self._logits.data_ptr()}
        for s in self.layout.states:
            pair = self._buffers[s["past_name"]]
            past, present = (pair[0], pair[0]) if len(pair) == 1 else (pair[self.parity], pair[1 - self.parity])
            addr[s["past_name"]], addr[s["present_name"]] = past.data_ptr(), present.data_ptr()
        return addr

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor, padding_length: torch.Tensor) -> torch.Tensor:
        """One call: write the inputs into their fixed buffers, bind, run (or replay); CPU logits ``[B, V]``."""
        batch, seq = int(input_ids.shape[0]), int(input_ids.shape[1])
        if batch != self.batch:
            raise InputError(f"input_ids has {batch} rows, the session holds {self.batch}", fix="call reset(batch) first")
        if seq > self.layout.max_seq:
            raise InputError(f"a call of {seq} tokens exceeds the engine's {self.layout.max_seq}", fix="prefill in smaller chunks (--prefill-chunk)")
        self._view(self._ids, (batch, seq)).copy_(input_ids)
        self._view(self._cache_position, (batch,)).copy_(cache_position)
        self._view(self._padding, (batch,)).copy_(padding_length)
        for name, shape in self.layout.input_shapes(batch, seq).items():
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"TensorRT refused shape {shape} for {name}", fix="check the engine's profile limits")
        for name, address in self.addresses().items():
            self.context.set_tensor_address(name, address)

        def launch() -> None:
            if not self.context.execute_async_v3(self.stream):
                raise EngineError("TensorRT execution failed (enqueue returned false)", fix="read TensorRT's log above")

        decode = seq == 1 and self.past > 0
        if decode and self.decode_graphs is not None:
            self.decode_graphs.run((batch, self.parity), launch)
        else:
            launch()
        self.past += seq
        self.parity = 1 - self.parity
        return self._view(self._logits, (batch, self.layout.vocab_size)).to("cpu", torch.float32, copy=True)

    def states(self) -> dict[str, torch.Tensor]:
        """``{present_name: CPU tensor}`` after the latest call (KV at full capacity)."""
        out = {}
        for s in self.layout.states:
            pair = self._buffers[s["past_name"]]
            current = pair[0] if len(pair) == 1 else pair[self.parity]  # after a call, 'past' holds the latest
            out[s["present_name"]] = self._view(current, self.layout.shape(s, self.batch)).cpu()
        return out


class StaticEngineStepper:
    """The `Stepper` face of a `StaticEngineSession` (what ``TrtModel`` delegates to for static
    engines): positions come from the generation loop's mask (`static_positions`)."""

    def __init__(self, session: StaticEngineSession, capacity: int) -> None:
        self.session = session
        self.capacity = capacity

    def zero_state(self, batch: int) -> int:
        self.session.reset(batch)
        return 0

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: int, decode: bool) -> tuple[torch.Tensor, int]:
        from hybridtrt.runtime.states import static_positions

        if state != self.session.past:
            raise InputError("stale state: a static engine holds one generation at a time", fix="call zero_state again")
        cache_position, padding = static_positions(attention_mask, int(input_ids.shape[1]), self.capacity)
        logits = self.session.step(input_ids.long(), torch.from_numpy(cache_position), torch.from_numpy(padding))
        return logits, self.session.past
