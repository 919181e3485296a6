"""``model.engine.json``: what an engine was built from and how to feed it.

A serialized TensorRT engine says nothing about the model it holds. The sidecar beside it records
everything a runtime (the Python `TrtModel` or the C++ runner) needs without reading the export
again, and everything needed to refuse a mismatch up front:

- ``tensorrt``: the TensorRT version that built it (engines are not portable across versions);
- ``gpu``: name and compute capability (engines are not portable across architectures);
- ``profiles``: the optimization profiles in engine order (`ProfileSpec.to_dict`);
- ``plugins``: what the parsed network holds — ``custom_nodes`` and plugin ``layers`` by ``domain::op``,
  ``function_bodies`` (any custom node built from its ONNX function body) — and the plugin library path and
  its sha256 when the network has plugin layers (else null: nothing to load at run time);
- ``source``: export dir, graph role, and the sha256 of its ``hybridtrt.json``;
- ``inputs`` / ``outputs`` / ``states``: names, dtypes, symbolic shapes from the manifest;
- ``dtype`` / ``state_dtype`` / ``model``: precision and model dims (vocab, eos, ...);
- ``kv_cache`` / ``max_cache_len``: the export's KV-cache flavour (DESIGN.md §6): ``"dynamic"`` (``attention_mask``
  input, KV grows; ``max_cache_len`` null) or ``"static"`` (``cache_position`` / ``padding_length`` inputs, KV at
  ``max_cache_len`` positions written in place). Sidecars written before the field existed read as dynamic; one
  of them whose inputs are a static export's is refused (`read_sidecar`);
- ``build``: the build flags (limits, strongly typed, timing cache);
- ``tensor_parallel``: ``{rank, world, vocab}`` when the export is one rank of ``export --tp N`` (absent otherwise):
  such an engine runs only as that rank of N processes, and a one-process runtime refuses it.

Deterministic JSON (sorted keys). Pure functions, no TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridtrt.engine.profiles import ProfileSpec
from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.io import CACHE_POSITION, DYNAMIC, STATIC, CacheFlavour
from hybridtrt.exporter.manifest import MANIFEST_FILE, Manifest
from hybridtrt.reading import expect_object, read_json

if TYPE_CHECKING:
    from hybridtrt.engine.network import NetworkPlugins

#: Version of the sidecar layout; bump when a field changes meaning. 2: ``plugins`` reports the parsed network.
SIDECAR_VERSION = 2
SIDECAR_SUFFIX = ".json"

_REQUIRED = ("sidecar_version", "tensorrt", "profiles", "plugins", "source", "inputs", "outputs", "states", "dtype", "state_dtype")


def sidecar_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def make_sidecar(
    manifest: Manifest,
    export_dir: str | Path,
    profiles: list[ProfileSpec],
    *,
    graph: str = "unified",
    tensorrt_version: str,
    gpu_name: str | None,
    compute_capability: str | None,
    plugin_library: str | Path | None,
    build_flags: dict[str, Any],
    network: NetworkPlugins | None = None,
) -> dict[str, Any]:
    """The sidecar contents for an engine built from ``export_dir``'s ``graph``.

    Args:
        manifest: The export's manifest.
        export_dir: The export directory (stored absolute).
        profiles: Profiles in engine order.
        graph: ``"unified"`` or ``"decode"``.
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        gpu_name / compute_capability: The build GPU (e.g. ``"NVIDIA H100"``, ``"9.0"``); None if unknown.
        plugin_library: The plugin ``.so`` the engine needs (its network holds plugin layers), or None.
        build_flags: Limits and switches the build used (JSON-serializable).
        network: What the parsed network held (`hybridtrt.engine.network.prove_plugins`); None for sidecars made
            without a network (tests): then the plugin library alone says whether the plugins are used.

    Raises:
        ArtefactError: ``graph`` is not in the export, or the plugin library does not exist.
    """
    if graph not in manifest.graphs:
        raise ArtefactError(f"the export has no {graph!r} graph (it has {sorted(manifest.graphs)})", fix="re-export with --split for a decode graph")
    entry = manifest.graphs[graph]
    export_dir = Path(export_dir).resolve()
    manifest_file = export_dir / MANIFEST_FILE
    plugins: dict[str, Any]
    if plugin_library is None:
        plugins = {"path": None, "sha256": None}
    else:
        lib = Path(plugin_library).resolve()
        if not lib.is_file():
            raise ArtefactError(f"plugin library {lib} does not exist", fix="build it with `hybridtrt plugins build` or pass --plugins PATH")
        plugins = {"path": str(lib), "sha256": file_sha256(lib)}
    if network is not None:
        plugins.update(network.to_sidecar())
    else:
        plugins.update({"custom_nodes": {}, "layers": {}, "function_bodies": plugin_library is None})
    return {
        "sidecar_version": SIDECAR_VERSION,
        "tensorrt": tensorrt_version,
        "gpu": {"name": gpu_name, "compute_capability": compute_capability},
        "profiles": [p.to_dict() for p in profiles],
        "plugins": plugins,
        "source": {
            "export_dir": str(export_dir),
            "graph": graph,
            "onnx": entry.file,
            "manifest_sha256": file_sha256(manifest_file) if manifest_file.is_file() else None,
            "checkpoint": manifest.source.get("checkpoint"),
        },
        "inputs": entry.inputs,
        "outputs": entry.outputs,
        "states": manifest.states,
        "dtype": manifest.dtype,
        "state_dtype": manifest.state_dtype,
        "logits": manifest.logits,
        "kv_cache": manifest.kv_cache,
        "max_cache_len": manifest.max_cache_len,
        "model": {k: manifest.model.get(k) for k in ("vocab_size", "eos_token_id", "bos_token_id", "pad_token_id", "layer_types", "family")},
        "build": build_flags,
        # One rank of a tensor-parallel export (omitted for one device): the runtime must be that rank of that world.
        **({"tensor_parallel": {k: manifest.tensor_parallel[k] for k in ("rank", "world", "vocab")}} if manifest.tensor_parallel else {}),
    }


def dumps_sidecar(sidecar: dict[str, Any]) -> str:
    """Deterministic JSON text of a sidecar."""
    return json.dumps(sidecar, indent=2, sort_keys=True) + "\n"


def write_sidecar(sidecar: dict[str, Any], engine_path: str | Path) -> Path:
    """Write ``<engine>.json`` atomically (temp file in the same dir, then rename)."""
    path = sidecar_path(engine_path)
    fd, tmp = tempfile.mkstemp(prefix=".sidecar-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps_sidecar(sidecar))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """Load and check ``<engine>.json``.

    Args:
        engine_path: The ``.engine`` file (its sidecar sits beside it), or the sidecar itself.

    Raises:
        ArtefactError: The sidecar is missing, not JSON, of another version, or lacks a field.
    """
    p = Path(engine_path)
    path = p if p.name.endswith(".engine" + SIDECAR_SUFFIX) or p.suffix == SIDECAR_SUFFIX else sidecar_path(p)
    if not path.is_file():
        raise ArtefactError(
            f"{path} not found: every engine needs the sidecar `hybridtrt build` writes beside it",
            fix="rebuild the engine with `hybridtrt build EXPORT_DIR -o model.engine`",
        )
    fix = "rebuild the engine with `hybridtrt build EXPORT_DIR -o model.engine`"
    d = expect_object(
        read_json(path, what="the engine sidecar", error=ArtefactError, fix=fix, limit=16 * 2**20),
        source=str(path), error=ArtefactError, fix=fix,
    )  # fmt: skip
    if d.get("sidecar_version") != SIDECAR_VERSION:
        raise ArtefactError(
            f"{path} has sidecar_version {d.get('sidecar_version')!r}, this hybridtrt reads {SIDECAR_VERSION}",
            fix="rebuild the engine with this version of hybridtrt",
        )
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ArtefactError(f"{path} lacks {', '.join(missing)}", fix="rebuild the engine")
    _check_flavour(d, path)
    return d


def _check_flavour(d: dict[str, Any], path: Path) -> None:
    """Fill in and check ``kv_cache`` / ``max_cache_len`` (in place).

    A sidecar written before these fields existed is a dynamic-cache engine's, unless its inputs say otherwise.

    Raises:
        ArtefactError: An old sidecar of a static-cache engine (nothing records its capacity), an unknown flavour,
            or a static flavour without a positive ``max_cache_len``.
    """
    if "kv_cache" not in d:
        if any(i.get("name") == CACHE_POSITION for i in d.get("inputs", [])):
            raise ArtefactError(
                f"{path} belongs to an engine built from a static-cache export (input {CACHE_POSITION}) by a hybridtrt "
                "whose sidecars did not record kv_cache / max_cache_len, so nothing says how to run it",
                fix="rebuild the engine with this hybridtrt (`hybridtrt build EXPORT_DIR -o model.engine`)",
            )
        d["kv_cache"], d["max_cache_len"] = DYNAMIC, None
    kind, capacity = d["kv_cache"], d.get("max_cache_len")
    if kind not in (DYNAMIC, STATIC):
        raise ArtefactError(f"{path} has kv_cache {kind!r}; this hybridtrt knows {DYNAMIC!r} and {STATIC!r}", fix="rebuild the engine with this hybridtrt")
    if kind == STATIC and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
        raise ArtefactError(f"{path} has kv_cache 'static' with max_cache_len {capacity!r}", fix="rebuild the engine with this hybridtrt")


def sidecar_flavour(sidecar: dict[str, Any]) -> CacheFlavour:
    """The KV-cache flavour of a sidecar read by `read_sidecar` (dynamic when the field is absent)."""
    kind = sidecar.get("kv_cache", DYNAMIC)
    return CacheFlavour(kind, sidecar.get("max_cache_len") if kind == STATIC else None)


def sidecar_profiles(sidecar: dict[str, Any]) -> list[ProfileSpec]:
    """The profiles of a sidecar, in engine order."""
    try:
        return [ProfileSpec.from_dict(p) for p in sidecar["profiles"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtefactError(f"malformed profiles in the sidecar ({e})", fix="rebuild the engine") from None


def check_plugin_library(sidecar: dict[str, Any], path: str | Path | None = None) -> Path | None:
    """The plugin library an engine needs, verified on disk.

    Args:
        sidecar: The engine's sidecar.
        path: Override of the recorded path (e.g. the library moved); its hash must still match.

    Returns:
        The library path, or None when the engine holds no plugin layer.

    Raises:
        ArtefactError: The library is missing, or its sha256 differs from the build's.
    """
    plugins = sidecar["plugins"]
    if plugins.get("path") is None:
        return None
    lib = Path(path or plugins["path"])
    if not lib.is_file():
        raise ArtefactError(
            f"the engine was built with plugin library {plugins['path']}, which is not at {lib}",
            fix="build the plugins again (`hybridtrt plugins build`) or pass plugins=PATH to the library the engine was built with",
        )
    digest = file_sha256(lib)
    if digest != plugins.get("sha256"):
        raise ArtefactError(
            f"plugin library {lib} has sha256 {digest[:12]}…, the engine was built with {str(plugins.get('sha256'))[:12]}…",
            fix="rebuild the engine against this library (`hybridtrt build`), or point at the library it was built with",
        )
    return lib
