"""The C++ runner's sidecar reader agrees with the Python buffer plan (compiled with g++; no TensorRT)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtrt.engine.profiles import engine_profiles
from hybridtrt.engine.sidecar import make_sidecar, write_sidecar
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.runtime.buffers import BufferPlan
from tests.static_capacity import CAPACITY

CPP_DIR = Path(__file__).resolve().parents[2] / "examples" / "cpp"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile examples/cpp/sidecar_check.cpp")


@pytest.fixture(scope="module")
def sidecar_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cpp") / "sidecar_check"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", str(CPP_DIR / "sidecar_check.cpp"), "-o", str(exe)], check=True, timeout=120)
    return exe


@pytest.mark.parametrize("graph", ["unified", "decode"])
def test_cpp_reads_what_python_plans(make_export, sidecar_check, tmp_path, graph):
    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, graph=graph, max_batch=3, max_input_len=8, max_cache_len=20)
    sidecar = make_sidecar(
        manifest, out, profiles, graph=graph, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={}
    )
    path = write_sidecar(sidecar, tmp_path / "model.engine")
    lines = subprocess.run([str(sidecar_check), str(path)], check=True, capture_output=True, text=True, timeout=60).stdout.splitlines()
    plan = BufferPlan.from_sidecar(sidecar)
    expected = [
        f"profile {i} {p.name} batch {p.dims['batch'].max} seq {p.dims['seq'].max} past {p.dims['past'].max}" for i, p in enumerate(plan.profiles)
    ]
    expected += [f"state {s.past_name} {s.present_name} {plan.state_bytes(s)}" for s in plan.states]
    expected += ["plugins none", "kv_cache dynamic"]
    assert lines == expected


def test_cpp_reads_the_kv_cache_flavour_like_python(make_export, sidecar_check, tmp_path):
    """A static-cache engine's sidecar says so (kv_cache static, max_cache_len); an old sidecar without the field reads
    as dynamic, unless its inputs are a static export's: then both readers refuse it, naming the fix."""
    from hybridtrt.engine.sidecar import read_sidecar
    from hybridtrt.errors import ArtefactError

    out = make_export("tiny-nemotron-h", ExportOptions(kv_cache="static", max_cache_len=CAPACITY, split=True))[1]  # test_native_layers'
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, max_batch=2, max_input_len=8, max_cache_len=64)
    sidecar = make_sidecar(manifest, out, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={})
    assert (sidecar["kv_cache"], sidecar["max_cache_len"]) == ("static", CAPACITY)
    path = write_sidecar(sidecar, tmp_path / "model.engine")
    lines = _run(sidecar_check, path).stdout.splitlines()
    assert lines[-1] == f"kv_cache static {CAPACITY}"
    assert "state past_key_values.1.key present.1.key " + str(2 * 2 * CAPACITY * 16 * 4) in lines  # fixed capacity, not profile-derived
    del sidecar["kv_cache"], sidecar["max_cache_len"]
    write_sidecar(sidecar, tmp_path / "model.engine")
    proc = _run(sidecar_check, path)
    assert proc.returncode == 1 and "static-cache export" in proc.stdout and "rebuild the engine" in proc.stdout
    with pytest.raises(ArtefactError, match="static-cache export"):
        read_sidecar(path)
    sidecar["kv_cache"] = "static"  # the flavour without its capacity
    write_sidecar(sidecar, tmp_path / "model.engine")
    assert _run(sidecar_check, path).returncode == 1
    with pytest.raises(ArtefactError, match="max_cache_len None"):
        read_sidecar(path)


# -- the runner's refusals (docs/deploying.md): TensorRT version and plugin sha256, same rules as Python ---------


def _run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_cpp_sha256_matches_hashlib(sidecar_check, tmp_path):
    import hashlib
    import random

    rng = random.Random(0)
    for name, data in [("empty", b""), ("abc", b"abc"), ("block", b"x" * 64), ("big", rng.randbytes(3 * 2**20 + 17))]:
        path = tmp_path / name
        path.write_bytes(data)
        assert _run(sidecar_check, "--sha256", path).stdout.strip() == hashlib.sha256(data).hexdigest()


@pytest.fixture
def plugin_sidecar(make_export, tmp_path):
    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    manifest = read_manifest(out)
    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugin v1")
    profiles = engine_profiles(manifest, max_batch=1, max_input_len=8, max_cache_len=16)
    sidecar = make_sidecar(manifest, out, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=lib, build_flags={})
    return write_sidecar(sidecar, tmp_path / "model.engine"), lib, sidecar


@pytest.mark.parametrize(
    ("runtime", "ok"), [(110100, True), (110203, False), (110105, True), (100150, False), (120100, False)]
)
def test_cpp_refuses_another_tensorrt(sidecar_check, plugin_sidecar, runtime, ok):
    path, lib, _ = plugin_sidecar
    proc = _run(sidecar_check, path, "--runtime-version", runtime)
    if ok:
        assert proc.returncode == 0 and proc.stdout.strip() == f"check ok {lib.resolve()}"
    else:
        major, minor, patch = runtime // 10000, runtime // 100 % 100, runtime % 100
        assert proc.returncode == 1
        assert f"built with TensorRT 11.1.0, this is TensorRT {major}.{minor}.{patch}" in proc.stdout


def test_cpp_refuses_a_changed_plugin_library_like_python(sidecar_check, plugin_sidecar, tmp_path):
    from hybridtrt.engine.sidecar import check_plugin_library
    from hybridtrt.errors import ArtefactError

    path, lib, sidecar = plugin_sidecar
    copy = tmp_path / "copy.so"
    copy.write_bytes(lib.read_bytes())
    assert _run(sidecar_check, path, "--runtime-version", 110100, "--plugins", copy).stdout.strip() == f"check ok {copy}"
    assert check_plugin_library(sidecar, copy) == copy
    lib.write_bytes(b"plugin v2")
    proc = _run(sidecar_check, path, "--runtime-version", 110100)
    assert proc.returncode == 1 and "has sha256" in proc.stdout and "rebuild the engine against this library" in proc.stdout
    with pytest.raises(ArtefactError, match="sha256"):
        check_plugin_library(sidecar)
    lib.unlink()
    proc = _run(sidecar_check, path, "--runtime-version", 110100)
    assert proc.returncode == 1 and "cannot be read" in proc.stdout


def test_cpp_refuses_plugins_for_an_engine_without_plugin_layers(sidecar_check, tmp_path, make_export):
    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, max_batch=1, max_input_len=8, max_cache_len=16)
    sidecar = make_sidecar(manifest, out, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={})
    path = write_sidecar(sidecar, tmp_path / "model.engine")
    assert _run(sidecar_check, path, "--runtime-version", 110100).stdout.strip() == "check ok none"
    proc = _run(sidecar_check, path, "--runtime-version", 110100, "--plugins", tmp_path / "x.so")
    assert proc.returncode == 1 and "holds no plugin layer" in proc.stdout


# -- tensor parallel: the runner as one of N launched processes (mpirun / srun / TensorRT's sample's variables) --
def test_cpp_runs_a_rank_engine_only_as_its_rank_like_python(make_export, sidecar_check, tmp_path):
    """Every (engine rank/world, launched rank/world) pair: the C++ runner accepts exactly where Python's
    `check_rank` (and `TrtModel`'s refusal of a rank alone) does, reads rank r's engine from ``rank{r}/``
    beside the one it was given, and takes the launchers' variables (Open MPI's, TensorRT's sample's)."""
    import os

    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.manifest import check_rank

    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, max_batch=1, max_input_len=8, max_cache_len=20)
    base = make_sidecar(manifest, out, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={})
    for folder in ("tp/rank0", "tp/rank1", "one"):
        (tmp_path / folder).mkdir(parents=True)
    for rank in range(2):
        write_sidecar({**base, "tensor_parallel": {"rank": rank, "world": 2, "vocab": "parallel"}}, tmp_path / "tp" / f"rank{rank}" / "model.engine")
    write_sidecar(base, tmp_path / "one" / "model.engine")

    def launch(engine, env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRT_", "OMPI_", "PMI_", "SLURM_"))}
        proc = subprocess.run([str(sidecar_check), str(engine), "--launch"], capture_output=True, text=True, timeout=60, env={**clean, **env})
        return proc.returncode, proc.stdout.strip()

    def python(tp, rank, world):
        if tp is None and world == 1:
            return True
        if tp is not None and world == 1:
            return False  # TrtModel without a communicator refuses a rank's engine
        try:
            check_rank("engine", tp, rank, world)
            return True
        except ArtefactError:
            return False

    given = tmp_path / "tp" / "rank0" / "model.engine"
    for rank, world in [(0, 1), (0, 2), (1, 2), (1, 4), (3, 4)]:
        env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world)} if world > 1 else {}
        code, text = launch(given, env)
        engine = tmp_path / "tp" / f"rank{rank}" / "model.engine"
        tp = {"rank": rank, "world": 2} if engine.with_suffix(".engine.json").is_file() else None
        expected = python(tp, rank, world) if tp is not None else False
        assert (code == 0) == expected, (rank, world, text)
        if code == 0:
            assert text == f"launch {rank} {world} {engine}"
        else:
            assert text.startswith("error: "), text
    code, text = launch(given, {})
    assert code == 1 and "runs only as one of 2 processes" in text and "mpirun -np 2" in text
    code, text = launch(given, {"TRT_MY_RANK": "1", "TRT_WORLD_SIZE": "2"})  # TensorRT's sampleDistCollective's variables
    assert code == 0 and text.endswith(str(tmp_path / "tp" / "rank1" / "model.engine")), text
    code, text = launch(tmp_path / "one" / "model.engine", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert code == 1 and "not in a rank directory" in text, text
    code, text = launch(tmp_path / "one" / "model.engine", {})
    assert code == 0 and python(None, 0, 1), text
    code, text = launch(given, {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"})
    assert code == 1 and "is not a rank of" in text, text
