"""Pass: run a bf16 graph on an executor without bf16 kernels (ONNX Runtime's CPU provider), with
bf16 rounding kept wherever the graph holds a bf16 tensor.

Pattern: every value whose type is ``bfloat16`` (graph inputs and outputs, initializers, node
outputs, including the outputs of our custom ops).

Rewrite: the value becomes ``float`` and is rounded to bf16 where it is produced::

    before:  a:bf16, b:bf16 ─ MatMul ─ y:bf16
    after:   a:f32,  b:f32  ─ MatMul ─ y/f32 ─ Cast(to=bf16) ─ Cast(to=f32) ─ y:f32

A ``Cast(to=bf16)`` already rounds, so it only gets the ``Cast(to=f32)`` after it; a ``CastLike``
whose target was bf16 now casts to fp32 and is rounded like any other producer. ``Constant`` /
``ConstantOfShape`` values are widened exactly. Graph inputs that were bf16 take fp32 arrays holding
bf16 values (a previous call's outputs are exactly that).

**Weights stay bf16 where they lie** (the pass never reads them: a 9B export's weights are 18 GB,
and the pass runs on the graph alone, external data not loaded). A bf16 initializer ``w`` is
renamed ``w/bf16`` and widened exactly by a ``Cast(to=f32)`` node that produces ``w``, so every
consumer (subgraphs included) reads fp32. ONNX Runtime folds such casts once at session creation:
one fp32 copy of the weights of the graph it runs. A ``Gather`` whose data is a bf16 weight (an
embedding lookup) reads the bf16 table directly and widens the rows it gathers, exactly equal and
without an fp32 copy of the table::

    before:  table:bf16 ─ Gather(ids) ─ rows:bf16
    after:   table/bf16 ─ Gather(ids) ─ rows/raw:bf16 ─ Cast(to=f32) ─ rows:f32

What this emulates, and how far it is from true bf16 execution: each bf16 tensor is the fp32
result of its producing op rounded once to bf16 (round to nearest even), which is what an op that
computes in fp32 and stores bf16 does — TensorRT's bf16 GEMMs and convolutions (fp32 accumulation),
and our scan ops (DESIGN.md §5). An executor that fuses a chain of pointwise ops and rounds only the
chain's result is *more* precise than this emulation; one that accumulates in bf16 is less. The
measured distance to the ONNX reference evaluator running the bf16 graph with ml_dtypes is in
tests/graphs/test_bf16_emulation.py and the README.

Inside model-local functions nothing is rewritten: our function bodies cast their inputs to fp32
and their outputs back with ``CastLike``, and the rounding of the node's bf16 outputs happens at the
call site like for any other node.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT
#: Suffix of the unrounded fp32 value a rewritten node produces.
RAW_SUFFIX = "/bf16_emulation/raw"


#: Inline initializers up to this size keep their values for shape inference (shape operands of
#: Reshape/Expand …); larger ones, and external ones, are described by their header alone.
_INFERENCE_VALUE_BYTES = 1 << 16


def _header_only(t: TensorProto) -> TensorProto:
    """``t`` without its values (name, type, dims) if it is a weight: all shape inference needs."""
    if t.data_location != TensorProto.EXTERNAL and t.ByteSize() <= _INFERENCE_VALUE_BYTES:
        return t
    out = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=TensorProto.EXTERNAL)
    out.external_data.add(key="location", value="none")
    return out


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the main graph (after ONNX type inference, on the graph
    without its weights: inference would otherwise serialize them all)."""
    from hybridtrt.ops.onnx_schema import register_schemas

    register_schemas()  # our ops' type inference (y fp32, states like the state input)
    g = model.graph
    graph = helper.make_graph(g.node, g.name, g.input, g.output, [_header_only(t) for t in g.initializer], value_info=g.value_info)
    bare = helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    bare.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _widen_tensor(t: TensorProto) -> TensorProto:
    """A (small, inline) bf16 TensorProto as an exactly equal fp32 one (same name)."""
    array = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(array, t.name)


def _widen_attributes(node: onnx.NodeProto) -> None:
    """``Constant``/``ConstantOfShape`` values in bf16 become the equal fp32 tensors."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
            attr.t.CopyFrom(_widen_tensor(attr.t))


#: Suffix of a bf16 weight's own name once the fp32 widening of it has taken the name.
WEIGHT_SUFFIX = "/bf16"


def emulate_bf16(model: onnx.ModelProto, supplied: frozenset[str] | set[str] = frozenset()) -> onnx.ModelProto:
    """Return a copy of ``model`` whose bf16 values are fp32 with bf16 rounding at every producer.

    Args:
        model: A graph, with its weights loaded or (the usual case) external data not loaded: weights
            are neither read nor copied (external references are kept as they are).
        supplied: bf16 weights (of `fp32_reads`) whose exact fp32 widening the caller hands to the
            executor itself (``SessionOptions.add_initializer``): they are declared fp32 under their
            own name, without a Cast, so that sessions can share one widened copy.

    Returns:
        The rewritten model; ``model`` is not modified. A graph without bf16 values is returned as
        an unchanged copy.
    """
    return _rewrite(model, rounding=True, supplied=supplied)


def fp32_reads(model: onnx.ModelProto) -> set[str]:
    """The bf16 weights of ``model`` that the rewritten graph reads in fp32: all but those only an
    embedding ``Gather`` reads (gathered in bf16, the rows widened)."""
    weights = {t.name for t in model.graph.initializer if t.data_type == BF16}
    read = {name for node in model.graph.node for j, name in enumerate(node.input) if name in weights and not (node.op_type == "Gather" and j == 0)}
    return read | (_subgraph_reads(model.graph) & weights) | {v.name for v in model.graph.output if v.name in weights}


def widen_bf16(model: onnx.ModelProto, supplied: frozenset[str] | set[str] = frozenset()) -> onnx.ModelProto:
    """Return a copy of ``model`` that computes in fp32 from its bf16 weights: the same rewrite as
    `emulate_bf16` (weights widened exactly, bf16 embedding rows gathered then widened) without the
    rounding of the values the graph computes; a ``Cast(to=bf16)`` of the graph casts to fp32.

    This is fp32 inference of the bf16 weights, not a bf16 execution: at least as precise as any
    bf16 executor, and as fast on ONNX Runtime's CPU provider as the fp32 export (the rounding Casts
    cost bf16 emulation 1.3-1.4x: README "Benchmarks (CPU)"). `hybridtrt.runtime.onnxruntime.OrtModel`
    runs bf16 exports this way by default; validation and export verification judge a bf16
    artefact as TensorRT runs it, through `emulate_bf16`. ``supplied``: as for `emulate_bf16`.
    """
    return _rewrite(model, rounding=False, supplied=supplied)


def _rewrite(model: onnx.ModelProto, *, rounding: bool, supplied: frozenset[str] | set[str]) -> onnx.ModelProto:
    """`emulate_bf16` (``rounding``) or `widen_bf16`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = value_types(model)
    bf16_values = {name for name, elem in types.items() if elem == BF16}
    if not bf16_values:
        return out

    weights = {t.name for t in g.initializer if t.data_type == BF16}
    if supplied - fp32_reads(model):
        raise ValueError(f"not bf16 weights read in fp32: {sorted(supplied - fp32_reads(model))[:3]}")
    for t in g.initializer:
        if t.name in supplied:
            t.data_type = F32  # its value comes from the caller, widened
        elif t.name in weights:
            t.name += WEIGHT_SUFFIX
    weights -= set(supplied)
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32

    # Widen each bf16 weight once, before any node (only those some node reads as fp32).
    nodes: list[onnx.NodeProto] = []
    gathers_bf16: set[int] = set()
    gathers_widened: set[int] = set()  # rows of a supplied (widened) table: bf16 values already
    widened: set[str] = set()
    for k, node in enumerate(g.node):
        if node.op_type == "Gather" and node.input[0] in weights:
            node.input[0] += WEIGHT_SUFFIX  # rows gathered in bf16, widened below
            gathers_bf16.add(k)
        elif node.op_type == "Gather" and node.input[0] in supplied:
            gathers_widened.add(k)
        widened.update(name for name in node.input if name in weights)
    widened.update(_subgraph_reads(g) & weights)
    widened.update(v.name for v in g.output if v.name in weights)
    nodes.extend(
        helper.make_node("Cast", [name + WEIGHT_SUFFIX], [name], to=F32, name=f"/bf16_emulation/weight/{name}")
        for name in sorted(widened)
    )

    for k, node in enumerate(g.node):
        _widen_attributes(node)
        casts: list[onnx.NodeProto] = []
        if not rounding and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == BF16:
                    a.i = F32  # the graph's own rounding to bf16: fp32 inference keeps the value
        for j, name in enumerate(node.output):
            if name not in bf16_values or k in gathers_widened:
                continue
            already_bf16 = k in gathers_bf16 or (node.op_type == "Cast" and any(a.name == "to" and a.i == BF16 for a in node.attribute))
            if not rounding and not already_bf16:
                continue  # computed in fp32, kept in fp32
            raw = name + RAW_SUFFIX
            node.output[j] = raw
            if already_bf16:  # bf16 values already: widen them
                casts.append(helper.make_node("Cast", [raw], [name], to=F32, name=f"{node.name}/bf16_emulation/widen_{j}"))
            else:  # fp32 result: round to bf16, widen back
                rounded = name + "/bf16_emulation/rounded"
                casts.append(helper.make_node("Cast", [raw], [rounded], to=BF16, name=f"{node.name}/bf16_emulation/round_{j}"))
                casts.append(helper.make_node("Cast", [rounded], [name], to=F32, name=f"{node.name}/bf16_emulation/widen_{j}"))
        nodes.append(node)
        nodes.extend(casts)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of the subgraphs (If/Loop/Scan bodies) of ``graph``'s nodes."""
    found: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found.update(name for n in sub.node for name in n.input)
                found |= _subgraph_reads(sub)
    return found


def round_to_bf16(array: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bf16 (round half to even), as fp32."""
    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def graph_has_bf16(model: onnx.ModelProto) -> bool:
    """Does ``model`` take, return or hold bf16 tensors? (Initializers may be external: only their
    declared type is read.)"""
    g = model.graph
    bf16 = onnx.TensorProto.BFLOAT16
    return any(v.type.tensor_type.elem_type == bf16 for v in (*g.input, *g.output)) or any(t.data_type == bf16 for t in g.initializer)


__all__ = ["emulate_bf16", "fp32_reads", "graph_has_bf16", "round_to_bf16", "value_types", "widen_bf16"]
