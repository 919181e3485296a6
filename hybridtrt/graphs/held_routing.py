"""Pass: hold an MoE graph's routing to given expert ids, and expose the ids it would have chosen.

Validation compares the continuous math of an artefact with the truth on **equal routing**
(DESIGN.md §8, `hybridtrt.models.moe.RoutingHold`): the truth chooses, everything else is held to
its choice. This pass gives an exported graph the same two hooks the reference has.

Find: every MoE router's ``TopK`` node, by our deterministic node name
``/model/layers.{i}/mixer/gate/TopK`` (the names survive `onnx.save`, the FP8 pass, layer windows
and the bf16 emulation). Its indices output (``[N, K]`` int64, ``N = B·L`` tokens) feeds the gather
of the routing weights and the ``MoeExperts`` / ``MoeExpertsFp8`` / ``MoeExpertsNvfp4`` node.

Rewrite (a copy; the input model is not modified, initializers keep pointing at the same external
data): every reader of the indices reads ``Where(hold_routing, held_experts.{i}, indices)`` instead,
with two new graph inputs: ``hold_routing`` (bool scalar, one for the graph) and ``held_experts.{i}``
(``[N, K]`` int64; any ``[1, K]`` when not holding). Held, the routing weights are the graph's own
scores of the held experts; free, the graph computes exactly what it did. The indices themselves
become the graph output ``routed_experts.{i}`` (through an ``Identity``). One copy serves both, so
a runtime holds one session per graph (ONNX Runtime gives each session its own weights). Nothing
else changes: the router still runs in the graph's own precision on the graph's own hidden state.

Check: a ``TopK`` under ``/mixer/gate/`` whose name carries no layer index, or two for one layer,
is refused (`ArtefactError`), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybridtrt.errors import ArtefactError

#: Graph input with the ids MoE layer ``i`` is held to, ``[N, K]`` int64.
HELD_EXPERTS = "held_experts.{}"
#: Graph input (bool scalar): hold every MoE layer to its ``held_experts.{i}`` (else choose freely).
HOLD_ROUTING = "hold_routing"
#: Graph output with the ids MoE layer ``i``'s own router chose, ``[N, K]`` int64.
ROUTED_EXPERTS = "routed_experts.{}"

_ROUTER_TOPK = re.compile(r"^/model/layers\.(\d+)/mixer/gate/TopK$")


@dataclass
class HeldGraph:
    """A graph whose routing is held.

    Attributes:
        model: The rewritten copy.
        layers: ``{MoE layer: number of experts per token K}`` for every router found.
    """

    model: onnx.ModelProto
    layers: dict[int, int] = field(default_factory=dict)


def router_topks(model: onnx.ModelProto) -> dict[int, onnx.NodeProto]:
    """``{layer: TopK node}`` of every MoE router in ``model``'s main graph."""
    found: dict[int, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.op_type != "TopK" or "/mixer/gate/" not in node.name:
            continue
        m = _ROUTER_TOPK.match(node.name)
        if m is None:
            raise ArtefactError(f"router TopK node {node.name!r} does not name its layer (/model/layers.{{i}}/mixer/gate/TopK)")
        layer = int(m.group(1))
        if layer in found:
            raise ArtefactError(f"MoE layer {layer} has two router TopK nodes ({found[layer].name!r}, {node.name!r})")
        found[layer] = node
    return found


def _top_k(model: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    """K of a router TopK, from its constant ``k`` input (None when it is not an initializer)."""
    for t in model.graph.initializer:
        if t.name == node.input[1]:
            return int(onnx.numpy_helper.to_array(t).reshape(-1)[0])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == node.input[1]:
            return int(onnx.numpy_helper.to_array(n.attribute[0].t).reshape(-1)[0])
    return None


def hold_routing(model: onnx.ModelProto) -> HeldGraph:
    """A copy of ``model`` whose MoE routing can be held (module docstring); unchanged without MoE."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    topks = router_topks(out)
    held = HeldGraph(out)
    if topks:
        out.graph.input.append(helper.make_tensor_value_info(HOLD_ROUTING, TensorProto.BOOL, []))
    for layer, node in sorted(topks.items()):
        indices = node.output[1]
        held_name, routed_name = HELD_EXPERTS.format(layer), ROUTED_EXPERTS.format(layer)
        used = f"{indices}.used"
        k = _top_k(out, node)
        dims = ["moe_tokens", k if k is not None else "moe_top_k"]
        for reader in out.graph.node:
            for j, name in enumerate(reader.input):
                if name == indices and reader.name != node.name:
                    reader.input[j] = used
        out.graph.input.append(helper.make_tensor_value_info(held_name, TensorProto.INT64, ["moe_held_tokens", dims[1]]))
        scope = f"/model/layers.{layer}/mixer/gate"
        at = next(j for j, n in enumerate(out.graph.node) if n.name == node.name) + 1  # topological order kept
        out.graph.node.insert(at, helper.make_node("Where", [HOLD_ROUTING, held_name, indices], [used], name=f"{scope}/HeldExperts"))
        out.graph.node.insert(at + 1, helper.make_node("Identity", [indices], [routed_name], name=f"{scope}/RoutedExperts"))
        out.graph.output.append(helper.make_tensor_value_info(routed_name, TensorProto.INT64, dims))
        held.layers[layer] = k or 0
    return held


def router_outputs(model_path: str | Path) -> dict[int, str]:
    """``{MoE layer: its router's TopK indices tensor}`` in an ONNX file (weights not loaded): what a
    recording must hold to be judged with routing held."""
    return {layer: node.output[1] for layer, node in router_topks(onnx.load(str(model_path), load_external_data=False)).items()}


def held_feeds(layers: Iterable[int], top_k: int, held: Mapping[int, Any] | None) -> dict[str, np.ndarray]:
    """The copy's routing feeds for one call: ``hold_routing`` and ``held_experts.{i}`` ``[B·L, K]``
    int64 from ``held`` (``{layer: [B, L, K]}`` ids, torch or numpy), or ``[1, K]`` zeros for every
    layer when ``held`` is None (free)."""
    feeds: dict[str, np.ndarray] = {HOLD_ROUTING: np.array(held is not None)}
    for layer in layers:
        ids = None if held is None else np.asarray(held[layer], dtype=np.int64)
        feeds[HELD_EXPERTS.format(layer)] = np.zeros((1, top_k), np.int64) if ids is None else np.ascontiguousarray(ids.reshape(-1, ids.shape[-1]))
    return feeds


def routed_ids(outputs: Mapping[str, Any], batch: int, length: int) -> dict[int, np.ndarray]:
    """``{MoE layer: [B, L, K]}`` from a run's ``routed_experts.{i}`` outputs (the layers it has)."""
    prefix = ROUTED_EXPERTS.format("")
    return {int(name[len(prefix) :]): np.asarray(v).reshape(batch, length, -1) for name, v in outputs.items() if name.startswith(prefix)}


__all__ = ["HELD_EXPERTS", "HOLD_ROUTING", "ROUTED_EXPERTS", "HeldGraph", "held_feeds", "hold_routing", "routed_ids", "router_outputs", "router_topks"]
