"""Plugin libraries loaded once per process: the one place that calls ``IPluginRegistry::loadLibrary``.

TensorRT's ``loadLibrary`` registers every creator the library's ``getCreators`` hands over, and fails (returns
null) when a creator with the same name, version and namespace is already registered — so loading
``libhybridtrt_trt.so`` on every ``build`` and every ``TrtModel`` made the second one fail: a second model, a
build followed by a load, a test module that does both. Every loader of this package (`hybridtrt.engine.build`,
`hybridtrt.runtime.tensorrt`) goes through `load_plugin_library`, which keeps one handle per library file per
process:

- the same file again (by resolved path): the handle of the first load, nothing registered twice;
- a byte-identical copy at another path (same sha256): the first load's handle too — the creators registered
  are that code;
- another file with other bytes: refused (`EngineError` naming both paths), since it would register the same
  creators (every hybridtrt plugin library registers `HYBRIDTRT_CREATORS`) and TensorRT would refuse it, or
  worse, an engine would run the first library's code while its sidecar names the second;
- the loaded file changed on disk since: refused (the process still runs the old code);
- creators already registered by a loader other than this module (the auto-registering shim dlopened, or
  ``polygraphy --plugins``): ``loadLibrary`` fails and the error says so.

TensorRT's own plugins (``init_libnvinfer_plugins``) are registered once per process as well. The C++ runner
applies the same rule (examples/cpp/plugin_libraries.h, ``PluginLibraries``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridtrt.engine.sidecar import file_sha256
from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS
from hybridtrt.errors import EngineError

if TYPE_CHECKING:
    from hybridtrt.engine.network import NetworkPlugins


@dataclass(frozen=True)
class LoadedLibrary:
    """A plugin library this process registered.

    Attributes:
        path: Resolved path of the file loaded.
        sha256: Its bytes' sha256 at load time.
        handle: What ``IPluginRegistry.load_library`` returned (kept for the life of the process).
    """

    path: Path
    sha256: str
    handle: Any


@dataclass
class _Process:
    """What one TensorRT (one ``tensorrt`` module, one libnvinfer: one per process) has registered."""

    trt_plugins: bool = False
    libraries: dict[Path, LoadedLibrary] = field(default_factory=dict)


_lock = threading.Lock()
# Keyed by the tensorrt module: one in a real process; the fake-TensorRT tests make a fresh one per test.
_processes: weakref.WeakKeyDictionary[Any, _Process] = weakref.WeakKeyDictionary()


def loaded_libraries(trt: Any) -> list[LoadedLibrary]:
    """The plugin libraries loaded into ``trt`` through `load_plugin_library`, first first."""
    with _lock:
        state = _processes.get(trt)
        return list(dict.fromkeys(state.libraries.values())) if state else []


def load_plugin_library(trt: Any, library: str | Path | None) -> LoadedLibrary | None:
    """Register TensorRT's plugins (once per process), then ``library``'s (once per file per process).

    Args:
        trt: The ``tensorrt`` module.
        library: The plugin library, or None (only TensorRT's own plugins).

    Returns:
        The loaded library (a handle kept for the life of the process), or None when ``library`` is None.

    Raises:
        EngineError: Another file with other bytes is already loaded (both paths named), the loaded file changed on
            disk, or TensorRT could not load the library (its creators registered by another loader, or the library
            does not fit this TensorRT).
    """
    with _lock:
        state = _processes.setdefault(trt, _Process())
        if not state.trt_plugins:
            trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")
            state.trt_plugins = True
        if library is None:
            return None
        path = Path(library).resolve()
        digest = file_sha256(path)
        known = state.libraries.get(path)
        if known is not None:
            if known.sha256 != digest:
                raise EngineError(
                    f"plugin library {path} changed on disk since this process loaded it (sha256 {known.sha256[:12]}… then, "
                    f"{digest[:12]}… now): TensorRT keeps running the code loaded first",
                    fix="restart the process to load the new library (a loaded plugin library cannot be replaced)",
                )
            return known
        first = next(iter(state.libraries.values()), None)
        if first is not None:
            if first.sha256 != digest:
                raise EngineError(
                    f"plugin library {path} would register the creators {_creator_names()} that {first.path} already "
                    f"registered in this process (different files: sha256 {digest[:12]}… vs {first.sha256[:12]}…)",
                    fix=f"use one plugin library per process: build and load every engine against {first.path}, "
                    "or run the other library's engines in another process",
                )
            state.libraries[path] = first  # a byte-identical copy: the same creators, the same code
            return first
        handle = trt.get_plugin_registry().load_library(str(path))
        if handle is None:
            raise EngineError(_load_failure(trt, path), fix=_load_failure_fix(trt))
        state.libraries[path] = LoadedLibrary(path, digest, handle)
        return state.libraries[path]


def required_library(network: NetworkPlugins, loaded: Path | None) -> Path | None:
    """The plugin library an engine's sidecar must name: ``loaded`` when the parsed network holds plugin layers.

    Args:
        network: What the parsed network holds (`hybridtrt.engine.network.prove_plugins`).
        loaded: The library this build loaded (None: none).

    Raises:
        EngineError: The network holds plugin layers although this build loaded no library — their creators came
            from elsewhere in the process (a dlopened autoreg shim, another tool's ``--plugins``), so the sidecar could
            name no library, and the engine would fail to deserialize wherever nothing registers them.
    """
    layers = {op: n for op, n in network.plugin_layers.items() if n}
    if not layers:
        return None
    if loaded is None:
        held = ", ".join(f"{n} {op}" for op, n in sorted(layers.items()))
        raise EngineError(
            f"the parsed network holds plugin layers ({held}) although this build loaded no plugin library: their "
            "creators were registered by another loader in this process, so the engine's sidecar could not name the "
            "library it needs at run time",
            fix="build with --plugins PATH (the libhybridtrt_trt.so to record), or build in a process where nothing else "
            "loads the plugins (do not dlopen libhybridtrt_trt_autoreg.so before `hybridtrt build`)",
        )
    return loaded


def _creator_names() -> str:
    return ", ".join(f"{ns}::{name} v{version}" for name, version, ns in sorted(HYBRIDTRT_CREATORS))


def _registered_elsewhere(trt: Any) -> bool:
    """True when every hybridtrt creator is in the registry although this module loaded no library."""
    registry = trt.get_plugin_registry()
    get = getattr(registry, "get_creator", None)
    if get is None:
        return False
    return all(get(name, version, ns) is not None for name, version, ns in HYBRIDTRT_CREATORS)


def _load_failure(trt: Any, path: Path) -> str:
    if _registered_elsewhere(trt):
        return (
            f"TensorRT could not load plugin library {path}: its creators ({_creator_names()}) are already registered "
            "in this process by a loader other than hybridtrt (libhybridtrt_trt_autoreg.so dlopened, polygraphy "
            "--plugins, ...), and TensorRT refuses to register a creator twice"
        )
    return f"TensorRT could not load plugin library {path}"


def _load_failure_fix(trt: Any) -> str:
    if _registered_elsewhere(trt):
        return "let hybridtrt load the plugins (do not dlopen the autoreg shim or pass --plugins to other tools in the same process)"
    return "rebuild the plugins against this TensorRT (`hybridtrt plugins build`)"


__all__ = ["LoadedLibrary", "load_plugin_library", "loaded_libraries", "required_library"]
