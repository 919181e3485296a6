"""TensorRT backend: runs a ``hybridtrt build`` engine with the same `generate` API as the reference.

Needs the TensorRT 11 Python bindings and a CUDA GPU; both are imported lazily, and their absence is
a typed `MissingDependencyError` (exit code 2 in the CLI), never an ImportError at import time.

Design choices:

- **Device memory is torch CUDA tensors.** torch is already a dependency (generation, sampling,
  the reference), it shares the CUDA primary context with TensorRT, gives us a caching allocator,
  streams and events, and turns the logits into the fp32 torch tensor the `Stepper` protocol
  returns with one ``.cpu()``. No second CUDA binding (cuda-python, pycuda) to install or pin.
- **States are preallocated once and ping-ponged** (`hybridtrt.runtime.buffers`): two buffers per
  state at ``max_batch × max_cache_len`` from the sidecar; at every call one is bound as
  ``past_*`` and the other as ``present_*``, then they swap. No per-step allocation and no host
  copy of any state; only ``input_ids``, ``attention_mask`` (a few bytes per row) go to the GPU
  and the last-position logits ``[B, V]`` come back.
- **Aliasing follows the engine**: a ``present_*`` output the engine aliases to its ``past_*`` input
  (``ICudaEngine.get_aliased_input_tensor``: layers that update in place, such as TensorRT's KV-cache update)
  gets one buffer bound as both; every other state is ping-ponged. hybridtrt's plugins declare no alias
  (plugin aliasing lets TensorRT copy a network input instead), so today's engines ping-pong every state.
- **Profiles**: prefill (profile 0) for ``seq > 1`` or ``past == 0``, decode (profile 1) for one
  token on a non-empty cache; the context switches profile only when the choice changes (once per
  generation).
- **Both KV-cache flavours** (DESIGN.md §6), told apart by the sidecar's ``kv_cache``. A dynamic-cache
  engine takes ``attention_mask [B, past + L]`` and KV inputs that grow by ``L`` per call, so no two
  decode steps have the same shapes: it runs eagerly, as above. A **static-cache** engine
  (``--kv-cache static``) takes ``cache_position [B]`` / ``padding_length [B]`` (derived from the
  generation loop's mask, `hybridtrt.runtime.states.static_positions`) and fixed-capacity KV buffers,
  so a decode step has fixed shapes and addresses once the batch is known: `TrtModel` hands every call
  to `hybridtrt.runtime.cuda_graphs.StaticEngineSession` (one buffer per state the engine aliases —
  TensorRT's KV-cache update writes in place — and a ping-pong pair for conv/SSM), which captures the
  first decode step of each ``(batch, buffer parity)`` as a CUDA graph and replays it afterwards
  (``cuda_graphs=False``: every call eager). All work of a model, graph capture included, runs on its
  one non-default stream. Plugin layers are captured like any layer — the SSD plugins and the MoE plugins
  (``MoeExperts`` / ``MoeExpertsFp8``) alike; an engine that holds MoE experts as ONNX function bodies
  (data-dependent shapes: a host synchronisation inside the step) runs its decode steps eagerly, and
  ``capture_blocker`` says why (`hybridtrt.runtime.cuda_graphs.capture_blocker`, from the sidecar).
- **One live generation per model**: the states live in the model's buffers, so `zero_state`
  invalidates earlier states; stepping a stale state is refused with an `InputError`.
"""

from __future__ import annotations

import logging
import math

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridtrt.engine.build import import_tensorrt
from hybridtrt.engine.plugin_registry import load_plugin_library
from hybridtrt.engine.sidecar import check_plugin_library, read_sidecar, sidecar_flavour
from hybridtrt.errors import ArtefactError, EngineError, InputError, MissingDependencyError
from hybridtrt.exporter.io import ATTENTION_MASK, INPUT_IDS, LOGITS, SEQ
from hybridtrt.exporter.manifest import check_rank
from hybridtrt.runtime.buffers import BufferPlan, PingPong, StateSlot
from hybridtrt.runtime.cuda_graphs import (
    GraphApi,
    StaticEngineSession,
    StaticEngineStepper,
    StaticLayout,
    TorchCudaGraphs,
    capture_blocker,
)
from hybridtrt.runtime.generation import GenerationResult, generate, iter_generate

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise ArtefactError(f"engine tensor dtype {name!r} has no torch equivalent here", fix="rebuild the engine with this hybridtrt")
    return _TORCH_DTYPES[name]



@dataclass(frozen=True)
class TrtState:
    """Handle to the states held in a `TrtModel`'s device buffers (not the tensors themselves).

    Attributes:
        generation: Which `zero_state` call it descends from.
        steps: Calls made since then.
        batch / past: Rows and cached positions.
    """

    generation: int
    steps: int
    batch: int
    past: int


class TrtModel:
    """A TensorRT engine with its sidecar. Implements the `Stepper` protocol.

    Args:
        engine_path: ``model.engine`` written by ``hybridtrt build`` (``model.engine.json`` beside it).
        plugins: Plugin library to load instead of the sidecar's path (its sha256 must match).
        device: CUDA device index.
        cuda_graphs: Replay the decode steps of a static-cache engine as CUDA graphs (no effect on a
            dynamic-cache engine, whose decode shapes change every step, nor on an engine whose MoE experts are
            function bodies: `capture_blocker`).
        communicator: This process's NCCL communicator when the engine is one rank of an ``export --tp N``
            (`hybridtrt.runtime.communicators.NcclCommunicator`, made on ``device``; the N processes are started
            by `hybridtrt.runtime.tensor_parallel.TensorParallelModel`): it is set on the execution context
            (``IExecutionContext::setCommunicator``). Without one, a rank's engine is refused; with one, an
            engine of another rank or world is.

    Raises:
        MissingDependencyError: No TensorRT bindings or no CUDA GPU.
        ArtefactError: Missing engine/sidecar, or a plugin library missing or with another hash.
        EngineError: TensorRT version or GPU differs from the build's, the plugin library could not be loaded (or
            another library with the same creators is loaded in this process), deserialization failed, or
            TensorRT refused the communicator.
    """

    backend = "tensorrt"

    def __init__(
        self, engine_path: str | Path, *, plugins: str | Path | None = None, device: int = 0, cuda_graphs: bool = True, communicator: Any = None
    ) -> None:
        self.engine_path = Path(engine_path)
        trt = import_tensorrt()
        self.device = self._select_device(device)
        if not self.engine_path.is_file():
            raise ArtefactError(f"engine {self.engine_path} does not exist", fix="build it with `hybridtrt build EXPORT_DIR -o model.engine`")
        self.sidecar = read_sidecar(self.engine_path)
        tp = self.sidecar.get("tensor_parallel")
        if tp and communicator is None:  # its DistCollective layers need the other ranks' processes and an NCCL communicator
            raise ArtefactError(
                f"engine {self.engine_path} is rank {tp.get('rank')} of a {tp.get('world')}-rank tensor-parallel model: it runs only as one of "
                f"{tp.get('world')} processes (one per GPU) joined by NCCL, and this process is one rank alone",
                fix=f"`hybridtrt generate {self.engine_path} …` starts all {tp.get('world')} ranks (Python: hybridtrt.runtime.tensor_parallel.TensorParallelModel)",
            )
        if communicator is not None:
            check_rank(self.engine_path, tp, communicator.rank, communicator.world)
        self.communicator = communicator
        self.flavour = sidecar_flavour(self.sidecar)
        self.plan = BufferPlan.from_sidecar(self.sidecar)
        self._check_compatible(trt)
        self.plugin_library = check_plugin_library(self.sidecar, plugins)

        self._logger = trt.Logger(trt.Logger.WARNING)
        load_plugin_library(trt, self.plugin_library)  # once per process: a second model reuses the handle
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.engine_path}", fix="rebuild the engine with this TensorRT on this GPU")
        self.in_place = self._aliased_states()
        self.context = self.engine.create_execution_context()
        if communicator is not None and not self.context.set_communicator(communicator.capsule()):
            raise EngineError(
                f"TensorRT refused rank {communicator.rank}'s NCCL communicator for {self.engine_path}",
                fix="one process per GPU, every rank's communicator made from one unique id (TensorParallelModel does both); NCCL_DEBUG=INFO says more",
            )
        self.cuda_stream = self._new_stream()
        self._profile: int | None = None
        self._pp = PingPong(batch=0)
        self._generation = 0
        self._static: StaticEngineStepper | None = None
        #: Why a static-cache engine's decode steps run eagerly although CUDA graphs were asked for (None: they don't).
        self.capture_blocker: str | None = None
        if self.flavour.static:
            self._static = self._static_stepper(cuda_graphs)
        else:
            self._allocate()

    # -- setup ----------------------------------------------------------------------------------
    # The CUDA touch points, kept apart so that tests can run the bookkeeping with a fake
    # TensorRT on the CPU (tests/runtime/test_buffers.py).
    def _select_device(self, index: int) -> torch.device:
        if not torch.cuda.is_available():
            raise MissingDependencyError(
                "the TensorRT backend needs a CUDA GPU visible to torch (torch.cuda.is_available() is False)",
                fix="run on a machine with an NVIDIA GPU and a CUDA build of torch",
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        return device

    def _new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.cuda_stream)

    def _empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D device buffer (every buffer of the model is allocated here, once)."""
        return torch.empty(numel, dtype=dtype, device=self.device)

    def _graph_api(self) -> GraphApi:
        """CUDA-graph capture and replay on the model's stream."""
        return TorchCudaGraphs(self.cuda_stream)

    def _compute_capability(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"{major}.{minor}"

    def _check_compatible(self, trt: Any) -> None:
        built = str(self.sidecar["tensorrt"])
        here = str(trt.__version__)
        if built.split(".")[:2] != here.split(".")[:2]:
            raise EngineError(f"{self.engine_path} was built with TensorRT {built}, this is TensorRT {here}", fix="rebuild the engine with this TensorRT (`hybridtrt build`)")
        cc = (self.sidecar.get("gpu") or {}).get("compute_capability")
        if cc is not None and cc != self._compute_capability():
            major, minor = self._compute_capability().split(".")
            raise EngineError(
                f"{self.engine_path} was built for compute capability {cc}, this GPU is {major}.{minor}",
                fix="rebuild the engine on this GPU (engines are specific to a GPU architecture)",
            )

    def _aliased_states(self) -> frozenset[str]:
        """``past_name`` of every state whose output the engine aliases to its input (bound to one buffer).

        Raises:
            EngineError: The engine aliases an output to anything but its own state's past input.
        """
        # get_aliased_input_tensor exists from TensorRT 10.15, the first release that can alias engine I/O
        # (IKVCacheUpdateLayer); an engine of an older TensorRT has no aliased I/O to report.
        aliased = getattr(self.engine, "get_aliased_input_tensor", None)
        if aliased is None:
            return frozenset()
        in_place = set()
        for s in self.plan.states:
            source = aliased(s.present_name)
            if source is None:
                continue
            if source != s.past_name:
                raise EngineError(
                    f"{self.engine_path} aliases output {s.present_name} to input {source}, not to {s.past_name}",
                    fix="rebuild the engine from an export of this hybridtrt",
                )
            in_place.add(s.past_name)
        for name in self.plan.outputs:
            if aliased(name) is not None:
                raise EngineError(f"{self.engine_path} aliases output {name} to input {aliased(name)}", fix="rebuild the engine")
        return frozenset(in_place)

    def _allocate(self) -> None:
        plan = self.plan
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in plan.states:
            n = math.prod(s.shape_at(plan.max_batch, plan.max_cache_len))
            dt = _torch_dtype(s.dtype)
            first = self._empty(n, dt)
            # one buffer bound as past and present when the engine updates the state in place
            second = first if s.past_name in self.in_place else self._empty(n, dt)
            self._pairs[s.past_name] = (first, second)
        self._outputs = {name: self._empty(math.prod(plan.output_max_shape(name)), _torch_dtype(dtype)) for name, (_, dtype) in plan.outputs.items()}
        max_seq = max(p.dims[SEQ].max for p in plan.profiles)
        self._ids = self._empty(plan.max_batch * max_seq, _torch_dtype(plan.input_dtypes.get(INPUT_IDS, "int64")))
        self._mask = self._empty(plan.max_batch * plan.max_cache_len, _torch_dtype(plan.input_dtypes.get(ATTENTION_MASK, "int64")))

    def _static_stepper(self, cuda_graphs: bool) -> StaticEngineStepper:
        """The session that runs a static-cache engine: its buffers, profiles, stream and CUDA graphs."""
        if set(self.plan.outputs) != {LOGITS}:
            raise EngineError(
                f"{self.engine_path} has outputs {sorted(self.plan.outputs)} besides its states; the static-cache runtime binds logits only",
                fix="rebuild the engine from an export without per-layer outputs",
            )
        max_seq = max(p.dims[SEQ].max for p in self.plan.profiles)
        layout = StaticLayout.from_sidecar(self.sidecar, shared=self.in_place, max_batch=self.plan.max_batch, max_seq=max_seq)
        self.capture_blocker = capture_blocker(self.sidecar["plugins"]) if cuda_graphs else None
        if self.capture_blocker is not None:
            logging.getLogger(__name__).warning("%s: %s", self.engine_path, self.capture_blocker)
        graphs = self._graph_api() if cuda_graphs and self.capture_blocker is None else None
        session = StaticEngineSession(self.context, layout, self._empty, graphs, stream=self.cuda_stream.cuda_stream, profiles=self.plan.profiles)
        return StaticEngineStepper(session, layout.capacity)

    @property
    def decode_graphs(self) -> Any:
        """The `DecodeGraphs` of a static-cache engine (captures / replays), None otherwise."""
        return self._static.session.decode_graphs if self._static is not None else None

    @property
    def device_bytes(self) -> int:
        """Bytes of the preallocated state and output buffers (TensorRT's activations excluded)."""
        if self._static is not None:
            return self._static.session.nbytes
        return self.plan.total_bytes(in_place=self.in_place)

    # -- Stepper --------------------------------------------------------------------------------
    def zero_state(self, batch: int) -> TrtState:
        """Start a generation of ``batch`` rows: zero the conv/SSM buffers (KV starts empty)."""
        if not 1 <= batch <= self.plan.max_batch:
            raise InputError(f"batch {batch} is outside the engine's 1..{self.plan.max_batch}", fix=f"rebuild with `hybridtrt build --max-batch {batch}`")
        self._generation += 1
        self._pp.reset(batch)
        with self._on_stream():
            if self._static is not None:
                self._static.zero_state(batch)  # every state, KV included (read at all positions)
            else:
                for s in self.plan.states:
                    if not s.grows:
                        self._view(s, 0, s.shape_at(batch, 0)).zero_()
        return TrtState(self._generation, 0, batch, 0)

    def check_request(self, batch: int, positions: int, prefill_chunk: int) -> None:
        """Refuse, before anything runs, a generation that needs more cache positions than the engine holds.

        Raises:
            InputError: ``positions`` (prompt with padding + new tokens) beyond the static cache's capacity or the
                dynamic engine's ``--max-cache-len``.
        """
        if self.flavour.static and positions > int(self.flavour.max_cache_len or 0):
            raise InputError(
                f"the prompt and new tokens need {positions} cache positions, this engine's export has --max-cache-len {self.flavour.max_cache_len}",
                fix=f"re-export with `--kv-cache static --max-cache-len {positions}` or more and rebuild, or ask for fewer tokens",
            )
        if not self.flavour.static and positions > self.plan.max_cache_len:
            raise InputError(
                f"the prompt and new tokens need {positions} cache positions, the engine's max cache length is {self.plan.max_cache_len}",
                fix=f"rebuild with `hybridtrt build --max-cache-len {positions}` or ask for fewer tokens",
            )

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: TrtState, decode: bool) -> tuple[torch.Tensor, TrtState]:
        """One engine call. See `hybridtrt.runtime.generation.Stepper.step`."""
        self._check_state(state)
        batch, seq = int(input_ids.shape[0]), int(input_ids.shape[1])
        past = self._pp.past
        if batch != self._pp.batch:
            raise InputError(f"input_ids has {batch} rows, the state has {self._pp.batch}", fix="call zero_state(batch) for a new batch size")
        if tuple(attention_mask.shape) != (batch, past + seq):
            raise InputError(f"attention_mask must be [{batch}, {past + seq}] (past + seq), got {tuple(attention_mask.shape)}")
        if seq > 1 and not any(p.name == "prefill" for p in self.plan.profiles):
            logits = None
            for t in range(seq):  # decode-only engine: feed the prompt token by token
                logits, state = self.step(input_ids[:, t : t + 1], attention_mask[:, : past + t + 1], state, decode=True)
            return logits, state  # type: ignore[return-value]
        if self._static is not None:
            with self._on_stream():
                logits, _ = self._static.step(input_ids, attention_mask, self._static.session.past, decode)
        else:
            profile = self.plan.check_call(batch, seq, past)
            logits = self._execute(input_ids, attention_mask, batch, seq, past, profile)
        self._pp.swap(seq)
        return logits, TrtState(self._generation, self._pp.steps, batch, self._pp.past)

    def cannot_verify(self) -> str:
        """Why `hybridtrt.runtime.speculative` cannot run here: designed, not built (DESIGN.md §11)."""
        return "a TensorRT model keeps one live state on the device, and the speculative rollback (per-row states, or a per-row static cache position) is not built for it yet"

    # -- internals ------------------------------------------------------------------------------
    def _check_state(self, state: TrtState) -> None:
        if not isinstance(state, TrtState) or state.generation != self._generation or state.steps != self._pp.steps:
            raise InputError(
                "stale TensorRT state: the states live in the model's device buffers and only the latest one is valid",
                fix="run one generation at a time per TrtModel (call zero_state again, or load a second TrtModel)",
            )

    def _view(self, slot: StateSlot, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._pairs[slot.past_name][index][: math.prod(shape)].view(shape)

    def _execute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int, seq: int, past: int, profile: int) -> torch.Tensor:
        ctx = self.context
        handle = self.cuda_stream.cuda_stream
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, handle):
                raise EngineError(f"TensorRT refused optimization profile {profile}", fix="rebuild the engine")
            self._profile = profile
        with self._on_stream():
            ids = self._ids[: batch * seq].view(batch, seq)
            ids.copy_(input_ids.to(ids.dtype), non_blocking=True)
            mask = self._mask[: batch * (past + seq)].view(batch, past + seq)
            mask.copy_(attention_mask.to(mask.dtype), non_blocking=True)
            for name, shape in self.plan.binding_shapes(batch, seq, past).items():
                if not ctx.set_input_shape(name, shape):
                    raise InputError(f"TensorRT refused shape {shape} for {name} (profile {profile})", fix="check the engine's limits in its sidecar")
            ctx.set_tensor_address(INPUT_IDS, ids.data_ptr())
            ctx.set_tensor_address(ATTENTION_MASK, mask.data_ptr())
            for s in self.plan.states:
                ctx.set_tensor_address(s.past_name, self._pairs[s.past_name][self._pp.past_index].data_ptr())
                ctx.set_tensor_address(s.present_name, self._pairs[s.past_name][self._pp.present_index].data_ptr())
            for name, buf in self._outputs.items():
                ctx.set_tensor_address(name, buf.data_ptr())
            if not ctx.execute_async_v3(handle):
                raise EngineError("TensorRT execution failed (enqueue returned false)", fix="read TensorRT's log above")
            shape = tuple(ctx.get_tensor_shape(LOGITS))
            logits = self._outputs[LOGITS][: math.prod(shape)].view(shape)
            if logits.dim() == 3:
                logits = logits[:, -1]
            host = logits.to("cpu", torch.float32, copy=True)  # always a copy: the buffer is reused
        self.cuda_stream.synchronize()
        return host

    # -- convenience ----------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, TrtState]:
        """Zero states, then one prefill call: last logits ``[B, V]`` and the state handle."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.step(input_ids, mask, self.zero_state(int(input_ids.shape[0])), decode=False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Copies (on the CPU) of the current states, ``{past_name: tensor}`` — for validation. A static cache's KV is
        trimmed to the positions written (as `OrtModel.named_states` does)."""
        self.cuda_stream.synchronize()
        b, past = self._pp.batch, self._pp.past
        if self._static is not None:
            full = self._static.session.states()
            return {s.past_name: full[s.present_name][:, :, :past] if s.kind in ("key", "value") else full[s.present_name] for s in self.plan.states}
        return {s.past_name: self._view(s, self._pp.past_index, s.shape_at(b, past)).to("cpu", copy=True) for s in self.plan.states}

    def named_states(self, state: TrtState) -> dict[str, torch.Tensor]:
        """``{present_name: CPU tensor}`` of the state returned by the latest `step` (for validation).

        Raises:
            InputError: ``state`` is not the latest one (its buffers have been reused).
        """
        self._check_state(state)
        return {s.present_name: t for s, t in zip(self.plan.states, self.state_tensors().values())}

    @property
    def vocab_size(self) -> int | None:
        """Logits width (the generation loop refuses token ids outside it)."""
        vocab = (self.sidecar.get("model") or {}).get("vocab_size")
        return int(vocab) if vocab is not None else None

    def snapshot(self, state: TrtState, attention_mask: torch.Tensor) -> Any:
        """The backend-independent copy of the latest state (`hybridtrt.runtime.snapshot`)."""
        from hybridtrt.runtime.snapshot import Snapshot

        return Snapshot(self.named_states(state), attention_mask.long().cpu().clone())

    def restore(self, snapshot: Any) -> TrtState:
        """Start a generation from ``snapshot``: zero states, then its tensors into the past buffers."""
        state = self.zero_state(snapshot.batch)
        if self._static is not None:
            with self._on_stream():
                self._static.session.load(snapshot.states, snapshot.past)
            self._pp.past = snapshot.past
            return TrtState(self._generation, self._pp.steps, state.batch, snapshot.past)
        if snapshot.past > self.plan.max_cache_len:
            raise InputError(f"the snapshot holds {snapshot.past} positions, the engine's max cache length is {self.plan.max_cache_len}")
        with self._on_stream():
            for s in self.plan.states:
                value = snapshot.states[s.present_name]
                self._view(s, self._pp.past_index, tuple(value.shape)).copy_(value.to(self.device), non_blocking=True)
        self._pp.past = snapshot.past
        return TrtState(self._generation, self._pp.steps, state.batch, snapshot.past)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> GenerationResult:
        """Same API as `TorchStepper.generate` / `OrtModel.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield ``[B]`` tokens step by step (same as `OrtModel.stream`)."""
        return iter_generate(self, input_ids, attention_mask, **kwargs)


__all__ = ["TrtModel", "TrtState"]
