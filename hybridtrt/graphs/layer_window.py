"""Pass: cut a window of decoder layers out of an exported graph (bounded-memory verification).

**Find** the residual stream. After decoder layer ``i`` the hidden state is ``h_i = residual +
mixer_out``: the output of an ``Add`` in the ``/model`` scope (the node names of
`hybridtrt.graphs.naming`) with one operand produced — possibly through ``Cast`` nodes of the
``/model`` scope (fp32 residuals) — by a node of ``/model/layers.{i}/``, and the other operand
``h_{i-1}`` (or, for layer 0, the output of ``/model/embeddings``), also possibly through Casts.

**Check** that exactly one such Add exists per layer and that they chain ``h_0 → h_1 → …``;
anything else is refused (`WindowError`): the pass never guesses.

**Rewrite** into a new model that computes layers ``first..last`` only: inputs ``hidden_in``
= ``h_{first-1}`` (absent when ``first == 0``: the embedding lookup is part of the window) and the
graph inputs the window's nodes read — ``input_ids`` and ``attention_mask`` (mask, bias and
decode flag are shared by all layers), the window's past states, and any other state whose shape
the exporter reads for a dynamic dim (the batch size is one symbol for all states); outputs ``hidden_out`` = ``h_last`` (``logits`` instead when
``last`` is the final layer) and the window's present states. Nodes are
the backward closure of the outputs, in graph order; initializers keep their external-data
references, so the window saved beside the model reads only its own weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx
from onnx import helper

from hybridtrt.errors import ExportError

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
_LAYER_SCOPE = re.compile(r"^/model/layers\.(\d+)/")
_TOP_ADD = re.compile(r"^/model/Add(_\d+)?$")
_PASS_THROUGH = ("Cast", "Identity")


class WindowError(ExportError):
    """The graph's decoder-layer boundaries cannot be found (so it cannot be verified by window)."""


def _layer_of(node: onnx.NodeProto | None) -> int | None:
    m = _LAYER_SCOPE.match(node.name) if node is not None else None
    return int(m.group(1)) if m else None


def residual_stream(model: onnx.ModelProto, num_layers: int) -> list[str]:
    """``[h_0, …, h_{L-1}]``: the value name of the hidden state after each decoder layer.

    Raises:
        WindowError: Not exactly one residual Add per layer, or they do not chain.
    """
    producer = {out: n for n in model.graph.node for out in n.output}

    def origin(value: str) -> tuple[str, onnx.NodeProto | None]:
        """Follow pass-through nodes of the top-level scope back to the producing value/node."""
        node = producer.get(value)
        while node is not None and node.op_type in _PASS_THROUGH and _layer_of(node) is None:
            value = node.input[0]
            node = producer.get(value)
        return value, node

    found: dict[int, tuple[str, str]] = {}  # layer -> (h_i, origin value of the other operand)
    for node in model.graph.node:
        if node.op_type != "Add" or not _TOP_ADD.match(node.name) or len(node.input) != 2:
            continue
        (va, na), (vb, nb) = origin(node.input[0]), origin(node.input[1])
        la, lb = _layer_of(na), _layer_of(nb)
        if (la is None) == (lb is None):
            continue
        layer, other = (la, vb) if la is not None else (lb, va)
        if layer in found:
            raise WindowError(f"two residual Adds for decoder layer {layer} ({found[layer][0]}, {node.output[0]})")
        found[layer] = (node.output[0], other)
    if sorted(found) != list(range(num_layers)):
        raise WindowError(f"found residual Adds for layers {sorted(found)}, expected 0..{num_layers - 1}")
    stream = [found[i][0] for i in range(num_layers)]
    for i in range(1, num_layers):
        if origin(found[i][1])[0] != stream[i - 1]:
            raise WindowError(f"the residual Add of layer {i} does not take h_{i - 1} ({stream[i - 1]})")
    first_other = producer.get(found[0][1]) if num_layers else None
    if num_layers and (first_other is None or not first_other.name.startswith("/model/embeddings/")):
        raise WindowError("the residual Add of layer 0 does not take the embedding output")
    return stream


def _value_info(name: str, elem_type: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None)


def extract(model: onnx.ModelProto, cuts: dict[str, int], outputs: dict[str, str | int]) -> onnx.ModelProto:
    """A model computing ``outputs`` with the nodes of ``model``, cut at ``cuts``.

    Args:
        model: The full graph (external data not loaded).
        cuts: Intermediate values that become inputs: ``{value: elem type}``.
        outputs: ``{value: value}`` for a graph output (keeps its ValueInfo), or ``{value: elem
            type}`` for an intermediate value.

    Returns:
        The sub-model: nodes of the backward closure of ``outputs`` (graph order), the graph inputs
        it reaches (in graph order) followed by the cuts, the initializers it uses, all functions.
    """
    g = model.graph
    producer = {out: i for i, n in enumerate(g.node) for out in n.output}
    initializers = {t.name: t for t in g.initializer}
    graph_inputs = {v.name: v for v in g.input}
    graph_outputs = {v.name: v for v in g.output}
    keep: set[int] = set()
    reached: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        value = stack.pop()
        if value in seen or value in cuts or value in initializers or not value:
            continue
        seen.add(value)
        if value in graph_inputs:
            reached.add(value)
            continue
        index = producer.get(value)
        if index is None:
            raise WindowError(f"value {value!r} has no producer")
        node = g.node[index]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise WindowError(f"node {node.name} has a subgraph; windows of control flow are not supported")
        keep.add(index)
        stack.extend(node.input)
    nodes = [g.node[i] for i in sorted(keep)]
    used = {name for n in nodes for name in n.input}
    new_inputs = [v for v in g.input if v.name in reached] + [_value_info(name, t) for name, t in cuts.items()]
    new_outputs = []
    for value, spec in outputs.items():
        if isinstance(spec, str):
            out = onnx.ValueInfoProto()
            out.CopyFrom(graph_outputs[value])
            new_outputs.append(out)
        else:
            new_outputs.append(_value_info(value, spec))
    graph = helper.make_graph(nodes, g.name, new_inputs, new_outputs, initializer=[initializers[n] for n in initializers if n in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    out.ir_version = model.ir_version
    return out


def window(
    model: onnx.ModelProto,
    stream: list[str],
    first: int,
    last: int,
    state_outputs: Iterable[str],
    hidden_type: int,
    final_outputs: Iterable[str] = ("logits",),
) -> onnx.ModelProto:
    """The sub-model of decoder layers ``first..last`` (see the module docstring).

    Args:
        model: The full graph.
        stream: `residual_stream` of it.
        first / last: Layer range (inclusive).
        state_outputs: The present state names of these layers.
        hidden_type: ONNX elem type of the residual stream (the reference's hidden-state dtype).
        final_outputs: The graph outputs (besides states) of a window that ends at the last layer.

    Raises:
        WindowError: The window would read weights of layers outside ``first..last`` (shape
            computations the exporter shares between layers are fine).
    """
    cuts = {stream[first - 1]: hidden_type} if first > 0 else {}
    final = last == len(stream) - 1
    outputs: dict[str, str | int] = {}
    if final:
        outputs.update({name: name for name in final_outputs})
    else:
        outputs[stream[last]] = hidden_type
    outputs.update({name: name for name in state_outputs})
    sub = extract(model, cuts, outputs)
    weights = {t.name for t in sub.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    foreign = sorted(
        {i for n in sub.graph.node if (i := _layer_of(n)) is not None and not first <= i <= last and weights.intersection(n.input)}
    )
    if foreign:
        raise WindowError(f"the window of layers {first}..{last} needs weights of layers {foreign}")
    renames = {}
    if first > 0:
        renames[stream[first - 1]] = HIDDEN_IN
    if not final:
        renames[stream[last]] = HIDDEN_OUT
    _rename_values(sub, renames)
    return sub


def _rename_values(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    if not renames:
        return
    g = model.graph
    for v in [*g.input, *g.output]:
        v.name = renames.get(v.name, v.name)
    for n in g.node:
        for i, name in enumerate(n.input):
            n.input[i] = renames.get(name, name)
        for i, name in enumerate(n.output):
            n.output[i] = renames.get(name, name)


__all__ = ["HIDDEN_IN", "HIDDEN_OUT", "WindowError", "extract", "residual_stream", "window"]
