"""The N-process runtime of a tensor-parallel export (DESIGN.md §12, `hybridtrt.runtime.tensor_parallel`):
one process per rank, the driver stepping every rank in lock step, on ONNX Runtime (gloo between CPU
processes) and on TensorRT with TensorRT and CUDA faked (tests/runtime/fake_tp.py: `TrtModel`'s own code
in every rank, the fake engine running the rank's graph through the communicator it was given).

The model has every block kind; at 4 ranks its 2 Mamba groups are each shared by 2 ranks (a collective over
a group of ranks) and its 2 KV heads replicated. The truth is the unsharded PyTorch reference's greedy tokens."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import torch

from hybridtrt.errors import ArtefactError, EngineError, InputError
from hybridtrt.models.loading import load_model
from hybridtrt.runtime.generation import TorchStepper, left_pad
from hybridtrt.runtime.tensor_parallel import TensorParallelModel, tensor_parallel_spec
from tests.cli.batch import run_batch

WORLD = 4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
NEW = 5
FAKE = "tests.runtime.fake_tp:fake_trt_rank"
CPP_DIR = Path(__file__).resolve().parents[2] / "examples" / "cpp"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def tp(tp_export):
    """``(checkpoint, OUT, the reference's greedy tokens on PROMPTS)``; OUT: tests/conftest.py ``tp_export``."""
    checkpoint, out = tp_export
    ids, mask = left_pad(PROMPTS)
    truth = TorchStepper(load_model(checkpoint)).generate(ids, mask, max_new_tokens=NEW).tokens
    return checkpoint, out, truth


def test_trt_ranks_generate_the_references_tokens_in_lock_step(tp):
    """4 processes, each `TrtModel` on its rank's engine with its communicator set: a left-padded batch gives
    the reference's greedy tokens; a stale state is refused. Then rank 2 raises at its next generation's third
    call while the others wait for it at a collective: the driver names rank 2, ends all 4 processes, and does
    not hang."""
    checkpoint, out, truth = tp
    spec = tensor_parallel_spec(out / "rank0" / "model.engine")
    assert spec.communicator == "nccl" and spec.artefacts == tuple(str(out / f"rank{r}" / "model.engine") for r in range(WORLD))
    ids, mask = left_pad(PROMPTS)
    fail_at = NEW + 3  # the first generation makes NEW calls (one prefill, NEW - 1 decode steps)
    model = TensorParallelModel(dataclasses.replace(spec, communicator="gloo", factory=FAKE, options={"fail_rank": 2, "fail_step": fail_at}), timeout_s=120)
    assert model.backend == "tensorrt ×4 (gloo)" and model.vocab_size == 256
    processes = list(model._processes)
    got = model.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(got.tokens, truth), (got.tokens, truth)
    stale = model.zero_state(2)
    model.zero_state(2)
    with pytest.raises(InputError, match="not the ranks' current one"):
        model.step(ids, mask, stale, decode=False)
    with pytest.raises(EngineError, match=f"rank 2 failed: RuntimeError: planted failure at step {fail_at}"):
        model.generate(ids, mask, max_new_tokens=NEW)
    assert not any(p.is_alive() for p in processes)
    model.close()  # idempotent after a failure


def test_a_rank_engine_loads_only_as_its_rank(tp, monkeypatch):
    """`TrtModel` with a communicator (TensorRT faked, in this process): rank 1's engine loaded as rank 0 is
    refused by name before TensorRT sees it, and a communicator TensorRT refuses is an error, not a run."""
    import sys

    from hybridtrt.engine.sidecar import read_sidecar
    from hybridtrt.runtime.communicators import make_capsule
    from tests.runtime.fake_trt import FakeRankContext, cpu_trt_class, fake_tensorrt

    _, out, _ = tp
    engine = out / "rank1" / "model.engine"
    trt = fake_tensorrt(None, read_sidecar(engine), [], rank_graph=str(out / "rank1" / "model.onnx"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    model = cpu_trt_class(trt.buffers)

    class Stub:
        rank, world = 0, WORLD

        def capsule(self):
            return make_capsule(1)

    with pytest.raises(ArtefactError, match="is rank 1 of a 4-rank tensor-parallel model, loaded as rank 0 of 4") as e:
        model(engine, communicator=Stub())
    assert "load rank0's artefact in rank 0's process" in e.value.fix
    Stub.rank = 1
    monkeypatch.setattr(FakeRankContext, "set_communicator", lambda self, capsule: False)
    with pytest.raises(EngineError, match="TensorRT refused rank 1's NCCL communicator"):
        model(engine, communicator=Stub())


def test_generate_and_build_on_a_tp_export_through_the_cli(tp, tmp_path, monkeypatch):
    """``generate OUT`` runs the ranks as ONNX Runtime processes and prints the reference's tokens (and the
    README's Python block does, on the same export);
    ``generate OUT/rank1/model.engine`` finds every rank's engine (and needs TensorRT here, a typed error);
    an engine of a rank moved out of its export is refused with the fix; ``build OUT --check-tensorrt``
    checks every rank's graph (10.16 imports DistCollective, 10.15 does not)."""
    checkpoint, out, truth = tp
    alone = tmp_path / "alone.engine"
    alone.write_bytes(b"fake")
    (tmp_path / "alone.engine.json").write_text((out / "rank1" / "model.engine.json").read_text())
    cases = [
        ["generate", out, "--ids", " ".join(map(str, PROMPTS[0])), "--max-new-tokens", NEW, "--ignore-eos"],
        ["generate", out / "rank1" / "model.engine", "--ids", "1 2"],
        ["generate", alone, "--ids", "1 2"],
        ["build", out, "--check-tensorrt", "10.16"],
        ["build", out, "--check-tensorrt", "10.15"],
        ["generate", out, "--ids", "1 2", "--speculative", "ngram"],
    ]
    got = run_batch(cases, columns=80)
    assert got[0].code == 0, got[0].output
    assert got[0].stdout.split()[:NEW] == [str(int(t)) for t in truth[0]], (got[0].stdout, truth[0])
    assert "backend onnxruntime ×4 (gloo)" in " ".join(got[0].output.split())
    expect = {
        1: ("TensorRT is not available", "install TensorRT 11"),
        2: ("is rank 1 of 4, and the other ranks' engines are found beside it", "hybridtrt build OUT -o alone.engine"),
        4: ("DistCollective", "10.16"),
        5: ("--speculative with a tensor-parallel model is not built yet", "drop --speculative"),
    }
    for i, (what, fix) in expect.items():
        o = got[i]
        text = " ".join(o.output.split())
        assert o.code == 2 and what in text and "fix:" in text and fix in text and "Traceback" not in text, (cases[i], o.output)
    assert got[3].code == 0, got[3].output

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (tmp_path / "out-tp4").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    block = blocks[1].replace("[[1, 2, 3]]", str(PROMPTS[:1])).replace("max_new_tokens=16", f"max_new_tokens={NEW}")
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert torch.equal(scope["result"].tokens[0], truth[0]), (scope["result"].tokens, truth[0])
    assert all(f"rank{r}" in got[3].stdout for r in range(WORLD)) and "would build" in got[3].stdout
    assert all(len(line) <= 80 for line in got[3].stdout.splitlines() if not line.startswith("note:"))  # the tables


def test_the_nccl_binding_follows_nccl_h(tmp_path, monkeypatch):
    """The ctypes binding against a stand-in ``libnccl.so.2`` compiled from NCCL's C signatures (nccl.h): the
    unique id is the 128 bytes ``ncclGetUniqueId`` wrote, ``ncclCommInitRank`` receives it by value with the
    rank and world, the capsule TensorRT takes holds the communicator under the name ``ncclComm_t``, close
    destroys it; an NCCL older than TensorRT's 2.19 is refused."""
    from hybridtrt.runtime import communicators as comms

    source = tmp_path / "nccl.c"
    source.write_text(_FAKE_NCCL)
    for version in (22703, 21805):
        lib = tmp_path / f"libnccl{version}.so"
        subprocess.run(["gcc", "-shared", "-fPIC", f"-DVERSION={version}", "-o", str(lib), str(source)], check=True)
    monkeypatch.setenv("HYBRIDTRT_NCCL", str(tmp_path / "libnccl22703.so"))
    monkeypatch.setattr(comms._Nccl, "_loaded", None)
    uid = comms.nccl_unique_id()
    assert uid == bytes((i * 7 + 1) % 256 for i in range(128))
    comm = comms.NcclCommunicator(uid, 3, 4)
    assert comm.pointer == 0x1000 + 3 * 16 + 4  # what the stand-in returns for a matching id
    assert comms.capsule_pointer(comm.capsule()) == comm.pointer
    with pytest.raises(ValueError):
        comms.capsule_pointer(comms.make_capsule(comm.pointer, b"other"))
    comm.close()
    assert comm.pointer == 0 and comms._Nccl._loaded.get_version is not None
    with pytest.raises(EngineError, match=r"ncclCommInitRank\(rank 1 of 4\) failed: invalid argument"):
        comms.NcclCommunicator(bytes(128), 1, 4)  # not the id ncclGetUniqueId made
    monkeypatch.setenv("HYBRIDTRT_NCCL", str(tmp_path / "libnccl21805.so"))
    monkeypatch.setattr(comms._Nccl, "_loaded", None)
    with pytest.raises(Exception, match=re.escape("NCCL 2.18.5; TensorRT's collectives need NCCL >= 2.19")):
        comms.nccl_unique_id()
    monkeypatch.setattr(comms._Nccl, "_loaded", None)

    # The C++ runner's communicator (examples/cpp/nccl_communicator.h): rank 0 makes the id and writes it to
    # TRT_NCCL_ID_FILE, rank 1 (started first) waits for it; both join with the same 128 bytes.
    main = tmp_path / "two_ranks.cpp"
    main.write_text(
        '#include "nccl_communicator.h"\n#include <iostream>\n'
        "int main(int, char** argv) { nccl_communicator::Communicator c(std::atoi(argv[1]), 2, argv[2], 30); "
        "std::cout << reinterpret_cast<long>(c.get()) << std::endl; }\n"
    )
    exe = tmp_path / "two_ranks"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CPP_DIR}", str(main), "-o", str(exe), "-ldl"], check=True, timeout=120)
    env = {"HYBRIDTRT_NCCL": str(tmp_path / "libnccl22703.so"), "PATH": "/usr/bin:/bin"}
    id_file = tmp_path / "nccl.id"
    waiting = subprocess.Popen([str(exe), "1", str(id_file)], stdout=subprocess.PIPE, text=True, env=env)
    first = subprocess.run([str(exe), "0", str(id_file)], capture_output=True, text=True, timeout=60, env=env, check=True)
    second, _ = waiting.communicate(timeout=60)
    assert (int(first.stdout), int(second)) == (0x1000 + 0 * 16 + 2, 0x1000 + 1 * 16 + 2)  # the stand-in checked the id's bytes


_FAKE_NCCL = r"""
/* A stand-in for libnccl.so.2 with NCCL's C signatures (nccl.h): ncclUniqueId is a 128-byte struct passed by
   value to ncclCommInitRank; ncclComm_t is an opaque pointer; ncclResult_t an int enum (0 = ncclSuccess,
   4 = ncclInvalidArgument). */
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct ncclComm* ncclComm_t;
static int destroyed = 0;
int ncclGetVersion(int* version) { *version = VERSION; return 0; }
const char* ncclGetErrorString(int result) { return result == 4 ? "invalid argument" : "unhandled error"; }
int ncclGetUniqueId(ncclUniqueId* id) { for (int i = 0; i < 128; ++i) id->internal[i] = (char)((i * 7 + 1) % 256); return 0; }
int ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    for (int i = 0; i < 128; ++i) if ((unsigned char)id.internal[i] != (i * 7 + 1) % 256) return 4;
    if (rank < 0 || rank >= nranks) return 4;
    *comm = (ncclComm_t)(long)(0x1000 + rank * 16 + nranks);
    return 0;
}
int ncclCommDestroy(ncclComm_t comm) { destroyed = comm != 0; return comm ? 0 : 4; }
"""
