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


def weight_name(node_name: str) -> str:
    """Initializer name of a MatMul's weight: ``/model/layers.0/mixer/in_proj/MatMul`` ->
    ``model.layers.0.mixer.in_proj.weight_t`` (``weight_t``: stored ``[in, out]``); the final
    projection (scope ``/model``) is ``model.lm_head.weight_t``."""
    scope = node_name.rsplit("/", 1)[0].lstrip("/")
    if scope == "model":
        scope = "model.lm_head"
    return scope.replace("/", ".") + ".weight_t"


def name_matmul_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give constant-folded MatMul weights (``val_123``, ``t``) names derived from their node, in place.

    Run after `assign_node_names`. An initializer shared by several MatMuls keeps the first name.
    """
    inits = {t.name: t for t in model.graph.initializer}
    renames: dict[str, str] = {}
    taken = set(inits)
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in inits and w not in renames and not w.startswith("model."):
            new = weight_name(node.name)
            if new not in taken:
                renames[w] = new
                taken.add(new)
    for old, new in renames.items():
        inits[old].name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return model


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


def name_values(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every main-graph value from the nodes, in place: a node's outputs
    ``<node name>_output_<k>``, a constant that is not a parameter (``model.…``) after its first
    reader, ``<node name>_input_<k>``. Graph inputs and outputs keep their names.

    Run after `assign_node_names` and `name_matmul_weights`. The names then depend on the graph's
    nodes alone, not on the counters of the trace that made it, so a stitched trace
    (`hybridtrt.exporter.stitch`) and a whole-model trace give the same bytes.
    """
    g = model.graph
    io_names = {v.name for v in (*g.input, *g.output)}
    renames: dict[str, str] = {}
    for node in g.node:
        for k, out in enumerate(node.output):
            if out and out not in io_names:
                renames[out] = f"{node.name}_output_{k}"
    constants = {t.name for t in g.initializer if not t.name.startswith("model.") and t.name not in io_names}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in constants and name not in renames:
                renames[name] = f"{node.name}_input_{k}"
    for node in g.node:
        for field in (node.input, node.output):
            for k, name in enumerate(field):
                if name in renames:
                    field[k] = renames[name]
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for v in g.value_info:
        v.name = renames.get(v.name, v.name)
    return model
