"""Tracing a deep model as a shallow one: trace one layer of each kind, then copy it (DESIGN.md §6).

``torch.export`` costs about 0.6 s per decoder layer on top of a fixed 5 s (its symbolic-shape
machinery and ``run_decompositions`` walk every op), so Nemotron-Nano-9B-v2's 56 layers cost
about 37 s per graph, twice per export. Every layer of one kind is the same computation on other
weights and other states, so the unoptimized trace of the whole model is the trace of a
*prototype* — the first layer, then one layer of each kind in the order the rest of the pattern
first uses them (``M-M-M*-M-…`` → ``M-M*``) — with each prototype layer copied once per layer of
its kind: its nodes renamed, its parameters and states renamed to that layer's, and its residual
input rewired to the previous layer's output.

What makes a copy valid is checked on the prototype's graph, not assumed:

- a node belongs to layer ``p`` by its module scope (``model.layers.p…``); unscoped nodes (the
  residual ``Add`` and the padding ``Where`` that `hybridtrt.models.model.run_blocks` applies
  between blocks) belong to the latest layer they read from, or to no layer; ``Constant`` nodes
  belong to no layer (the exporter shares a constant between layers);
- layer 0 reads nothing another layer computed, and layer ``p ≥ 1`` reads exactly one value computed
  by another layer: one value of layer ``p - 1`` (the residual stream);
- nothing outside the layers reads a layer's value except one value of the last layer (the input of
  ``norm_f``); a layer's graph outputs are its own states (and ``layer_output.p``);
- a layer's parameters and state inputs are read by that layer's nodes only.

A prototype that breaks a rule raises `CannotStitch`, and the exporter traces the whole model
instead. The stitched trace is then optimized and passed like a traced one; tests/exporter/
test_stitch.py proves the final graphs equal the whole model's trace node for node, and their
outputs bit for bit on ONNX Runtime.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import onnx

from hybridtrt.exporter import io
from hybridtrt.graphs.naming import SCOPES_KEY
from hybridtrt.models.config import HybridConfig

#: Initializer names of parameters carry the wrapper's prefix (`hybridtrt.exporter.streaming.PARAM_PREFIX`).
_LAYER_PARAMETER = re.compile(r"^model\.layers\.(\d+)\.")
_LAYER_SCOPE = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")
#: torch.onnx's scope of nodes it made outside any module call (no module of ours).
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"
_GLOBAL = -1


class CannotStitch(Exception):
    """The prototype's graph breaks a rule of copying layers (module docstring); trace the whole model."""


@dataclass(frozen=True)
class Prototype:
    """A prototype of ``target``: its layer kinds, and which prototype layer each target layer copies.

    Attributes:
        config: The target config with the prototype's layer pattern.
        source: For each prototype layer, the target layer whose parameters it is traced with.
        copies: For each target layer, the prototype layer it is a copy of.
    """

    config: HybridConfig
    source: tuple[int, ...]
    copies: tuple[int, ...]


def prototype(config: HybridConfig) -> Prototype | None:
    """The prototype of ``config``, or None when it would not be shorter than the model."""
    kinds = config.layer_types
    first: dict[str, int] = {}
    for i, kind in enumerate(kinds[1:], start=1):
        first.setdefault(kind, i)
    source = (0, *first.values())
    if len(source) >= len(kinds):
        return None
    proto_of = {kind: p for p, kind in enumerate(kinds[i] for i in source) if p}
    copies = (0, *(proto_of[kind] for kind in kinds[1:]))
    return Prototype(replace(config, layer_types=tuple(kinds[i] for i in source)), source, copies)


@dataclass(frozen=True)
class Structure:
    """What tracing reads of a checkpoint (`hybridtrt.exporter.streaming.fake_model`, the trace
    cache's key): config, dtype, and each parameter's shape and dtype, never its bytes."""

    config: HybridConfig
    dtype: Any
    parameters: dict[str, Any]
    #: What else the traced module depends on (a tensor-parallel rank's world: `RankCheckpoint.trace_tag`).
    trace_tag: str | None = None


def prototype_structure(checkpoint: Any, proto: Prototype) -> Structure:
    """The prototype's parameters: layer ``p``'s are those of target layer ``proto.source[p]``.

    Raises:
        CannotStitch: A layer's parameters (names, shapes, dtypes) differ from those of the layer
            its prototype is traced with, e.g. a quantized checkpoint that excludes some layers.
    """
    layers: dict[int, dict[str, tuple]] = {}
    parameters: dict[str, Any] = {}
    for name, source in checkpoint.parameters.items():
        match = re.match(r"^layers\.(\d+)\.", name)
        if match is None:
            parameters[name] = source
        else:
            layers.setdefault(int(match.group(1)), {})[name[match.end() :]] = (tuple(source.shape), source.dtype)
    for i, p in enumerate(proto.copies):
        if layers.get(i) != layers.get(proto.source[p]):
            raise CannotStitch(f"layer {i}'s parameters differ from layer {proto.source[p]}'s, whose trace it would copy")
    for p, t in enumerate(proto.source):
        for name, source in checkpoint.parameters.items():
            if name.startswith(f"layers.{t}."):
                parameters[f"layers.{p}." + name.removeprefix(f"layers.{t}.")] = source
    return Structure(proto.config, checkpoint.dtype, parameters, getattr(checkpoint, "trace_tag", None))


def _scope_layer(node: onnx.NodeProto) -> int | None | str:
    """The decoder layer of ``node``'s module scope; None for nodes outside any module (placed by
    data flow); "global" for nodes of another module (embeddings, ``norm_f``)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            modules = [m for m in re.findall(r"'([^']*)'", prop.value)[1:-1] if m and m != _NO_MODULE]
            for module in modules:
                match = _LAYER_SCOPE.match(module)
                if match:
                    return int(match.group(1))
            return "global" if modules else None
    return None


def _per_layer_io(config: HybridConfig, spec: Any) -> tuple[dict[str, tuple[int, str]], dict[tuple[int, str], str]]:
    """``name -> (layer, role)`` and its inverse for the per-layer graph inputs and outputs."""
    by_name: dict[str, tuple[int, str]] = {}
    for s in io.state_specs(config, spec.flavour):
        by_name[s.past_name] = (s.layer, f"past {s.kind}")
        by_name[s.present_name] = (s.layer, f"present {s.kind}")
    if spec.per_layer:
        for i in range(config.num_layers):
            by_name[f"layer_output.{i}"] = (i, "layer output")
    return by_name, {v: k for k, v in by_name.items()}


def _rename_layer(text: str, old: int, new: int) -> str:
    return re.sub(rf"\blayers\.{old}\b", f"layers.{new}", text)


@dataclass
class _Layout:
    """Which decoder layer each node and value of a prototype trace belongs to (`_GLOBAL`: none).

    Attributes:
        node_layer: Per node, in graph order.
        value_layer: Per value name (initializers, graph inputs, node outputs).
        constants: Indices of ``Constant`` nodes (no layer: the exporter shares them).
    """

    node_layer: list[int]
    value_layer: dict[str, int]
    constants: set[int]


def _layout(graph: onnx.GraphProto, proto_io: dict[str, tuple[int, str]]) -> _Layout:
    value_layer: dict[str, int] = {}
    for t in graph.initializer:
        match = _LAYER_PARAMETER.match(t.name)
        value_layer[t.name] = int(match.group(1)) if match else _GLOBAL
    for v in graph.input:
        value_layer[v.name] = proto_io.get(v.name, (_GLOBAL, ""))[0]
    node_layer: list[int] = []
    constants: set[int] = set()
    for k, node in enumerate(graph.node):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise CannotStitch(f"node {node.name} ({node.op_type}) has a subgraph")
        scope = _scope_layer(node)
        standard = node.domain in ("", "ai.onnx")
        if node.op_type == "Constant" and standard and not node.input:
            layer = _GLOBAL
            constants.add(k)
        elif isinstance(scope, int):
            layer = scope
        elif node.op_type == "Shape" and standard and node.input[0] in proto_io:
            layer = _GLOBAL  # torch.export reads a dim shared by every layer off one layer's state
        elif scope == "global":
            layer = _GLOBAL
        else:  # outside any module: the residual Add and padding Where between blocks
            layer = max((value_layer[i] for i in node.input if i), default=_GLOBAL)
        node_layer.append(layer)
        for o in node.output:
            if o:
                value_layer[o] = layer
    return _Layout(node_layer, value_layer, constants)


def _residual_stream(graph: onnx.GraphProto, layout: _Layout, n_layers: int) -> tuple[dict[int, str], dict[int, str]]:
    """Each layer's residual input (layers ≥ 1) and output, checking the rules of the module
    docstring: the only computed values that cross layers are the residual stream's."""
    inputs = {v.name for v in graph.input}
    crossing: dict[int, set[str]] = {p: set() for p in range(_GLOBAL, n_layers)}
    for node, layer in zip(graph.node, layout.node_layer):
        for i in node.input:
            owner = layout.value_layer[i] if i else _GLOBAL
            if owner != _GLOBAL and owner != layer and i not in inputs:
                crossing[layer].add(i)
    residual_in: dict[int, str] = {}
    for p in range(n_layers):
        reads = crossing[p]
        if p == 0 and reads:
            raise CannotStitch(f"layer 0 reads {sorted(reads)} of other layers")
        if p and (len(reads) != 1 or layout.value_layer[next(iter(reads))] != p - 1):
            raise CannotStitch(f"layer {p} reads {sorted(reads)} of other layers; a copy needs exactly one value of layer {p - 1}")
        if p:
            residual_in[p] = next(iter(reads))
    last = crossing[_GLOBAL]
    if len(last) != 1 or layout.value_layer[next(iter(last))] != n_layers - 1:
        raise CannotStitch(f"nodes outside the layers read {sorted(last)}; a copy needs exactly one value of the last layer")
    return residual_in, {p - 1: v for p, v in residual_in.items()} | {n_layers - 1: next(iter(last))}


def _check_ownership(graph: onnx.GraphProto, layout: _Layout, proto_io: dict[str, tuple[int, str]]) -> None:
    """A layer's parameters and state inputs are read by that layer alone (save ``Shape`` reads of a
    shared dim), and a layer's graph outputs are its own states."""
    inputs = {v.name for v in graph.input}
    for node, layer in zip(graph.node, layout.node_layer):
        for i in node.input:
            if i in inputs and i in proto_io and proto_io[i][0] != layer and not (layer == _GLOBAL and node.op_type == "Shape"):
                raise CannotStitch(f"{i} is read by {node.name} outside layer {proto_io[i][0]}")
            match = _LAYER_PARAMETER.match(i)
            if match and int(match.group(1)) != layer:
                raise CannotStitch(f"{i} is read by {node.name} outside its layer")
    for v in graph.output:
        owner = layout.value_layer.get(v.name, _GLOBAL)
        if owner != _GLOBAL and proto_io.get(v.name, (None,))[0] != owner:
            raise CannotStitch(f"graph output {v.name} is computed by layer {owner} but is not one of its states")


def _order(graph: onnx.GraphProto, layout: _Layout, proto: Prototype) -> tuple[list[int], dict[tuple[int, int], list[int]], list[int]]:
    """Where the prototype's nodes go in the stitched graph: the nodes before the layers, each
    copy's nodes keyed ``(copy, prototype layer)``, and the nodes after the layers, each list in
    the prototype's order.

    Nodes outside the layers go before them when a layer reads them (directly or not) or the
    prototype has them there, else after them. A constant goes, once however many copies read it,
    where its first reader is in the stitched graph, at its place in the prototype's order: where
    the whole model's trace creates it.
    """
    node_layer, constants = layout.node_layer, layout.constants
    layer_nodes = [[k for k, layer in enumerate(node_layer) if layer == p and k not in constants] for p in range(proto.config.num_layers)]
    producer = {o: k for k, node in enumerate(graph.node) for o in node.output if o}
    needed: set[int] = set()
    stack = [producer[i] for nodes in layer_nodes for k in nodes for i in graph.node[k].input if i in producer]
    while stack:
        k = stack.pop()
        if node_layer[k] == _GLOBAL and k not in needed:
            needed.add(k)
            stack.extend(producer[i] for i in graph.node[k].input if i in producer)
    first_layer = min(k for nodes in layer_nodes for k in nodes)
    outside = [k for k, layer in enumerate(node_layer) if layer == _GLOBAL and k not in constants]
    pre = [k for k in outside if k < first_layer or k in needed]
    post = [k for k in outside if not (k < first_layer or k in needed)]
    before, after = (_GLOBAL, _GLOBAL), (len(proto.copies), _GLOBAL)
    region = {k: before for k in pre} | {k: after for k in post}
    for p, nodes in enumerate(layer_nodes):
        region.update({k: (proto.source[p], p) for k in nodes})  # its first copy
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for i in node.input:
            readers.setdefault(i, []).append(k)
    placed: dict[tuple[int, int], list[int]] = {}
    for k in sorted(constants):
        where = min((region[r] for o in graph.node[k].output for r in readers.get(o, ()) if r in region), default=before)
        placed.setdefault(where, []).append(k)
    copies = {(i, p): sorted(layer_nodes[p] + placed.get((i, p), [])) for i, p in enumerate(proto.copies)}
    return sorted(pre + placed.get(before, [])), copies, sorted(post + placed.get(after, []))


def stitch(model: onnx.ModelProto, proto: Prototype, target: HybridConfig, spec: Any) -> onnx.ModelProto:
    """The unoptimized trace of ``target`` from the trace of ``proto.config`` (same ``spec``).

    Raises:
        CannotStitch: The prototype's graph breaks a rule of the module docstring.
    """
    graph = model.graph
    n_proto = proto.config.num_layers
    proto_io, proto_by_role = _per_layer_io(proto.config, spec)
    target_by_name, target_io = _per_layer_io(target, spec)
    layout = _layout(graph, proto_io)
    residual_in, residual_out = _residual_stream(graph, layout, n_proto)
    _check_ownership(graph, layout, proto_io)
    layer_of_value = layout.value_layer
    inputs = {v.name: v for v in graph.input}

    # The copies.
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for field in (g.node, g.initializer, g.input, g.output, g.value_info):
        del field[:]

    def renamer(i: int, p: int) -> dict[str, str]:
        """Value names of target layer ``i`` (a copy of prototype layer ``p``)."""
        names: dict[str, str] = {}
        for name, layer in layer_of_value.items():
            if layer != p:
                continue
            if name in proto_io:
                names[name] = target_io[(i, proto_io[name][1])]
            elif _LAYER_PARAMETER.match(name):
                names[name] = _rename_layer(name, p, i)
            else:
                names[name] = f"{name}_L{i}"
        return names

    names_of = [renamer(i, p) for i, p in enumerate(proto.copies)]
    for i in range(1, len(proto.copies)):  # the residual stream: layer i reads what layer i - 1 wrote
        p, q = proto.copies[i], proto.copies[i - 1]
        names_of[i][residual_in[p]] = names_of[i - 1][residual_out[q]]
    final = {residual_out[n_proto - 1]: names_of[-1][residual_out[proto.copies[-1]]]}
    for name, (p, role) in proto_io.items():  # a dim read off prototype layer p's state: off its first copy's
        if name in inputs:
            final[name] = target_io[(proto.source[p], role)]

    pre, copies, post = _order(graph, layout, proto)

    def copy_node(k: int, names: dict[str, str], layer: tuple[int, int] | None) -> None:
        node = g.node.add()
        node.CopyFrom(graph.node[k])
        for field in (node.input, node.output):
            for j, name in enumerate(field):
                field[j] = names.get(name, name)
        if layer is not None:
            p, i = layer
            node.name = f"{node.name}_L{i}"
            for prop in node.metadata_props:
                prop.value = _rename_layer(prop.value, p, i)

    def copy_info(infos: Iterable[onnx.ValueInfoProto], into, names: dict[str, str]) -> None:
        for v in infos:
            new = into.add()
            new.CopyFrom(v)
            new.name = names.get(v.name, v.name)

    for k in pre:
        copy_node(k, final, None)
    for i, p in enumerate(proto.copies):
        for k in copies[(i, p)]:
            copy_node(k, names_of[i], (p, i))
    for k in post:
        copy_node(k, final, None)

    for v in graph.value_info:
        if layer_of_value.get(v.name, _GLOBAL) == _GLOBAL:
            copy_info([v], g.value_info, final)
    for i, p in enumerate(proto.copies):
        copy_info([v for v in graph.value_info if layer_of_value.get(v.name) == p], g.value_info, names_of[i])

    def source(name: str) -> str:
        """The prototype's graph input/output that target input/output ``name`` is a copy of."""
        if name not in target_by_name:
            return name
        layer, role = target_by_name[name]
        return proto_by_role[(proto.copies[layer], role)]

    for name in io.input_names(target, spec.flavour):
        copy_info([inputs[source(name)]], g.input, {source(name): name})
    outputs = {v.name: v for v in graph.output}
    for name in io.output_names(target, spec.per_layer, spec.hidden):
        copy_info([outputs[source(name)]], g.output, {source(name): name})

    params = list(graph.initializer)
    layered = [t for t in params if _LAYER_PARAMETER.match(t.name)]
    first = params.index(layered[0]) if layered else len(params)
    for t in params[:first]:
        g.initializer.add().CopyFrom(t)
    for i, p in enumerate(proto.copies):
        for t in layered:
            if int(_LAYER_PARAMETER.match(t.name).group(1)) == p:
                new = g.initializer.add()
                new.CopyFrom(t)
                new.name = _rename_layer(t.name, p, i)
    for t in params[first:]:
        if not _LAYER_PARAMETER.match(t.name):
            g.initializer.add().CopyFrom(t)
    return out


__all__ = ["CannotStitch", "Prototype", "Structure", "prototype", "prototype_structure", "stitch"]
