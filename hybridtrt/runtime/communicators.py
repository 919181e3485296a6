"""The communicators of a tensor-parallel model's processes (DESIGN.md §12): one process per rank.

- `NcclCommunicator`: NCCL's own communicator, what TensorRT's ``IExecutionContext::setCommunicator``
  takes (NvInferRuntime.h; the Python binding ``IExecutionContext.set_communicator`` takes a PyCapsule
  named ``"ncclComm_t"`` around the ``ncclComm_t``: TensorRT's samples/python/attention_mdtrt). It is made
  with NCCL's C API through ``ctypes`` on the ``libnccl.so.2`` that torch's CUDA build already installs
  (the ``nvidia-nccl-cu*`` wheel), as vLLM's ``pynccl`` does: no second package to install or pin.
  Why not the alternatives: ``torch.distributed``'s NCCL process group owns its communicator and hands out
  the raw handle only through a private method (``_comm_ptr``); ``nccl4py`` (what TensorRT's Python sample
  uses) is one more package with its own CUDA dependencies, for the three calls made here. The unique id is
  made once, by the launcher, and handed to every rank (TensorRT's ``sampleDistCollective`` does the same
  through a file).
- `GlooCommunicator`: the CPU stand-in, over ``torch.distributed``'s gloo backend, that runs the same
  collectives between real processes: a rank's ONNX graph on ONNX Runtime (`hybridtrt.runtime.onnxruntime`
  with ``communicator=``) and the fake-TensorRT tests use it. Its all-reduce gathers every rank's tensor and
  sums in rank order, the rank emulator's order (`hybridtrt.runtime.rank_emulator`), so N processes compute
  the same bits as the emulator; NCCL's ring sums in another order (a half-precision sum moves by its rounding).

NCCL's C API used (``nccl.h``, stable since NCCL 2.0; NCCL ≥ 2.19 for TensorRT's collectives,
samples/sampleDistCollective/README.md)::

    ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);            // struct { char internal[128]; }
    ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
    ncclResult_t ncclCommDestroy(ncclComm_t comm);
    ncclResult_t ncclGetVersion(int* version);
    const char*  ncclGetErrorString(ncclResult_t result);
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hybridtrt.errors import EngineError, MissingDependencyError

#: ``NCCL_UNIQUE_ID_BYTES`` (nccl.h).
NCCL_UNIQUE_ID_BYTES = 128
#: The capsule name TensorRT's ``set_communicator`` reads (samples/python/attention_mdtrt).
CAPSULE_NAME = b"ncclComm_t"
#: The oldest NCCL TensorRT's collectives take (samples/sampleDistCollective/README.md: ">= 2.19.0 and < 3.0").
NCCL_MIN_VERSION = (2, 19)
#: How long a rank waits for the others at one collective or at start-up before it gives up.
DEFAULT_TIMEOUT_S = 300.0


class Communicator(Protocol):
    """One rank's end of the collectives between N processes."""

    rank: int
    world: int

    def capsule(self) -> Any:
        """The handle TensorRT's ``set_communicator`` takes."""
        ...

    def close(self) -> None:
        """Release the communicator (after every execution context using it)."""
        ...


def sum_in_rank_order(parts: Sequence[np.ndarray], members: Sequence[int], rank: int, what: str = "") -> np.ndarray:
    """An all-reduce's result on ``rank``: ``parts[m]`` summed over ``members`` in rank order, so every member
    (and every run) gets the same bits. The rank emulator (`hybridtrt.runtime.rank_emulator`) and
    `GlooCommunicator` both sum here.

    Raises:
        ValueError: ``rank`` is not one of ``members``.
    """
    if rank not in members:
        raise ValueError(f"{what}rank {rank} runs an all-reduce over {tuple(members)}, which it is not part of")
    out = parts[members[0]].copy()
    for member in members[1:]:
        out += parts[member]
    return out


class _UniqueId(ctypes.Structure):
    """``ncclUniqueId``. Made from bytes with ``from_buffer_copy``: a ``c_char`` array's constructor stops at
    the first NUL, and an id has NUL bytes (the stand-in test's id has one at byte 73)."""

    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


def nccl_library_path() -> str | None:
    """Where ``libnccl.so.2`` is: ``$HYBRIDTRT_NCCL``, torch's ``nvidia-nccl-cu*`` wheel, or the loader's path."""
    if os.environ.get("HYBRIDTRT_NCCL"):
        return os.environ["HYBRIDTRT_NCCL"]
    try:
        import nvidia.nccl  # type: ignore[import-not-found]  # the wheel torch's CUDA build depends on

        for folder in map(Path, nvidia.nccl.__path__):
            for name in ("lib/libnccl.so.2", "lib/libnccl.so"):
                if (folder / name).is_file():
                    return str(folder / name)
    except ImportError:
        pass
    return ctypes.util.find_library("nccl")


class _Nccl:
    """The few NCCL calls made here, bound once per process."""

    _loaded: _Nccl | None = None

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.path = path
        self.get_error_string = lib.ncclGetErrorString
        self.get_error_string.restype, self.get_error_string.argtypes = ctypes.c_char_p, [ctypes.c_int]
        self.get_version = lib.ncclGetVersion
        self.get_version.restype, self.get_version.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]
        self.get_unique_id = lib.ncclGetUniqueId
        self.get_unique_id.restype, self.get_unique_id.argtypes = ctypes.c_int, [ctypes.POINTER(_UniqueId)]
        self.comm_init_rank = lib.ncclCommInitRank
        self.comm_init_rank.restype = ctypes.c_int
        self.comm_init_rank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]
        self.comm_destroy = lib.ncclCommDestroy
        self.comm_destroy.restype, self.comm_destroy.argtypes = ctypes.c_int, [ctypes.c_void_p]

    @classmethod
    def load(cls) -> _Nccl:
        if cls._loaded is None:
            path = nccl_library_path()
            if path is None:
                raise MissingDependencyError(
                    "tensor-parallel TensorRT engines talk through NCCL, and no libnccl.so.2 was found "
                    "(torch's CUDA build installs one with the nvidia-nccl wheel)",
                    fix="install a CUDA build of torch, or set HYBRIDTRT_NCCL=/path/to/libnccl.so.2",
                )
            try:
                cls._loaded = cls(path)
            except (OSError, AttributeError) as e:
                raise MissingDependencyError(f"{path} is not a usable NCCL library ({e})", fix="point HYBRIDTRT_NCCL at libnccl.so.2 (NCCL ≥ 2.19)") from None
            cls._loaded.check_version()
        return cls._loaded

    def check(self, result: int, call: str) -> None:
        if result != 0:
            reason = self.get_error_string(result)
            raise EngineError(f"NCCL {call} failed: {reason.decode() if reason else f'error {result}'}", fix="check that every rank runs on its own GPU of one node and NCCL_DEBUG=WARN's log")

    def version(self) -> tuple[int, int, int]:
        code = ctypes.c_int()
        self.check(self.get_version(ctypes.byref(code)), "ncclGetVersion")
        # nccl.h NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z since 2.9 (X*1000 + Y*100 + Z before).
        v = code.value
        return (v // 10000, v // 100 % 100, v % 100) if v >= 20900 else (v // 1000, v // 100 % 10, v % 100)

    def check_version(self) -> None:
        found = self.version()
        if found[:2] < NCCL_MIN_VERSION or found[0] >= 3:
            raise MissingDependencyError(
                f"{self.path} is NCCL {'.'.join(map(str, found))}; TensorRT's collectives need NCCL >= 2.19, < 3.0",
                fix="install a newer NCCL (torch's CUDA build pins one) or set HYBRIDTRT_NCCL",
            )


def nccl_unique_id() -> bytes:
    """A new NCCL unique id (made once, by the launcher; every rank joins with it)."""
    nccl = _Nccl.load()
    uid = _UniqueId()
    nccl.check(nccl.get_unique_id(ctypes.byref(uid)), "ncclGetUniqueId")
    return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)


def make_capsule(pointer: int, name: bytes = CAPSULE_NAME) -> Any:
    """A PyCapsule named ``name`` around ``pointer`` (what ``set_communicator`` takes)."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.c_void_p(pointer), name, None)


def capsule_pointer(capsule: Any, name: bytes = CAPSULE_NAME) -> int:
    """The pointer a capsule made by `make_capsule` holds (raises ValueError for another capsule name)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get(capsule, name) or 0)


class NcclCommunicator:
    """This process's NCCL communicator as rank ``rank`` of ``world`` (the current CUDA device is the rank's:
    set it first, as ``ncclCommInitRank`` binds the device current at the call).

    Raises:
        MissingDependencyError: No NCCL library, or one older than 2.19.
        EngineError: ``ncclCommInitRank`` failed.
    """

    def __init__(self, unique_id: bytes, rank: int, world: int) -> None:
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        self.rank, self.world = rank, world
        self._nccl = _Nccl.load()
        comm = ctypes.c_void_p()
        self._nccl.check(self._nccl.comm_init_rank(ctypes.byref(comm), world, _UniqueId.from_buffer_copy(unique_id), rank), f"ncclCommInitRank(rank {rank} of {world})")
        self.pointer = int(comm.value or 0)

    def capsule(self) -> Any:
        if not self.pointer:
            raise EngineError(f"rank {self.rank}'s NCCL communicator is closed", fix="make a new one")
        return make_capsule(self.pointer)

    def close(self) -> None:
        if self.pointer:
            self._nccl.check(self._nccl.comm_destroy(ctypes.c_void_p(self.pointer)), "ncclCommDestroy")
            self.pointer = 0


class GlooCommunicator:
    """Rank ``rank`` of ``world`` processes joined by gloo (``torch.distributed``) through the file ``store``.

    Its collectives take and return NumPy arrays: `all_reduce` sums in rank order over ``group`` (all
    ranks when empty), `all_gather` concatenates along axis 0. Its `capsule` carries an id of this
    process's communicator, so a fake TensorRT can find it again (`GlooCommunicator.from_capsule`).
    """

    _live: dict[int, GlooCommunicator] = {}

    def __init__(self, store: str | Path, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self._dist = dist
        file_store = dist.FileStore(str(store), world)
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group; one rank per process")
        dist.init_process_group("gloo", store=file_store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        GlooCommunicator._live[id(self)] = self
        #: Collectives this rank has made, in order: ``(operation, shape)``.
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def capsule(self) -> Any:
        return make_capsule(id(self))

    @classmethod
    def from_capsule(cls, capsule: Any) -> GlooCommunicator:
        return cls._live[capsule_pointer(capsule)]

    def _gather(self, value: np.ndarray) -> list[np.ndarray]:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(value))
        # Sizes may differ on axis 0 (an uneven vocabulary split): exchange the shapes first.
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64))
        widest = int(max(s.item() for s in sizes))
        padded = torch.zeros((widest, *t.shape[1:]), dtype=t.dtype)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._dist.all_gather(parts, padded)
        return [p[: int(s.item())].numpy() for p, s in zip(parts, sizes, strict=True)]

    def all_reduce(self, value: np.ndarray, group: Sequence[int] = ()) -> np.ndarray:
        members = tuple(group) or tuple(range(self.world))
        if self.rank not in members:  # before the exchange: the others would wait for this rank's part
            raise ValueError(f"rank {self.rank} runs an all-reduce over {members}, which it is not part of")
        self.calls.append(("all_reduce", tuple(value.shape)))
        return sum_in_rank_order(self._gather(value), members, self.rank)  # every rank takes part in the gather

    def all_gather(self, value: np.ndarray) -> np.ndarray:
        self.calls.append(("all_gather", tuple(value.shape)))
        return np.concatenate(self._gather(value), axis=0)

    def close(self) -> None:
        GlooCommunicator._live.pop(id(self), None)
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
