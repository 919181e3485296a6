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

**Expert ranges** of a routed-experts node (`expert_nodes`, `before_experts`, `expert_range`,
`after_experts`): an MoE layer's expert stacks are the largest weights of the model (Nemotron-3
Nano 30B: 2 × 1.28 GB per layer in bf16). The layer runs in three parts: the graph up to the node's
inputs ``x, topk_indices, topk_weights``; the node on the (token, k) pairs that chose experts
``start..stop-1``, one range at a time, with rows ``start:stop`` of every per-expert weight (a byte
range of the external file: nothing is copied) and its sum over ``k`` left in fp32 (the node's
function with its final ``CastLike`` made an ``Identity``, domain `PAIRS_DOMAIN`); and the rest of
the graph with the node's output ``y`` as an input. The caller adds the pairs' outputs per token
and rounds once to ``y``'s dtype, as the node does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx
from onnx import helper, numpy_helper

from hybridtrt.errors import ExportError
from hybridtrt.graphs.external_data import external_info, point_at, tensor_nbytes
from hybridtrt.ops.moe_onnx import MOE_EXPERTS, MOE_EXPERTS_FP8, MOE_EXPERTS_NVFP4
from hybridtrt.ops.onnx_functions import DOMAIN

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


#: The spec of an intermediate value that becomes a window's input or output: its elem type (a
#: hidden state ``[batch, seq, hidden]``), or its ValueInfo as it is.
ValueSpec = int | onnx.ValueInfoProto


def _value_info(name: str, spec: ValueSpec) -> onnx.ValueInfoProto:
    if isinstance(spec, onnx.ValueInfoProto):
        out = onnx.ValueInfoProto()
        out.CopyFrom(spec)
        out.name = name
        return out
    return helper.make_tensor_value_info(name, spec, ["batch", "seq", "hidden"])


def typed(name: str, elem_type: int) -> onnx.ValueInfoProto:
    """A ValueInfo of ``elem_type`` and unknown shape."""
    return helper.make_tensor_value_info(name, elem_type, None)


def extract(model: onnx.ModelProto, cuts: dict[str, ValueSpec], outputs: dict[str, str | ValueSpec]) -> onnx.ModelProto:
    """A model computing ``outputs`` with the nodes of ``model``, cut at ``cuts``.

    Args:
        model: The full graph (external data not loaded).
        cuts: Intermediate values that become inputs: ``{value: spec}`` (`ValueSpec`).
        outputs: ``{value: value}`` for a graph output (keeps its ValueInfo), or ``{value: spec}``
            for an intermediate value.

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


#: Routed-experts ops (`hybridtrt.ops.moe_onnx`): inputs 0–2 are ``x [T, D]``, ``topk_indices
#: [T, K]``, ``topk_weights [T, K]``; every later input is per expert, ``[E, …]``.
EXPERT_OPS = (MOE_EXPERTS, MOE_EXPERTS_FP8, MOE_EXPERTS_NVFP4)
#: Domain of the pairs function `expert_range` runs (verification only, never in an export).
PAIRS_DOMAIN = "hybridtrt.verify"
#: Inputs and output of an `expert_range` model.
PAIR_X, PAIR_EXPERT, PAIR_WEIGHT, PAIR_Y = "pair_x", "pair_expert", "pair_weight", "pair_y"


def expert_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The routed-experts nodes of ``model`` (graph order) whose per-expert inputs are all
    initializers with one leading expert count: the nodes `expert_range` can split."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in EXPERT_OPS:
            continue
        weights = [initializers.get(name) for name in node.input[3:]]
        if weights and all(t is not None and t.dims for t in weights) and len({t.dims[0] for t in weights}) == 1:
            found.append(node)
    return found


def expert_bytes(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int, int]:
    """``(experts, bytes)``: the expert count and the bytes of all per-expert inputs of ``node``."""
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [initializers[name] for name in node.input[3:]]
    return weights[0].dims[0], sum(tensor_nbytes(t) for t in weights)


def before_experts(model: onnx.ModelProto, node: onnx.NodeProto, types: dict[str, int], cuts: Iterable[str] = ()) -> onnx.ModelProto:
    """The part of ``model`` that computes ``node``'s inputs ``x, topk_indices, topk_weights``.

    Args:
        model: A window.
        node: One of its `expert_nodes`.
        types: Elem type of every value (`hybridtrt.graphs.bf16_emulation.value_types`).
        cuts: Outputs of earlier expert nodes, fed as inputs (they ran by ranges before this one).

    Inputs of ``node`` that are graph inputs already (held routing's ``held_experts.{i}``,
    `hybridtrt.graphs.held_routing`) are not outputs of the part: the caller has them.
    """
    given = {i.name for i in model.graph.input}
    return extract(model, {y: typed(y, types[y]) for y in cuts}, {v: typed(v, types[v]) for v in node.input[:3] if v not in given})


def after_experts(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto], types: dict[str, int]) -> onnx.ModelProto:
    """``model`` with the outputs ``y`` of ``nodes`` as inputs: what is left once they ran by
    ranges (the routers, used by the nodes alone, are gone)."""
    graph_outputs = {v.name: v.name for v in model.graph.output}
    return extract(model, {n.output[0]: typed(n.output[0], types[n.output[0]]) for n in nodes}, graph_outputs)


def expert_range(model: onnx.ModelProto, node: onnx.NodeProto, start: int, stop: int, types: dict[str, int]) -> onnx.ModelProto:
    """A model running ``node`` on pairs of experts ``start..stop-1`` (module docstring).

    Inputs ``pair_x [P, D]`` (x's dtype: the token of each pair), ``pair_expert [P, 1]`` (int64,
    the pair's expert minus ``start``), ``pair_weight [P, 1]`` (fp32); output ``pair_y [P, D]``
    fp32: each pair's weighted expert output, before the rounding to x's dtype. The per-expert
    weights are rows ``start:stop`` of ``node``'s (external ones point into the same file).

    Raises:
        WindowError: The node's function does not end with ``CastLike(sum, x)``.
    """
    function = next((f for f in model.functions if f.domain == node.domain and f.name == node.op_type), None)
    if function is None:
        raise WindowError(f"the graph has no function body for {node.domain}::{node.op_type}")
    pairs = onnx.FunctionProto()
    pairs.CopyFrom(function)
    last = next((n for n in pairs.node if function.output[0] in n.output), None)
    if last is None or last.op_type != "CastLike" or last.input[1] != function.input[0]:
        raise WindowError(f"{node.op_type}'s body does not end with CastLike(y, x); it cannot run by expert ranges")
    last.op_type = "Identity"
    del last.input[1:]
    pairs.domain = PAIRS_DOMAIN

    initializers = {t.name: t for t in model.graph.initializer}
    weights = []
    for name in node.input[3:]:
        whole = initializers[name]
        part = onnx.TensorProto()
        part.CopyFrom(whole)
        part.dims[0] = stop - start
        row = tensor_nbytes(whole) // whole.dims[0]
        if whole.data_location == onnx.TensorProto.EXTERNAL:
            location, offset, _ = external_info(whole)
            point_at(part, location, offset + start * row, (stop - start) * row)
        else:
            part.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(whole)[start:stop], name))
        weights.append(part)
    call = helper.make_node(node.op_type, [PAIR_X, PAIR_EXPERT, PAIR_WEIGHT, *node.input[3:]], [PAIR_Y], node.name, domain=PAIRS_DOMAIN)
    call.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [call],
        f"{node.name} experts {start}..{stop - 1}",
        [typed(PAIR_X, types[node.input[0]]), typed(PAIR_EXPERT, onnx.TensorProto.INT64), typed(PAIR_WEIGHT, onnx.TensorProto.FLOAT)],
        [typed(PAIR_Y, onnx.TensorProto.FLOAT)],
        initializer=weights,
    )
    opsets = [o for o in model.opset_import if o.domain == ""] + [helper.make_opsetid(PAIRS_DOMAIN, 1)]
    out = helper.make_model(graph, opset_imports=opsets, functions=[pairs])
    out.ir_version = model.ir_version
    return out


__all__ = [
    "EXPERT_OPS",
    "HIDDEN_IN",
    "HIDDEN_OUT",
    "PAIRS_DOMAIN",
    "WindowError",
    "after_experts",
    "before_experts",
    "expert_bytes",
    "expert_nodes",
    "expert_range",
    "extract",
    "head_weight",
    "residual_stream",
    "typed",
    "vocab_slice",
    "window",
]
