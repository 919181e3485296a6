"""Build a TensorRT 11 engine from an export directory, through polygraphy's Python API (DESIGN.md §9).

- **Version gates first** (`hybridtrt.engine.versions`, `hybridtrt.engine.dispatch`): before TensorRT parses
  anything, the graph is run through the emulated ONNX parser of the installed TensorRT. A release whose parser
  does not cover the graph's opset, imports a node nowhere, or — with a plugin library — would build the custom
  nodes from their function bodies (TensorRT <= 10.6 always does) is refused with a typed error, unless
  ``--allow-function-bodies`` accepts the function bodies knowingly.
- **Proof after parsing** (`hybridtrt.engine.network`): the parsed network's IPluginV3 layers are counted and
  compared with the graph's custom nodes; with a plugin library, a node that did not become its plugin is an
  error (or accepted with ``--allow-function-bodies``). The sidecar and the summary report what the network
  holds, and name the plugin library only when the network needs it.
- **Strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): TensorRT 11 has no
  FP16/BF16/FP8 builder flags; precision comes from the ONNX dtypes and Q/DQ nodes (DESIGN.md §7).
  TensorRT 11 networks are always strongly typed and ignores the (deprecated) flag; we still pass
  it so that a TensorRT 10 build means the same thing. No precision flag is ever set.
- **Two optimization profiles** for the unified graph, prefill then decode (`engine_profiles`).
- **Attention decomposable** (`hybridtrt.engine.attention`): the parser makes every ``Attention`` a fused-kernel-only
  ``IAttention``; the build marks them decomposable (``--attention fused`` keeps them fused-only), builds with
  ``ProfilingVerbosity.DETAILED`` and records what the engine holds for each (``IEngineInspector``) in the sidecar.
- **Plugin library** ``libhybridtrt_trt.so`` loaded with ``IPluginRegistry::loadLibrary`` (its ``getCreators``),
  as trtexec ``--dynamicPlugins`` does.
- **No aliased plugin I/O** (``PreviewFeature.kALIASED_PLUGIN_IO_10_03`` stays off, and no plugin declares an
  alias): the runtimes bind ``past_*`` and ``present_*`` to different (ping-pong) buffers, so
  ``Mamba2StateUpdate`` reads the past state and writes the new one directly; plugin aliasing would let TensorRT
  insert a copy of the network-input state instead (one extra state copy per step). Outputs the engine itself
  aliases to inputs (``ICudaEngine::getAliasedInputTensor``, e.g. a KV-cache update layer) are bound to one
  buffer by the runtimes.
- **Timing cache** loaded and saved back when given.
- **Atomic**: engine, sidecar and timing cache are written to temp files and renamed at the end;
  a failed build writes nothing. ``tensorrt`` is imported (lazily) before any file is touched.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridtrt.engine.attention import DECOMPOSABLE, AttentionLayers, inspect_engine_attention, mark_attention
from hybridtrt.engine.dispatch import DispatchReport, emulate_dispatch, require_dispatch
from hybridtrt.engine.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN
from hybridtrt.engine.network import NetworkPlugins, prove_plugins
from hybridtrt.engine.profiles import ProfileSpec, engine_profiles
from hybridtrt.engine.sidecar import make_sidecar, sidecar_path, write_sidecar
from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS, LOCAL_FUNCTION_ALWAYS
from hybridtrt.engine.versions import check_runtime_version
from hybridtrt.errors import EngineError, MissingDependencyError, PluginBuildError
from hybridtrt.exporter.manifest import Manifest, read_manifest

_DEPLOY_DOC = "see README 'Deploying the engine' (docs/deploying.md)"


def import_tensorrt() -> Any:
    """``import tensorrt``, or a typed error naming what is needed.

    Raises:
        MissingDependencyError: The TensorRT Python bindings are not installed, or older than 10.0 (the gate
            of `hybridtrt.engine.versions`).
    """
    try:
        import tensorrt as trt
    except ImportError as e:  # also catches a broken install (missing libnvinfer.so)
        raise MissingDependencyError(
            f"TensorRT is not available ({e}): building or running an engine needs the TensorRT 11 Python "
            "bindings (`import tensorrt`) and a CUDA GPU",
            fix=f"install TensorRT 11 with its Python wheel on a machine with an NVIDIA GPU; {_DEPLOY_DOC}",
        ) from None
    check_runtime_version(str(getattr(trt, "__version__", "unknown")))
    return trt


def resolve_plugin_library(plugins: str | Path | None) -> Path | None:
    """The plugin library to load: ``plugins`` if given, else the built ``libhybridtrt_trt.so`` if any.

    Returns:
        The library path, or None when none is built (the ONNX function bodies are used).

    Raises:
        EngineError: ``plugins`` was given and does not exist.
    """
    if plugins is not None:
        lib = Path(plugins)
        if not lib.is_file():
            raise EngineError(f"plugin library {lib} does not exist", fix="build it with `hybridtrt plugins build --tensorrt-root DIR` or drop --plugins")
        return lib.resolve()
    from hybridtrt.plugins import library_path

    try:
        return library_path("trt")
    except PluginBuildError:
        return None


@dataclass
class BuildPlan:
    """Everything decided before TensorRT is involved (printed by the CLI, checked by tests).

    Attributes:
        export_dir: The export directory.
        manifest: Its manifest.
        onnx_path: The ONNX graph the engine is built from.
        graph: ``"unified"`` or ``"decode"``.
        profiles: Optimization profiles in engine order.
        plugin_library: Plugin ``.so`` to load, or None (function bodies).
        output: Engine path to write.
        timing_cache: Timing cache file to load (if it exists) and save, or None.
        flags: Build flags recorded in the sidecar (limits, ``allow_function_bodies``, ...).
    """

    export_dir: Path
    manifest: Manifest
    onnx_path: Path
    graph: str
    profiles: list[ProfileSpec]
    plugin_library: Path | None
    output: Path
    timing_cache: Path | None
    flags: dict[str, Any] = field(default_factory=dict)


def plan_build(
    export_dir: str | Path,
    output: str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_input_len: int = DEFAULT_MAX_INPUT_LEN,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    plugins: str | Path | None = None,
    timing_cache: str | Path | None = None,
    graph: str = "unified",
    builder_optimization_level: int | None = None,
    allow_function_bodies: bool = False,
    attention: str = DECOMPOSABLE,
) -> BuildPlan:
    """Validate the request and compute profiles and paths, without TensorRT.

    Raises:
        ArtefactError: Not a complete export.
        EngineError: Bad limits, missing graph, unwritable output, missing ``--plugins`` file.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    profiles = engine_profiles(manifest, graph=graph, max_batch=max_batch, max_input_len=max_input_len, max_cache_len=max_cache_len)
    onnx_path = export_dir / manifest.graphs[graph].file
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path} is missing from the export", fix="re-export the model")
    out = Path(output)
    if out.is_dir():
        raise EngineError(f"output {out} is a directory", fix="pass a file name, e.g. -o model.engine")
    if not out.parent.exists():
        raise EngineError(f"output directory {out.parent} does not exist", fix=f"create it (`mkdir -p {out.parent}`)")
    if not os.access(out.parent, os.W_OK):
        raise EngineError(f"output directory {out.parent} is not writable", fix="choose another -o path")
    if timing_cache is not None and not Path(timing_cache).parent.is_dir():
        raise EngineError(f"timing cache directory {Path(timing_cache).parent} does not exist", fix="create it or choose another --timing-cache path")
    lib = resolve_plugin_library(plugins)
    flags = {
        "graph": graph,
        "max_batch": max_batch,
        "max_input_len": max_input_len,
        "max_cache_len": max_cache_len,
        "strongly_typed": True,
        "timing_cache": str(Path(timing_cache).resolve()) if timing_cache else None,
        "builder_optimization_level": builder_optimization_level,
        "allow_function_bodies": allow_function_bodies,
        "attention": attention,
    }
    return BuildPlan(export_dir, manifest, onnx_path, graph, profiles, lib, out, Path(timing_cache) if timing_cache else None, flags)


def check_dispatch(plan: BuildPlan, tensorrt_version: str) -> DispatchReport:
    """Emulate TensorRT ``tensorrt_version``'s ONNX parser on the plan's graph (no TensorRT needed).

    The plugins count as registered when the plan loads a plugin library.

    Raises:
        EngineError: The parser would not build what was asked (opset, unsupported node, custom nodes built
            from function bodies although plugins are loaded and ``allow_function_bodies`` is off).
        MissingDependencyError: ``tensorrt_version`` is unreadable or older than 10.0.
    """
    report = emulate_dispatch(plan.onnx_path, tensorrt_version, plugins=HYBRIDTRT_CREATORS if plan.plugin_library else ())
    require_dispatch(
        report, plugins_loaded=plan.plugin_library is not None, allow_function_bodies=bool(plan.flags.get("allow_function_bodies"))
    )
    return report


def plugins_to_load(plan: BuildPlan, report: DispatchReport) -> Path | None:
    """The plugin library to register before parsing: none when this TensorRT would never use it (<= 10.6, where
    only ``--allow-function-bodies`` gets this far)."""
    if plan.plugin_library is None or report.release.dispatch == LOCAL_FUNCTION_ALWAYS:
        return None
    return plan.plugin_library


@dataclass
class BuildResult:
    """What `build_engine` wrote, and what the parsed network held.

    Attributes:
        network: Custom nodes of the graph and the plugin layers the network holds for them.
        plugin_library: The plugin library the engine needs at run time (None: it holds no plugin layer).
        dispatch: The emulated parse that gated the build.
        attention: The IAttention layers, their decomposable flag and what the engine holds for them.
    """

    engine: Path
    sidecar: Path
    plan: BuildPlan
    engine_bytes: int
    seconds: float
    tensorrt_version: str
    network: NetworkPlugins
    plugin_library: Path | None
    dispatch: DispatchReport
    attention: AttentionLayers


def _gpu() -> tuple[str | None, str | None]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return torch.cuda.get_device_name(), f"{major}.{minor}"
    except (ImportError, RuntimeError):
        pass
    return None, None


def _load_plugins(trt: Any, lib: Path | None) -> None:
    """Register TensorRT's own plugins, then ours (``IPluginRegistry::loadLibrary``, i.e. its ``getCreators``), each
    once per process (`hybridtrt.engine.plugin_registry`: a second build, or a build then a `TrtModel`, reuses the
    first load — TensorRT's ``loadLibrary`` fails when the creators are already registered)."""
    from hybridtrt.engine.plugin_registry import load_plugin_library

    load_plugin_library(trt, lib)


def _tmp_beside(path: Path, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{tag}.tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def build_engine(
    export_dir: str | Path,
    output: str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_input_len: int = DEFAULT_MAX_INPUT_LEN,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    plugins: str | Path | None = None,
    timing_cache: str | Path | None = None,
    graph: str = "unified",
    builder_optimization_level: int | None = None,
    allow_function_bodies: bool = False,
    attention: str = DECOMPOSABLE,
    plan: BuildPlan | None = None,
) -> BuildResult:
    """Build ``output`` (+ ``output.json`` sidecar) from ``export_dir``.

    Args:
        export_dir: Directory written by ``hybridtrt export``.
        output: Engine file to write (e.g. ``model.engine``).
        max_batch / max_input_len / max_cache_len: Profile limits (see `hybridtrt.engine.profiles`).
        plugins: Plugin library; None = the built ``libhybridtrt_trt.so`` if any, else function bodies.
        timing_cache: Loaded if it exists, saved back after the build.
        graph: ``"unified"`` (two profiles) or ``"decode"`` (``decode.onnx``, one profile).
        builder_optimization_level: TensorRT builder optimization level (None = TensorRT's default).
        allow_function_bodies: Accept custom nodes built from their ONNX function bodies although a plugin
            library is given (otherwise a typed error).
        attention: ``"decomposable"`` (default: TensorRT may split an IAttention into several kernels when it has
            no fused one) or ``"fused"`` (fused kernels only; the build fails where none fits).
        plan: A precomputed `plan_build` result (the CLI prints it first); overrides the other args.

    Raises:
        MissingDependencyError: No TensorRT (or < 10.0); raised before anything is written.
        EngineError: The version gates or the proof after parsing refused the build, the build failed
            (TensorRT's log says why), or bad arguments.
    """
    plan = plan or plan_build(
        export_dir,
        output,
        max_batch=max_batch,
        max_input_len=max_input_len,
        max_cache_len=max_cache_len,
        plugins=plugins,
        timing_cache=timing_cache,
        graph=graph,
        builder_optimization_level=builder_optimization_level,
        allow_function_bodies=allow_function_bodies,
        attention=attention,
    )
    trt = import_tensorrt()  # before any file is written
    report = check_dispatch(plan, str(trt.__version__))
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    start = time.perf_counter()
    lib = plugins_to_load(plan, report)
    _load_plugins(trt, lib)
    try:
        builder, network, parser = NetworkFromOnnxPath(str(plan.onnx_path), strongly_typed=True)()
    except Exception as e:  # polygraphy raises PolygraphyException with the parser's errors
        raise EngineError(f"TensorRT's ONNX parser failed on {plan.onnx_path}: {e}", fix="read the parser errors above") from e
    net = prove_plugins(
        trt, network, report.custom_nodes(), expected=report.expected_plugin_layers(), plugins_loaded=lib is not None,
        allow_function_bodies=bool(plan.flags.get("allow_function_bodies")),
    )  # fmt: skip
    layers = mark_attention(trt, network, mode=plan.flags.get("attention", DECOMPOSABLE))
    from hybridtrt.engine.plugin_registry import required_library

    needed = required_library(net, lib)  # the sidecar names the library only when needed; plugin layers need one
    trt_profiles = []
    for spec in plan.profiles:
        profile = Profile()
        for name, (lo, opt, hi) in spec.shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(profile)
    cache_in = plan.timing_cache if plan.timing_cache is not None and plan.timing_cache.is_file() else None
    config = CreateConfig(
        profiles=trt_profiles,
        load_timing_cache=str(cache_in) if cache_in else None,
        builder_optimization_level=plan.flags.get("builder_optimization_level"),
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # the engine inspector's per-layer facts
    )

    out = plan.output
    tmp_engine = _tmp_beside(out, "engine")
    tmp_cache = _tmp_beside(plan.timing_cache, "cache") if plan.timing_cache is not None else None
    try:
        try:
            blob = EngineBytesFromNetwork(
                (builder, network, parser), config=config, save_timing_cache=str(tmp_cache) if tmp_cache else None
            )()
        except Exception as e:  # polygraphy raises PolygraphyException / RuntimeError with TensorRT's log
            raise EngineError(f"TensorRT could not build {plan.onnx_path}: {e}", fix="read TensorRT's log above; build the plugins if a custom op is unsupported") from e
        if blob is None:
            raise EngineError(f"TensorRT returned no engine for {plan.onnx_path}", fix="read TensorRT's log above")
        data = bytes(blob)
        tmp_engine.write_bytes(data)
        gpu_name, cc = _gpu()
        sidecar = make_sidecar(
            plan.manifest,
            plan.export_dir,
            plan.profiles,
            graph=plan.graph,
            tensorrt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=cc,
            plugin_library=needed,
            network=net,
            build_flags=plan.flags,
        )
        layers = inspect_engine_attention(trt, data, layers)
        sidecar["attention"] = layers.to_sidecar()
        write_sidecar(sidecar, tmp_engine)  # writes tmp_engine + ".json" atomically
        os.replace(sidecar_path(tmp_engine), sidecar_path(out))
        try:
            os.replace(tmp_engine, out)
        except OSError:
            sidecar_path(out).unlink(missing_ok=True)
            raise
        if tmp_cache is not None and tmp_cache.stat().st_size > 0:
            os.replace(tmp_cache, plan.timing_cache)  # type: ignore[arg-type]
    finally:
        for tmp in (tmp_engine, sidecar_path(tmp_engine), tmp_cache):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return BuildResult(
        out, sidecar_path(out), plan, len(data), time.perf_counter() - start, str(trt.__version__), net, needed, report, layers
    )
