"""Pass: expose intermediate tensors as graph outputs (what polygraphy's ``--onnx-outputs`` does),
and find each decoder layer's output by our deterministic node names.

Find (`locate_layer_outputs`): decoder layer ``i`` ends with the residual add
``h = h + mixer(norm(h))``, found as the one ``Add`` node that sits at block level (scope ``/model``
or ``/model/layers.{i}``, not inside a layer's ``norm``/``mixer``) and takes an input produced —
directly, or through ``Cast``/``Identity``/``QuantizeLinear``/``DequantizeLinear`` — by a node named
``/model/layers.{i}/…``. The layer's output is that Add's output, carried on through block-level
``Mul``/``Where``/``Cast``/``Identity`` nodes for as long as each is the tensor's only consumer (the
model holds left-padding rows at zero, ``where(row, h + out, 0)``; the tensor the next layer reads
is the selected one). Only the *producers'* names are used, never the Add's own name or the tensor names, so a
file re-saved by another tool that keeps node names (``onnx.save``, onnx_ir, onnx-graphsurgeon
clean-ups, ModelOpt-style Q/DQ insertion on the residual path, our FP8 pass) is read the same way.
Exports made with ``--per-layer`` already carry these tensors as ``layer_output.{i}`` graph
outputs; the rule finds exactly those.

Check: a layer whose residual Add cannot be found (renamed or fused by another tool), or for which
several Adds qualify, is listed in `LayerOutputs.missing` with the reason; never guessed.

Rewrite (`expose_outputs`): returns a copy of the graph with the requested tensors appended to the
graph outputs, typed by ONNX shape inference. The input model is not modified; initializers keep
pointing at the same external data files. Refusals (`ArtefactError`): a tensor that no node
produces, or whose type shape inference cannot find.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from hybridtrt.errors import ArtefactError

#: Graph-output name of decoder layer ``i``'s output in ``--per-layer`` exports (DESIGN.md §6).
LAYER_OUTPUT = "layer_output.{}"
#: Ops that carry a tensor through unchanged in meaning (dtype, quantization), walked through
#: when looking for the node that produced a residual Add's input.
PASSTHROUGH_OPS = frozenset({"Cast", "CastLike", "Identity", "QuantizeLinear", "DequantizeLinear"})

#: Block-level ops that may follow the residual add before the next layer reads the hidden state
#: (``Where``: only when the tensor is a value, not the condition).
CARRY_OPS = frozenset({"Mul", "Where", "Cast", "CastLike", "Identity"})

_LAYER_SCOPE = re.compile(r"^/model/layers\.(\d+)(?:/|$)")
_BLOCK_SCOPE = re.compile(r"^/model/layers\.(\d+)$")


@dataclass
class LayerOutputs:
    """Where each decoder layer's output is in a graph.

    Attributes:
        tensors: ``{layer: tensor name}`` for every layer found.
        missing: ``{layer: why it was not found}``.
    """

    tensors: dict[int, str] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)


def _node_layer(node_name: str) -> int | None:
    """``/model/layers.4/mixer/out_proj/MatMul`` -> 4; anything outside a layer -> None."""
    m = _LAYER_SCOPE.match(node_name)
    return int(m.group(1)) if m else None


def _scope(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0]


def _source_layer(tensor: str, producers: dict[str, onnx.NodeProto]) -> int | None:
    """Decoder layer of the node that produced ``tensor``, walking up through pass-through ops."""
    seen: set[str] = set()
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        node = producers[tensor]
        if node.op_type in PASSTHROUGH_OPS and node.input:
            tensor = node.input[0]
            continue
        return _node_layer(node.name)
    return None


def _residual_layer(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> int | None:
    """The layer whose residual add ``node`` is, or None when it is not one."""
    if node.op_type != "Add":
        return None
    scope = _scope(node.name)
    block = _BLOCK_SCOPE.match(scope)
    if block:  # an Add at a block's own scope is that block's residual add
        return int(block.group(1))
    if _LAYER_SCOPE.match(node.name):  # inside a layer's norm/mixer: an internal Add
        return None
    layers = {_source_layer(t, producers) for t in node.input} - {None}
    # The residual input comes from an earlier layer, the mixer output from this one.
    return max(layers) if layers else None


def _carried(tensor: str, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> str:
    """Follow ``tensor`` through block-level `CARRY_OPS` that are its only consumer."""
    seen: set[str] = set()
    while tensor not in outputs and tensor not in seen and len(consumers.get(tensor, [])) == 1:
        seen.add(tensor)
        node = consumers[tensor][0]
        if node.op_type not in CARRY_OPS or _LAYER_SCOPE.match(node.name) or not node.output:
            break
        if node.op_type == "Where" and node.input[0] == tensor:
            break
        tensor = node.output[0]
    return tensor


def locate_layer_outputs(model: onnx.ModelProto, num_layers: int) -> LayerOutputs:
    """Find the output tensor of every decoder layer ``0 .. num_layers-1`` (see the module docstring).

    Args:
        model: The graph (weights need not be loaded: ``onnx.load(path, load_external_data=False)``).
        num_layers: Decoder layers of the model (``hybridtrt.json``'s ``layers``).

    Returns:
        `LayerOutputs`; every layer is either in ``tensors`` or in ``missing``.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    candidates: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:
        layer = _residual_layer(node, producers)
        if layer is not None:
            candidates.setdefault(layer, []).append(node)
    found = LayerOutputs()
    for i in range(num_layers):
        nodes = candidates.get(i, [])
        if len(nodes) == 1:
            found.tensors[i] = _carried(nodes[0].output[0], consumers, outputs)
        elif not nodes:
            found.missing[i] = (
                f"no residual Add takes an output of a node named /model/layers.{i}/… "
                "(nodes renamed, or the Add fused, by another tool?)"
            )
        else:
            names = ", ".join(repr(n.name) for n in nodes[:3])
            found.missing[i] = f"ambiguous: {len(nodes)} Add nodes qualify as layer {i}'s residual add ({names})"
    return found


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every tensor ONNX shape inference can type (graph I/O, value_info, inferred)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except onnx.shape_inference.InferenceError:
        inferred = model
    g = inferred.graph
    types = {v.name: v.type for v in (*g.input, *g.output, *g.value_info) if v.type.HasField("tensor_type")}
    for init in g.initializer:
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


def expose_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` added to its graph outputs (after the existing ones).

    Tensors that are graph outputs already are left where they are. Symbolic dims that shape
    inference invented (``unk__N``) are left unnamed.

    Args:
        model: The graph; load it without external data to keep the copy small (the copy's
            initializers reference the same external files).
        tensors: Names of intermediate tensors.

    Returns:
        The new `onnx.ModelProto`.

    Raises:
        ArtefactError: A tensor no node produces, or one without an inferable type.
    """
    produced = {out for node in model.graph.node for out in node.output}
    existing = {o.name for o in model.graph.output}
    wanted = [t for t in dict.fromkeys(tensors) if t not in existing]
    unknown = [t for t in wanted if t not in produced]
    if unknown:
        raise ArtefactError(
            f"cannot expose {unknown[:4]}{' …' if len(unknown) > 4 else ''}: no node in the graph produces it",
            fix="name tensors that exist in the graph (e.g. from `hybridtrt inspect` or Netron)",
        )
    types = _value_types(model) if wanted else {}
    untyped = [t for t in wanted if t not in types]
    if untyped:
        raise ArtefactError(
            f"cannot expose {untyped[:4]}: ONNX shape inference finds no type for it",
            fix="expose a tensor further down the graph, or run the graph through onnx.shape_inference first",
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in wanted:
        value = out.graph.output.add()
        value.name = name
        value.type.CopyFrom(types[name])
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("unk__"):
                dim.ClearField("dim_param")
    return out


__all__ = ["CARRY_OPS", "LAYER_OUTPUT", "PASSTHROUGH_OPS", "LayerOutputs", "expose_outputs", "locate_layer_outputs"]
