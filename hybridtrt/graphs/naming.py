"""Pass: deterministic, readable node names from the module hierarchy.

``/model/layers.{i}/mixer/in_proj/MatMul`` — derived from the exporter's
``pkg.torch.onnx.name_scopes`` metadata. Nodes without scope information (created by optimizer
rewrites) are named after the nearest scope of their inputs' producers, else ``/model/<Op>``.
Duplicates within a scope get ``_1``, ``_2`` … in graph order. Refuses nothing.
"""

from __future__ import annotations

import ast
from collections import Counter

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def scope_path(module_path: str, wrapper_prefix: str = "model.") -> str:
    """``"model.layers.0.mixer.in_proj"`` -> ``"/model/layers.0/mixer/in_proj"``."""
    path = module_path[len(wrapper_prefix) :] if module_path.startswith(wrapper_prefix) else module_path
    parts: list[str] = []
    for piece in [p for p in path.split(".") if p]:
        if piece.isdigit() and parts:
            parts[-1] += "." + piece
        else:
            parts.append(piece)
    return "/model" + "".join("/" + p for p in parts)


def _node_scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            modules = [s for s in scopes[1:-1] if s]
            return scope_path(modules[-1]) if modules else "/model"
    return None


def assign_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename every main-graph node in place; returns ``model``."""
    producer_scope: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        scope = _node_scope(node)
        if scope is None:
            scope = next((producer_scope[i] for i in node.input if i in producer_scope), "/model")
        for out in node.output:
            producer_scope[out] = scope
        base = f"{scope}/{node.op_type}"
        node.name = base if counts[base] == 0 else f"{base}_{counts[base]}"
        counts[base] += 1
    return model
