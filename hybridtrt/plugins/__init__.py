"""The CUDA kernels and TensorRT plugins of hybridtrt: build them, find them, call them.

``plugins/`` (C++/CUDA, CMake) builds three libraries:

- ``libhybridtrt_kernels.so``: the Mamba-2 SSD kernels behind a C ABI (no TensorRT), always built;
- ``libhybridtrt_trt.so``: the IPluginV3 plugins ``hybridtrt::Mamba2ChunkScan`` and
  ``hybridtrt::Mamba2StateUpdate`` (DESIGN.md §5), built when ``TENSORRT_ROOT`` is given; it registers only
  through its exported ``getCreators`` — for ``IPluginRegistry::loadLibrary`` and ``trtexec --dynamicPlugins``;
- ``libhybridtrt_trt_autoreg.so``: a shim beside it that registers the same creators when it is dlopened —
  for loaders that only dlopen (``polygraphy --plugins``, ``trtexec --staticPlugins``).

Public names:
    library_path(kind) -> Path      where a built library is (env ``HYBRIDTRT_PLUGIN_DIR``, then
                                    ``plugins/build`` of the checkout)
    dlopen_library(path) -> Path    the library to give a loader that only dlopens
    build_plugins(...) -> BuildResult   runs CMake (``python -m hybridtrt.plugins build``)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from hybridtrt.errors import PluginBuildError

__all__ = [
    "LIBRARY_NAMES",
    "PLUGIN_DIR_ENV",
    "BuildResult",
    "build_plugins",
    "default_build_dir",
    "dlopen_library",
    "library_path",
]

#: Environment variable naming a directory that holds the built libraries (searched first).
PLUGIN_DIR_ENV = "HYBRIDTRT_PLUGIN_DIR"

#: File name of each library kind.
LIBRARY_NAMES: dict[str, str] = {
    "kernels": "libhybridtrt_kernels.so",
    "trt": "libhybridtrt_trt.so",
    "trt_autoreg": "libhybridtrt_trt_autoreg.so",
}

LibraryKind = Literal["kernels", "trt", "trt_autoreg"]


def default_build_dir() -> Path:
    """``plugins/build`` of the repository checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "plugins" / "build"


def library_path(kind: LibraryKind = "kernels") -> Path:
    """Path of a built plugin library.

    Args:
        kind: ``"kernels"`` (``libhybridtrt_kernels.so``, C ABI) or ``"trt"`` (``libhybridtrt_trt.so``,
            the TensorRT plugins).

    Returns:
        The first existing file among ``$HYBRIDTRT_PLUGIN_DIR/<name>`` and ``plugins/build/<name>``.

    Raises:
        PluginBuildError: ``kind`` is unknown or the library has not been built; the fix names the
            build command.
    """
    if kind not in LIBRARY_NAMES:
        raise PluginBuildError(
            f"unknown plugin library kind {kind!r}", fix=f"use one of {sorted(LIBRARY_NAMES)}"
        )
    name = LIBRARY_NAMES[kind]
    candidates: list[Path] = []
    env_dir = os.environ.get(PLUGIN_DIR_ENV)
    if env_dir:
        candidates.append(Path(env_dir) / name)
    candidates.append(default_build_dir() / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    command = "python -m hybridtrt.plugins build"
    if kind in ("trt", "trt_autoreg"):
        command += " --tensorrt-root /path/to/TensorRT"
    raise PluginBuildError(
        f"{name} not found (searched {searched})",
        fix=f"build it with `{command}` (or `hybridtrt plugins build`), or point ${PLUGIN_DIR_ENV} at its directory",
    )


def dlopen_library(library: str | os.PathLike[str]) -> Path:
    """The plugin library to give a loader that only dlopens and registers nothing itself.

    polygraphy's ``--plugins`` / ``LoadPlugins`` (``ctypes.CDLL``) and ``trtexec --staticPlugins`` need
    ``libhybridtrt_trt_autoreg.so``, which registers the creators of ``libhybridtrt_trt.so`` at load; a
    plain dlopen of ``libhybridtrt_trt.so`` registers nothing. ``IPluginRegistry::loadLibrary`` and
    ``trtexec --dynamicPlugins`` take ``libhybridtrt_trt.so`` itself (its ``getCreators``).

    Args:
        library: ``libhybridtrt_trt.so`` (mapped to the shim beside it), the shim, or another library
            (returned as is: its own registration is its business).

    Raises:
        PluginBuildError: The shim is not beside ``libhybridtrt_trt.so``.
    """
    path = Path(library)
    if path.name != LIBRARY_NAMES["trt"]:
        return path
    shim = path.with_name(LIBRARY_NAMES["trt_autoreg"])
    if not shim.is_file():
        raise PluginBuildError(
            f"{shim.name} is missing beside {path}: loaders that only dlopen (polygraphy --plugins, trtexec "
            "--staticPlugins) need it, since libhybridtrt_trt.so registers only through getCreators",
            fix="rebuild the plugins with `hybridtrt plugins build --tensorrt-root DIR` (it builds both libraries)",
        )
    return shim


def __getattr__(name: str):  # lazy: importing the package must not import subprocess machinery eagerly
    if name in {"BuildResult", "build_plugins"}:
        from hybridtrt.plugins import build

        return getattr(build, name)
    raise AttributeError(name)
