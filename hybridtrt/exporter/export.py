"""``hybridtrt export``: checkpoint -> ``model.onnx`` (+ ``decode.onnx``) + ``weights.data`` +
``hybridtrt.json``.

Steps: load the reference model → trace with ``torch.onnx.export(dynamo=True)`` (custom ops become
``hybridtrt`` domain nodes) → graph passes (function bodies, names, dims, cleanup) → write
atomically → verify the written file with ONNX Runtime against the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
import torch

from hybridtrt.errors import ExportError, HybridTrtError
from hybridtrt.exporter import io
from hybridtrt.exporter.manifest import (
    MANIFEST_FILE,
    GraphEntry,
    Manifest,
    checkpoint_hash,
    layer_map,
)
from hybridtrt.exporter.quantize import QuantizeOptions, quantize_graph
from hybridtrt.exporter.translation import translation_table
from hybridtrt.exporter.wrapper import GraphModule, example_inputs
from hybridtrt.graphs.cleanup import strip_metadata
from hybridtrt.graphs.dims import name_io_dims
from hybridtrt.graphs.external_data import save_with_external_data, share_external_data
from hybridtrt.graphs.naming import assign_node_names, name_matmul_weights
from hybridtrt.models.config import MAMBA
from hybridtrt.models.loading import DTYPES, load_model, parse_dtype
from hybridtrt.models.model import HybridLM
from hybridtrt.ops.onnx_functions import DOMAIN, MAX_OPSET, MIN_OPSET, attach_functions

MODEL_FILE = "model.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "weights.data"
DECODE_WEIGHTS_FILE = "decode.weights.data"
DEFAULT_OPSET = 24

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

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
        verify: Run the written graph with ONNX Runtime against the reference after export.
        size_threshold: Initializers of at least this many bytes go to external data.
        kv_cache: ``"dynamic"`` (growing KV, ``attention_mask``) or ``"static"`` (fixed-capacity
            KV written in place; `hybridtrt.exporter.io.CacheFlavour`).
        max_cache_len: KV capacity of the static cache.
    """

    dtype: str = "fp32"
    state_dtype: str | None = None
    logits: Literal["last", "all"] = "last"
    split: bool | None = None
    opset: int | None = None
    per_layer: bool = False
    verify: bool = True
    size_threshold: int = 1024
    kv_cache: str = "dynamic"
    max_cache_len: int | None = None


@dataclass
class ExportResult:
    """What an export wrote and found."""

    out_dir: Path
    manifest: Manifest
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    parameters: int = 0
    parameter_bytes: int = 0
    verification: dict[str, float] = field(default_factory=dict)  # output -> rel L2 (worst)


@contextlib.contextmanager
def _no_step(_: str) -> Iterator[None]:
    yield


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's chatter (it prints progress and warns about torchvision)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
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


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(
            f"output directory {out_dir} is not writable ({e.strerror or e})",
            fix="choose a directory you can write to with -o/--output",
        ) from None


def _check_dtype_runs(model: HybridLM, dtype_name: str, state_dtype: torch.dtype) -> None:
    """PyTorch on this machine must run the model in this dtype (export traces eagerly)."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1, state_dtype), logits="last")
    except (RuntimeError, NotImplementedError) as e:
        device = model.embeddings.weight.device
        raise ExportError(
            f"dtype {dtype_name} is not supported by PyTorch on this machine ({device}): {str(e).splitlines()[0]}",
            fix="export in fp32 here, or export on a machine whose PyTorch supports this dtype",
        ) from None


def _export_program(model: HybridLM, logits: str, decode: bool, per_layer: bool, state_dtype: torch.dtype, opset: int, flavour: io.CacheFlavour):
    """``torch.onnx.export(dynamo=True)`` of one graph; returns the ``ONNXProgram``."""
    graph = GraphModule(model, logits, decode, per_layer, flavour).eval()
    inputs = example_inputs(model, seq=1 if decode else 5, state_dtype=state_dtype, flavour=flavour)
    with _quiet_exporter():
        return torch.onnx.export(
            graph,
            inputs,
            dynamo=True,
            input_names=io.input_names(model.config, flavour),
            output_names=io.output_names(model.config, per_layer),
            dynamic_shapes=graph.dynamic_shapes(),
            custom_translation_table=translation_table(opset),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )


def _run_passes(proto: onnx.ModelProto, model: HybridLM, logits: str, decode: bool, per_layer: bool, flavour: io.CacheFlavour) -> onnx.ModelProto:
    """The graph passes every export gets: names, cleanup, function bodies, I/O dims."""
    from hybridtrt import __version__

    assign_node_names(proto)
    name_matmul_weights(proto)
    strip_metadata(proto)
    attach_functions(proto)
    name_io_dims(proto, io.io_shapes(model.config, logits, decode, per_layer, flavour))
    proto.producer_name = "hybridtrt"
    proto.producer_version = __version__
    return proto


def trace_graph(
    model: HybridLM,
    *,
    logits: str = "last",
    decode: bool = False,
    per_layer: bool = False,
    state_dtype: torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
    flavour: io.CacheFlavour = io.DYNAMIC_CACHE,
) -> onnx.ModelProto:
    """Trace one graph (unified or decode) and run the graph passes. Returns an in-memory model
    with its weights (for graph passes that rewrite weights, e.g. FP8, and for tests)."""
    program = _export_program(model, logits, decode, per_layer, state_dtype, opset, flavour)
    return _run_passes(program.model_proto, model, logits, decode, per_layer, flavour)


def trace_to_file(
    model: HybridLM,
    path: Path,
    data_name: str,
    *,
    logits: str = "last",
    decode: bool = False,
    per_layer: bool = False,
    state_dtype: torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
    size_threshold: int = 1024,
    flavour: io.CacheFlavour = io.DYNAMIC_CACHE,
) -> onnx.ModelProto:
    """Trace one graph and write it with its weights streamed straight to ``data_name``.

    Unlike `trace_graph` no in-memory protobuf copy of the weights is ever made: the exporter's
    IR writes each tensor to the data file, and the passes run on the weight-less graph. Returns
    that graph (initializers external) after saving it to ``path``.
    """
    import onnx_ir as ir

    program = _export_program(model, logits, decode, per_layer, state_dtype, opset, flavour)
    ir.save(program.model, path, external_data=data_name, size_threshold_bytes=size_threshold)
    del program
    gc.collect()
    proto = _run_passes(onnx.load(str(path), load_external_data=False), model, logits, decode, per_layer, flavour)
    onnx.save_model(proto, str(path))
    return proto


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
    """onnx/onnx_ir create data files 0600; give written files the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        if (directory / name).exists():
            os.chmod(directory / name, 0o666 & ~umask)


def _publish(partial: Path, out_dir: Path, names: list[str]) -> None:
    """Move finished files into place. The manifest goes first out and last in, so an interrupted
    publish never leaves a directory that claims to be complete."""
    stale = out_dir / MANIFEST_FILE
    if stale.exists():
        stale.unlink()
    for name in names:
        if name != MANIFEST_FILE:
            os.replace(partial / name, out_dir / name)
    os.replace(partial / MANIFEST_FILE, out_dir / MANIFEST_FILE)


def export(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    step: Step = _no_step,
    model: HybridLM | None = None,
    quantize: QuantizeOptions | None = None,
) -> ExportResult:
    """Export a checkpoint directory to ONNX.

    Args:
        checkpoint_dir: HF checkpoint (config.json + safetensors).
        out_dir: Output directory (created).
        options: Export flags.
        step: ``step(name)`` context manager wrapped around each stage (progress display).
        model: Use this already-loaded model instead of loading ``checkpoint_dir`` (tests).
        quantize: FP8 Q/DQ on the linear layers (DESIGN.md §7): calibrate on the reference, then
            the same scales in every graph of the export.

    Returns:
        `ExportResult`.
    """
    opts = options or ExportOptions()
    out = Path(out_dir)
    opset = opts.opset or DEFAULT_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}", fix=f"use --opset {DEFAULT_OPSET}")
    dtype = parse_dtype(opts.dtype)
    state_dtype = parse_dtype(opts.state_dtype or "fp32")
    flavour = io.cache_flavour(opts.kv_cache, opts.max_cache_len, opset)
    _check_writable(out)

    with step("load checkpoint"):
        if model is None:
            model = load_model(checkpoint_dir, dtype)
        _check_dtype_runs(model, _DTYPE_NAMES[dtype], state_dtype)
    roles = [("unified", MODEL_FILE, WEIGHTS_FILE, False)]
    split = MAMBA in model.config.layer_types if opts.split is None else opts.split
    if split:
        roles.append(("decode", DECODE_FILE, DECODE_WEIGHTS_FILE, True))
    if split and MAMBA not in model.config.layer_types:
        raise ExportError("--split needs at least one Mamba layer (the decode graph exists for Mamba2StateUpdate)")

    partial = out / f".partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        graphs: dict[str, GraphEntry] = {}
        written: list[str] = []
        recipe = None
        for role, fname, data, decode in roles:
            trace_args = dict(logits=opts.logits, decode=decode, per_layer=opts.per_layer, state_dtype=state_dtype, opset=opset, flavour=flavour)
            if quantize is None:
                with step(f"trace {role} graph (torch.export → ONNX), stream weights to {data}"):
                    proto = trace_to_file(model, partial / fname, data, size_threshold=opts.size_threshold, **trace_args)
            else:
                with step(f"trace {role} graph (torch.export → ONNX)"):
                    proto = trace_graph(model, **trace_args)
                label = "FP8: calibrate on the reference, insert Q/DQ" if recipe is None else f"FP8: insert Q/DQ ({role})"
                with step(label):
                    recipe = quantize_graph(proto, model, checkpoint_dir, quantize)
                save_with_external_data(proto, partial / fname, data, opts.size_threshold)
            with step(f"write {fname}"):
                entry = GraphEntry(
                    file=fname,
                    data=[],
                    role=role,
                    inputs=_value_entries(proto.graph.input),
                    outputs=_value_entries(proto.graph.output),
                    custom_ops=_custom_op_counts(proto),
                )
                del proto
                if graphs:  # later graphs reuse the unified graph's weights.data where identical
                    if share_external_data(partial / fname, partial / MODEL_FILE, opts.size_threshold):
                        entry.data.append(WEIGHTS_FILE)
                if (partial / data).exists():
                    entry.data.append(data)
                    written.append(data)
                _fix_permissions(partial, [fname, data])
                graphs[role] = entry
                onnx.checker.check_model(str(partial / fname), full_check=True)
                written.append(fname)
        config = model.config
        manifest = Manifest(
            source={"checkpoint": str(Path(checkpoint_dir).resolve()), "sha256": checkpoint_hash(checkpoint_dir), "family": config.family},
            model=config.to_dict(),
            layers=layer_map(config.pattern),
            dtype=_DTYPE_NAMES[dtype],
            state_dtype=_DTYPE_NAMES[state_dtype],
            logits=opts.logits,
            opset=opset,
            graphs=graphs,
            states=[s.to_dict() for s in io.state_specs(config, flavour)],
            per_layer_outputs=[f"layer_output.{i}" for i in range(config.num_layers)] if opts.per_layer else [],
            quantization=recipe,
            kv_cache=flavour.kind,
            max_cache_len=flavour.max_cache_len,
        )
        manifest.write(partial)
        written.append(MANIFEST_FILE)
        _publish(partial, out, written)
    except HybridTrtError:
        raise
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(
            f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}",
            fix=f"bf16 needs opset ≥ 22; otherwise report this with the checkpoint's config.json (opset {opset})",
        ) from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)

    n_params = sum(p.numel() for p in model.parameters())
    result = ExportResult(
        out_dir=out,
        manifest=manifest,
        files={name: (out / name).stat().st_size for name in written},
        parameters=n_params,
        parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )
    if opts.verify:
        with step("verify with ONNX Runtime"):
            result.verification = verify_export(out, model, manifest)
    return result


def verify_export(out_dir: Path, model: HybridLM, manifest: Manifest) -> dict[str, float]:
    """Run every written graph with ONNX Runtime on example inputs and compare with the reference.

    Returns the worst rel L2 per graph; raises `ExportError` when a graph disagrees (rel L2 above
    1e-4 in fp32, 1e-2 in half precision) — an exporter bug, never a silent wrong artefact.
    """
    from hybridtrt.runtime.onnxruntime import OrtSession
    from hybridtrt.validation.metrics import rel_l2

    if manifest.dtype == "bf16":
        return {}  # ONNX Runtime's CPU provider has no bf16 kernels; validate on TensorRT instead.
    from hybridtrt.validation.metrics import compare

    state_dtype = parse_dtype(manifest.state_dtype)
    tol = 1e-4 if manifest.dtype == "fp32" else 1e-2
    worst: dict[str, float] = {}
    flavour = manifest.cache_flavour
    for role, entry in manifest.graphs.items():
        decode = role == "decode"
        inputs = example_inputs(model, seq=1 if decode else 7, batch=3, past=4, state_dtype=state_dtype, seed=1, flavour=flavour)
        graph = GraphModule(model, manifest.logits, decode, bool(manifest.per_layer_outputs), flavour).eval()
        with torch.no_grad():
            expected = graph(*inputs)
        session = OrtSession(out_dir / entry.file)
        feeds = dict(zip([v["name"] for v in entry.inputs], inputs))
        got = session.run(feeds)
        names = [v["name"] for v in entry.outputs]
        if manifest.quantization:
            # FP8 changes the numbers by design: a sanity gate on the logits only (the real
            # accuracy report is `hybridtrt validate`).
            cosine = compare(got[names[0]], expected[0]).cosine
            if not cosine >= 0.5:  # catastrophic only (a broken scale gives ~0.1)
                raise ExportError(f"{entry.file}: FP8 logits have cosine {cosine:.4f} < 0.5 against the reference", fix="check the calibration set; try --weight-scale channel or --exclude")
            worst[entry.file] = rel_l2(got[names[0]], expected[0])
            continue
        errors = {name: rel_l2(got[name], exp) for name, exp in zip(names, expected)}
        # A half-precision SSM state is rounded on both sides: one fp16 ulp is 1e-3 relative.
        limit = {k: 1e-2 if manifest.state_dtype != "fp32" and "ssm_state" in k else tol for k in errors}
        bad = {k: v for k, v in errors.items() if not v <= limit[k]}
        if bad:
            raise ExportError(
                f"{entry.file} disagrees with the PyTorch reference on {sorted(bad)} (rel L2 {max(bad.values()):.2e} > {tol})",
                fix="this is a bug in hybridtrt; please report it with the checkpoint's config.json",
            )
        worst[entry.file] = max(errors.values())
    return worst
