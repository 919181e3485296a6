"""Pass: strip exporter metadata (stack traces with absolute paths, FX node dumps, the exported
program's symbolic range constraints) and stale value_info so the file is byte-identical across
machines, checkouts and tracing modes (the range constraints depend on the example inputs'
strides, which differ between a traced eager prefill and the zero states of a weight-less trace)."""

from __future__ import annotations

import onnx


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove per-node and per-input/output metadata, doc strings and the graph's intermediate
    value_info, in place."""
    for value in (*model.graph.input, *model.graph.output, *model.graph.initializer):
        del value.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
    del model.graph.value_info[:]
    del model.metadata_props[:]
    del model.graph.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    return model
