"""Plugin registration through every loader users have, against a fake libnvinfer (no TensorRT, no GPU).

plugins/tests/fakeNvinfer/fakeNvinfer.cpp implements the registry calls a plugin library meets
(getPluginRegistry, IPluginRegistry::loadLibrary with its lock held across dlopen, registerCreator,
getCreator, getAllCreators); registryHarness.cpp loads our libraries the ways tools do. Contract
(plugins/README.md "Loading the plugins"):

- ``libhybridtrt_trt.so`` for IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: getCreators returns
  all four creators (the SSD and MoE plugins), nothing touches the registry during dlopen, each creator registered
  once;
- ``libhybridtrt_trt_autoreg.so`` for a plain dlopen (polygraphy --plugins, trtexec --staticPlugins):
  registers the same creators at load, with libnvinfer loaded globally or RTLD_LOCAL (the tensorrt module).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.plugins.conftest import TrtTestBuild


def harness(build: TrtTestBuild, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(build.harness), *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def facts(stdout: str) -> dict[str, list[str]]:
    """``{first word: [rest of the line, ...]}`` of the harness report."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, _, rest = line.partition(" ")
        out.setdefault(key, []).append(rest)
    return out


#: What the registry holds once libhybridtrt_trt.so is registered: the four creators of `HYBRIDTRT_CREATORS`, each with
#: the fields its getFieldNames lists (what the ONNX parser passes: chunk_size as INT32, activation as CHAR).
REGISTERED = [
    "Mamba2ChunkScan 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields chunk_size:INT32",
    "Mamba2StateUpdate 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields -",
    "MoeExperts 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields activation:CHAR",
    "MoeExpertsFp8 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields activation:CHAR",
]


def test_the_registered_creators_are_the_rule_tables():
    """The creators the harness expects are `HYBRIDTRT_CREATORS` (what the dispatch emulator and the loaders assume)."""
    from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS

    assert {tuple(line.split()[:3]) for line in REGISTERED} == {(n, v, ns) for n, v, ns in HYBRIDTRT_CREATORS}


def assert_registered_once(report: dict[str, list[str]]) -> None:
    assert report["creators"] == [str(len(REGISTERED))], report
    assert sorted(report["creator"]) == REGISTERED
    assert report["duplicates"] == ["0"]
    assert report["reentrant"] == ["0"], report.get("reentrant-call")


def test_load_library_registers_every_creator_once(trt_test_build: TrtTestBuild) -> None:
    """IPluginRegistry::loadLibrary (our build, TrtModel, the C++ runner, trtexec --dynamicPlugins): the registry
    holds its lock across dlopen; the library calls nothing back, getCreators hands over all four creators."""
    proc = harness(trt_test_build, "load-library", str(trt_test_build.fake_nvinfer), str(trt_test_build.trt_library))
    report = facts(proc.stdout)
    assert report["load-library"] == ["ok"]
    assert_registered_once(report)
    assert report["logger-finder"] == ["1"]


@pytest.mark.parametrize("nvinfer_scope", ["global", "local"])
def test_plain_dlopen_of_the_shim_registers(trt_test_build: TrtTestBuild, nvinfer_scope: str) -> None:
    """dlopen of libhybridtrt_trt_autoreg.so (ctypes.CDLL, trtexec --staticPlugins) with libnvinfer in the
    process globally (linked) or RTLD_LOCAL (the tensorrt Python module): every creator registered, once."""
    proc = harness(
        trt_test_build, "dlopen", str(trt_test_build.fake_nvinfer), str(trt_test_build.autoreg_library), nvinfer_scope
    )
    report = facts(proc.stdout)
    assert report["dlopen"] == ["ok"]
    assert_registered_once(report)


def test_both_loaders_in_one_process_register_once(trt_test_build: TrtTestBuild) -> None:
    proc = harness(
        trt_test_build, "both", str(trt_test_build.fake_nvinfer), str(trt_test_build.trt_library),
        str(trt_test_build.autoreg_library),
    )  # fmt: skip
    report = facts(proc.stdout)
    assert report["load-library"] == ["ok"] and report["dlopen"] == ["ok"]
    assert_registered_once(report)


def test_shim_without_tensorrt_says_so(trt_test_build: TrtTestBuild) -> None:
    proc = harness(trt_test_build, "dlopen-alone", str(trt_test_build.autoreg_library))
    assert "dlopen ok" in proc.stdout
    assert "no libnvinfer in this process, so no plugin was registered" in proc.stderr


def test_harness_catches_registration_during_dlopen(trt_test_build: TrtTestBuild) -> None:
    """The harness can fail: a library that registers from a load-time constructor (what libhybridtrt_trt.so
    did before, and what the shim does by design) calls the registry while loadLibrary holds its lock across
    dlopen — with a real lock, the deadlock; the fake records the re-entrant calls instead. (dlsym then finds
    getCreators in the shim's dependency, so the creators arrive anyway: the hazard is the re-entry.)"""
    proc = harness(trt_test_build, "load-library", str(trt_test_build.fake_nvinfer), str(trt_test_build.autoreg_library))
    report = facts(proc.stdout)
    assert int(report["reentrant"][0]) >= 2, report
    assert {"getCreator", "registerCreator"} <= set(report["reentrant-call"])
    assert "refused to register" in proc.stderr


def test_polygraphy_load_plugins_registers_through_the_shim(trt_test_build: TrtTestBuild) -> None:
    """polygraphy's own LoadPlugins (``--plugins``: ctypes.CDLL) on the shim, with the fake libnvinfer loaded
    RTLD_LOCAL first as ``import tensorrt`` does: every creator ends up in the registry."""
    code = (
        "import ctypes, sys\n"
        "fake = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)\n"
        "from polygraphy.backend.trt import LoadPlugins\n"
        "LoadPlugins(plugins=[sys.argv[2]])()\n"
        "fake.fakeNvinferReport()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(trt_test_build.fake_nvinfer), str(trt_test_build.autoreg_library)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_registered_once(facts(proc.stdout))


# -- a plugin library loaded any number of times in one process (issue 23, item 6) ------------------------------


def test_a_second_load_library_fails(trt_test_build: TrtTestBuild) -> None:
    """What every build and every TrtModel did: IPluginRegistry::loadLibrary on each use. TensorRT documents that the
    call "will fail and return nullptr if any of the plugins are already registered" — the fake does the same."""
    proc = harness(trt_test_build, "load-twice", str(trt_test_build.fake_nvinfer), str(trt_test_build.trt_library))
    report = facts(proc.stdout)
    assert report["load-library"] == ["ok", "failed"]
    assert report["loads"] == ["1"] and report["failed-loads"] == ["1"]
    assert report["creators"] == [str(len(REGISTERED))]  # the failed load registered nothing


def test_cpp_runner_loads_each_library_once(trt_test_build: TrtTestBuild, tmp_path) -> None:
    """The C++ runner's PluginLibraries (examples/cpp/plugin_libraries.h): the same library twice and a byte-identical
    copy reuse the first handle (one loadLibrary call); a library with other bytes is refused, naming both paths."""
    copy = tmp_path / "copy" / "libhybridtrt_trt.so"
    other = tmp_path / "other" / "libhybridtrt_trt.so"
    for path, data in ((copy, trt_test_build.trt_library.read_bytes()), (other, trt_test_build.trt_library.read_bytes() + b"\0")):
        path.parent.mkdir()
        path.write_bytes(data)
    proc = harness(trt_test_build, "runner-rule", str(trt_test_build.fake_nvinfer), str(trt_test_build.trt_library), str(copy), str(other))
    report = facts(proc.stdout)
    lib = str(trt_test_build.trt_library.resolve())
    assert report["runner-load"][:3] == [f"same-handle {lib}"] * 3
    assert report["runner-load"][3].startswith(f"refused plugin library {other} would register the creators that {lib}")
    assert report["loads"] == ["1"] and report["failed-loads"] == ["0"]
    assert_registered_once(report)


_PYTHON_LOADER = """
import ctypes, sys, types
fake = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
fake.fakeNvinferLoadLibrary.restype = ctypes.c_void_p
fake.fakeNvinferLoadLibrary.argtypes = [ctypes.c_char_p]
fake.fakeNvinferHasCreator.argtypes = [ctypes.c_char_p] * 3
registry = types.SimpleNamespace(
    load_library=lambda path: fake.fakeNvinferLoadLibrary(path.encode()),
    get_creator=lambda *key: object() if fake.fakeNvinferHasCreator(*(k.encode() for k in key)) else None,
)
trt = types.ModuleType("tensorrt")
trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
trt.init_libnvinfer_plugins = lambda logger, ns: True
trt.get_plugin_registry = lambda: registry
from hybridtrt.engine.build import _load_plugins
from hybridtrt.engine.plugin_registry import load_plugin_library
from hybridtrt.errors import EngineError
for lib in sys.argv[2:]:
    if lib == "raw":  # another loader registers the creators first (as the autoreg shim or polygraphy would)
        registry.load_library(sys.argv[3])
        continue
    try:
        _load_plugins(trt, lib)  # what build_engine calls
        print("build-load ok")
        print("model-load", "ok" if load_plugin_library(trt, lib) else "none")  # what TrtModel calls
    except EngineError as e:
        print("refused", str(e).replace(chr(10), " "))
sys.stdout.flush()
fake.fakeNvinferReport()
"""


def _python_loader(build: TrtTestBuild, *libs: str) -> dict[str, list[str]]:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", _PYTHON_LOADER, str(build.fake_nvinfer), *libs], capture_output=True, text=True, timeout=120,
        check=False, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return facts(proc.stdout)


def test_python_loader_loads_once_against_the_fake_libnvinfer(trt_test_build: TrtTestBuild) -> None:
    """hybridtrt.engine.plugin_registry against the fake libnvinfer's real registry calls: a build then a model load,
    twice over, in one process — one loadLibrary, every creator registered once."""
    lib = str(trt_test_build.trt_library)
    report = _python_loader(trt_test_build, lib, lib)
    assert report["build-load"] == ["ok", "ok"] and report["model-load"] == ["ok", "ok"]
    assert report["loads"] == ["1"] and report["failed-loads"] == ["0"]
    assert_registered_once(report)


def test_python_loader_names_creators_registered_by_another_loader(trt_test_build: TrtTestBuild) -> None:
    report = _python_loader(trt_test_build, "raw", str(trt_test_build.trt_library))
    assert len(report["refused"]) == 1 and "already registered in this process by a loader other than hybridtrt" in report["refused"][0]
    assert report["failed-loads"] == ["1"]
