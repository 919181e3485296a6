"""Proof after parsing: plugin layers of a (fake) TensorRT network counted against the graph's custom nodes."""

from __future__ import annotations

import types
from collections import Counter

import pytest

from hybridtrt.engine.network import NetworkPlugins, count_plugin_layers, prove_plugins
from hybridtrt.errors import EngineError

#: An op no creator serves (NVFP4 experts have no plugin yet): its nodes are function bodies by design.
SCAN, MOE = "hybridtrt::Mamba2ChunkScan", "hybridtrt::MoeExpertsNvfp4"


class Layer:
    def __init__(self, layer_type, namespace="", name=""):
        self.type = layer_type
        core = types.SimpleNamespace(plugin_namespace=namespace, plugin_name=name, plugin_version="1")
        self._plugin = types.SimpleNamespace(get_capability_interface=lambda kind: core if kind == "CORE" else None)


TRT = types.SimpleNamespace(
    LayerType=types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", PLUGIN_V2="PLUGIN_V2", MATRIX_MULTIPLY="MATRIX_MULTIPLY"),
    PluginCapabilityType=types.SimpleNamespace(CORE="CORE"),
    IPluginV3Layer=type("IPluginV3Layer", (Layer,), {"plugin": property(lambda self: self._plugin)}),
)


def network(*layers: Layer) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_layers=len(layers), get_layer=list(layers).__getitem__)


def scan_layers(n: int) -> list[Layer]:
    return [Layer("PLUGIN_V3", "hybridtrt", "Mamba2ChunkScan") for _ in range(n)]


def test_counts_only_iplugin_v3_layers_by_namespace_and_name():
    net = network(Layer("MATRIX_MULTIPLY"), *scan_layers(3), Layer("PLUGIN_V3", "", "ROIAlign_TRT"), Layer("PLUGIN_V2"))
    assert count_plugin_layers(TRT, net) == Counter({SCAN: 3, "::ROIAlign_TRT": 1})


def test_ops_without_a_plugin_are_reported_not_refused():
    """Scan nodes must be plugin layers; NVFP4 MoE nodes (no creator) are function bodies by design."""
    result = prove_plugins(TRT, network(*scan_layers(4)), Counter({SCAN: 4, MOE: 2}), expected=Counter({SCAN: 4}),
                           plugins_loaded=True, allow_function_bodies=False)  # fmt: skip
    assert result == NetworkPlugins({SCAN: 4, MOE: 2}, {SCAN: 4, MOE: 0})
    assert result.function_bodies == {MOE: 2}
    assert result.summary() == f"4 plugin layers {SCAN}, 2 function bodies {MOE}"
    assert result.to_sidecar() == {"custom_nodes": {MOE: 2, SCAN: 4}, "layers": {MOE: 0, SCAN: 4}, "function_bodies": True}


def test_a_served_op_built_as_function_body_is_refused_unless_allowed():
    args = (TRT, network(*scan_layers(3)), Counter({SCAN: 4}))
    with pytest.raises(EngineError, match=f"1 of 4 {SCAN} nodes are function bodies"):
        prove_plugins(*args, plugins_loaded=True, allow_function_bodies=False)
    assert prove_plugins(*args, plugins_loaded=True, allow_function_bodies=True).function_bodies == {SCAN: 1}
    assert prove_plugins(*args, plugins_loaded=False, allow_function_bodies=False).plugin_layers == {SCAN: 3}


def test_more_plugin_layers_than_nodes_is_an_error():
    with pytest.raises(EngineError, match="more plugin layers than the graph has custom nodes"):
        prove_plugins(TRT, network(*scan_layers(5)), Counter({SCAN: 4}), plugins_loaded=True, allow_function_bodies=False)
