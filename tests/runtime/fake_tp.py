"""A tensor-parallel rank's process with TensorRT and CUDA faked: the `RankSpec.factory` the runtime tests
give `TensorParallelModel`, run in each spawned process.

It installs the fake ``tensorrt`` (tests/runtime/fake_trt.py) in its process, joins the other processes
through gloo, and loads the rank's engine with `TrtModel`'s own code (its CUDA touch points on the CPU):
the sidecar's rank check, ``set_communicator`` with the communicator's capsule, the buffers, profiles and
ping-pong. The fake engine runs the rank's ONNX graph cut at its collectives, which go through the
communicator TensorRT was given (`FakeRankContext`): a rank that was not given one cannot run.

``spec.options`` may carry test knobs, removed before `TrtModel` sees the rest:
``fail_rank`` / ``fail_step``: that rank raises at that step (a rank failing in the middle of a generation).
"""

from __future__ import annotations

import sys

from hybridtrt.engine.sidecar import read_sidecar
from hybridtrt.runtime.communicators import GlooCommunicator
from tests.runtime.fake_trt import cpu_trt_class, fake_tensorrt


def fake_trt_rank(spec, rank: int, rendezvous):
    options = dict(spec.options)
    fail_rank, fail_step = options.pop("fail_rank", None), options.pop("fail_step", None)
    engine = spec.artefacts[rank]
    sidecar = read_sidecar(engine)
    graph = f"{sidecar['source']['export_dir']}/{sidecar['source']['onnx']}"
    trt = fake_tensorrt(None, sidecar, [], rank_graph=graph)
    sys.modules["tensorrt"] = trt  # this process is the rank's alone
    communicator = GlooCommunicator(rendezvous, rank, spec.world)
    model = cpu_trt_class(trt.buffers)(engine, communicator=communicator, **options)
    if rank == fail_rank:
        step, calls = model.step, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_step:
                raise RuntimeError(f"planted failure at step {fail_step}")
            return step(*args, **kwargs)

        model.step = failing
    return model, communicator
