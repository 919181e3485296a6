"""library_path(): search order and the error that names the build command."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridtrt.errors import PluginBuildError
from hybridtrt.plugins import PLUGIN_DIR_ENV, library_path


def test_missing_library_error_names_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hybridtrt.plugins as plugins

    monkeypatch.setenv(PLUGIN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(plugins, "default_build_dir", lambda: tmp_path / "build")  # ignore a real build
    with pytest.raises(PluginBuildError) as err:
        library_path("trt")
    text = str(err.value)
    assert "libhybridtrt_trt.so not found" in text
    assert str(tmp_path) in text and str(tmp_path / "build") in text
    assert "python -m hybridtrt.plugins build --tensorrt-root" in text
    assert err.value.stage == "plugins"


def test_env_dir_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "libhybridtrt_kernels.so"
    fake.write_bytes(b"")
    monkeypatch.setenv(PLUGIN_DIR_ENV, str(tmp_path))
    assert library_path("kernels") == fake


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(PluginBuildError, match="unknown plugin library kind"):
        library_path("onnx")  # type: ignore[arg-type]


def test_build_without_nvcc_raises_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridtrt.errors import MissingDependencyError
    from hybridtrt.plugins import build

    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(MissingDependencyError, match="nvcc"):
        build.build_plugins(build_dir="/nonexistent/never-created")


def test_build_with_bad_tensorrt_root_is_refused(tmp_path: Path) -> None:
    from hybridtrt.plugins.build import build_plugins, find_nvcc

    if find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA compiler)")
    with pytest.raises(PluginBuildError, match="NvInferRuntime.h"):
        build_plugins(build_dir=tmp_path / "b", tensorrt_root=tmp_path)


def test_main_reports_typed_errors_without_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from hybridtrt.plugins import build

    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert build.main(["build", "--build-dir", "/nonexistent/never-created"]) == 2
    assert "nvcc" in capsys.readouterr().err


def test_dlopen_loaders_get_the_autoreg_shim(tmp_path: Path) -> None:
    """polygraphy --plugins and trtexec --staticPlugins only dlopen: they need the shim beside libhybridtrt_trt.so."""
    from hybridtrt.plugins import dlopen_library

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"")
    with pytest.raises(PluginBuildError, match="libhybridtrt_trt_autoreg.so is missing"):
        dlopen_library(lib)
    shim = tmp_path / "libhybridtrt_trt_autoreg.so"
    shim.write_bytes(b"")
    assert dlopen_library(lib) == shim
    assert dlopen_library(shim) == shim
    other = tmp_path / "libsomeone_else.so"
    assert dlopen_library(other) == other  # another library's registration is its own business


def test_printed_polygraphy_command_names_the_shim(tmp_path: Path) -> None:
    """`hybridtrt compare` prints `polygraphy run ... --trt --plugins X`: X must be the library that registers on
    a plain dlopen, not libhybridtrt_trt.so (which polygraphy's ctypes.CDLL would load without registering)."""
    import numpy as np

    from hybridtrt.validation.polygraphy_bridge import BridgeFiles, command_lines

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"")
    (tmp_path / "libhybridtrt_trt_autoreg.so").write_bytes(b"")
    feeds = [{"input_ids": np.zeros((1, 3), dtype=np.int64)}]
    files = BridgeFiles(tmp_path / "inputs.json", tmp_path / "reference.json", tmp_path / "model.onnx", 1e-5, 1e-5, feeds=feeds)
    trt = " ".join(command_lines(files, plugins=lib)["trt"])
    assert f"--plugins {tmp_path / 'libhybridtrt_trt_autoreg.so'}" in trt and f"{lib} " not in trt
