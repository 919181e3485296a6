"""Emulate TensorRT's ONNX parser dispatch over an exported graph, per TensorRT version — no TensorRT needed.

For every node that matters it answers how the parser of a given TensorRT release imports it:

==================  ===========================================================================================
importer            when
==================  ===========================================================================================
``plugin``          a registered creator (name, ``plugin_version``, ``plugin_namespace``) wins, by the
                    release's rule (`hybridtrt.engine.trt_rules`: never <= 10.6; if registered 10.7-10.14;
                    with a ``plugin_namespace`` attribute or ``kENABLE_PLUGIN_OVERRIDE`` >= 10.15)
``local function``  the node's model-local function body is built (standard ONNX ops, visited in turn)
``native layer``    a standard op of `NATIVE_OPS` built as its dedicated layer (IAttention, IKVCacheUpdateLayer)
``builtin``         any other standard op (counted, not listed)
``unsupported``     nothing can import it on this release
==================  ===========================================================================================

Every node of a non-default domain is checked (the ``hybridtrt`` ops and any op other helpers add), every
standard op of `NATIVE_OPS` against the release, the model's opset and its importer's refusals
(`hybridtrt.engine.native_layers`), every standard op — in the graph and in every function body the parser
would build — against `OP_RULES` (the static checker's attribute refusals, operators.md's element types and
build-time-constant inputs), and the graph as a whole against the release's opset range and, before 10.8,
the local-function name-aliasing bug. Element types come from ONNX shape inference for the graph and are
propagated node by node through each function body from its call's input types. Problems are sentences
naming the node (or the function body and its nodes), the release, the rule's source and the fix.
`require_dispatch` turns them — and custom nodes that would be built from function bodies although a plugin
library is loaded — into one typed error.

The emulator is what the build checks before TensorRT parses anything; after parsing, the build compares its
prediction with the plugin layers the network really holds (`hybridtrt.engine.network`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.numpy_helper
from onnx import helper

from hybridtrt.engine.native_layers import IMPORTER_RULES, GraphFacts
from hybridtrt.engine.trt_rules import (
    BODY_FIXES,
    DEQUANTIZE_RULES,
    LOCAL_FUNCTION_ALWAYS,
    NATIVE_OPS,
    NONZERO,
    OP_RULES,
    PLUGIN_NAMESPACE_WINS,
    PRESENT,
    REGISTERED_PLUGIN_WINS,
    TENSORRT_OPS,
    TRT_TYPE_NAMES,
    AttributeRule,
    NativeOp,
    OpRule,
    ParserRelease,
)
from hybridtrt.engine.versions import MIN_PLUGIN_DISPATCH, fmt, parse_version, parser_release
from hybridtrt.errors import EngineError

PLUGIN = "plugin"
LOCAL_FUNCTION = "local function"
NATIVE = "native layer"
BUILTIN = "builtin"
UNSUPPORTED = "unsupported"

_DEFAULT_DOMAINS = ("", "ai.onnx")

Creator = tuple[str, str, str]  # (name, version, namespace)


@dataclass(frozen=True)
class NodeImport:
    """How one node is imported.

    Attributes:
        scope: ``"graph"``, a subgraph path (``"graph > /If.then_branch"``) or the local function being built.
        node: Node name.
        op: ``"domain::op_type"`` for custom ops, ``op_type`` for standard ones.
        importer: ``plugin`` | ``local function`` | ``native layer`` | ``unsupported``.
        detail: The plugin key, the layer, or why it is unsupported.
    """

    scope: str
    node: str
    op: str
    importer: str
    detail: str = ""

    @property
    def custom(self) -> bool:
        return "::" in self.op

    @property
    def in_function_body(self) -> bool:
        return self.scope.startswith("function ")


@dataclass
class DispatchReport:
    """The emulated parse of one graph by one TensorRT release."""

    tensorrt: str
    release: ParserRelease
    opset: int
    plugins: frozenset[Creator]
    plugin_override: bool
    nodes: list[NodeImport] = field(default_factory=list)
    builtin: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    #: What holds on some GPUs only, or is not verified (4-bit weights: `DEQUANTIZE_RULES` ``hardware``).
    notes: list[str] = field(default_factory=list)

    def custom_nodes(self) -> Counter[str]:
        """Custom nodes of the model itself (not inside function bodies), by op: what the network must hold."""
        return Counter(n.op for n in self.nodes if n.custom and not n.in_function_body)

    def imported_as(self, importer: str) -> Counter[str]:
        """Custom nodes of the model imported by ``importer``, by op."""
        return Counter(n.op for n in self.nodes if n.custom and not n.in_function_body and n.importer == importer)

    def plugin_ops(self) -> set[str]:
        """The custom ops (``domain::op``) a registered creator serves: what must become plugin layers. Custom
        ops nobody ships a plugin for (e.g. ``MoeExpertsNvfp4`` today) are built from their function bodies by design."""
        names = {name for name, _, _ in self.plugins}
        return {n.op for n in self.nodes if n.custom and n.op.split("::", 1)[1] in names}

    def expected_plugin_layers(self) -> Counter[str]:
        """Custom nodes of the model whose op has a registered creator, by op (the proof after parsing)."""
        ops = self.plugin_ops()
        return Counter({op: n for op, n in self.custom_nodes().items() if op in ops})

    def rows(self) -> list[list[str]]:
        """Table rows ``[op, importer, nodes, detail]`` of the custom and native nodes (model level)."""
        counts = Counter((n.op, n.importer, n.detail) for n in self.nodes if not n.in_function_body)
        return [[op, imp, str(k), detail] for (op, imp, detail), k in sorted(counts.items())]

    @property
    def ok(self) -> bool:
        return not self.problems


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    """The node's attributes with values (references to the enclosing function's attributes are skipped)."""
    out: dict[str, object] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            continue
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _all_zeros(t: onnx.TensorProto) -> bool:
    """An inline initializer of zeros (False for anything that cannot be read without its weights)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return False
    try:
        raw = onnx.numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - types numpy cannot hold
        return bool(t.raw_data) and not any(t.raw_data)
    return not raw.astype("float64").any() if raw.size else True


def _type_name(elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type)
    return TRT_TYPE_NAMES.get(name, name)


@dataclass
class _Scope:
    """What the rules need to know about the values of one graph or function body.

    Attributes:
        name: ``"graph"`` or ``"function domain::op"``.
        types: Value name -> ONNX element type (0: unknown).
        constants: Values known at build time (initializers, ``Constant`` outputs).
        opsets: The scope's opset imports (schemas for type propagation in function bodies).
    """

    name: str
    types: dict[str, int]
    constants: set[str]
    opsets: dict[str, int] = field(default_factory=dict)
    propagate: bool = False


def _graph_scope(model: onnx.ModelProto) -> tuple[_Scope, onnx.ModelProto | None, str]:
    """The main graph's scope from ONNX shape inference (and the inferred model, or the reason it failed)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # onnx raises InferenceError / ValidationError / RuntimeError
        inferred, error = None, f"{type(e).__name__}: {e}"
    else:
        error = ""
    graph = (inferred or model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return _Scope("graph", types, constants), inferred, error


def _bind_attribute_refs(function: onnx.FunctionProto, call: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The function's nodes with every attribute reference replaced by the call's value (or the default)."""
    given = {a.name: a for a in call.attribute}
    defaults = {a.name: a for a in function.attribute_proto}
    nodes = []
    for node in function.node:
        if not any(a.ref_attr_name for a in node.attribute):
            nodes.append(node)
            continue
        bound = onnx.NodeProto()
        bound.CopyFrom(node)
        del bound.attribute[:]
        for a in node.attribute:
            source = (given.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)) if a.ref_attr_name else a
            if source is not None:
                value = onnx.AttributeProto()
                value.CopyFrom(source)
                value.name = a.name
                bound.attribute.append(value)
        nodes.append(bound)
    return nodes


class _Emulator:
    def __init__(self, model: onnx.ModelProto, version: str, plugins: frozenset[Creator], plugin_override: bool):
        self.version = parse_version(version)
        self.release = parser_release(self.version)
        self.functions = {f.name: f for f in model.functions}  # the parser keys local functions by op_type
        self.report = DispatchReport(version, self.release, default_opset(model), plugins, plugin_override)
        self._collisions_reported: set[str] = set()
        self.graph_scope, inferred, self.inference_error = _graph_scope(model)
        self.shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        self.zeros = {t.name: _all_zeros(t) for t in model.graph.initializer}
        self.graph_scope.opsets = {o.domain: o.version for o in model.opset_import}
        self.facts = GraphFacts.of(model, inferred) if inferred is not None else None
        #: The graph inputs' symbolic dims (batch, sequence, past): dynamic at build time. Other symbols in
        #: inferred shapes are where ONNX shape inference gave up, not dims TensorRT would find dynamic.
        self.dynamic_dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        self._refusals: dict[tuple[str, str], list[str]] = {}  # (scope, refusal) -> node names
        self._fixes: dict[tuple[str, str], str] = {}

    # -- the parser's decision for one node (ModelImporter.cpp parseNode, by release) -------------------
    def importer(self, node: onnx.NodeProto) -> tuple[str, str]:
        attrs = _attrs(node)
        plugin_version = str(attrs.get("plugin_version", "1"))
        namespace = str(attrs.get("plugin_namespace", ""))
        key = (node.op_type, plugin_version, namespace)
        in_registry = key in self.report.plugins  # isNodeInPluginRegistry: the attribute's namespace only
        # FallbackPluginImporter also tries the node's domain as namespace from 10.10 on.
        domain_key = (node.op_type, plugin_version, node.domain)
        by_domain = self.version >= (10, 10) and not namespace and domain_key in self.report.plugins
        plugin_detail = f"{namespace}::{node.op_type} v{plugin_version}"
        builtin = onnx.defs.has(node.op_type)  # builtin importers are keyed by op_type alone, any domain
        has_function = node.op_type in self.functions
        rule = self.release.dispatch
        asks_for_plugin = self.report.plugin_override or "plugin_namespace" in attrs
        if rule == PLUGIN_NAMESPACE_WINS and asks_for_plugin and in_registry:
            return PLUGIN, plugin_detail
        if builtin:
            return BUILTIN, ""
        trt_op = TENSORRT_OPS.get(node.op_type)  # TensorRT's own ops: a builtin importer, before any local function
        if trt_op is not None:
            if self.version < trt_op.since:
                return UNSUPPORTED, f"{trt_op.op_type} needs TensorRT >= {fmt(trt_op.since)} ({trt_op.sources[0]})"
            return NATIVE, trt_op.layer
        if has_function:
            if rule == REGISTERED_PLUGIN_WINS and in_registry:
                return PLUGIN, plugin_detail
            return LOCAL_FUNCTION, f"{len(self.functions[node.op_type].node)} nodes"
        missing = f"no creator {plugin_detail} registered and no local function"
        if rule == PLUGIN_NAMESPACE_WINS and asks_for_plugin:
            return UNSUPPORTED, missing
        if in_registry:
            return PLUGIN, plugin_detail
        if by_domain:  # FallbackPluginImporter reads the namespace from the node's domain from 10.10 on
            return PLUGIN, f"{node.domain}::{node.op_type} v{plugin_version} (namespace from the node's domain)"
        return UNSUPPORTED, missing

    # -- walking the graph ------------------------------------------------------------------------------------
    def visit(self, nodes: Iterable[onnx.NodeProto], scope: str, outer: set[str], values: _Scope) -> None:
        for node in nodes:
            self.visit_node(node, scope, outer, values)
            if values.propagate:
                self.propagate(node, values)
            for a in node.attribute:
                subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for g in subgraphs:  # element types inside subgraphs are not inferred: checked for attributes only
                    inner = _Scope(values.name, {}, {i.name for i in g.initializer})
                    self.visit(g.node, f"{scope} > {node.name or node.op_type}.{a.name}", outer | _graph_names(g), inner)

    def visit_node(self, node: onnx.NodeProto, scope: str, outer: set[str], values: _Scope) -> None:
        report = self.report
        name = node.name or f"<{node.op_type} -> {', '.join(node.output)}>"
        custom = node.domain not in _DEFAULT_DOMAINS
        op = f"{node.domain}::{node.op_type}" if custom else node.op_type
        importer, detail = self.importer(node)
        if not custom:
            native = NATIVE_OPS.get(node.op_type)
            if importer in (BUILTIN, NATIVE) and node.op_type in OP_RULES:
                self.check_op(node, name, OP_RULES[node.op_type], values)
            if node.op_type == "Constant":
                values.constants.update(o for o in node.output if o)
            if importer == BUILTIN and native is None:
                report.builtin[node.op_type] += 1
                return
            if native is not None and importer == BUILTIN:
                importer, detail = self.native(native, node, name)
        elif importer == NATIVE:  # one of TensorRT's own ops (TENSORRT_OPS)
            self.check_tensorrt_op(node, name, values)
        elif importer == BUILTIN:
            report.problems.append(
                f"node {name!r} ({op}): its op_type {node.op_type!r} is also a standard ONNX op, and TensorRT's parser "
                "imports it as that op whatever its domain"
            )
        report.nodes.append(NodeImport(scope, name, op, importer, detail))
        if importer == UNSUPPORTED:
            report.problems.append(f"node {name!r} ({op}) cannot be imported by TensorRT {fmt(self.version)}: {detail}")
        if importer == LOCAL_FUNCTION:
            function = self.functions[node.op_type]
            self.check_function_scope(function, name, op, outer)
            body = _Scope(
                f"function {op}",
                {formal: values.types.get(actual, 0) for formal, actual in zip(function.input, node.input)},
                {formal for formal, actual in zip(function.input, node.input) if actual in values.constants},
                {o.domain: o.version for o in function.opset_import},
                propagate=True,
            )
            self.visit(_bind_attribute_refs(function, node), body.name, outer, body)

    def native(self, native: NativeOp, node: onnx.NodeProto, name: str) -> tuple[str, str]:
        detail = native.layer  # its importer's restrictions are checked below, not repeated in the table
        if self.version < native.since:
            return UNSUPPORTED, f"{native.op_type} needs TensorRT >= {fmt(native.since)} ({native.layer})"
        if self.report.opset < native.min_opset:
            return UNSUPPORTED, f"{native.op_type} exists from opset {native.min_opset}, the model imports {self.report.opset}"
        if self.facts is not None and native.op_type in IMPORTER_RULES:
            refused = IMPORTER_RULES[native.op_type](node, self.facts)
            if refused:
                return UNSUPPORTED, f"TensorRT's {native.op_type} importer (onnxOpImporters.cpp) would not build {native.layer}: " + "; ".join(refused)
        return NATIVE, detail

    # -- the parser's static checker and operators.md, per op (OP_RULES) ---------------------------------------
    def refuse(self, scope: str, node_name: str, refusal: str, fix: str = "") -> None:
        names = self._refusals.setdefault((scope, refusal), [])
        if node_name not in names:  # a function body is visited once per call
            names.append(node_name)
        if fix:
            self._fixes[(scope, refusal)] = fix

    def check_op(self, node: onnx.NodeProto, name: str, rule: OpRule, values: _Scope) -> None:
        attrs = _attrs(node)
        for a in rule.attributes:
            if self.version >= a.since and a.name in attrs and self._refuses(a, attrs[a.name]):
                self.refuse(values.name, name, self._attribute_refusal(rule.op_type, a, attrs[a.name]), a.fix)
        for i in rule.typed_inputs:
            if i < len(node.input) and node.input[i] and values.types.get(node.input[i], 0):
                kind = _type_name(values.types[node.input[i]])
                if kind not in rule.types:
                    self.refuse(values.name, name, f"{rule.op_type} on {kind} (input {i}) is not supported: TensorRT's "
                                f"{rule.op_type} takes {', '.join(rule.types)} (operators.md){self._quantized_note(kind)}")  # fmt: skip
        if rule.typed_to and "to" in attrs:
            kind = _type_name(int(attrs["to"]))  # type: ignore[arg-type]
            if kind not in rule.types:
                self.refuse(values.name, name, f"{rule.op_type} to {kind} is not supported: TensorRT's {rule.op_type} takes "
                            f"{', '.join(rule.types)} (operators.md){self._quantized_note(kind)}")  # fmt: skip
        if rule.op_type == "DequantizeLinear":
            self.check_dequantize(node, name, attrs, values)
        for i in rule.constant_inputs:
            if i < len(node.input) and node.input[i] and node.input[i] not in values.constants:
                self.refuse(values.name, name, f"{rule.op_type}'s input {i} must be a build-time constant (an initializer "
                            "or a Constant node; operators.md), it is computed in the graph")  # fmt: skip

    def check_dequantize(self, node: onnx.NodeProto, name: str, attrs: dict[str, object], values: _Scope) -> None:
        """`DEQUANTIZE_RULES`: a DequantizeLinear of 4-bit weights, by TensorRT version."""
        kind = _type_name(values.types.get(node.input[0], 0)) if values.types.get(node.input[0], 0) else ""
        rule = DEQUANTIZE_RULES.get(kind)
        if rule is None:
            return
        v = fmt(self.version)
        where = values.name
        note = f"{kind} weights: {rule.hardware}"
        if note not in self.report.notes:
            self.report.notes.append(note)
        if self.version < rule.since:
            self.refuse(where, name, f"DequantizeLinear of {kind} needs TensorRT >= {fmt(rule.since)} ({rule.sources[0]}); this is {v}")
            return
        block = int(attrs.get("block_size", 0) or 0)
        data, scale = self.shapes.get(node.input[0]), self.shapes.get(node.input[1]) if len(node.input) > 1 else None
        if rule.constant_until is not None and self.version < rule.constant_until and node.input[0] not in values.constants:
            self.refuse(where, name, f"TensorRT {v} dequantizes {kind} only from weights (an initializer), not a computed tensor ({rule.sources[1]})")
        if data is not None and math.prod(data) % 2:
            self.refuse(where, name, f"a {kind} tensor of {math.prod(data)} elements: TensorRT's parser needs an even count of 4-bit elements")
        if len(node.input) > 2 and node.input[2] and not self.zeros.get(node.input[2], False):
            self.refuse(where, name, "a non-zero (or unknown) zero point: TensorRT quantizes symmetrically only (NvInfer.h: \"zeroPt must only contain zero-valued coefficients\")")
        if not block:
            return
        if self.version < rule.blocked_since:
            self.refuse(where, name, f"blocked DequantizeLinear of {kind} needs TensorRT >= {fmt(rule.blocked_since)} ({rule.sources[1]}); this is {v}")
        if rule.block_sizes and block not in rule.block_sizes:
            self.refuse(where, name, f"{kind} blocks of {block}: TensorRT documents {kind} blocks of {' or '.join(map(str, rule.block_sizes))} ({rule.sources[-1]})",
                        fix="re-export with --block-size 128 (or 64)" if kind == "INT4" else "")  # fmt: skip
        if data is None or scale is None:
            return
        axis = int(attrs.get("axis", 1)) % len(data) if data else 0  # type: ignore[arg-type]
        if len(scale) != len(data) or len(scale) > 2:
            self.refuse(where, name, f"a blocked scale of rank {len(scale)} for a rank-{len(data)} input: TensorRT takes a scale of the input's rank, at most 2 (NvInfer.h, IDequantizeLayer)")
        elif axis < len(data) - 2:
            self.refuse(where, name, f"blocking on axis {axis} of a rank-{len(data)} input: TensorRT blocks one of the last two dimensions (NvInfer.h, IDequantizeLayer)")
        elif data[axis] % max(scale[axis], 1) or data[axis] // max(scale[axis], 1) != block:
            self.refuse(where, name, f"{data[axis]} values in {scale[axis]} blocks of {block}: TensorRT's parser infers the block from the shapes and refuses a partial one "
                        "(onnxOpImporters.cpp: \"Inferred block size is not an integer.\")", fix="re-export with a block size that divides the dimension")  # fmt: skip

    def check_tensorrt_op(self, node: onnx.NodeProto, name: str, values: _Scope) -> None:
        """`TENSORRT_OPS`: the importer's and the layer's refusals of one of TensorRT's own ops."""
        rule = TENSORRT_OPS[node.op_type]
        attrs = _attrs(node)
        where = values.name
        note = f"{rule.op_type}: {rule.hardware}"
        if note not in self.report.notes:
            self.report.notes.append(note)
        for attribute, allowed in rule.attributes.items():
            value = attrs.get(attribute)
            value = value.decode() if isinstance(value, bytes) else value
            if value not in allowed:
                self.refuse(where, name, f"{rule.op_type} with {attribute}={value!r}: TensorRT maps {', '.join(allowed)} ({rule.sources[2]})")
        kind = _type_name(values.types.get(node.input[0], 0)) if values.types.get(node.input[0], 0) else ""
        if not rule.block_sizes:  # no blocked quantization: the attributes and the input type are the rules
            if kind and kind not in rule.input_types:
                self.refuse(where, name, f"{rule.op_type} on {kind}: the layer takes {', '.join(rule.input_types)} ({rule.sources[2]})")
            return
        block = attrs.get("block_size")
        if block not in rule.block_sizes:
            self.refuse(where, name, f"{rule.op_type} with block_size {block!r}: its importer takes {' or '.join(map(str, rule.block_sizes))} ({rule.sources[1]})")
        scale_type = _type_name(int(attrs["scale_type"])) if "scale_type" in attrs else None  # type: ignore[arg-type]
        if scale_type is not None and not any(TRT_TYPE_NAMES.get(t, t) == scale_type for t in rule.scale_types):
            self.refuse(where, name, f"{rule.op_type} with scale_type {scale_type}: its importer takes {', '.join(rule.scale_types)} ({rule.sources[1]})")
        scale = node.input[1] if len(node.input) > 1 else ""
        if not scale or scale not in values.constants:
            self.refuse(where, name, f"{rule.op_type}'s scale (input 1) must be an initializer ({rule.sources[1]}: \"Scale input must be an initializer.\")")
        elif scale in self.shapes and math.prod(self.shapes[scale]) != 1:
            self.refuse(where, name, f"{rule.op_type}'s scale has shape {list(self.shapes[scale])}: its importer takes one value (\"Scale input must be a scalar.\")")
        if kind and kind not in rule.input_types:
            self.refuse(where, name, f"{rule.op_type} on {kind}: the layer takes {', '.join(rule.input_types)} ({rule.sources[2]})")
        shape = self.facts.shapes.get(node.input[0]) if self.facts is not None and where == "graph" else None
        if shape is None:
            return
        if len(shape) not in rule.ranks:
            self.refuse(where, name, f"{rule.op_type} on a rank-{len(shape)} input: the layer takes rank {' or '.join(map(str, rule.ranks))} ({rule.sources[2]})")
            return
        axis = int(attrs.get("axis", 1)) % len(shape)  # type: ignore[arg-type]
        if axis < len(shape) - 2:
            self.refuse(where, name, f"{rule.op_type} blocking axis {axis} of a rank-{len(shape)} input: the layer blocks the last or second to last ({rule.sources[2]})")
        elif shape[axis] in self.dynamic_dims:
            self.refuse(where, name, f"{rule.op_type} blocking a dynamic axis ({shape[axis]!r}): the layer needs its extent at build time ({rule.sources[2]})")
        elif isinstance(shape[axis], int) and isinstance(block, int) and block > 0 and shape[axis] % block:
            self.refuse(where, name, f"{rule.op_type} blocking {shape[axis]} values in blocks of {block}: the extent must be a multiple of the block ({rule.sources[2]})")

    @staticmethod
    def _refuses(rule: AttributeRule, value: object) -> bool:
        if rule.refuse == PRESENT:
            return True
        if rule.refuse == NONZERO:
            return bool(value)
        return value not in rule.allowed

    def _attribute_refusal(self, op_type: str, rule: AttributeRule, value: object) -> str:
        shown = "(any value)" if rule.refuse == PRESENT else f"= {value!r}"
        where = ("TensorRT's static checker refuses it before importing anything (onnxOpCheckers.cpp)" if rule.source == "checker"
                 else "operators.md")  # fmt: skip
        return f"{op_type} with attribute {rule.name} {shown}: \"{rule.message}\" — {where}"

    @staticmethod
    def _quantized_note(kind: str) -> str:
        if kind in ("FP8", "FP4", "INT4", "INT8"):
            return f"; {kind} is a quantized type in TensorRT, reached only through QuantizeLinear/DequantizeLinear"
        return ""

    def propagate(self, node: onnx.NodeProto, values: _Scope) -> None:
        """Element types of ``node``'s outputs inside a function body (ONNX's per-node inference)."""
        if node.domain not in _DEFAULT_DOMAINS:
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, values.opsets.get(node.domain, values.opsets.get("", 1)), node.domain)
            known = {i: onnx.helper.make_tensor_type_proto(values.types[i], None) for i in node.input if values.types.get(i)}
            outputs = onnx.shape_inference.infer_node_outputs(schema, node, known)
        except Exception:  # noqa: BLE001 - onnx raises several types; an unknown type just goes unchecked
            return
        for out, proto in outputs.items():
            values.types[out] = proto.tensor_type.elem_type

    def refusal_problems(self) -> list[str]:
        """One sentence per (scope, refusal) naming up to three nodes, then the fix of each refused body."""
        problems, bodies = [], []
        for (scope, refusal), names in self._refusals.items():
            listed = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            where = "" if scope == "graph" else f"in the body of {scope.removeprefix('function ')}, which TensorRT would build: "
            fix = self._fixes.get((scope, refusal))
            problems.append(f"{where}{refusal} — node{'s' if len(names) > 1 else ''} {listed}" + (f" — fix: {fix}" if fix else ""))
            if scope != "graph" and scope not in bodies:
                bodies.append(scope)
        for scope in bodies:
            op = scope.removeprefix("function ")
            problems.append(f"{op} cannot be built from its function body by TensorRT {fmt(self.version)} — fix: {self.body_fix(op)}")
        return problems

    def body_fix(self, op: str) -> str:
        """The fix for a refused function body of ``op`` (``domain::op_type``): `BODY_FIXES` when no registered creator
        serves the op; when one is registered the parser still chose the body, which its release or the node decides."""
        name = op.rsplit("::", 1)[-1]
        served = sorted(f"{ns}::{n} v{v}" for n, v, ns in self.report.plugins if n == name)
        if not served:
            return BODY_FIXES.get(name, "build the plugin for it, or re-export without it")
        if self.release.dispatch == LOCAL_FUNCTION_ALWAYS:
            return (f"{', '.join(served)} is registered, but TensorRT {fmt(self.version)}'s parser always builds a node's "
                    f"local function (NVIDIA/TensorRT#4113): install TensorRT >= {fmt(MIN_PLUGIN_DISPATCH)} (>= 10.15 or 11 "
                    "recommended)")  # fmt: skip
        return (f"{', '.join(served)} is registered, but the node does not ask for it (no plugin_namespace attribute, or "
                "another plugin_version / plugin_namespace): re-export with this hybridtrt, whose nodes carry "
                "plugin_namespace=\"hybridtrt\", plugin_version=\"1\"")  # fmt: skip

    def check_function_scope(self, function: onnx.FunctionProto, name: str, op: str, outer: set[str]) -> None:
        """Before 10.8 a local function whose value names alias an outer-scope tensor is imported wrongly."""
        if not self.release.function_scope_bug:
            return
        inner = set(function.input) | {o for n in function.node for o in n.output if o}
        clash = sorted(inner & outer)
        if clash and op not in self._collisions_reported:
            self._collisions_reported.add(op)
            self.report.problems.append(
                f"node {name!r} ({op}): its local function uses value names that also name tensors of the calling graph "
                f"({', '.join(clash[:5])}{', ...' if len(clash) > 5 else ''}); TensorRT {fmt(self.version)} mishandles "
                "them (fixed in 10.8) — install TensorRT >= 10.8, or load the plugins, or re-export with distinct names"
            )

    def run(self, model: onnx.ModelProto) -> DispatchReport:
        report = self.report
        if report.opset > self.release.max_opset:
            report.problems.append(
                f"TensorRT {fmt(self.version)} documents ONNX opsets up to {self.release.max_opset} "
                f"({self.release.source}); this graph is opset {report.opset}. The parser itself only checks a minimum, "
                "so hybridtrt refuses (policy) rather than let ops newer than the release build by older rules or fail "
                "deep in the build — install TensorRT >= 10.15 (11 recommended), "
                f"or re-export with `hybridtrt export --opset {self.release.max_opset}` if the dtype allows it "
                "(bf16 needs 22)"
            )
        elif report.opset < 9:
            report.problems.append(f"the graph imports default-domain opset {report.opset}; TensorRT's parser needs >= 9")
        if self.inference_error:
            report.problems.append(
                f"ONNX shape inference failed on the graph ({self.inference_error}): the element types TensorRT's "
                "operators take cannot be checked — re-export with this hybridtrt"
            )
        self.visit(model.graph.node, "graph", _graph_names(model.graph), self.graph_scope)
        report.problems += self.refusal_problems()
        return report


def emulate_dispatch(
    model: onnx.ModelProto | str | Path,
    tensorrt_version: str,
    *,
    plugins: Iterable[Creator] = (),
    plugin_override: bool = False,
) -> DispatchReport:
    """How TensorRT ``tensorrt_version``'s ONNX parser imports ``model``.

    Args:
        model: The ModelProto, or an ``.onnx`` path (read without its external weights).
        tensorrt_version: e.g. ``"11.1.0"``.
        plugins: The creators registered when the parser runs, as (name, version, namespace); e.g.
            `hybridtrt.engine.trt_rules.HYBRIDTRT_CREATORS` when libhybridtrt_trt.so is loaded.
        plugin_override: The parser flag ``kENABLE_PLUGIN_OVERRIDE`` (10.15+).

    Raises:
        MissingDependencyError: The version is unreadable or older than TensorRT 10.0.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return _Emulator(proto, tensorrt_version, frozenset(plugins), plugin_override).run(proto)


def require_dispatch(report: DispatchReport, *, plugins_loaded: bool, allow_function_bodies: bool) -> None:
    """Refuse a build whose parse would not be what was asked for.

    Raises:
        EngineError: Any problem of the report; or, with a plugin library loaded, custom nodes of an op the
            library serves that would be built from their function bodies (unless ``allow_function_bodies``).
    """
    problems = list(report.problems)
    plugin_ops = report.plugin_ops()  # ops nobody ships a plugin for are function bodies by design
    bodies = Counter({op: n for op, n in report.imported_as(LOCAL_FUNCTION).items() if op in plugin_ops})
    version = report.tensorrt
    if plugins_loaded and bodies and not allow_function_bodies:
        listing = ", ".join(f"{n}x {op}" for op, n in sorted(bodies.items()))
        if report.release.dispatch == LOCAL_FUNCTION_ALWAYS:
            problems.append(
                f"TensorRT {version}'s ONNX parser always builds a custom node from its local function when the model has "
                f"one (NVIDIA/TensorRT#4113): {listing} would run as slow function bodies and the plugins would never be "
                f"used — install TensorRT >= {fmt(MIN_PLUGIN_DISPATCH)} (>= 10.15 or 11 recommended), or pass "
                "--allow-function-bodies to build the function bodies knowingly"
            )
        else:
            problems.append(
                f"{listing} would be built from local functions although a plugin library is loaded: no registered creator "
                "matches their (op_type, plugin_version, plugin_namespace)"
                + (" or they carry no plugin_namespace attribute" if report.release.dispatch == PLUGIN_NAMESPACE_WINS else "")
                + " — re-export with this hybridtrt, or pass --allow-function-bodies"
            )
    if problems:
        raise EngineError(
            f"TensorRT {version} would not build this graph as asked:\n  - " + "\n  - ".join(problems),
            fix="see each line above; `hybridtrt build EXPORT --check-tensorrt VERSION` re-checks without TensorRT",
        )


__all__ = [
    "BUILTIN",
    "LOCAL_FUNCTION",
    "NATIVE",
    "PLUGIN",
    "UNSUPPORTED",
    "DispatchReport",
    "NodeImport",
    "default_opset",
    "emulate_dispatch",
    "require_dispatch",
]
