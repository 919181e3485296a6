"""Per-layer taps on any export: where each decoder layer's output is in the ONNX file, and an
ONNX Runtime session of a temporary copy that exposes those tensors as extra outputs.

Exports made with ``--per-layer`` carry ``layer_output.{i}`` graph outputs already; any other
export (fp32, fp16, FP8, or a file re-saved by another tool that kept our node names) is read with
`hybridtrt.graphs.expose_outputs.locate_layer_outputs`. Layers that cannot be located are listed
with the reason (validation then compares the states alone for them). States are graph outputs
(``present_*``) in every export, so they never need a tap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from hybridtrt.exporter.manifest import Manifest
from hybridtrt.graphs.expose_outputs import LAYER_OUTPUT, expose_outputs, locate_layer_outputs
from hybridtrt.runtime.onnxruntime import OrtSession


@dataclass
class LayerTaps:
    """The per-layer tensors of one ONNX file.

    Attributes:
        model_path: The ONNX file (its external data lives beside it).
        tensors: ``{"layer_output.{i}": graph tensor name}`` for the layers found.
        missing: ``{"layer_output.{i}": why it was not found}``.
        outputs: The file's own graph outputs, in order.
    """

    model_path: Path
    tensors: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    @property
    def by_tensor(self) -> dict[str, str]:
        """``{graph tensor name: "layer_output.{i}"}``."""
        return {t: name for name, t in self.tensors.items()}

    @property
    def exposed(self) -> bool:
        """Every found tensor is a graph output already (a ``--per-layer`` export)."""
        return set(self.tensors.values()) <= set(self.outputs)

    def notes(self) -> list[str]:
        """One line per layer whose output could not be located."""
        return [f"{name}: not located in {self.model_path.name} — {why}; compared by its states only" for name, why in self.missing.items()]


def layer_taps(export_dir: str | Path, manifest: Manifest, role: str = "unified") -> LayerTaps:
    """Locate the per-layer tensors of ``export_dir``'s ``role`` graph (weights are not loaded)."""
    path = Path(export_dir) / manifest.graphs[role].file
    proto = onnx.load(str(path), load_external_data=False)
    found = locate_layer_outputs(proto, len(manifest.layers))
    return LayerTaps(
        model_path=path,
        tensors={LAYER_OUTPUT.format(i): t for i, t in found.tensors.items()},
        missing={LAYER_OUTPUT.format(i): why for i, why in found.missing.items()},
        outputs=[o.name for o in proto.graph.output],
    )


class ProtoSession(OrtSession):
    """`OrtSession` over an in-memory graph whose initializers live in external files in ``folder``.

    ONNX Runtime refuses external data outside the model's own directory (symlinks included), so a
    modified copy of an export cannot be written elsewhere; it is handed over as bytes instead,
    with ``folder`` as the external-data directory. The graph holds no weights, so the bytes are small.
    """

    def __init__(self, proto: onnx.ModelProto, folder: str | Path, *, threads: int | None = None) -> None:
        self._open(proto, Path(folder), threads=threads, config=None)


def exposed_session(taps: LayerTaps, *, threads: int | None = None) -> OrtSession:
    """A session whose outputs are the file's own plus every located layer tensor.

    A ``--per-layer`` export runs as it is; any other gets a temporary in-memory copy with the
    tensors marked as outputs (`expose_outputs`), as polygraphy's ``--onnx-outputs`` does.
    """
    if taps.exposed:
        return OrtSession(taps.model_path, threads=threads)
    proto = onnx.load(str(taps.model_path), load_external_data=False)
    return ProtoSession(expose_outputs(proto, list(taps.tensors.values())), taps.model_path.parent, threads=threads)


__all__ = ["LayerTaps", "ProtoSession", "exposed_session", "layer_taps"]
