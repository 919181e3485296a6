"""The IAttention layers of a parsed network: decomposable by default, and what the built engine holds for them.

TensorRT's ONNX parser builds every ``Attention`` node as an ``IAttention`` with ``decomposable`` false unless the
node carries the non-standard attribute ``TRT_decomposable`` (onnx-tensorrt ``onnxOpImporters.cpp``
``importAttention``: ``attention->setDecomposable(decomposable)``). NvInfer.h (``class IAttention``, TensorRT 10.14
to 11.1): "By default, IAttention is not decomposable and TensorRT will try to use a single fused kernel ... Setting
the IAttention to decomposable=True can allow IAttention to be decomposed to use multiple kernels if no fused kernel
support found." A configuration without a fused kernel (fp32, head_dim 16 as in the test presets, a long decode
cache, an older GPU) therefore fails to build unless the layer is decomposable. hybridtrt keeps its ONNX standard
(ONNX Runtime refuses unknown attributes) and sets the flag on the parsed network instead: every IAttention is
decomposable unless ``hybridtrt build --attention fused`` asks for fused kernels only.

In the network an IAttention shows as an ``IAttentionInputLayer`` (``LayerType.ATTENTION_INPUT``) and an
``IAttentionOutputLayer``; ``IAttentionBoundaryLayer.attention`` is the IAttention (python/src/infer/pyGraph.cpp).

Which implementation the engine holds is read back with ``IEngineInspector`` (``ProfilingVerbosity.DETAILED``):
the engine layers whose name or metadata mention an attention layer's name. TensorRT documents no field that says
"fused" or "decomposed"; one engine layer for an attention layer is reported as fused, several as decomposed — an
inference from the inspector's output, recorded with the layer types it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: ``hybridtrt build --attention`` choices.
DECOMPOSABLE = "decomposable"
FUSED = "fused"
ATTENTION_MODES = (DECOMPOSABLE, FUSED)


@dataclass
class AttentionLayers:
    """The IAttention layers of one build.

    Attributes:
        names: Names of the attention layers (the ONNX ``Attention`` nodes), in network order.
        decomposable: The flag set on every one of them.
        engine: ``{attention name: what the engine holds}`` from the inspector, or None when not inspected.
        inspection_error: Why the engine could not be inspected ("" when it was, or not tried).
    """

    names: list[str]
    decomposable: bool
    engine: dict[str, str] | None = None
    inspection_error: str = ""
    _engine_layers: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def to_sidecar(self) -> dict[str, Any]:
        return {
            "layers": len(self.names),
            "mode": DECOMPOSABLE if self.decomposable else FUSED,
            "engine": self.engine,
            "inspection_error": self.inspection_error or None,
        }

    def summary(self) -> str:
        """One line for the build summary."""
        if not self.names:
            return "no IAttention layers"
        head = f"{len(self.names)} IAttention, {'decomposable' if self.decomposable else 'fused kernels only'}"
        if self.engine is None:
            return head + (f"; engine not inspected ({self.inspection_error})" if self.inspection_error else "")
        kinds = sorted(set(self.engine.values()))
        return head + "; engine: " + ", ".join(kinds)


def mark_attention(trt: Any, network: Any, *, mode: str = DECOMPOSABLE) -> AttentionLayers:
    """Set ``decomposable`` on every IAttention of ``network`` (``mode`` `DECOMPOSABLE`) or clear it (`FUSED`).

    Raises:
        ValueError: Unknown ``mode`` (the CLI restricts it to `ATTENTION_MODES`).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    decomposable = mode == DECOMPOSABLE
    names = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.ATTENTION_INPUT:
            continue
        layer.__class__ = trt.IAttentionInputLayer  # the Python API returns ILayer; the type says which subclass
        layer.attention.decomposable = decomposable
        names.append(str(layer.name))
    return AttentionLayers(names, decomposable)


def _mentions(entry: dict[str, Any], name: str) -> bool:
    return name in str(entry.get("Name", "")) or name in str(entry.get("Metadata", ""))


def read_engine_attention(attention: AttentionLayers, engine_information: str) -> AttentionLayers:
    """Fill ``attention.engine`` from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Each attention layer's name is looked up in the engine layers' ``Name`` and ``Metadata``. The attention
    layer's name is the ONNX node's plus a suffix the parser adds, so the lookup strips TensorRT's suffixes.
    """
    try:
        layers = json.loads(engine_information).get("Layers", [])
    except (json.JSONDecodeError, AttributeError) as e:
        attention.inspection_error = f"the engine inspector's JSON is unreadable ({e})"
        return attention
    layers = [entry for entry in layers if isinstance(entry, dict)]
    if not layers:
        attention.inspection_error = "the engine inspector listed no layers (built without ProfilingVerbosity.DETAILED?)"
        return attention
    engine = {}
    for name in attention.names:
        node = name.split(" ")[0]
        hits = [entry for entry in layers if _mentions(entry, node)]
        kinds = sorted({str(entry.get("LayerType", "?")) for entry in hits})
        if not hits:
            engine[name] = "not found in the inspector's layers"
        elif len(hits) == 1:
            engine[name] = f"fused: 1 engine layer ({kinds[0]})"
        else:
            engine[name] = f"decomposed: {len(hits)} engine layers ({', '.join(kinds)})"
        attention._engine_layers[name] = hits
    attention.engine = engine
    return attention


def inspect_engine_attention(trt: Any, engine_bytes: bytes, attention: AttentionLayers) -> AttentionLayers:
    """Deserialize the built engine and read what it holds for each attention layer (best effort: a failure is
    recorded in ``inspection_error``, the build itself stands)."""
    if not attention.names:
        return attention
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as e:  # noqa: BLE001 - TensorRT raises RuntimeError/TypeError/AttributeError by version
        attention.inspection_error = f"{type(e).__name__}: {e}"
        return attention
    return read_engine_attention(attention, info)


__all__ = [
    "ATTENTION_MODES",
    "DECOMPOSABLE",
    "FUSED",
    "AttentionLayers",
    "inspect_engine_attention",
    "mark_attention",
    "read_engine_attention",
]
