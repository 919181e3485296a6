"""Will TensorRT build our attention and KV-update nodes as its native layers? A data table of the
ONNX parser's rules (onnx-tensorrt ``onnxOpImporters.cpp``, TensorRT 10.14–11.1) and one function
that applies them to a graph — no TensorRT needed, so the answer is known on any machine.

=================  =================  ============  ===============================================
ONNX op            TensorRT layer     parser since  what the importer requires (else it refuses,
                                                    or — marked ⚠ — silently ignores the input)
=================  =================  ============  ===============================================
``Attention``      ``IAttention``     10.14         one output; no ``past_key``/``past_value``;
(opset 23)                                          Q/K/V of equal rank 3 or 4 (3: head attrs);
                                                    ⚠ ``nonpad_kv_seqlen`` and ``softcap`` are
                                                    not read; ``is_causal`` aligns upper-left;
                                                    mask rank ≤ 4, bool or Q's dtype
``TensorScatter``  ``IKVCacheUpdate   10.15         cache and update rank 4; ``axis`` −2;
(opset 24)         Layer`` kLINEAR                  ``mode="linear"``; the cache's sequence dim
                                                    static; its output a network output (the
                                                    layer writes in place into bound memory)
=================  =================  ============  ===============================================

The issue-14 dispatch emulator can fold `NATIVE_LAYERS` into its table; `hybridtrt build` should
call `check_native_layers` with the installed TensorRT version before parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from onnx import NodeProto, helper

from hybridtrt.errors import EngineError


@dataclass
class GraphFacts:
    """What the rules need to know about values: rank, static dims, dtype; graph outputs."""

    shapes: dict[str, list[int | str]]
    dtypes: dict[str, int]
    outputs: set[str]
    opset: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphFacts:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
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
    if a.get("softcap", 0.0):
        problems.append("sets softcap, which TensorRT's importer ignores")
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


@dataclass(frozen=True)
class NativeRule:
    """One ONNX op TensorRT builds as a native layer."""

    op_type: str
    layer: str
    since_tensorrt: tuple[int, int]
    since_opset: int
    problems: Callable[[NodeProto, GraphFacts], list[str]]
    source: str = field(default="onnx-tensorrt onnxOpImporters.cpp")


#: op_type -> rule (a registry; the dispatch emulator can merge it).
NATIVE_LAYERS: dict[str, NativeRule] = {
    "Attention": NativeRule("Attention", "IAttention", (10, 14), 23, _attention_problems),
    "TensorScatter": NativeRule("TensorScatter", "IKVCacheUpdateLayer", (10, 15), 24, _tensor_scatter_problems),
}


@dataclass
class Dispatch:
    """Where one node goes: ``layer`` when TensorRT builds it natively, else ``reasons``."""

    node: str
    op_type: str
    layer: str | None
    reasons: list[str]


def _version(text: str) -> tuple[int, int]:
    parts = (str(text).split(".") + ["0"])[:2]
    return int(parts[0]), int(parts[1])


def native_dispatch(model: onnx.ModelProto, tensorrt_version: str) -> list[Dispatch]:
    """Apply `NATIVE_LAYERS` to every node of the main graph that has a rule."""
    g = GraphFacts.of(model)
    trt = _version(tensorrt_version)
    out = []
    for node in model.graph.node:
        rule = NATIVE_LAYERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        reasons = []
        if trt < rule.since_tensorrt:
            reasons.append(f"TensorRT {tensorrt_version} predates the {rule.op_type} importer ({'.'.join(map(str, rule.since_tensorrt))})")
        if g.opset < rule.since_opset:
            reasons.append(f"opset {g.opset} < {rule.since_opset}")
        reasons += rule.problems(node, g)
        out.append(Dispatch(node.name or node.op_type, node.op_type, None if reasons else rule.layer, reasons))
    return out


def check_native_layers(model: onnx.ModelProto, tensorrt_version: str) -> list[Dispatch]:
    """`native_dispatch`, raising `EngineError` when a node would not become its native layer."""
    dispatch = native_dispatch(model, tensorrt_version)
    bad = [d for d in dispatch if d.layer is None]
    if bad:
        raise EngineError(
            "TensorRT would not build these nodes as native layers: " + "; ".join(f"{d.node}: {', '.join(d.reasons)}" for d in bad[:4]),
            fix="re-export with this hybridtrt at opset 24, and build with TensorRT ≥ 10.15",
        )
    return dispatch
