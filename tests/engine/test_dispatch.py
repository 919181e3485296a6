"""The emulated ONNX-parser dispatch on the export flavours (fp32, FP8, --split; half precision at the default opset: test_parser_rules.py), per TensorRT release.

What must hold for our graphs (fp32, FP8 at opset 22): with libhybridtrt_trt.so loaded, every ``hybridtrt`` node becomes our plugin on
every release that prefers plugins (10.7+); without it, every node is its local function; the releases that
would lose the plugins (<= 10.6) or cannot parse opset 22 (10.0 / 10.1) are refused. Planted graphs show the
other rules: a missing plugin_namespace on 10.15+, function-name aliasing before 10.8, a custom op type that is
also a standard op, a custom node nothing can import, and the native-layer rows (Attention, TensorScatter).
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from hybridtrt.cli.main import main
from hybridtrt.engine.dispatch import LOCAL_FUNCTION, NATIVE, PLUGIN, UNSUPPORTED, emulate_dispatch, require_dispatch
from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS
from hybridtrt.errors import EngineError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import read_manifest

PLUGIN_RELEASES = ["10.7.0", "10.9.0", "10.14", "10.15", "11.1.0"]


@pytest.fixture(scope="module")
def flavours(make_export, make_checkpoint, tmp_path_factory) -> dict[str, object]:
    """Export directories of every flavour at opset 22 (attention as primitive ops), the newest opset
    that TensorRT 10.2-10.14 parse; the default opset-24 export is tested on its own below."""
    from hybridtrt.exporter.quantize import QuantizeOptions

    out = {
        "fp32+split": make_export("tiny-nemotron-h", ExportOptions(split=True, opset=22))[1],
        # The decode graph's op (Mamba2StateUpdate) is dispatched in "fp32+split"; the half dtypes add no op (their
        # graphs, with the type rules, at the default opset: tests/engine/test_parser_rules.py).
    }
    fp8 = tmp_path_factory.mktemp("fp8")
    export(make_checkpoint("tiny-nemotron-h", initializer_range=0.05), fp8, ExportOptions(verify=False, opset=22, split=False), quantize=QuantizeOptions(calib_random=4))
    out["fp8"] = fp8
    return out


def graphs(export_dir):
    manifest = read_manifest(export_dir)
    for name, entry in manifest.graphs.items():
        yield name, onnx.load(str(export_dir / entry.file), load_external_data=False), {f"hybridtrt::{op}": n for op, n in entry.custom_ops.items()}


@pytest.mark.parametrize("flavour", ["fp32+split", "fp8"])
def test_every_custom_node_becomes_our_plugin_from_10_7(flavours, flavour):
    seen = set()
    for name, model, custom in graphs(flavours[flavour]):
        seen.add(name)
        assert custom, "the graph has custom nodes"
        for version in PLUGIN_RELEASES:
            report = emulate_dispatch(model, version, plugins=HYBRIDTRT_CREATORS)
            assert report.ok, report.problems
            assert report.custom_nodes() == custom
            assert report.imported_as(PLUGIN) == custom
            require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)
            # without the plugin library every node is built from its local function, on every release
            bodies = emulate_dispatch(model, version)
            assert bodies.ok and bodies.imported_as(LOCAL_FUNCTION) == custom
            require_dispatch(bodies, plugins_loaded=False, allow_function_bodies=False)
    if flavour == "fp32+split":
        assert seen == {"unified", "decode"}


def test_the_default_opset_24_export_needs_tensorrt_10_15(make_export):
    """Default export: opset 24, one standard Attention node per attention layer (IAttention from 10.14)."""
    out = make_export("tiny-nemotron-h", ExportOptions(split=True))[1]
    for _, model, custom in graphs(out):
        for version in ("10.15", "11.1.0"):
            report = emulate_dispatch(model, version, plugins=HYBRIDTRT_CREATORS)
            assert report.ok, report.problems
            assert report.imported_as(PLUGIN) == custom
            assert sum(n.op == "Attention" and n.importer == NATIVE for n in report.nodes) >= 1
        old = emulate_dispatch(model, "10.9.0", plugins=HYBRIDTRT_CREATORS)
        assert any("this graph is opset 24" in p for p in old.problems)
        assert any("Attention needs TensorRT >= 10.14" in p for p in old.problems)


@pytest.mark.parametrize("flavour", ["fp32+split", "fp8"])
def test_releases_that_lose_the_plugins_or_the_opset_are_refused(flavours, flavour):
    for _, model, custom in graphs(flavours[flavour]):
        report = emulate_dispatch(model, "10.6.0", plugins=HYBRIDTRT_CREATORS)
        assert report.ok and report.imported_as(LOCAL_FUNCTION) == custom  # the parse works, the plugins are lost
        with pytest.raises(EngineError, match="NVIDIA/TensorRT#4113"):
            require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)
        require_dispatch(report, plugins_loaded=True, allow_function_bodies=True)
        for version in ("10.0.1", "10.1.0"):
            old = emulate_dispatch(model, version)
            assert any("documents ONNX opsets up to 20" in p and "opset 22" in p for p in old.problems)
            with pytest.raises(EngineError, match="opset 22"):
                require_dispatch(old, plugins_loaded=False, allow_function_bodies=True)


def test_function_bodies_only_fp8_qdq_nodes_are_builtin(flavours):
    """The FP8 graph adds QuantizeLinear/DequantizeLinear: builtin importers, counted, never custom."""
    _, model, _ = next(graphs(flavours["fp8"]))
    report = emulate_dispatch(model, "11.1.0", plugins=HYBRIDTRT_CREATORS)
    assert report.builtin["QuantizeLinear"] > 0 and report.builtin["DequantizeLinear"] > 0


# -- planted graphs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unified(flavours):
    return onnx.load(str(flavours["fp32+split"] / "model.onnx"), load_external_data=False)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_missing_plugin_namespace_loses_the_plugin_from_10_15(unified):
    model = _copy(unified)
    for node in model.graph.node:
        if node.domain == "hybridtrt":
            keep = [a for a in node.attribute if a.name != "plugin_namespace"]
            del node.attribute[:]
            node.attribute.extend(keep)
    # 10.7-10.14: a registered plugin wins; the fallback importer looks the namespace up in the node's domain
    # (10.10+), isNodeInPluginRegistry in the attribute only: namespace "" is not registered -> local function
    assert emulate_dispatch(model, "10.9.0", plugins=HYBRIDTRT_CREATORS).imported_as(LOCAL_FUNCTION)
    report = emulate_dispatch(model, "11.1.0", plugins=HYBRIDTRT_CREATORS)
    assert report.imported_as(LOCAL_FUNCTION) == {"hybridtrt::Mamba2ChunkScan": 4}
    with pytest.raises(EngineError, match="no plugin_namespace attribute"):
        require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)
    # kENABLE_PLUGIN_OVERRIDE does not help either: the attribute's namespace ("") has no creator
    assert emulate_dispatch(model, "11.1.0", plugins=HYBRIDTRT_CREATORS, plugin_override=True).imported_as(LOCAL_FUNCTION)
    # a creator registered under the empty namespace would be found with the override flag
    empty_ns = {(name, version, "") for name, version, _ in HYBRIDTRT_CREATORS}
    assert emulate_dispatch(model, "11.1.0", plugins=empty_ns, plugin_override=True).imported_as(PLUGIN)


def test_function_names_aliasing_the_outer_graph_before_10_8(unified):
    """Rename an outer tensor to a name the Mamba2ChunkScan function uses inside: 10.7 mishandles it, 10.8 not."""
    model = _copy(unified)
    function = next(f for f in model.functions if f.name == "Mamba2ChunkScan")
    inner = function.node[0].output[0]
    node = next(n for n in model.graph.node if n.op_type == "Mul")
    old = node.output[0]
    node.output[0] = inner
    for other in model.graph.node:
        other.input[:] = [inner if i == old else i for i in other.input]
    report = emulate_dispatch(model, "10.7.0")
    assert any("mishandles them (fixed in 10.8)" in p and inner in p for p in report.problems)
    assert emulate_dispatch(model, "10.8.0").ok
    assert emulate_dispatch(model, "10.7.0", plugins=HYBRIDTRT_CREATORS).ok  # plugins: the function is not built


def _model(nodes, inputs, outputs, opset, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("hybridtrt", 1)]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def _t(name, shape=(1, 2, 3, 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def test_attention_and_tensorscatter_need_their_release():
    """The native-layer rows the static-cache flavour will use: Attention (IAttention, 10.14, opset 23) and
    TensorScatter (IKVCacheUpdateLayer, 10.15, opset 24)."""
    attention = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")], [_t("q"), _t("k"), _t("v")], [_t("y")], 23)
    assert emulate_dispatch(attention, "10.13.0").nodes[0].importer == UNSUPPORTED
    report = emulate_dispatch(attention, "10.14")
    assert report.ok and report.nodes[0].importer == NATIVE and report.nodes[0].detail.startswith("IAttention")
    scatter = _model(
        [helper.make_node("TensorScatter", ["cache", "update", "idx"], ["present"], name="kv", axis=-2)],
        [_t("cache"), _t("update"), helper.make_tensor_value_info("idx", TensorProto.INT64, [1])], [_t("present")], 24,
    )  # fmt: skip
    old = emulate_dispatch(scatter, "10.14")
    assert any("opset 24" in p for p in old.problems) and old.nodes[0].importer == UNSUPPORTED
    new = emulate_dispatch(scatter, "10.15")
    assert new.ok and new.nodes[0].detail.startswith("IKVCacheUpdateLayer")


def test_every_hybridtrt_node_is_checked_not_only_the_scan_ops():
    """A custom op no plugin serves (MoeExpertsNvfp4 today) is its function body by design: reported, not refused.
    Once a creator for it is registered it must become that plugin — without a plugin_namespace attribute on 10.15+
    it would not, and that is refused. A custom node with neither a function nor a creator cannot be imported at all;
    a custom op type that is also a standard op ignores its domain."""
    op = "hybridtrt::MoeExpertsNvfp4"
    assert not {name for name, _, _ in HYBRIDTRT_CREATORS} & {"MoeExpertsNvfp4"}
    body = helper.make_function("hybridtrt", "MoeExpertsNvfp4", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                [helper.make_opsetid("", 22)])  # fmt: skip

    def moe(**attrs):
        node = helper.make_node("MoeExpertsNvfp4", ["x"], ["y"], domain="hybridtrt", name="moe", **attrs)
        return _model([node], [_t("x")], [_t("y")], 22, [body])

    tagged = moe(plugin_namespace="hybridtrt", plugin_version="1")
    report = emulate_dispatch(tagged, "11.1.0", plugins=HYBRIDTRT_CREATORS)
    assert report.imported_as(LOCAL_FUNCTION) == {op: 1} and report.rows()
    assert not report.expected_plugin_layers()
    require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)  # no plugin for it: not refused

    with_moe_plugin = HYBRIDTRT_CREATORS | {("MoeExpertsNvfp4", "1", "hybridtrt")}
    assert emulate_dispatch(tagged, "11.1.0", plugins=with_moe_plugin).imported_as(PLUGIN) == {op: 1}
    untagged = emulate_dispatch(moe(), "11.1.0", plugins=with_moe_plugin)
    assert untagged.expected_plugin_layers() == {op: 1}
    with pytest.raises(EngineError, match="MoeExpertsNvfp4 would be built from local functions"):
        require_dispatch(untagged, plugins_loaded=True, allow_function_bodies=False)

    orphan = _model([helper.make_node("Unknown", ["x"], ["y"], domain="hybridtrt", name="orphan")], [_t("x")], [_t("y")], 22)
    assert any("cannot be imported" in p for p in emulate_dispatch(orphan, "10.9.0").problems)

    clash = _model([helper.make_node("Relu", ["x"], ["y"], domain="hybridtrt", name="clash")], [_t("x")], [_t("y")], 22)
    assert any("also a standard ONNX op" in p for p in emulate_dispatch(clash, "11.1.0", plugins=HYBRIDTRT_CREATORS).problems)


def test_moe_export_every_custom_node_becomes_a_plugin_with_the_library(make_export, tmp_path, capsys):
    """The MoE preset: with libhybridtrt_trt.so loaded the scan ops and the routed experts (MoeExperts, issue 26) are
    our plugins on every release that prefers plugins — none is left to a function body, and `build --check-tensorrt`
    says so; without the library the experts build from their standard-ONNX body (allowed: a bf16 body TensorRT can
    build)."""
    _, out = make_export("tiny-nemotron3-moe", ExportOptions(opset=22))  # opset 22: parsable from 10.2
    for name, model, custom in graphs(out):
        scan = "hybridtrt::Mamba2StateUpdate" if name == "decode" else "hybridtrt::Mamba2ChunkScan"
        assert "hybridtrt::MoeExperts" in custom and scan in custom
        for version in PLUGIN_RELEASES:
            report = emulate_dispatch(model, version, plugins=HYBRIDTRT_CREATORS)
            assert report.ok, report.problems
            assert report.imported_as(PLUGIN) == custom == report.expected_plugin_layers()
            assert not report.imported_as(LOCAL_FUNCTION)
            assert {r[1] for r in report.rows() if r[0] == "hybridtrt::MoeExperts"} == {PLUGIN}
            require_dispatch(report, plugins_loaded=True, allow_function_bodies=False)
        bare = emulate_dispatch(model, "11.1.0")
        assert bare.ok, bare.problems
        assert bare.imported_as(LOCAL_FUNCTION) == custom
    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugin")  # --check-tensorrt never loads it
    capsys.readouterr()
    assert main(["build", str(out), "--plugins", str(lib), "--check-tensorrt", "11.1"]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if "hybridtrt::MoeExperts" in line]
    assert rows and all(row[2].strip() == PLUGIN for row in rows), rows