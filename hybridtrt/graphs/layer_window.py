"""Pass: cut a window of decoder layers out of an exported graph (bounded-memory verification).

**Find** the residual stream by node names (`hybridtrt.graphs.naming`): the hidden state ``h_i``
after decoder layer ``i`` is what the next block's norm reads — the one value from outside the
scope ``/model/layers.{i+1}/norm/`` (``/model/norm_f/`` after the last layer) that the nodes of
that scope consume, followed back through ``Cast``/``Identity`` nodes of the ``/model`` scope
(fp32 residuals). Whatever the reference wraps around ``residual + out`` (a padding select, a
cast) is on the producing side, so ``h_i`` is a cut between the layers.

**Check** that each scope reads exactly one such value, and that a window reads no weights of
layers outside it (the embedding only in the first window, the head only in the last); anything
else is refused (`WindowError`): the pass never guesses.

**Rewrite** into a new model that computes layers ``first..last`` only: inputs ``hidden_in``
= ``h_{first-1}`` (absent when ``first == 0``: the embedding lookup is part of the window) and the
graph inputs the window's nodes read — ``input_ids`` and ``attention_mask`` (mask, bias and
decode flag are shared by all layers), the window's past states, and any other state whose shape
the exporter reads for a dynamic dim (the batch size is one symbol for all states); outputs
``hidden_out`` = ``h_last`` and the window's
present states. The head (final norm, LM head) counts as member ``L`` after the ``L`` layers: a
window whose ``last`` is ``L`` ends with ``logits`` instead, and the window ``(L, L)`` is the head
alone. Nodes are the backward closure of the outputs, in graph order; initializers keep
their external-data references, so the window saved beside the model reads only its own weights.

**Vocabulary slices** of the head window (`head_weight`, `vocab_slice`): the LM head's weight is
as large as a few layers together (Nano-9B-v2: 1.17 GB in bf16, and ONNX Runtime's CPU provider
widens a half-precision weight to an fp32 copy), so it can be run in slices of the vocabulary.
The pattern is strict — an external ``[hidden, vocab]`` initializer read as the second input of
a ``MatMul`` whose result reaches ``logits`` through ``Cast``/``Identity`` nodes only — so each
slice computes exactly the columns ``logits[..., start:stop]`` of the whole head; any other head
(an FP8 Q/DQ head, a softcap) is run whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx
from onnx import helper

from hybridtrt.errors import ExportError
from hybridtrt.graphs.external_data import point_at, tensor_nbytes

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
_LAYER_SCOPE = re.compile(r"^/model/layers\.(\d+)/")
_PASS_THROUGH = ("Cast", "Identity")


class WindowError(ExportError):
    """The graph's decoder-layer boundaries cannot be found (so it cannot be verified by window)."""


def _layer_of(node: onnx.NodeProto | None) -> int | None:
    m = _LAYER_SCOPE.match(node.name) if node is not None else None
    return int(m.group(1)) if m else None


def residual_stream(model: onnx.ModelProto, num_layers: int) -> list[str]:
    """``[h_0, …, h_{L-1}]``: the value name of the hidden state after each decoder layer.

    Raises:
        WindowError: A norm scope is missing or reads more than one outside value.
    """
    g = model.graph
    producer = {out: n for n in g.node for out in n.output}
    constants = {t.name for t in g.initializer}

    def origin(value: str) -> str:
        node = producer.get(value)
        while node is not None and node.op_type in _PASS_THROUGH and _layer_of(node) is None:
            value = node.input[0]
            node = producer.get(value)
        return value

    def reads(scope: str) -> set[str]:
        nodes = [n for n in g.node if n.name.startswith(scope)]
        if not nodes:
            raise WindowError(f"the graph has no nodes named {scope}*")
        inside = {out for n in nodes for out in n.output}
        return {origin(v) for n in nodes for v in n.input if v and v not in inside and v not in constants}

    stream = []
    for i in range(num_layers):
        scope = f"/model/layers.{i + 1}/norm/" if i + 1 < num_layers else "/model/norm_f/"
        values = reads(scope)
        if len(values) != 1:
            raise WindowError(f"{scope} reads {len(values)} values from outside ({sorted(values)[:4]}), expected the hidden state alone")
        stream.append(values.pop())
    return stream


def _value_info(name: str, elem_type: int) -> onnx.ValueInfoProto:
    """A hidden state ``[batch, seq, hidden]`` (symbolic dims)."""
    return helper.make_tensor_value_info(name, elem_type, ["batch", "seq", "hidden"])


def extract(model: onnx.ModelProto, cuts: dict[str, int], outputs: dict[str, str | int]) -> onnx.ModelProto:
    """A model computing ``outputs`` with the nodes of ``model``, cut at ``cuts``.

    Args:
        model: The full graph (external data not loaded).
        cuts: Intermediate hidden states ``[batch, seq, hidden]`` that become inputs: ``{value:
            elem type}``.
        outputs: ``{value: value}`` for a graph output (keeps its ValueInfo), or ``{value: elem
            type}`` for an intermediate hidden state.

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
        stream: `residual_stream` of it (``L`` values).
        first / last: Member range (inclusive): layers ``0..L-1``, and ``L`` for the head.
        state_outputs: The present state names of these layers.
        hidden_type: ONNX elem type of the residual stream (the reference's hidden-state dtype).
        final_outputs: The graph outputs (besides states) of a window that includes the head.

    Raises:
        WindowError: The window would read weights of layers outside ``first..last`` (shape
            computations the exporter shares between layers are fine).
    """
    cuts = {stream[first - 1]: hidden_type} if first > 0 else {}
    final = last == len(stream)
    outputs: dict[str, str | int] = {}
    if final:
        outputs.update({name: name for name in final_outputs})
    else:
        outputs[stream[last]] = hidden_type
    outputs.update({name: name for name in state_outputs})
    sub = extract(model, cuts, outputs)
    weights = {t.name for t in sub.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    foreign = sorted({n.name for n in sub.graph.node if weights.intersection(n.input) and not _allowed(n, first, last, final)})
    if foreign:
        raise WindowError(f"the window of layers {first}..{last} reads weights outside it (in {foreign[:4]})")
    renames = {}
    if first > 0:
        renames[stream[first - 1]] = HIDDEN_IN
    if not final:
        renames[stream[last]] = HIDDEN_OUT
    _rename_values(sub, renames)
    return sub


def _allowed(node: onnx.NodeProto, first: int, last: int, final: bool) -> bool:
    """May a node of this window read weights? Its layer's, the embedding's (first window), the
    head's (last window)."""
    layer = _layer_of(node)
    if layer is not None:
        return first <= layer <= last
    if node.name.startswith("/model/embeddings/"):
        return first == 0
    return final


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


def head_weight(model: onnx.ModelProto, logits: str = "logits") -> onnx.TensorProto | None:
    """The weight of ``model``'s LM head if the head can run by vocabulary slices (module
    docstring), else None.

    Args:
        model: A window that ends with ``logits`` (external data not loaded).
        logits: The logits output's name.
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    producer = {out: n for n in g.node for out in n.output}
    node = producer.get(logits)
    while node is not None and node.op_type in _PASS_THROUGH:
        if len(consumers.get(node.input[0], [])) != 1:
            return None
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul" or len(consumers.get(node.input[1], [])) != 1:
        return None
    weight = next((t for t in g.initializer if t.name == node.input[1]), None)
    if weight is None or weight.data_location != onnx.TensorProto.EXTERNAL or len(weight.dims) != 2:
        return None
    vocab = next(v for v in g.output if v.name == logits).type.tensor_type.shape.dim[-1]
    if vocab.HasField("dim_value") and vocab.dim_value != weight.dims[1]:
        return None
    return weight


def vocab_slice(model: onnx.ModelProto, weight: str, start: int, stop: int, location: str, logits: str = "logits") -> onnx.ModelProto:
    """A copy of the head window ``model`` that computes ``logits[..., start:stop]``: the head
    weight ``weight`` (found by `head_weight`) becomes its columns ``start:stop``, stored from
    offset 0 of the external file ``location`` (the caller writes it), and the last dim of every
    value between the ``MatMul`` and ``logits`` is ``stop - start``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    t = next(t for t in g.initializer if t.name == weight)
    t.dims[1] = stop - start
    point_at(t, location, 0, tensor_nbytes(t))
    output = next(v for v in g.output if v.name == logits)
    output.type.tensor_type.shape.dim[-1].Clear()
    output.type.tensor_type.shape.dim[-1].dim_value = stop - start
    del g.value_info[:]  # intermediate shapes (if any) would still say the whole vocabulary
    return out


__all__ = ["HIDDEN_IN", "HIDDEN_OUT", "WindowError", "extract", "head_weight", "residual_stream", "vocab_slice", "window"]
