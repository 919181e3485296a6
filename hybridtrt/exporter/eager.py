"""The weight-loaded export (the code path before streaming), kept as the byte-identity oracle.

`write_graphs` loads the whole model, traces it with its real weights (``torch.onnx.export(dynamo=True,
optimize=True)``, in two steps: the unoptimized trace may be the trace cache's, see `_program`), runs the
same graph passes, and writes the files the way the exporter did before weights were streamed: ``onnx_ir.save`` for plain graphs, ``onnx.save_model`` for FP8 graphs (Q/DQ
inserted in memory), `share_external_data` for the decode graph. Its memory is the whole model
several times over; tests compare its files byte for byte with `hybridtrt.exporter.export.export`'s.
"""

from __future__ import annotations

import gc
from pathlib import Path

import onnx

import hybridtrt.exporter.export as export_mod
from hybridtrt.exporter import io
from hybridtrt.exporter.export import (
    DECODE_FILE,
    DECODE_WEIGHTS_FILE,
    DEFAULT_OPSET,
    MODEL_FILE,
    WEIGHTS_FILE,
    ExportOptions,
    GraphSpec,
    export_program,
    optimize_program,
    run_passes,
)
from hybridtrt.exporter.quantize import QuantizeOptions, quantize_graph
from hybridtrt.exporter.streaming import PARAM_PREFIX, FrozenTrace
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.graphs.external_data import save_with_external_data, share_external_data
from hybridtrt.models.config import MAMBA
from hybridtrt.models.loading import Checkpoint, load_model, open_checkpoint, parse_dtype
from hybridtrt.models.model import HybridLM


def _program(model: HybridLM, spec: GraphSpec, checkpoint: Checkpoint | None):
    """``torch.onnx.export(optimize=True)`` of the loaded model, or, given its ``checkpoint``, the same
    in two steps: the unoptimized trace (`hybridtrt.exporter.trace_cache.traced`: replayed when the
    cache holds one of this structure, the streamed export's trace of fake weights; a trace of the
    loaded model and one of fake weights are the same bytes, tests/exporter/test_trace_cache.py; a
    model deeper than its prototype gets the streamed export's stitched trace, which is the
    whole-model trace's program, tests/exporter/test_stitch.py), then every parameter's real value
    and the optimizer, as ``torch.onnx.export`` runs it. What this oracle witnesses is the streaming:
    stand-ins in the optimizer, recipes, the files written from the checkpoint."""
    inputs = example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour)
    if checkpoint is None:
        return export_program(model, inputs, spec, optimize=True)
    program = export_mod._trace_unoptimized(checkpoint, spec, whole=lambda: FrozenTrace(export_program(model, inputs, spec, optimize=False))).thaw()
    state = model.state_dict()
    program.apply_weights({name: state[name.removeprefix(PARAM_PREFIX)] for name in program.model.graph.initializers})
    optimize_program(program)
    return program


def trace_graph(model: HybridLM, spec: GraphSpec | None = None, checkpoint: Checkpoint | None = None) -> onnx.ModelProto:
    """Trace one graph of a loaded model and run the graph passes; the weights are in the returned
    protobuf (for passes that rewrite weights in memory, and tests). With the model's ``checkpoint``
    the unoptimized trace may be replayed (`_program`)."""
    spec = spec or GraphSpec()
    return run_passes(_program(model, spec, checkpoint).model_proto, model.config, spec)


def trace_to_file(
    model: HybridLM, path: Path, data_name: str, spec: GraphSpec | None = None, size_threshold: int = 1024, checkpoint: Checkpoint | None = None
) -> onnx.ModelProto:
    """Trace one graph of a loaded model and write it with its weights to ``data_name``
    (``onnx_ir.save``); returns the graph without its weights (initializers external)."""
    import onnx_ir as ir

    spec = spec or GraphSpec()

    program = _program(model, spec, checkpoint)
    ir.save(program.model, path, external_data=data_name, size_threshold_bytes=size_threshold)
    del program
    gc.collect()
    proto = run_passes(onnx.load(str(path), load_external_data=False), model.config, spec)
    onnx.save_model(proto, str(path))
    return proto


def write_graphs(
    checkpoint_dir: str | Path, directory: str | Path, options: ExportOptions | None = None, quantize: QuantizeOptions | None = None
) -> list[str]:
    """Write the export's graphs and weight files into ``directory`` from the loaded model.

    Returns:
        The file names written (no manifest, no verification).
    """
    opts = options or ExportOptions()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint_dir, opts.dtype)
    checkpoint = open_checkpoint(checkpoint_dir, opts.dtype)
    state_dtype = parse_dtype(opts.state_dtype or "fp32")
    split = MAMBA in model.config.layer_types if opts.split is None else opts.split
    roles = [(MODEL_FILE, WEIGHTS_FILE, False)] + ([(DECODE_FILE, DECODE_WEIGHTS_FILE, True)] if split else [])
    opset = opts.opset or DEFAULT_OPSET
    flavour = io.cache_flavour(opts.kv_cache, opts.max_cache_len, opset)
    written: list[str] = []
    for fname, data, decode in roles:
        spec = GraphSpec(opts.logits, decode, opts.per_layer, state_dtype, opset, flavour)
        if quantize is None:
            trace_to_file(model, directory / fname, data, spec, opts.size_threshold, checkpoint)
        else:
            proto = trace_graph(model, spec, checkpoint)
            quantize_graph(proto, model, checkpoint_dir, quantize)
            save_with_external_data(proto, directory / fname, data, opts.size_threshold)
            del proto
        if written:
            share_external_data(directory / fname, directory / MODEL_FILE, opts.size_threshold)
        written += [fname] + ([data] if (directory / data).exists() else [])
    return written


__all__ = ["trace_graph", "trace_to_file", "write_graphs"]
