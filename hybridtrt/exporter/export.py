"""``hybridtrt export``: checkpoint -> ``model.onnx`` (+ ``decode.onnx``) + ``weights.data`` +
``hybridtrt.json``, in memory bounded by the largest tensor, not the model.

Steps: read the checkpoint's config and safetensors headers (every refusal happens here, before
any work) → check the memory the export will need against the machine's and its limits
(`hybridtrt.exporter.preflight`) → lock the output directory, refuse a foreign one, and check the
disk space the export will need (`hybridtrt.exporter.target`) → trace each graph with fake
weights (`hybridtrt.exporter.streaming`: ``torch.onnx.export(dynamo=True)``, the exporter's own
optimizer, custom ops become ``hybridtrt`` domain nodes) → graph passes (names, cleanup, function
bodies, dims; FP8 Q/DQ with sequential calibration on the lazy reference) → stream every weight
from the checkpoint into ``weights.data`` (one tensor in flight, NaN/Inf checked) → verify the
written files with ONNX Runtime against the lazy reference (whole graph, or by decoder-layer
windows) → ``hybridtrt.json`` (with the verification record) → publish atomically (the previous export or the
new one at every instant).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx.external_data_helper import uses_external_data

from hybridtrt.errors import ExportError
from hybridtrt.exporter import io, preflight, stitch, trace_cache
from hybridtrt.exporter.integrity import record_files
from hybridtrt.exporter.mtp_graph import MTP_FILE, MTP_WEIGHTS_FILE, mtp_graph_bytes, verify_mtp_graph, write_mtp_graph
from hybridtrt.exporter.manifest import (
    MANIFEST_FILE,
    GraphEntry,
    Manifest,
    checkpoint_hash,
    layer_map,
)
from hybridtrt.exporter.quantize import QuantizeOptions, WeightOnlyOptions, quantize_graph, quantize_weights
from hybridtrt.exporter.streaming import (
    DeferredTable,
    FrozenTrace,
    defer_large_initializers,
    fake_model,
    trace_and_optimize,
    trace_inputs,
)
from hybridtrt.exporter.target import OutputDir
from hybridtrt.exporter.translation import translation_table
from hybridtrt.exporter.verify import VERIFY_MODES, Progress, held_state_bytes, temporary_bytes, verify_export
from hybridtrt.exporter.wrapper import GraphModule
from hybridtrt.graphs.cleanup import strip_metadata
from hybridtrt.graphs.dims import name_io_dims, read_dims_off_first_input
from hybridtrt.graphs.external_data import (
    deferred_key,
    external_info,
    is_deferred,
    planned_external_bytes,
    share_before_write,
    write_external_data,
)
from hybridtrt.graphs.naming import assign_node_names, name_matmul_weights, name_values
from hybridtrt.models.config import MAMBA, HybridConfig
from hybridtrt.models.loading import (
    Checkpoint,
    dtype_name,
    open_checkpoint,
    parse_dtype,
)
from hybridtrt.models.model import HybridLM
from hybridtrt.ops.onnx_functions import DOMAIN, MAX_OPSET, MIN_OPSET, attach_functions

MODEL_FILE = "model.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "weights.data"
DECODE_WEIGHTS_FILE = "decode.weights.data"
DEFAULT_OPSET = 24
ARTEFACTS = {MODEL_FILE, DECODE_FILE, WEIGHTS_FILE, DECODE_WEIGHTS_FILE, MTP_FILE, MTP_WEIGHTS_FILE}

Step = Callable[[str], contextlib.AbstractContextManager]


@dataclass
class ExportOptions:
    """Flags of ``hybridtrt export``; None means the default.

    Attributes:
        dtype: Model dtype ``fp32 | fp16 | bf16``.
        state_dtype: SSM state dtype (default fp32).
        logits: ``"last"`` ``[B, V]`` or ``"all"`` ``[B, L, V]``.
        split: Also write the decode-only graph ``decode.onnx`` (Mamba2StateUpdate). None (the
            default): when the model has a Mamba layer — runtimes use it for one-token steps, 1.2–1.3×
            faster per token than the unified graph on ONNX Runtime (README "Long context").
        opset: Default-domain ONNX opset.
        per_layer: Expose each decoder layer's output as ``layer_output.{i}`` (for validation).
        verify: Run the written graphs with ONNX Runtime against the reference before publishing.
        verify_mode: ``auto`` (whole graph for small models, decoder-layer windows above),
            ``full`` or ``layers`` (`hybridtrt.exporter.verify`).
        size_threshold: Initializers of at least this many bytes go to external data.
        force: Export into a non-empty directory that is not a hybridtrt export, or into the
            checkpoint directory.
        kv_cache: ``"dynamic"`` (growing KV, ``attention_mask``) or ``"static"`` (fixed-capacity
            KV written in place; `hybridtrt.exporter.io.CacheFlavour`).
        max_cache_len: KV capacity of the static cache.
        dequantize: Export a quantized (ModelOpt) checkpoint's weights dequantized to ``dtype``, as
            ModelOpt dequantizes them, with no Q/DQ: the way to deploy an NVFP4 checkpoint today, at
            ``dtype``'s size.
        fp4_activations: An NVFP4 checkpoint's linear layers with FP4 activations too (W4A4, a
            Blackwell target: `hybridtrt.graphs.fp4_activations`), quantized per call with the
            checkpoint's ``input_scale``.
        dequantize_experts: An NVFP4 checkpoint's routed experts in ``dtype`` (dequantized as ModelOpt
            does) instead of 4-bit ``MoeExpertsNvfp4``: what TensorRT builds without a MoE plugin.
        speculative: Graphs for speculative decoding (DESIGN.md §11): every position's logits and the
            final hidden states ``last_hidden_state`` from the unified and decode graphs, and the
            checkpoint's MTP head as ``mtp.onnx`` when it has one (`hybridtrt.exporter.mtp_graph`).
    """

    dtype: str = "fp32"
    state_dtype: str | None = None
    logits: Literal["last", "all"] = "last"
    split: bool | None = None
    opset: int | None = None
    per_layer: bool = False
    verify: bool = True
    verify_mode: str = "auto"
    size_threshold: int = 1024
    force: bool = False
    kv_cache: str = "dynamic"
    max_cache_len: int | None = None
    dequantize: bool = False
    fp4_activations: bool = False
    dequantize_experts: bool = False
    speculative: bool = False


@dataclass(frozen=True)
class GraphSpec:
    """One graph of an export: what the traced module computes and the opset it is exported at.

    Attributes:
        logits: ``"last"`` or ``"all"`` positions.
        decode: The decode-only graph (one token, ``Mamba2StateUpdate``) instead of the unified one.
        per_layer: Expose each decoder layer's output.
        state_dtype: SSM state dtype.
        opset: Default-domain ONNX opset.
        flavour: KV-cache flavour (`hybridtrt.exporter.io.CacheFlavour`).
    """

    logits: str = "last"
    decode: bool = False
    per_layer: bool = False
    state_dtype: torch.dtype = torch.float32
    opset: int = DEFAULT_OPSET
    flavour: io.CacheFlavour = io.DYNAMIC_CACHE
    hidden: bool = False

    def module(self, model: HybridLM) -> GraphModule:
        return GraphModule(model, self.logits, self.decode, self.per_layer, self.flavour, self.hidden).eval()  # type: ignore[arg-type]

    @property
    def seq(self) -> int:
        """Tokens of the example inputs (1 for the decode graph)."""
        return 1 if self.decode else 5


@dataclass
class ExportResult:
    """What an export wrote and found."""

    out_dir: Path
    manifest: Manifest
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    parameters: int = 0
    parameter_bytes: int = 0
    verification: dict[str, float] = field(default_factory=dict)  # graph file -> worst rel L2
    removed_partials: list[str] = field(default_factory=list)  # "NAME (whose, why)" of leftover .partial-* dirs removed
    kept_partials: list[str] = field(default_factory=list)  # "NAME (whose, why)" of marked .partial-* dirs left alone
    publish_note: str = ""  # `OutputDir.publish_note`: "swap", "in place", or "in place: <why not a swap>"


@contextlib.contextmanager
def _no_step(_: str) -> Iterator[None]:
    yield


@contextlib.contextmanager
def _no_progress(label: str, total: int, unit: str = "B") -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's chatter (it prints progress and warns about torchvision)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_program(model: HybridLM, inputs: tuple[torch.Tensor, ...], spec: GraphSpec, *, optimize: bool):
    """``torch.onnx.export(dynamo=True)`` of one graph of ``model``; returns the ``ONNXProgram``."""
    graph = spec.module(model)
    with _quiet_exporter():
        return torch.onnx.export(
            graph,
            inputs,
            dynamo=True,
            input_names=io.input_names(model.config, spec.flavour),
            output_names=io.output_names(model.config, spec.per_layer, spec.hidden),
            dynamic_shapes=graph.dynamic_shapes(),
            custom_translation_table=translation_table(spec.opset),
            opset_version=spec.opset,
            optimize=optimize,
            verbose=False,
        )


def run_passes(proto: onnx.ModelProto, config: HybridConfig, spec: GraphSpec) -> onnx.ModelProto:
    """The graph passes every export gets: names, cleanup, function bodies, I/O dims."""
    from hybridtrt import __version__

    read_dims_off_first_input(proto)
    assign_node_names(proto)
    name_matmul_weights(proto)
    name_values(proto)
    strip_metadata(proto)
    attach_functions(proto)
    name_io_dims(proto, io.io_shapes(config, spec.logits, spec.decode, spec.per_layer, spec.flavour, spec.hidden))
    proto.producer_name = "hybridtrt"
    proto.producer_version = __version__
    return proto


def optimize_program(program) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs after tracing."""
    with _quiet_exporter():
        program.optimize()


def trace_streamed(checkpoint: Checkpoint, table: DeferredTable, spec: GraphSpec | None = None) -> onnx.ModelProto:
    """Trace one graph (unified or decode) without loading the weights, and run the graph passes.

    Returns the graph with its large initializers as placeholders whose recipes are in ``table``
    (`hybridtrt.exporter.streaming`); small ones (≤ `FOLD_LIMIT` elements) are inline.
    """
    spec = spec or GraphSpec()
    cached = trace_cache.load(checkpoint, spec, table)
    if cached is not None:
        return cached
    program, stand_ins, large = trace_and_optimize(_trace_unoptimized(checkpoint, spec), checkpoint, optimize_program)
    defer_large_initializers(program, table, stand_ins, large)
    proto = program.model_proto
    del program, stand_ins
    _forget_trace()
    proto = run_passes(proto, checkpoint.config, spec)
    trace_cache.store(checkpoint, spec, table, proto)
    return proto


class TracedBeside:
    """`trace_streamed` of one graph in a second Python process, while this one traces and streams
    the graphs before it: on two CPUs the unified and the decode graph are traced at once.

    The child is a fresh interpreter, not a fork: a fork copies only the forking thread, and a lock
    another thread held (a live ONNX Runtime session's pool, a test runner's I/O thread) hangs the
    child the first time it needs it (seen: a forked child freeing an inherited session, waiting on
    its pool forever). The child gets the checkpoint's structure and the graph's spec (pickled, in
    a temporary file), imports the exporter in the time this process traces, and returns the graph
    with its placeholders' recipes on stdout (`trace_cache.portable`), keyed into the export's own
    table on arrival (`trace_cache.adopt`): the files are the same bytes as a trace here. A child
    that fails for any reason returns nothing and the graph is traced here, where any error is
    raised as usual; an export that fails first kills and reaps it (`close`).
    """

    def __init__(self, checkpoint: Checkpoint, spec: GraphSpec) -> None:
        import pickle
        import subprocess
        import tempfile

        import hybridtrt

        self.checkpoint, self.spec = checkpoint, spec
        self.request = tempfile.NamedTemporaryFile(prefix="hybridtrt-trace-", suffix=".pkl")
        self.request.write(pickle.dumps((checkpoint, spec)))
        self.request.flush()
        self.stderr = tempfile.TemporaryFile()
        package_parent = str(Path(hybridtrt.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
        self.process: Any = subprocess.Popen(
            [*self.command(), self.request.name], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )

    @classmethod
    def start(cls, checkpoint: Checkpoint, spec: GraphSpec) -> TracedBeside | None:
        """A child tracing ``spec``, or None (logged) when none could be started: the graph is then
        traced here, as without a second process."""
        import pickle

        try:
            return cls(checkpoint, spec)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            logging.getLogger(__name__).warning("no second tracing process (%s: %s); tracing every graph here", type(e).__name__, e)
            return None

    @staticmethod
    def command() -> list[str]:
        """The child's command line, before the request file's path."""
        return [sys.executable, "-c", "import sys; from hybridtrt.exporter.export import trace_beside_child; trace_beside_child(sys.argv[1])"]

    @classmethod
    def worthwhile(cls, graphs: int) -> bool:
        """Trace beside only where it helps: two or more CPUs, more than one graph, not turned off."""
        return graphs > 1 and len(os.sched_getaffinity(0)) >= 2 and os.environ.get(BESIDE_ENV) != "0"

    def result(self, table: DeferredTable) -> onnx.ModelProto:
        """The child's graph keyed into ``table``, or the graph traced here if the child failed."""
        blob, _ = self.process.communicate()
        code = self.process.returncode
        self.stderr.seek(0)
        why = self.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {code}"]
        self.close()
        if code == 0 and blob:
            return trace_cache.adopt(blob, table)
        logging.getLogger(__name__).warning("the %s graph's tracing process failed (%s); tracing it here", "decode" if self.spec.decode else "unified", why[0])
        return trace_streamed(self.checkpoint, table, self.spec)

    def close(self) -> None:
        """Stop and reap the child if it still runs (the export failed before asking for its graph)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.request.close()
        self.stderr.close()


def trace_beside_child(request: str) -> None:
    """The child of `TracedBeside`: trace the requested graph, write it to stdout."""
    import pickle

    torch.set_num_threads(1)  # tracing is Python; the exporting process uses the other CPU
    with open(request, "rb") as f:
        checkpoint, spec = pickle.load(f)
    table = DeferredTable(checkpoint)
    blob = trace_cache.portable(trace_streamed(checkpoint, table, spec), table)
    sys.stdout.buffer.write(blob)
    sys.stdout.buffer.flush()


#: ``HYBRIDTRT_TRACE_BESIDE=0`` traces every graph in the exporting process (`TracedBeside`).
BESIDE_ENV = "HYBRIDTRT_TRACE_BESIDE"


#: Trace a prototype of one layer per kind and copy it out (`hybridtrt.exporter.stitch`); False
#: traces every layer (the witness the stitch tests compare against).
STITCH = True


def _trace_unoptimized(checkpoint: Checkpoint, spec: GraphSpec, whole: Callable[[], FrozenTrace] | None = None) -> FrozenTrace:
    """The unoptimized trace of ``spec`` on fake weights: of a prototype with one layer per kind,
    copied out to every layer (`hybridtrt.exporter.stitch`), or of the whole model when the
    prototype's graph cannot be copied (``whole()``, by default a trace of fake weights). Replayed
    from the trace cache when it holds one of a checkpoint of the same structure."""
    proto = stitch.prototype(checkpoint.config) if STITCH else None
    if proto is not None:
        try:
            shallow = stitch.prototype_structure(checkpoint, proto)
            return trace_cache.traced(shallow, spec, partial(_trace, shallow, spec)).stitched(proto, checkpoint.config, spec)
        except stitch.CannotStitch as e:
            logging.getLogger(__name__).warning("tracing every layer: %s", e)
    return trace_cache.traced(checkpoint, spec, whole or partial(_trace, checkpoint, spec))


def _trace(checkpoint: Checkpoint | stitch.Structure, spec: GraphSpec) -> FrozenTrace:
    model = fake_model(checkpoint)
    inputs = trace_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour)
    return FrozenTrace(export_program(model, inputs, spec, optimize=False))


def _forget_trace() -> None:
    """Drop what tracing leaves behind: torch keeps the last export's fake-tensor → FX-node map
    (the whole traced graph) in a module global until the next export, and glibc keeps the freed
    heap (about 13 MiB after tracing a 0.1 B model) unless asked to return it."""
    import gc

    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """glibc as a `ctypes.CDLL`, or None elsewhere (musl, macOS, Windows)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory_promptly() -> None:
    """Make freed weight buffers leave the process at once (glibc only; a no-op elsewhere).

    glibc serves blocks below its mmap threshold from the heap, and raises that threshold (up to
    32 MiB) each time a large block is freed; freed heap blocks are kept, so tensors streamed one
    at a time would pile up as resident memory. With the threshold fixed at 1 MiB every buffer of
    that size is its own mapping, returned on free. Process-wide: the CLI calls it, a library
    caller may.
    """
    m_mmap_threshold = -3
    libc = _glibc()
    if libc is not None:
        libc.mallopt(m_mmap_threshold, 1 << 20)


def _value_entries(values) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
    return out


def _custom_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN).items()))


def _fix_permissions(directory: Path, names: list[str]) -> None:
    """Give written files the usual permissions (onnx/onnx_ir create data files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        if (directory / name).exists():
            os.chmod(directory / name, 0o666 & ~umask)


def check_options(opts: ExportOptions, quantize: QuantizeOptions | None) -> int:
    """Refuse bad flags before any work. Returns the opset."""
    from hybridtrt.exporter.calibration import check_calibration_source

    opset = opts.opset or DEFAULT_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}", fix=f"use --opset {DEFAULT_OPSET}")
    parse_dtype(opts.dtype)
    parse_dtype(opts.state_dtype or "fp32")
    if opts.verify_mode not in VERIFY_MODES:
        raise ExportError(f"verification mode {opts.verify_mode!r} is unknown", fix=f"use one of {', '.join(VERIFY_MODES)}")
    if quantize is not None and quantize.fixed is None and quantize.act_amax is None:  # a checkpoint's own scales, or a TP rank's calibrated ones
        check_calibration_source(quantize.calib_file, quantize.calib_random)
    return opset


def mtp_note(config, exported: bool = False) -> str:
    """What the export says of a checkpoint's multi-token-prediction layers."""
    pattern = f" (pattern {config.mtp_pattern!r})" if config.mtp_pattern else ""
    if exported:
        return f"{config.mtp_layers} MTP layer(s){pattern} in the checkpoint (mtp.*), exported as {MTP_FILE}: the draft head of `generate --speculative mtp`"
    return (f"{config.mtp_layers} MTP layer(s){pattern} in the checkpoint (mtp.*), not exported: the main model's logits do not "
            "depend on them; `export --speculative` writes them as mtp.onnx")  # fmt: skip


def _checkpoint_quantization(
    checkpoint: Checkpoint,
    quantize: QuantizeOptions | None,
    weight_only: WeightOnlyOptions | None,
    dequantize: bool,
    fp4_activations: bool = False,
    dequantize_experts: bool = False,
) -> tuple[QuantizeOptions | None, WeightOnlyOptions | None]:
    """A ModelOpt FP8 checkpoint is exported with its own scales (`hybridtrt.exporter.quantize.
    from_checkpoint`), an NVFP4 one as 4-bit weights with its own scales (`nvfp4_from_checkpoint`;
    with ``fp4_activations``, FP4 activations too), or, with ``dequantize``, any ModelOpt checkpoint
    with its weights dequantized (and ``quantize`` / ``weight_only``, our own, if asked for)."""
    quantization = checkpoint.quantization
    if dequantize_experts and (quantization is None or quantization.algo != "NVFP4" or dequantize):
        raise ExportError(
            "--dequantize-experts keeps an NVFP4 checkpoint's routed experts in --dtype; "
            + ("--dequantize dequantizes every weight already" if dequantize and quantization is not None else
               f"{checkpoint.root} is " + (f"a ModelOpt {quantization.algo} checkpoint" if quantization is not None else "not quantized")),
            fix="drop --dequantize-experts",
        )  # fmt: skip
    if fp4_activations and (quantization is None or quantization.algo != "NVFP4" or dequantize):
        what = "--dequantize exports no 4-bit weights" if dequantize and quantization is not None else (
            f"{checkpoint.root} is " + (f"a ModelOpt {quantization.algo} checkpoint" if quantization is not None else "not quantized"))
        raise ExportError(
            f"--fp4-activations pairs FP4 activations with an NVFP4 checkpoint's own FP4 weights and input scales; {what}",
            fix="export a ModelOpt NVFP4 checkpoint (without --dequantize), or drop --fp4-activations",
        )
    if quantization is None:
        if dequantize:
            raise ExportError(f"--dequantize: {checkpoint.root} is not a quantized checkpoint", fix="drop --dequantize")
        return quantize, weight_only
    if dequantize:
        return quantize, weight_only
    if quantize is not None or weight_only is not None:
        raise ExportError(
            f"{checkpoint.root} is quantized to {quantization.algo} by ModelOpt already; the export keeps its scales",
            fix="drop --quantize and its flags (--calib, --calib-random, --exclude, --weight-scale, --block-size), "
            "or add --dequantize to quantize its dequantized weights again",
        )
    from hybridtrt.exporter.quantize import from_checkpoint, nvfp4_from_checkpoint

    if quantization.algo == "NVFP4":
        return None, nvfp4_from_checkpoint(checkpoint, fp4_activations=fp4_activations, dequantize_experts=dequantize_experts)
    return from_checkpoint(checkpoint), None


def export(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    step: Step = _no_step,
    progress: Progress = _no_progress,
    quantize: QuantizeOptions | None = None,
    weight_only: WeightOnlyOptions | None = None,
    rank: Any = None,
) -> ExportResult:
    """Export a checkpoint directory to ONNX.

    Args:
        checkpoint_dir: HF checkpoint (config.json + safetensors).
        out_dir: Output directory (created).
        options: Export flags.
        step: ``step(name)`` context manager wrapped around each short stage (progress display).
        progress: ``progress(label, total, unit)`` context manager yielding ``advance(n)``, for the
            long stages (weight streaming in bytes, calibration in layers, verification).
        quantize: FP8 Q/DQ on the linear layers (DESIGN.md §7): calibrate on the reference, then
            the same scales in every graph of the export.
        weight_only: 4-bit weights on the linear layers (W4A16, `hybridtrt.graphs.weight_only`).
        rank: One rank of a tensor-parallel export (`hybridtrt.exporter.tensor_parallel.RankExport`,
            from `export_tp`): the checkpoint is read as the rank's slices, the rank's graphs traced
            with their collectives, nothing verified alone (the ranks are verified together).

    Returns:
        `ExportResult`.
    """
    opts = options or ExportOptions()
    opset = check_options(opts, quantize)
    state_dtype = parse_dtype(opts.state_dtype or "fp32")
    flavour = io.cache_flavour(opts.kv_cache, opts.max_cache_len, opset)
    with step("read checkpoint (config.json, safetensors headers)"):
        checkpoint = open_checkpoint(checkpoint_dir, opts.dtype)
    if quantize is not None and weight_only is not None:
        raise ExportError("FP8 Q/DQ and 4-bit weights are two different recipes", fix="pass one --quantize")
    if rank is None:
        quantize, weight_only = _checkpoint_quantization(checkpoint, quantize, weight_only, opts.dequantize, opts.fp4_activations, opts.dequantize_experts)
    else:  # export_tp resolved the recipe for every rank, on the unsharded checkpoint
        checkpoint = rank.view(checkpoint)
        if quantize is not None and quantize.fixed is None:
            quantize = rank.fp8(quantize)  # the unsharded model's activation and weight scales
        if weight_only is not None and weight_only.fixed is not None:
            weight_only = rank.nvfp4(weight_only, checkpoint)  # the rank's part of the checkpoint's codes and block scales
        elif weight_only is not None:
            weight_only = rank.int4(weight_only, checkpoint)  # the ranks' blocks; the rank's inputs of the AWQ pre-scales
    config = checkpoint.config
    if opts.speculative and config.mtp_layers:
        from hybridtrt.models.mtp import check_mtp_config

        check_mtp_config(config)  # before anything is traced
    logits = "all" if opts.speculative else opts.logits
    roles = [("unified", MODEL_FILE, WEIGHTS_FILE, False)]
    split = MAMBA in config.layer_types if opts.split is None else opts.split
    if split:
        if MAMBA not in config.layer_types:
            raise ExportError("--split needs at least one Mamba layer (the decode graph exists for Mamba2StateUpdate)")
        roles.append(("decode", DECODE_FILE, DECODE_WEIGHTS_FILE, True))

    largest = max((p.nbytes for p in checkpoint.parameters.values()), default=0)
    preflight.check_memory(preflight.memory_bytes(checkpoint.parameter_bytes, largest, config.num_layers, opts.verify_mode if opts.verify else None))
    from hybridtrt.models.lazy import lazy_model

    reference = lazy_model(checkpoint) if rank is None else None  # a rank's graph means nothing alone
    with OutputDir(Path(out_dir), ARTEFACTS, MANIFEST_FILE, checkpoint.root, force=opts.force) as target, contextlib.ExitStack() as stack:
        target.check_space(preflight.disk_bytes(checkpoint.parameter_bytes, len(roles), opts.verify, held_state_bytes(config, flavour)))
        table = DeferredTable(checkpoint)
        graphs: dict[str, GraphEntry] = {}
        written: list[str] = []
        recipe = weights_recipe = None
        unified_keys: dict[str, str] = {}
        # Calibration and the AWQ search run before anything is traced: their working set (a layer's
        # weights and the batches' activations) is gone before tracing's residue builds up, so the
        # export peaks at the larger of the two, not at their sum.
        if quantize is not None and quantize.fixed is None and rank is None:
            with progress("FP8 calibration (each layer read once)", len(reference.weights.groups), "layers") as advance:
                quantize.progress = _counter(advance)
                from hybridtrt.exporter.quantize import run_calibration

                run_calibration(reference, checkpoint.root, quantize)
        if weight_only is not None and weight_only.calibrated and weight_only.awq is None:
            with progress("AWQ search (each layer read once)", len(reference.weights.groups), "layers") as advance:
                weight_only.progress = _counter(advance)
                from hybridtrt.exporter.quantize import run_awq

                run_awq(reference, checkpoint.root, weight_only)
        specs = {role: GraphSpec(logits, decode, opts.per_layer, state_dtype, opset, flavour, opts.speculative) for role, _, _, decode in roles}
        beside_ok = rank is None and TracedBeside.worthwhile(len(roles))
        started = {role: TracedBeside.start(checkpoint, specs[role]) for role, *_ in roles[1:]} if beside_ok else {}
        beside = {role: b for role, b in started.items() if b is not None}
        for b in beside.values():
            stack.callback(b.close)
        for role, fname, data, decode in roles:
            if role in beside:
                with step(f"trace {role} graph (in a second process, beside the {roles[0][0]} graph)"):
                    proto = beside.pop(role).result(table)
            elif rank is not None:
                with step(f"trace {role} graph (rank {rank.rank}'s slices, collectives as DistCollective)"):
                    proto = rank.trace(checkpoint, table, specs[role])
            else:
                with step(f"trace {role} graph (torch.export → ONNX, weights not loaded)"):
                    proto = trace_streamed(checkpoint, table, specs[role])
            rule = "onnx_ir"  # the writer the weight-loaded export used: onnx_ir.save
            if quantize is not None:
                with step(f"FP8: insert Q/DQ ({role})"):
                    recipe = quantize_graph(proto, reference, checkpoint.root, quantize, quantizer=table.quantizer())
                rule = "onnx"  # FP8 graphs were saved from memory with onnx.save_model
            if weight_only is not None:
                with step(f"{weight_only.scheme}: 4-bit weights ({role})"):
                    weights_recipe = quantize_weights(proto, weight_only, quantizer=table.quantizer())
                rule = "onnx"
            shared = 0
            if graphs:  # later graphs reuse the unified graph's weights.data where identical
                shared = share_before_write(
                    proto,
                    target.partial / MODEL_FILE,
                    rule=rule,
                    size_threshold=opts.size_threshold,
                    same=lambda t, path, offset, n, keys=unified_keys: table.same(t, path, offset, n, keys),
                )
                rule = "onnx"
            else:
                unified_keys = {t.name: deferred_key(t) for t in proto.graph.initializer if is_deferred(t)}
            entry = GraphEntry(
                file=fname,
                data=[WEIGHTS_FILE] if shared else [],
                role=role,
                inputs=_value_entries(proto.graph.input),
                outputs=_value_entries(proto.graph.output),
                custom_ops=_custom_op_counts(proto),
            )
            total = planned_external_bytes(proto, rule, opts.size_threshold)
            target.check_space(total + proto.ByteSize())
            meter = progress if total else _no_progress
            with target.writing(total + proto.ByteSize(), f"{data} and {fname}"), meter(f"stream weights → {data}", total, "B") as advance:
                write_external_data(proto, target.partial, data, rule=rule, size_threshold=opts.size_threshold, chunks=table.chunks, progress=advance)
                onnx.save_model(proto, str(target.partial / fname))
            del proto
            if (target.partial / data).exists():
                entry.data.append(data)
                written.append(data)
            _fix_permissions(target.partial, [fname, data])
            graphs[role] = entry
            try:
                onnx.checker.check_model(str(target.partial / fname), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise ExportError(
                    f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}",
                    fix=f"bf16 needs opset ≥ 22; otherwise report this with the checkpoint's config.json (opset {opset})",
                ) from e
            written.append(fname)
        mtp = bool(opts.speculative and config.mtp_layers)
        if mtp:
            target.check_space(mtp_graph_bytes(checkpoint))
            with step(f"trace the MTP head → {MTP_FILE} (its weights in {MTP_WEIGHTS_FILE}; the embedding and LM head shared with {WEIGHTS_FILE})"):
                proto = write_mtp_graph(checkpoint, target.partial, opset, target.partial / MODEL_FILE)
            data = sorted({external_info(t)[0] for t in proto.graph.initializer if uses_external_data(t)})
            graphs["mtp"] = GraphEntry(
                file=MTP_FILE, data=data, role="mtp", inputs=_value_entries(proto.graph.input), outputs=_value_entries(proto.graph.output), custom_ops=_custom_op_counts(proto)
            )
            _fix_permissions(target.partial, [MTP_FILE, *data])
            onnx.checker.check_model(str(target.partial / MTP_FILE), full_check=True)
            written += [MTP_FILE, *[d for d in data if d not in written]]
        manifest = Manifest(
            source=dict(rank.source) if rank is not None else {
                "checkpoint": str(checkpoint.root.resolve()),
                "sha256": checkpoint_hash(checkpoint.root),
                "family": config.family,
                **({"dequantized": checkpoint.quantization.describe()} if opts.dequantize else {}),
                **({"mtp": mtp_note(config, mtp)} if config.mtp_layers else {}),
            },
            model=config.to_dict(),
            layers=layer_map(config.pattern),
            dtype=dtype_name(checkpoint.dtype),
            state_dtype=dtype_name(state_dtype),
            logits=logits,
            opset=opset,
            graphs=graphs,
            states=[s.to_dict() for s in io.state_specs(config, flavour)],
            per_layer_outputs=[f"layer_output.{i}" for i in range(config.num_layers)] if opts.per_layer else [],
            hidden_states=opts.speculative,
            quantization=recipe,
            weight_only=weights_recipe,
            kv_cache=flavour.kind,
            max_cache_len=flavour.max_cache_len,
            tensor_parallel=rank.describe() if rank is not None else None,
        )
        if rank is not None:
            manifest.verification = {"method": "tensor-parallel", "reason": "a rank's graph is verified with the others' by the rank emulator: ../hybridtrt-tp.json"}
        elif opts.verify:
            against = "the FP8 reference (fp32)" if recipe else "the 4-bit weights' reference (fp32)" if weights_recipe else "the fp32 reference"
            with step(f"verify with ONNX Runtime against {against} ({opts.verify_mode})"):
                truth = reference if checkpoint.dtype == torch.float32 else lazy_model(checkpoint.as_dtype(torch.float32))
                held = held_state_bytes(config, flavour)  # by layer windows: the states held on disk
                with target.writing(temporary_bytes(checkpoint.parameter_bytes, held), "verification's temporary files"):  # head slices (verify.py)
                    manifest.verification = verify_export(
                        target.partial, reference, manifest, truth=truth, mode=opts.verify_mode, parameter_bytes=checkpoint.parameter_bytes, progress=progress
                    )
                del truth
            if mtp:
                with step(f"verify {MTP_FILE} with ONNX Runtime against the reference MTP head"):
                    manifest.verification["graphs"][MTP_FILE] = verify_mtp_graph(target.partial, checkpoint, manifest)
        else:
            manifest.verification = {"method": "skipped", "reason": "--no-verify"}
        with step("record the size and sha256 of every file"):  # checked on every read (exporter/integrity.py)
            manifest.files = record_files(target.partial, written)
        with target.writing(len(manifest.to_json().encode()), MANIFEST_FILE):
            manifest.write(target.partial)
        written.append(MANIFEST_FILE)
        target.publish(written)

    out = Path(out_dir)
    return ExportResult(
        out_dir=out,
        manifest=manifest,
        files={name: (out / name).stat().st_size for name in written},
        parameters=checkpoint.num_parameters,
        parameter_bytes=checkpoint.parameter_bytes,
        verification={f: g["worst"]["rel_l2"] for f, g in manifest.verification.get("graphs", {}).items()},
        removed_partials=target.removed_partials,
        kept_partials=target.kept_partials,
        publish_note=target.publish_note,
    )


def _counter(advance: Callable[[int], None]) -> Callable[[int, int], None]:
    """``progress(done, total)`` callbacks -> increments of ``advance``."""
    last = 0

    def update(done: int, total: int) -> None:
        nonlocal last
        advance(done - last)
        last = done

    return update
