"""Plugin registration through every loader users have, against a fake libnvinfer (no TensorRT, no GPU).

plugins/tests/fakeNvinfer/fakeNvinfer.cpp implements the registry calls a plugin library meets
(getPluginRegistry, IPluginRegistry::loadLibrary with its lock held across dlopen, registerCreator,
getCreator, getAllCreators); registryHarness.cpp loads our libraries the ways tools do. Contract
(plugins/README.md "Loading the plugins"):

- ``libhybridtrt_trt.so`` for IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: getCreators returns
  both creators, nothing touches the registry during dlopen, each creator registered once;
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


def assert_registered_once(report: dict[str, list[str]]) -> None:
    assert report["creators"] == ["2"], report
    creators = sorted(report["creator"])
    assert creators == [
        "Mamba2ChunkScan 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields chunk_size:INT32",
        "Mamba2StateUpdate 1 hybridtrt registered-as hybridtrt kind PLUGIN CREATOR_V3ONE fields -",
    ]
    assert report["duplicates"] == ["0"]
    assert report["reentrant"] == ["0"], report.get("reentrant-call")


def test_load_library_registers_both_creators_once(trt_test_build: TrtTestBuild) -> None:
    """IPluginRegistry::loadLibrary (our build, TrtModel, the C++ runner, trtexec --dynamicPlugins): the registry
    holds its lock across dlopen; the library calls nothing back, getCreators hands over both creators."""
    proc = harness(trt_test_build, "load-library", str(trt_test_build.fake_nvinfer), str(trt_test_build.trt_library))
    report = facts(proc.stdout)
    assert report["load-library"] == ["ok"]
    assert_registered_once(report)
    assert report["logger-finder"] == ["1"]


@pytest.mark.parametrize("nvinfer_scope", ["global", "local"])
def test_plain_dlopen_of_the_shim_registers(trt_test_build: TrtTestBuild, nvinfer_scope: str) -> None:
    """dlopen of libhybridtrt_trt_autoreg.so (ctypes.CDLL, trtexec --staticPlugins) with libnvinfer in the
    process globally (linked) or RTLD_LOCAL (the tensorrt Python module): both creators registered, once."""
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
    RTLD_LOCAL first as ``import tensorrt`` does: both creators end up in the registry."""
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
