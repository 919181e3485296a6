"""A tensor-parallel model as N processes, one per rank (DESIGN.md §12): ``export --tp N``'s ranks on
TensorRT (one engine and one GPU per rank, NCCL) or on ONNX Runtime (CPU, gloo).

`TensorParallelModel` is the driver, in the caller's process, and implements the `Stepper` protocol,
so the one generation loop (`hybridtrt.runtime.generation`: chunked prefill, sampling, stopping) runs
once, here. Each call is sent to every rank's process, which runs its own engine or graphs on its own
states; the ranks meet only inside their engines, at the collectives. Every rank gets every call with
the same inputs, in the same order: that is the lock step, and no rank can run ahead (a rank runs a
call only when the driver sends it, and the driver sends the next call only when every rank has
answered the last). The logits are all-gathered inside the graphs, so every rank holds the same
logits; rank 0's come back. The states stay on the ranks (their devices' memory): the driver holds a
handle to them, as `hybridtrt.runtime.tensorrt.TrtModel` does.

How a rank's process starts (`RankSpec.factory`; `tensorrt_rank` and `onnxruntime_rank` here): it
selects its device (rank r on GPU r of the node), joins the communicator from the rendezvous the
driver made (an NCCL unique id, or a gloo file store), loads its rank's artefact with that
communicator (which refuses another rank's or world's artefact) and reports ready. A rank that fails
sends its error back, and the driver ends every rank (the others would wait at their next collective
forever) and raises the error naming the rank. Processes are started with ``spawn`` (CUDA cannot be
used in a forked child).
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridtrt import errors
from hybridtrt.errors import EngineError, InputError
from hybridtrt.exporter.integrity import SAMPLED
from hybridtrt.runtime.communicators import DEFAULT_TIMEOUT_S
from hybridtrt.runtime.generation import GenerationResult, generate, iter_generate

#: Communicators a `RankSpec` can ask for.
COMMUNICATORS = ("nccl", "gloo")


@dataclass(frozen=True)
class RankSpec:
    """What every rank's process loads, and how (sent to the spawned processes: plain data).

    Attributes:
        artefacts: Rank r's artefact at index r (an engine, or an export directory).
        communicator: ``"nccl"`` (GPUs) or ``"gloo"`` (CPU processes).
        factory: ``"module:function"`` that makes a rank's ``(model, communicator)`` in its process, called
            as ``function(spec, rank, rendezvous)`` (`tensorrt_rank`, `onnxruntime_rank`).
        options: Keyword arguments for the rank's model (``plugins``, ``cuda_graphs``; ``threads``, ``bf16``).
        backend: What the ranks run, for messages.
    """

    artefacts: tuple[str, ...]
    communicator: str
    factory: str
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "tensorrt"

    @property
    def world(self) -> int:
        return len(self.artefacts)


def tensorrt_rank(spec: RankSpec, rank: int, rendezvous: Any) -> tuple[Any, Any]:
    """Rank ``rank``'s engine on GPU ``rank``, its NCCL communicator set on the execution context."""
    from hybridtrt.runtime.communicators import NcclCommunicator
    from hybridtrt.runtime.tensorrt import TrtModel

    if not torch.cuda.is_available() or torch.cuda.device_count() <= rank:
        raise errors.MissingDependencyError(
            f"rank {rank} of {spec.world} needs GPU {rank}, and torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)",
            fix=f"run on a node with {spec.world} GPUs (CUDA_VISIBLE_DEVICES lists the ones to use, in rank order)",
        )
    torch.cuda.set_device(rank)  # ncclCommInitRank binds the current device
    communicator = NcclCommunicator(rendezvous, rank, spec.world)
    try:
        return TrtModel(spec.artefacts[rank], device=rank, communicator=communicator, **spec.options), communicator
    except BaseException:
        communicator.close()
        raise


def onnxruntime_rank(spec: RankSpec, rank: int, rendezvous: Any) -> tuple[Any, Any]:
    """Rank ``rank``'s export on ONNX Runtime (CPU), its collectives through gloo."""
    from hybridtrt.runtime.communicators import GlooCommunicator
    from hybridtrt.runtime.onnxruntime import OrtModel

    communicator = GlooCommunicator(rendezvous, rank, spec.world)
    try:
        return OrtModel(spec.artefacts[rank], communicator=communicator, **spec.options), communicator
    except BaseException:
        communicator.close()
        raise


def _resolve(factory: str) -> Any:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)


def _describe(error: BaseException) -> dict[str, Any]:
    """An error as plain data (it crosses a process boundary)."""
    described = {"type": type(error).__name__, "message": str(error), "trace": traceback.format_exc()}
    if isinstance(error, errors.HybridTrtError):
        described.update(message=error.message, fix=error.fix)
    return described


#: A rank's own methods the driver asks rank 0 (limits; every rank has the same).
_RANK0_CALLS = ("check_request", "max_prefill_tokens")


def _worker(spec: RankSpec, rank: int, rendezvous: Any, conn: Any) -> None:
    """A rank's process: make the model, then answer the driver's calls until it says stop."""
    communicator = None
    try:
        model, communicator = _resolve(spec.factory)(spec, rank, rendezvous)
        methods = [name for name in _RANK0_CALLS if callable(getattr(model, name, None))]
        conn.send(("ready", {"vocab_size": getattr(model, "vocab_size", None), "pid": os.getpid(), "methods": methods}))
        state, shared = None, None
        while True:
            op, *args = conn.recv()
            if op == "stop":
                break
            if op == "zero_state":
                batch, name = args
                state = model.zero_state(batch)
                if rank == 0 and name is not None and (shared is None or shared.name != name):
                    shared = _attach(name, shared)
                conn.send(("ok", None))
            elif op == "step":
                ids, mask, decode = args
                logits, state = model.step(torch.from_numpy(ids), torch.from_numpy(mask), state, decode)
                conn.send(("ok", _hand_back(logits, shared) if rank == 0 else None))
            elif op == "call" and args[0] in _RANK0_CALLS:  # a local method of rank 0's model (no collective in it)
                name, call_args = args
                conn.send(("ok", getattr(model, name)(*call_args)))
            else:
                raise ValueError(f"unknown request {op!r}")
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the driver, which ends the ranks
        try:
            conn.send(("error", _describe(e)))
        except (OSError, ValueError):
            pass
    finally:
        if communicator is not None:
            try:
                communicator.close()
            except Exception:  # noqa: BLE001 - the process is ending; the driver has the first error
                pass


def _attach(name: str, old: Any) -> Any:
    """The driver's shared logits buffer ``name`` (rank 0's side; the driver owns and unlinks it)."""
    from multiprocessing import shared_memory

    if old is not None:
        old.close()
    return shared_memory.SharedMemory(name=name)


def _hand_back(logits: torch.Tensor, shared: Any) -> Any:
    """Rank 0's logits for the driver: written into the shared buffer when they fit (``("shared", shape)``),
    else the array itself. Through the pipe, 4 MiB of logits (batch 8, 131,072 tokens) took 19 ms a step
    (benchmarks/tp_driver.py); through shared memory one copy on each side."""
    array = logits.float().cpu().numpy()
    if shared is None or array.nbytes > shared.size:
        return array
    np.ndarray(array.shape, np.float32, buffer=shared.buf)[...] = array
    return ("shared", array.shape)


@dataclass(frozen=True)
class TpState:
    """Handle to the states the ranks hold (not the tensors themselves): which `zero_state` it descends
    from and how many calls since, as `hybridtrt.runtime.tensorrt.TrtState`."""

    generation: int
    steps: int
    batch: int


class TensorParallelModel:
    """N processes running the N ranks of a tensor-parallel model in lock step. Implements `Stepper`.

    Args:
        spec: What each rank loads (`tensor_parallel_spec` makes it from an export or an engine).
        timeout_s: How long the driver waits for a rank to start or to answer one call.
        shared_logits: Rank 0's logits come back through shared memory (default), not the pipe
            (benchmarks/tp_driver.py measures both).

    Raises:
        The first rank's error that stopped it (its type, its message prefixed with the rank); EngineError
        when a rank's process exits or does not answer in ``timeout_s``.
    """

    def __init__(self, spec: RankSpec, *, timeout_s: float = DEFAULT_TIMEOUT_S, shared_logits: bool = True) -> None:
        if spec.communicator not in COMMUNICATORS:
            raise InputError(f"communicator {spec.communicator!r} is not one of {', '.join(COMMUNICATORS)}")
        self.spec, self.timeout_s = spec, timeout_s
        self.backend = f"{spec.backend} ×{spec.world} ({spec.communicator})"
        self._folder = tempfile.TemporaryDirectory(prefix="hybridtrt-tp-")
        self._processes: list[Any] = []
        self._conns: list[Any] = []
        self._generation = 0
        self._current: TpState | None = None
        self._shared: Any = None  # rank 0's logits come back through it (`_hand_back`)
        self._shared_logits = shared_logits
        context = multiprocessing.get_context("spawn")
        rendezvous = self._rendezvous()
        try:
            for rank in range(spec.world):
                parent, child = context.Pipe()
                process = context.Process(target=_worker, args=(spec, rank, rendezvous, child), name=f"hybridtrt-rank{rank}", daemon=True)
                process.start()
                child.close()
                self._processes.append(process)
                self._conns.append(parent)
            ready = self._gather("starting")
        except BaseException:
            self.close()
            raise
        self.ranks = ready
        self._vocab_size = ready[0].get("vocab_size")
        for name in ready[0]["methods"]:  # the generation loop asks for these only where the model has them
            setattr(self, name, self._rank0_method(name))

    def _rendezvous(self) -> Any:
        if self.spec.communicator == "nccl":  # what every rank needs, checked once here before N processes start
            from hybridtrt.engine.build import import_tensorrt
            from hybridtrt.runtime.communicators import nccl_unique_id

            if self.spec.backend == "tensorrt":
                import_tensorrt()
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if gpus < self.spec.world:
                raise errors.MissingDependencyError(
                    f"{self.spec.world} ranks run on {self.spec.world} GPUs of one node (rank r on GPU r), and torch sees {gpus}",
                    fix=f"run on a node with {self.spec.world} GPUs (CUDA_VISIBLE_DEVICES lists them in rank order)",
                )
            return nccl_unique_id()
        return str(Path(self._folder.name) / "gloo-store")

    # -- the ranks ------------------------------------------------------------------------------
    def _send(self, message: tuple, ranks: range | None = None) -> None:
        if not self._conns:
            raise EngineError("this tensor-parallel model is closed", fix="make a new TensorParallelModel")
        for rank in ranks if ranks is not None else range(self.spec.world):
            try:
                self._conns[rank].send(message)
            except (OSError, ValueError):
                self._fail(rank, None)

    def _gather(self, what: str, ranks: range | None = None) -> list[Any]:
        """Every rank's answer to the last message, in rank order; the first failure ends all ranks."""
        ranks = ranks if ranks is not None else range(self.spec.world)
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(answers) < len(ranks):
            waiting = [r for r in ranks if r not in answers]
            ready = multiprocessing.connection.wait([self._conns[r] for r in waiting], timeout=0.5)
            for rank in waiting:
                conn = self._conns[rank]
                if conn in ready:
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        self._fail(rank, None)
                    if kind == "error":
                        self._fail(rank, payload)
                    answers[rank] = payload
                elif self._processes[rank].exitcode is not None and not conn.poll():
                    self._fail(rank, None)
            if time.monotonic() > deadline:
                slow = [r for r in ranks if r not in answers]
                self.close(wait=False)
                raise EngineError(
                    f"rank(s) {', '.join(map(str, slow))} did not answer within {self.timeout_s:.0f} s while {what}",
                    fix="a rank waits at a collective for the others: check every rank's log (NCCL_DEBUG=WARN) and that each has its own GPU",
                )
        return [answers[r] for r in ranks]

    def _fail(self, rank: int, described: dict[str, Any] | None) -> None:
        code = self._processes[rank].exitcode
        self.close(wait=False)  # the other ranks may wait at a collective for this one: end them
        if described is None:
            raise EngineError(f"rank {rank}'s process ended (exit code {code}) without an answer", fix="its output above says why")
        kind = getattr(errors, described["type"], None)
        if isinstance(kind, type) and issubclass(kind, errors.HybridTrtError):
            raise kind(f"rank {rank}: {described['message']}", fix=described.get("fix"))
        raise EngineError(
            f"rank {rank} failed: {described['type']}: {described['message']}",
            fix="an internal error; its traceback:\n" + described["trace"].rstrip(),
        )

    def close(self, wait: bool = True) -> None:
        """Stop every rank's process (idempotent): ask them to stop and wait for them (``wait``), else
        terminate them at once (after a failure, when they may be waiting at a collective)."""
        for conn in self._conns if wait else ():
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for process in self._processes:
            if wait:
                process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._processes = [], []
        if self._shared is not None:
            self._shared.close()
            self._shared.unlink()
            self._shared = None
        self._folder.cleanup()

    def __enter__(self) -> TensorParallelModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_processes", None):
            self.close()

    # -- Stepper --------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.spec.world

    @property
    def vocab_size(self) -> int | None:
        return self._vocab_size

    def zero_state(self, batch: int) -> TpState:
        from multiprocessing import shared_memory

        need = int(batch) * int(self._vocab_size or 0) * 4 * self._shared_logits  # fp32 logits [batch, vocab]
        if need and (self._shared is None or self._shared.size < need):
            if self._shared is not None:
                self._shared.close()
                self._shared.unlink()
            self._shared = shared_memory.SharedMemory(create=True, size=need)
        self._send(("zero_state", int(batch), self._shared.name if self._shared is not None else None))
        self._gather("zeroing the states")
        self._generation += 1
        self._current = TpState(self._generation, 0, int(batch))
        return self._current

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: TpState, decode: bool) -> tuple[torch.Tensor, TpState]:
        if state != self._current:
            raise InputError(
                "this state is not the ranks' current one (a later zero_state or step replaced it): the ranks hold one generation's states",
                fix="step the state the last call returned",
            )
        ids = np.ascontiguousarray(input_ids.cpu().numpy().astype(np.int64))
        mask = np.ascontiguousarray(attention_mask.cpu().numpy().astype(np.int64))
        self._send(("step", ids, mask, bool(decode)))
        logits = self._gather("stepping")[0]
        if isinstance(logits, tuple):  # in the shared buffer (`_hand_back`)
            logits = np.ndarray(logits[1], np.float32, buffer=self._shared.buf).copy()
        self._current = TpState(state.generation, state.steps + 1, state.batch)
        return torch.from_numpy(logits), self._current

    def _rank0_method(self, name: str) -> Any:
        """Rank 0's ``name`` (`_RANK0_CALLS`: its limits, the same on every rank: one architecture, one build)."""

        def call(*args: Any) -> Any:
            self._send(("call", name, args), range(1))
            return self._gather(name, range(1))[0]

        call.__name__ = name
        return call

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> GenerationResult:
        """Same API as `TorchStepper.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield ``[B]`` tokens step by step."""
        return iter_generate(self, input_ids, attention_mask, **kwargs)


def tensor_parallel_spec(artefact: str | Path, *, integrity: str | None = SAMPLED, **options: Any) -> RankSpec:
    """The `RankSpec` of a tensor-parallel artefact.

    Args:
        artefact: The top directory of ``export --tp N`` (its ranks run on ONNX Runtime, CPU processes
            joined by gloo), or one rank's engine built from it, e.g. ``OUT/rank0/model.engine`` (every
            rank's engine of the same name runs on its own GPU, joined by NCCL).
        integrity: The ranks' file check when reading an export (`read_tp_manifest`).
        **options: For each rank's model (`OrtModel`: ``threads``, ``bf16``; `TrtModel`: ``plugins``, ``cuda_graphs``).

    Raises:
        ArtefactError: Not a tensor-parallel artefact, or a rank missing or not the one its place says.
    """
    from hybridtrt.engine.sidecar import read_sidecar
    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.manifest import TP_MANIFEST
    from hybridtrt.exporter.tensor_parallel import rank_dir, read_tp_manifest

    path = Path(artefact)
    if path.is_dir():
        top, _ = read_tp_manifest(path, integrity=integrity)
        world = int(top["tensor_parallel"]["world"])
        return RankSpec(tuple(str(path / rank_dir(r)) for r in range(world)), "gloo", f"{__name__}:onnxruntime_rank", options, "onnxruntime")
    sidecar = read_sidecar(path)
    tp = sidecar.get("tensor_parallel")
    if not tp:
        raise ArtefactError(f"{path} is a one-device engine", fix="run it with hybridtrt.runtime.load (or `hybridtrt generate ENGINE`)")
    rank, world = int(tp["rank"]), int(tp["world"])
    root = path.resolve().parent.parent
    if path.resolve().parent.name != rank_dir(rank) or not (root / TP_MANIFEST).is_file():
        raise ArtefactError(
            f"{path} is rank {rank} of {world}, and the other ranks' engines are found beside it: it must be in {rank_dir(rank)}/ of the "
            f"tensor-parallel export (with {TP_MANIFEST} above it)",
            fix=f"build every rank in place: hybridtrt build OUT -o {path.name}",
        )
    engines = []
    for r in range(world):
        engine = root / rank_dir(r) / path.name
        if not engine.is_file():
            raise ArtefactError(f"rank {r}'s engine {engine} does not exist", fix=f"hybridtrt build {root} -o {path.name} builds every rank's")
        theirs = read_sidecar(engine).get("tensor_parallel") or {}
        if (theirs.get("rank"), theirs.get("world")) != (r, world):
            raise ArtefactError(f"{engine} is rank {theirs.get('rank')} of {theirs.get('world')}, not rank {r} of {world}", fix=f"hybridtrt build {root} -o {path.name}")
        engines.append(str(engine))
    return RankSpec(tuple(engines), "nccl", f"{__name__}:tensorrt_rank", options, "tensorrt")
