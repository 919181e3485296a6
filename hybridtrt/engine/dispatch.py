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
standard op of `NATIVE_OPS` is checked against the release and the model's opset, and the graph as a whole
against the release's opset range and, before 10.8, the local-function name-aliasing bug. Problems are
sentences naming the node, the release and the fix. `require_dispatch` turns them — and custom nodes that
would be built from function bodies although a plugin library is loaded — into one typed error.

The emulator is what the build checks before TensorRT parses anything; after parsing, the build compares its
prediction with the plugin layers the network really holds (`hybridtrt.engine.network`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from hybridtrt.engine.trt_rules import (
    LOCAL_FUNCTION_ALWAYS,
    NATIVE_OPS,
    PLUGIN_NAMESPACE_WINS,
    REGISTERED_PLUGIN_WINS,
    NativeOp,
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

    def custom_nodes(self) -> Counter[str]:
        """Custom nodes of the model itself (not inside function bodies), by op: what the network must hold."""
        return Counter(n.op for n in self.nodes if n.custom and not n.in_function_body)

    def imported_as(self, importer: str) -> Counter[str]:
        """Custom nodes of the model imported by ``importer``, by op."""
        return Counter(n.op for n in self.nodes if n.custom and not n.in_function_body and n.importer == importer)

    def plugin_ops(self) -> set[str]:
        """The custom ops (``domain::op``) a registered creator serves: what must become plugin layers. Custom
        ops nobody ships a plugin for (e.g. ``MoeExperts`` today) are built from their function bodies by design."""
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


class _Emulator:
    def __init__(self, model: onnx.ModelProto, version: str, plugins: frozenset[Creator], plugin_override: bool):
        self.version = parse_version(version)
        self.release = parser_release(self.version)
        self.functions = {f.name: f for f in model.functions}  # the parser keys local functions by op_type
        self.report = DispatchReport(version, self.release, default_opset(model), plugins, plugin_override)
        self._collisions_reported: set[str] = set()

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
    def visit(self, nodes: Iterable[onnx.NodeProto], scope: str, outer: set[str]) -> None:
        for node in nodes:
            self.visit_node(node, scope, outer)
            for a in node.attribute:
                subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for g in subgraphs:
                    self.visit(g.node, f"{scope} > {node.name or node.op_type}.{a.name}", outer | _graph_names(g))

    def visit_node(self, node: onnx.NodeProto, scope: str, outer: set[str]) -> None:
        report = self.report
        name = node.name or f"<{node.op_type} -> {', '.join(node.output)}>"
        custom = node.domain not in _DEFAULT_DOMAINS
        op = f"{node.domain}::{node.op_type}" if custom else node.op_type
        importer, detail = self.importer(node)
        if not custom:
            native = NATIVE_OPS.get(node.op_type)
            if importer == BUILTIN and native is None:
                report.builtin[node.op_type] += 1
                return
            if native is not None and importer == BUILTIN:
                importer, detail = self.native(native)
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
            self.visit(function.node, f"function {op}", outer)

    def native(self, native: NativeOp) -> tuple[str, str]:
        detail = native.layer + (f" ({native.restrictions})" if native.restrictions else "")
        if self.version < native.since:
            return UNSUPPORTED, f"{native.op_type} needs TensorRT >= {fmt(native.since)} ({native.layer})"
        if self.report.opset < native.min_opset:
            return UNSUPPORTED, f"{native.op_type} exists from opset {native.min_opset}, the model imports {self.report.opset}"
        return NATIVE, detail

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
                f"TensorRT {fmt(self.version)}'s ONNX parser covers opsets up to {self.release.max_opset} "
                f"({self.release.source}); this graph is opset {report.opset} — install TensorRT >= 10.15 (11 recommended), "
                f"or re-export with `hybridtrt export --opset {self.release.max_opset}` if the dtype allows it "
                "(bf16 needs 22)"
            )
        elif report.opset < 9:
            report.problems.append(f"the graph imports default-domain opset {report.opset}; TensorRT's parser needs >= 9")
        self.visit(model.graph.node, "graph", _graph_names(model.graph))
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
