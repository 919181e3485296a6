"""Pass: run a bf16 graph on an executor without bf16 kernels (ONNX Runtime's CPU provider), with
bf16 rounding kept wherever the graph holds a bf16 tensor.

Pattern: every value whose type is ``bfloat16`` (graph inputs and outputs, initializers, node
outputs, including the outputs of our custom ops).

Rewrite: the value becomes ``float`` and is rounded to bf16 where it is produced::

    before:  a:bf16, b:bf16 ─ MatMul ─ y:bf16
    after:   a:f32,  b:f32  ─ MatMul ─ y/f32 ─ Cast(to=bf16) ─ Cast(to=f32) ─ y:f32

A ``Cast(to=bf16)`` already rounds, so it only gets the ``Cast(to=f32)`` after it; a ``CastLike``
whose target was bf16 now casts to fp32 and is rounded like any other producer. bf16 initializers
and ``Constant``/``ConstantOfShape`` values are widened exactly. Graph inputs that were bf16 take fp32
arrays holding bf16 values (a previous call's outputs are exactly that).

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

from hybridtrt.errors import ArtefactError

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT
#: Suffix of the unrounded fp32 value a rewritten node produces.
RAW_SUFFIX = "/bf16_emulation/raw"


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the main graph (after ONNX type inference)."""
    from hybridtrt.ops.onnx_schema import register_schemas

    register_schemas()  # our ops' type inference (y fp32, states like the state input)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _widen_tensor(t: TensorProto) -> TensorProto:
    """A bf16 TensorProto as an exactly equal fp32 one (same name)."""
    array = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(array, t.name)


def _widen_attributes(node: onnx.NodeProto) -> None:
    """``Constant``/``ConstantOfShape`` values in bf16 become the equal fp32 tensors."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
            attr.t.CopyFrom(_widen_tensor(attr.t))


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose bf16 tensors are fp32 with bf16 rounding at every producer.

    Args:
        model: A graph with its initializers loaded (``onnx.load(path)``, external data included).

    Returns:
        The rewritten model; ``model`` is not modified. A graph without bf16 values is returned as
        an unchanged copy.

    Raises:
        ArtefactError: an initializer is still external (load the weights first), or a bf16 value
            has no known producer type (type inference failed).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise ArtefactError(
                f"initializer {t.name} is in external data", fix="load the model with its weights before emulating bf16"
            )
    types = _value_types(model)
    bf16_values = {name for name, elem in types.items() if elem == BF16}
    if not bf16_values:
        return out

    for i, t in enumerate(g.initializer):
        if t.data_type == BF16:
            g.initializer[i].CopyFrom(_widen_tensor(t))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32

    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        _widen_attributes(node)
        casts: list[onnx.NodeProto] = []
        for k, name in enumerate(node.output):
            if name not in bf16_values:
                continue
            is_rounding_cast = node.op_type == "Cast" and any(a.name == "to" and a.i == BF16 for a in node.attribute)
            raw = name + RAW_SUFFIX
            node.output[k] = raw
            if is_rounding_cast:  # already bf16: widen it
                casts.append(helper.make_node("Cast", [raw], [name], to=F32, name=f"{node.name}/bf16_emulation/widen_{k}"))
            else:  # fp32 result: round to bf16, widen back
                rounded = name + "/bf16_emulation/rounded"
                casts.append(helper.make_node("Cast", [raw], [rounded], to=BF16, name=f"{node.name}/bf16_emulation/round_{k}"))
                casts.append(helper.make_node("Cast", [rounded], [name], to=F32, name=f"{node.name}/bf16_emulation/widen_{k}"))
        nodes.append(node)
        nodes.extend(casts)
    del g.node[:]
    g.node.extend(nodes)
    return out


def round_to_bf16(array: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bf16 (round half to even), as fp32."""
    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


__all__ = ["emulate_bf16", "round_to_bf16"]


#: Above this many bytes of weights an emulated graph is handed to ONNX Runtime as a file with
#: external data: one protobuf message cannot exceed 2 GiB (a bf16 embedding of 131072 × 4480 is
#: already 2.3 GB once widened to fp32).
INLINE_LIMIT = 1 << 30


def emulated_session(model: onnx.ModelProto, make_session):
    """``make_session(source)`` over the emulated ``model`` (weights loaded): the serialized bytes
    for a small graph, else a temporary ``model.onnx`` + ``weights.data`` that is deleted once the
    session holds its weights (ONNX Runtime reads or maps them at creation)."""
    import shutil
    import tempfile
    from pathlib import Path

    emulated = emulate_bf16(model)
    size = sum(len(t.raw_data) for t in emulated.graph.initializer)
    if size <= INLINE_LIMIT:
        return make_session(emulated.SerializeToString())
    folder = Path(tempfile.mkdtemp(prefix="hybridtrt-bf16-"))
    try:
        onnx.save_model(emulated, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.data", size_threshold=1024)
        del emulated
        return make_session(str(folder / "model.onnx"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def graph_has_bf16(model: onnx.ModelProto) -> bool:
    """Does ``model`` take, return or hold bf16 tensors? (Initializers may be external: only their
    declared type is read.)"""
    g = model.graph
    bf16 = onnx.TensorProto.BFLOAT16
    return any(v.type.tensor_type.elem_type == bf16 for v in (*g.input, *g.output)) or any(t.data_type == bf16 for t in g.initializer)
