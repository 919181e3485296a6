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
`StaticEngineSession` drives an execution context with these rules, selecting the engine's optimization
profile (prefill / decode, `hybridtrt.runtime.buffers.choose_profile`) before it binds. ``TrtModel``
(`hybridtrt.runtime.tensorrt`) delegates every call of a static-cache engine (sidecar ``kv_cache: "static"``)
to it, on the model's own non-default CUDA stream, with `TorchCudaGraphs`. Which states share one buffer
follows the engine (``ICudaEngine.get_aliased_input_tensor``), not an assumption: an engine that did not
alias a KV output would get that KV state ping-ponged too. Tested on the CPU with a fake TensorRT and a
fake graph API; the capture on a GPU is unverified here.

**Which engines are captured** (`capture_blocker`, from the sidecar's proof of what the parsed network holds): every
static-cache engine whose custom nodes are plugin layers — the SSD plugins and the MoE plugins (``MoeExperts``,
``MoeExpertsFp8``: a static output shape, routing on the device, no host synchronisation) alike. An engine that builds
MoE experts from their ONNX function bodies (no plugin library at build time, or NVFP4 experts, which have no plugin)
cannot be: those bodies have data-dependent shapes (`hybridtrt.engine.trt_rules.DATA_DEPENDENT_BODIES`), which
TensorRT resolves with a host synchronisation inside the step — so its decode steps run eagerly, and `TrtModel` says
why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hybridtrt.engine.trt_rules import DATA_DEPENDENT_BODIES
from hybridtrt.errors import ArtefactError, EngineError, InputError
from hybridtrt.exporter.io import CACHE_POSITION, INPUT_IDS, LOGITS, PADDING_LENGTH, SEQ
from hybridtrt.runtime.buffers import choose_profile

_KV = ("key", "value")
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: I/O dtype names of a sidecar (numpy's) -> torch.
_IO_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        # thread_local: only this thread's unsafe CUDA calls invalidate the capture (trtexec's
        # cudaStreamCaptureModeThreadLocal), not another thread's allocation.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch()
        return graph

    def replay(self, graph: Any) -> None:
        graph.replay()


def capture_blocker(plugins: dict[str, Any]) -> str | None:
    """Why the decode steps of an engine cannot be captured as CUDA graphs; None when they can.

    Args:
        plugins: The sidecar's ``plugins`` record: ``custom_nodes`` and plugin ``layers`` by ``domain::op``
            (`hybridtrt.engine.network.NetworkPlugins.to_sidecar`). A sidecar made without a network names no
            custom node and blocks nothing.

    Returns:
        A sentence naming the custom nodes built from function bodies with data-dependent shapes
        (`DATA_DEPENDENT_BODIES`) and the fix, or None.
    """
    custom = plugins.get("custom_nodes") or {}
    layers = plugins.get("layers") or {}
    bodies = {
        op: int(n) - int(layers.get(op, 0))
        for op, n in custom.items()
        if op.rsplit("::", 1)[-1] in DATA_DEPENDENT_BODIES and int(n) > int(layers.get(op, 0))
    }
    if not bodies:
        return None
    listing = ", ".join(f"{n}x {op}" for op, n in sorted(bodies.items()))
    return (
        f"{listing} run as ONNX function bodies, whose data-dependent shapes make TensorRT synchronise with the host "
        "inside a step, which a CUDA-graph capture forbids: the decode steps run eagerly — rebuild the engine with the "
        "plugin library (`hybridtrt plugins build --tensorrt-root DIR`, then `hybridtrt build`) so that MoeExperts / "
        "MoeExpertsFp8 are plugins (NVFP4 experts have no plugin yet: re-export with --dequantize-experts)"
    )


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
        capacity: The KV cache's positions (``max_cache_len``), padding included.
        shared: Past names of the states bound to one buffer as past and present (the engine aliases
            them); None: the KV states (what TensorRT's ``IKVCacheUpdateLayer`` does).
        logits_dtype: dtype of the ``logits`` output.
        logits_all: ``logits`` is ``[B, L, V]`` (an ``--logits all`` export), not ``[B, V]``.
    """

    states: tuple[dict[str, Any], ...]
    dtypes: dict[str, torch.dtype]
    max_batch: int
    max_seq: int
    vocab_size: int
    capacity: int = 0
    shared: frozenset[str] | None = None
    logits_dtype: torch.dtype = torch.float32
    logits_all: bool = False

    @classmethod
    def from_manifest(cls, manifest: Any, *, max_batch: int, max_seq: int) -> StaticLayout:
        if manifest.kv_cache != "static":
            raise EngineError("CUDA-graph decode needs a static-cache export", fix="re-export with `--kv-cache static --max-cache-len N`")
        dtypes = {"model": _TORCH[manifest.dtype], "state": _TORCH[manifest.state_dtype]}
        return cls(tuple(manifest.states), dtypes, max_batch, max_seq, int(manifest.model["vocab_size"]), int(manifest.max_cache_len), logits_all=manifest.logits != "last")

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any], *, shared: frozenset[str], max_batch: int, max_seq: int) -> StaticLayout:
        """The layout of a static-cache engine from its sidecar (`hybridtrt.engine.sidecar.read_sidecar`).

        Args:
            shared: Past names of the states the engine updates in place (``get_aliased_input_tensor``).

        Raises:
            EngineError: The sidecar is a dynamic-cache engine's.
            ArtefactError: A logits dtype with no torch equivalent.
        """
        if sidecar.get("kv_cache") != "static":
            raise EngineError("the static-cache session needs an engine built from a `--kv-cache static` export", fix="use the dynamic path of TrtModel")
        dtypes = {"model": _TORCH[sidecar["dtype"]], "state": _TORCH[sidecar["state_dtype"]]}
        logits = next(o for o in sidecar["outputs"] if o["name"] == LOGITS)
        if logits["dtype"] not in _IO_TORCH:
            raise ArtefactError(f"the engine's logits have dtype {logits['dtype']!r}", fix="rebuild the engine with this hybridtrt")
        return cls(
            tuple(sidecar["states"]), dtypes, max_batch, max_seq, int(sidecar["model"]["vocab_size"]), int(sidecar["max_cache_len"]),
            frozenset(shared), _IO_TORCH[logits["dtype"]], sidecar.get("logits", "last") != "last",
        )  # fmt: skip

    def shape(self, state: dict[str, Any], batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in state["shape"])

    def in_place(self, state: dict[str, Any]) -> bool:
        """True for a state bound to one buffer as ``past`` and ``present`` (the engine aliases them)."""
        return state["kind"] in _KV if self.shared is None else state["past_name"] in self.shared

    def input_shapes(self, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        shapes = {INPUT_IDS: (batch, seq), CACHE_POSITION: (batch,), PADDING_LENGTH: (batch,)}
        shapes.update({s["past_name"]: self.shape(s, batch) for s in self.states})
        return shapes


class StaticEngineSession:
    """Runs calls of a static-cache engine on preallocated buffers, decode steps as CUDA graphs.

    Args:
        context: A TensorRT ``IExecutionContext`` (``set_input_shape``, ``set_tensor_address``,
            ``execute_async_v3``; ``set_optimization_profile_async`` when ``profiles`` are given).
        layout: `StaticLayout`.
        empty: ``empty(numel, dtype) -> 1-D device tensor`` (allocation, once).
        graphs: `GraphApi`, or None to run every call eagerly.
        stream: The CUDA stream handle passed to ``execute_async_v3`` and profile switches (the one
            ``graphs`` captures on).
        profiles: The engine's optimization profiles in engine order (`ProfileSpec`); the session
            switches between them by `choose_profile` (prefill: ``seq > 1`` or ``past == 0``). None: a
            context with one profile that takes every call.
    """

    def __init__(
        self,
        context: Any,
        layout: StaticLayout,
        empty: Callable[[int, torch.dtype], torch.Tensor],
        graphs: GraphApi | None = None,
        stream: int = 0,
        profiles: Sequence[Any] | None = None,
    ) -> None:
        self.context = context
        self.layout = layout
        self.stream = stream
        self.profiles = list(profiles) if profiles is not None else None
        self.decode_graphs = DecodeGraphs(graphs) if graphs is not None else None
        b = layout.max_batch
        self._ids = empty(b * layout.max_seq, torch.int64)
        self._cache_position = empty(b, torch.int64)
        self._padding = empty(b, torch.int64)
        self._logits = empty(b * (layout.max_seq if layout.logits_all else 1) * layout.vocab_size, layout.logits_dtype)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        for s in layout.states:
            n = math.prod(layout.shape(s, b))
            dtype = layout.dtypes[s["dtype"]]
            self._buffers[s["past_name"]] = [empty(n, dtype)] if layout.in_place(s) else [empty(n, dtype), empty(n, dtype)]
        self.batch = 0
        self.past = 0
        self.parity = 0
        self._profile: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of every preallocated buffer (states, inputs, logits)."""
        flat = [self._ids, self._cache_position, self._padding, self._logits, *(b for pair in self._buffers.values() for b in pair)]
        return sum(t.numel() * t.element_size() for t in flat)

    def _view(self, flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return flat[: math.prod(shape)].view(shape)

    def reset(self, batch: int) -> None:
        """Zero every state for ``batch`` rows (KV too: a static cache is read at every position)."""
        if not 1 <= batch <= self.layout.max_batch:
            raise InputError(f"batch {batch} is outside the engine's 1..{self.layout.max_batch}", fix=f"rebuild with `hybridtrt build --max-batch {batch}`")
        self.batch, self.past, self.parity = batch, 0, 0
        for s in self.layout.states:
            self._view(self._buffers[s["past_name"]][0], self.layout.shape(s, batch)).zero_()

    def load(self, states: dict[str, torch.Tensor], past: int) -> None:
        """Write ``{present_name: tensor}`` (KV trimmed to ``past`` positions, as `states` gives it after
        trimming) into the zeroed buffers of the current batch: the session continues after ``past``."""
        if past > self.layout.capacity:
            raise InputError(f"the snapshot holds {past} positions, the engine's max cache length is {self.layout.capacity}",
                             fix=f"re-export with `--kv-cache static --max-cache-len {past}` or more, and rebuild")  # fmt: skip
        for s in self.layout.states:
            target = self._view(self._buffers[s["past_name"]][self.parity], self.layout.shape(s, self.batch))
            value = states[s["present_name"]].to(target.device, target.dtype)
            (target[:, :, : value.shape[2]] if s["kind"] in _KV else target).copy_(value)
        self.past = past

    def addresses(self) -> dict[str, int]:
        """Tensor name -> device address for the current parity (what a graph captures)."""
        addr = {INPUT_IDS: self._ids.data_ptr(), CACHE_POSITION: self._cache_position.data_ptr(), PADDING_LENGTH: self._padding.data_ptr(), LOGITS: self._logits.data_ptr()}
        for s in self.layout.states:
            pair = self._buffers[s["past_name"]]
            past, present = (pair[0], pair[0]) if len(pair) == 1 else (pair[self.parity], pair[1 - self.parity])
            addr[s["past_name"]], addr[s["present_name"]] = past.data_ptr(), present.data_ptr()
        return addr

    def _select_profile(self, seq: int) -> None:
        """Switch to the profile of a call of ``seq`` tokens on ``past`` positions (only when it changes).

        Raises:
            InputError: No profile takes the call, or it is longer than the profile's ``seq`` range.
        """
        if self.profiles is None:
            return
        index = choose_profile(self.profiles, seq, self.past)
        limit = self.profiles[index].dims[SEQ].max
        if seq > limit:
            raise InputError(f"a call of {seq} tokens > the engine's max input length {limit}", fix=f"prefill in chunks of at most {limit} tokens (--prefill-chunk) or rebuild with `hybridtrt build --max-input-len {seq}`")
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self.stream):
                raise EngineError(f"TensorRT refused optimization profile {index}", fix="rebuild the engine")
            self._profile = index

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor, padding_length: torch.Tensor) -> torch.Tensor:
        """One call: write the inputs into their fixed buffers, bind, run (or replay); CPU fp32 logits ``[B, V]``
        (the last position's)."""
        batch, seq = int(input_ids.shape[0]), int(input_ids.shape[1])
        if batch != self.batch:
            raise InputError(f"input_ids has {batch} rows, the session holds {self.batch}", fix="call reset(batch) first")
        self._select_profile(seq)  # refuses a call longer than its profile's seq range first (names the build flag)
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
        if self.layout.logits_all:
            logits = self._view(self._logits, (batch, seq, self.layout.vocab_size))[:, -1]
        else:
            logits = self._view(self._logits, (batch, self.layout.vocab_size))
        return logits.to("cpu", torch.float32, copy=True)

    def states(self) -> dict[str, torch.Tensor]:
        """``{present_name: CPU tensor}`` after the latest call (KV at full capacity)."""
        out = {}
        for s in self.layout.states:
            pair = self._buffers[s["past_name"]]
            current = pair[0] if len(pair) == 1 else pair[self.parity]  # after a call, 'past' holds the latest
            out[s["present_name"]] = self._view(current, self.layout.shape(s, self.batch)).to("cpu", copy=True)  # never a view of a live buffer
        return out


class StaticEngineStepper:
    """The `Stepper` face of a `StaticEngineSession` (what ``TrtModel`` delegates its calls to for static
    engines; ``TrtModel`` keeps its own state handles around it): positions come from the generation
    loop's mask (`static_positions`)."""

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
