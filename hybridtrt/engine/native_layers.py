"""The importers of TensorRT's native attention layers: what ``importAttention`` / ``importTensorScatter``
(onnx-tensorrt ``onnxOpImporters.cpp``, TensorRT 10.14–11.1) refuse or silently ignore — called by the
dispatch emulator (`hybridtrt.engine.dispatch`) for every node it imports as a native layer; which release
imports which op is `hybridtrt.engine.trt_rules.NATIVE_OPS`, what the static checker refuses before any
import (``softmax_precision``, ``softcap``) is `hybridtrt.engine.trt_rules.OP_RULES`.

=================  =================  ===============================================================
ONNX op            TensorRT layer     what the importer requires (else it refuses, or — marked ⚠ —
                                      silently ignores the input)
=================  =================  ===============================================================
``Attention``      ``IAttention``     one output; no ``past_key``/``past_value``; Q/K/V of equal
                                      rank 3 or 4 (3: head attrs); ⚠ ``nonpad_kv_seqlen`` is not
                                      read; ``is_causal`` aligns upper-left; mask rank ≤ 4, bool or
                                      Q's dtype
``TensorScatter``  ``IKVCacheUpdate   cache and update rank 4; ``axis`` −2; ``mode="linear"``; the
                   Layer`` kLINEAR    cache's sequence dim static; its output a network output (the
                                      layer writes in place into bound memory)
=================  =================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import NodeProto, helper



@dataclass
class GraphFacts:
    """What the rules need to know about values: rank, static dims, dtype; graph outputs."""

    shapes: dict[str, list[int | str]]
    dtypes: dict[str, int]
    outputs: set[str]
    opset: int

    @classmethod
    def of(cls, model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> GraphFacts:
        """Facts of ``model``; ``inferred`` is its shape-inferred copy when the caller has one."""
        inferred = inferred or onnx.shape_inference.infer_shapes(model, strict_mode=False)
        shapes, dtypes = {}, {}
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            dtypes[v.name] = t.elem_type
        opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
        return cls(shapes, dtypes, {o.name for o in model.graph.output}, opset)

    def rank(self, name: str) -> int | None:
        return len(self.shapes[name]) if name in self.shapes else None


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _present(node: NodeProto, index: int) -> bool:
    return len(node.input) > index and node.input[index] != ""


def _attention_problems(node: NodeProto, g: GraphFacts) -> list[str]:
    a = _attrs(node)
    problems = []
    if len(node.output) != 1:
        problems.append(f"has {len(node.output)} outputs; TensorRT imports Attention with one output only")
    if _present(node, 4) or _present(node, 5):
        problems.append("sets past_key/past_value, which TensorRT's importer refuses (write the cache with TensorScatter)")
    if _present(node, 6):
        problems.append("sets nonpad_kv_seqlen, which TensorRT's importer ignores (put padding in attn_mask)")
    if a.get("is_causal", 0):
        problems.append("sets is_causal: TensorRT aligns it upper-left, wrong for queries after a cache (pass the causal mask)")
    ranks = {g.rank(n) for n in node.input[:3]}
    if len(ranks) != 1 or not ranks <= {3, 4, None}:
        problems.append(f"Q/K/V ranks {sorted(r for r in ranks if r is not None)} must be equal, 3 or 4")
    if ranks == {3} and not (a.get("q_num_heads") and a.get("kv_num_heads")):
        problems.append("3-D Q/K/V need q_num_heads and kv_num_heads")
    if _present(node, 3):
        mask = node.input[3]
        if (g.rank(mask) or 0) > 4:
            problems.append(f"attn_mask has rank {g.rank(mask)} > 4")
        if mask in g.dtypes and g.dtypes[mask] not in (onnx.TensorProto.BOOL, g.dtypes.get(node.input[0], g.dtypes[mask])):
            problems.append("attn_mask must be bool or Q's dtype")
    return problems


def _tensor_scatter_problems(node: NodeProto, g: GraphFacts) -> list[str]:
    a = _attrs(node)
    problems = []
    cache, update = node.input[0], node.input[1]
    for role, name in (("past_cache", cache), ("update", update)):
        if g.rank(name) not in (4, None):
            problems.append(f"{role} has rank {g.rank(name)}; TensorRT needs [batch, heads, sequence, head_dim]")
    axis = a.get("axis", -2)
    if axis not in (-2, 2):
        problems.append(f"axis {axis}: TensorRT writes along the sequence dim −2 only")
    mode = a.get("mode", b"linear")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "linear":
        problems.append(f"mode {mode!r}: TensorRT supports linear only")
    dims = g.shapes.get(cache)
    if dims is not None and len(dims) == 4 and not isinstance(dims[2], int) or (dims is not None and len(dims) == 4 and dims[2] == 0):
        problems.append(f"the cache's sequence dim is {dims[2]!r}; IKVCacheUpdateLayer needs a static capacity (--max-cache-len)")
    if node.output[0] not in g.outputs:
        problems.append(f"its output {node.output[0]!r} is not a graph output; IKVCacheUpdateLayer writes in place into bound memory")
    return problems


#: op_type -> the importer's refusals for a node of that op (`NATIVE_OPS` says which release imports it).
IMPORTER_RULES: dict[str, Callable[[NodeProto, GraphFacts], list[str]]] = {
    "Attention": _attention_problems,
    "TensorScatter": _tensor_scatter_problems,
}
