"""A fake ``tensorrt`` module that runs `TrtModel` on the CPU (shared by the runtime tests).

The "engine" is the ONNX Runtime session of the graph the sidecar names. Its execution context checks every
shape against the active optimization profile, reads its inputs from and writes its outputs to the buffers bound
by address (every buffer `TrtModel` allocates goes through ``_empty``, so addresses resolve to tensors), and
enforces TensorRT's binding rule: a state's ``past`` and ``present`` share one buffer exactly when the engine
aliases them (``get_aliased_input_tensor``). `FakeGraphs` captures the addresses, shapes and profile bound at
capture time and executes nothing; a replay runs with what it captured — so a replay with the wrong buffer parity
computes a wrong token. The plugin registry follows TensorRT's documented rule (NvInferRuntimeCommon.h):
``load_library`` returns None when any of the library's creators is already registered.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import torch

from hybridtrt.engine.sidecar import write_sidecar
from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS
from hybridtrt.runtime.onnxruntime import OrtSession

#: The CUDA stream handle of every fake model (a non-default stream: not 0).
STREAM = 7


class FakeContext:
    def __init__(self, session: OrtSession, sidecar: dict, aliases: dict[str, str], buffers: dict[int, torch.Tensor]) -> None:
        self.session = session
        self.sidecar = sidecar
        self.aliases = aliases  # the engine's output -> input aliasing
        self.profiles = sidecar["profiles"]
        self.buffers = buffers
        self.profile = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.out_shapes: dict[str, tuple] = {}
        self.calls: list[tuple[int, tuple]] = []
        self.streams: set[int] = set()

    def set_optimization_profile_async(self, index, stream):
        self.streams.add(stream)
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.profiles[self.profile]["shapes"][name]
        assert all(a <= d <= b for a, d, b in zip(lo, shape, hi)), (name, shape, self.profile)
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.streams.add(stream)
        self.execute(dict(self.addresses), dict(self.shapes), self.profile)
        return True

    def execute(self, addresses: dict[str, int], shapes: dict[str, tuple], profile: int) -> None:
        feeds = {n: self.buffers[addresses[n]][: int(torch.Size(s).numel())].view(s).clone() for n, s in shapes.items()}
        for past, present in ((s["past_name"], s["present_name"]) for s in self.sidecar["states"]):
            if self.aliases.get(present) == past:
                assert addresses[past] == addresses[present], f"engine aliases {present} to {past}, bound apart"
            else:
                assert addresses[past] != addresses[present], f"{past} and {present} share a buffer"
        self.calls.append((profile, shapes["input_ids"]))
        for name, value in self.session.run(feeds).items():
            out = torch.from_numpy(value)
            self.buffers[addresses[name]][: out.numel()].copy_(out.flatten())
            self.out_shapes[name] = tuple(out.shape)

    def get_tensor_shape(self, name):
        return self.out_shapes[name]


class FakeGraphs:
    """`GraphApi`: capture records what is bound (executes nothing, as stream capture); replay runs it."""

    def __init__(self, context: FakeContext) -> None:
        self.context = context

    def capture(self, launch):
        return dict(self.context.addresses), dict(self.context.shapes), self.context.profile

    def replay(self, graph):
        self.context.streams.add(STREAM)
        self.context.execute(*graph)


class FakeRegistry:
    """``IPluginRegistry`` with TensorRT's rule: a load whose creators are already registered returns None."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.creators: set[tuple[str, str, str]] = set()

    def load_library(self, path):
        self.calls.append(str(path))
        if self.creators & HYBRIDTRT_CREATORS:
            return None
        self.creators |= HYBRIDTRT_CREATORS
        return object()

    def get_creator(self, name, version, namespace):
        return object() if (name, version, namespace) in self.creators else None


class FakeRankContext(FakeContext):
    """The context of one rank's engine (``export --tp N``): it runs only once TensorRT is given the rank's
    communicator (``set_communicator``, a capsule named ``ncclComm_t``: TensorRT's Python binding), then runs
    the rank's graph cut at its collectives, which go through that communicator to the other processes."""

    def __init__(self, graph_path, *args) -> None:
        super().__init__(None, *args)
        self.graph_path = graph_path
        self.capsules: list = []

    def set_communicator(self, capsule) -> bool:
        from hybridtrt.runtime.communicators import GlooCommunicator
        from hybridtrt.runtime.rank_emulator import CollectiveSession

        self.capsules.append(capsule)
        self.session = CollectiveSession(self.graph_path, GlooCommunicator.from_capsule(capsule))  # KeyError: not a live communicator's capsule
        return True

    def execute(self, *args) -> None:
        assert self.session is not None, "a rank's engine ran without a communicator"
        super().execute(*args)


def fake_tensorrt(session, sidecar: dict, contexts: list, aliases: dict[str, str] | None = None, buffers: dict | None = None, rank_graph=None) -> types.ModuleType:
    """A ``tensorrt`` module whose engines run ``session`` (``rank_graph``: a rank's graph file, run by a
    `FakeRankContext` once its communicator is set)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.1.0"
    aliases = aliases or {}
    buffers = {} if buffers is None else buffers
    registry = FakeRegistry()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Engine:
        def get_aliased_input_tensor(self, name):
            return aliases.get(name)

        def create_execution_context(self):
            if rank_graph is not None:
                contexts.append(FakeRankContext(rank_graph, sidecar, aliases, buffers))
            else:
                contexts.append(FakeContext(session, sidecar, aliases, buffers))
            return contexts[-1]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine()

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.init_libnvinfer_plugins = lambda logger, ns: True
    trt.registry = registry
    trt.get_plugin_registry = lambda: registry
    trt.TensorIOMode = types.SimpleNamespace(INPUT=0, OUTPUT=1)
    trt.buffers = buffers
    return trt


def cpu_trt_model(monkeypatch, export_dir: Path, sidecar: dict, engine: Path, aliases=None, trt=None, **kwargs):
    """``(TrtModel on the CPU, its fake context)`` for ``sidecar`` written beside ``engine``; ``trt``: reuse a fake
    module (several models in one process), else a new one is installed as ``tensorrt``."""
    engine.write_bytes(b"fake engine")
    write_sidecar(sidecar, engine)
    contexts: list = []
    if trt is None:
        session = OrtSession(export_dir / sidecar["source"]["onnx"])
        trt = fake_tensorrt(session, sidecar, contexts, aliases)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    model = cpu_trt_class(trt.buffers)(engine, **kwargs)
    return model, model.context


def cpu_trt_class(buffers: dict) -> type:
    """`TrtModel` with its CUDA touch points on the CPU, its buffers registered in ``buffers`` by address."""
    from hybridtrt.runtime import tensorrt as trt_runtime

    class CpuTrtModel(trt_runtime.TrtModel):
        def _select_device(self, index):
            return torch.device("cpu")

        def _new_stream(self):
            return types.SimpleNamespace(cuda_stream=STREAM, synchronize=lambda: None)

        def _on_stream(self):
            return contextlib.nullcontext()

        def _empty(self, numel, dtype):
            t = torch.empty(numel, dtype=dtype)
            buffers[t.data_ptr()] = t
            return t

        def _graph_api(self):
            return FakeGraphs(self.context)

    return CpuTrtModel
