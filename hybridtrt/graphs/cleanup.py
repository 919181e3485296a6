"""Pass: strip exporter metadata (stack traces with absolute paths, FX node dumps) and stale
value_info so the file is byte-identical across machines and checkouts."""

from __future__ import annotations

import onnx


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove per-node metadata/doc strings and the graph's intermediate value_info, in place."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
    del model.graph.value_info[:]
    del model.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    return model
