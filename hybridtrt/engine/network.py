"""Proof after parsing: the plugin layers a TensorRT network really holds, against the graph's custom nodes.

The dispatch emulator predicts which custom nodes the ONNX parser turns into plugins; this module counts what
the parser actually built (``IPluginV3Layer`` s, by ``namespace::name``) and refuses a network in which a
custom node became its function body although a plugin library was loaded — a registration that failed, a
creator that did not match, a parser that preferred the local function. Both the engine's sidecar and the
``build`` summary report these counts, never what was merely loaded.

`count_plugin_layers` only uses the TensorRT Python API (``network.num_layers``, ``get_layer``,
``LayerType.PLUGIN_V3``, ``IPluginV3Layer.plugin``, ``get_capability_interface(PluginCapabilityType.CORE)``),
so tests drive it with a fake network.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from hybridtrt.errors import EngineError


@dataclass(frozen=True)
class NetworkPlugins:
    """Custom nodes of the graph and plugin layers of the parsed network, by ``domain::op`` / ``namespace::name``.

    Attributes:
        custom_nodes: Custom nodes of the graph (outside function bodies), e.g. ``{"hybridtrt::Mamba2ChunkScan": 4}``.
        plugin_layers: Plugin layers of the network with the same keys (other plugins are not counted).
    """

    custom_nodes: dict[str, int]
    plugin_layers: dict[str, int]

    @property
    def function_bodies(self) -> dict[str, int]:
        """Custom nodes the network holds as their function bodies (no plugin layer), by op."""
        return {op: n - self.plugin_layers.get(op, 0) for op, n in self.custom_nodes.items() if n > self.plugin_layers.get(op, 0)}

    def to_sidecar(self) -> dict[str, Any]:
        return {
            "custom_nodes": dict(sorted(self.custom_nodes.items())),
            "layers": dict(sorted(self.plugin_layers.items())),
            "function_bodies": bool(self.function_bodies),
        }

    def summary(self) -> str:
        """One line for the build summary: what the network holds."""
        if not self.custom_nodes:
            return "no custom nodes"
        parts = [f"{n} plugin layers {op}" for op, n in sorted(self.plugin_layers.items()) if n]
        parts += [f"{n} function bodies {op}" for op, n in sorted(self.function_bodies.items())]
        return ", ".join(parts)


def count_plugin_layers(trt: Any, network: Any) -> Counter[str]:
    """``{"namespace::name": count}`` of the IPluginV3 layers of a parsed network."""
    counts: Counter[str] = Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # the Python API returns ILayer; the type says which subclass it is
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        counts[f"{core.plugin_namespace}::{core.plugin_name}"] += 1
    return counts


def prove_plugins(
    trt: Any,
    network: Any,
    custom_nodes: Counter[str],
    *,
    expected: Counter[str] | None = None,
    plugins_loaded: bool,
    allow_function_bodies: bool,
) -> NetworkPlugins:
    """Compare the network's plugin layers with the graph's custom nodes.

    Args:
        trt: The tensorrt module.
        network: The parsed ``INetworkDefinition``.
        custom_nodes: Custom nodes of the graph by ``domain::op`` (`DispatchReport.custom_nodes`).
        expected: The custom nodes that must be plugin layers: those of ops the loaded library serves
            (`DispatchReport.expected_plugin_layers`); None means all of ``custom_nodes``.
        plugins_loaded: A plugin library was loaded before parsing.
        allow_function_bodies: The user accepts custom nodes built from their function bodies.

    Raises:
        EngineError: With a plugin library loaded, a node of ``expected`` did not become its plugin (unless
            allowed); or the network holds more plugin layers of an op than the graph has nodes (never expected).
    """
    expected = Counter(custom_nodes) if expected is None else expected
    layers = count_plugin_layers(trt, network)
    result = NetworkPlugins(dict(custom_nodes), {op: layers.get(op, 0) for op in custom_nodes})
    extra = {op: n for op, n in layers.items() if op in custom_nodes and n > custom_nodes[op]}
    if extra:
        raise EngineError(
            f"the parsed network holds more plugin layers than the graph has custom nodes: {extra} vs {dict(custom_nodes)}",
            fix="report this with the export; rebuild after re-exporting",
        )
    lost = {op: n for op, n in result.function_bodies.items() if op in expected}
    if plugins_loaded and lost and not allow_function_bodies:
        missing = ", ".join(f"{n} of {custom_nodes[op]} {op}" for op, n in sorted(lost.items()))
        raise EngineError(
            f"after parsing, {missing} nodes are function bodies, not plugin layers, although the plugin library was "
            "loaded: the engine would run the slow standard-ONNX bodies",
            fix="check that the plugin library registers its creators with this TensorRT (IPluginRegistry::loadLibrary "
            "must see getCreators; rebuild it with `hybridtrt plugins build`), or pass --allow-function-bodies",
        )
    return result


__all__ = ["NetworkPlugins", "count_plugin_layers", "prove_plugins"]
