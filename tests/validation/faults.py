"""Planting faults in an exported graph, to prove that validation catches and locates them.

Every planter re-records the manifest's file sizes and hashes afterwards (`reseal`), as an attacker who also
rewrites ``hybridtrt.json`` would: the numerical gates must catch what the integrity check cannot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hybridtrt.exporter.integrity import record_files
from hybridtrt.exporter.manifest import MANIFEST_FILE


def reseal(export_dir: Path) -> None:
    """Re-record the size and sha256 of every file in ``hybridtrt.json`` (test-only: it blesses what is there)."""
    path = Path(export_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["files"] = record_files(export_dir, manifest["files"])
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

def _load(export_dir: Path) -> onnx.ModelProto:
    """``model.onnx`` without its weights (external initializers stay references to the data file)."""
    return onnx.load(str(export_dir / "model.onnx"), load_external_data=False)


def _save(model: onnx.ModelProto, export_dir: Path) -> None:
    """Write ``model.onnx`` only: the data file, which ``decode.onnx`` may share, is untouched."""
    onnx.save_model(model, str(export_dir / "model.onnx"))
    reseal(export_dir)


def scale_initializers(export_dir: Path, names: set[str], factor: float) -> None:
    """Multiply each named initializer by ``factor`` (all must exist), in place (`edit_initializers`)."""
    edit_initializers(export_dir, {name: (lambda a: a * a.dtype.type(factor)) for name in names})


def edit_initializers(export_dir: Path, edits: dict[str, Callable[[np.ndarray], np.ndarray]]) -> None:
    """Replace each named initializer ``a`` by ``edits[name](a)`` (same shape and dtype), in place.

    External initializers are rewritten at their own offset in their data file, so every graph that
    shares the file (``decode.onnx`` shares ``weights.data``) sees the same fault, as it would see a
    corrupted file; inline ones are changed in ``model.onnx``.
    """
    path = export_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    found, inline = set(), False
    for t in model.graph.initializer:
        if t.name not in edits:
            continue
        found.add(t.name)
        edit = edits[t.name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(t).copy()), t.name))
            inline = True
            continue
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(export_dir / info["location"], "r+b") as f:
            f.seek(offset)
            raw = onnx.TensorProto()
            raw.CopyFrom(t)
            del raw.external_data[:]
            raw.data_location = onnx.TensorProto.DEFAULT
            raw.raw_data = f.read(length)
            edited = numpy_helper.from_array(edit(numpy_helper.to_array(raw).copy()), t.name).raw_data
            assert len(edited) == length, (t.name, len(edited), length)
            f.seek(offset)
            f.write(edited)
    if found != set(edits):
        raise KeyError(sorted(set(edits) - found))
    if inline:
        onnx.save_model(model, str(path))
    reseal(export_dir)


def perturb_weight(export_dir: Path, initializer: str, scale: float = 1.5) -> None:
    """Multiply one initializer by ``scale``."""
    scale_initializers(export_dir, {initializer}, scale)


def swap_outputs(export_dir: Path, a: str, b: str) -> None:
    """Make graph output ``a`` carry ``b``'s value and vice versa."""
    model = _load(export_dir)
    rename = {a: b, b: a}
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name] + ".swapped"
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name] + ".swapped"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name.endswith(".swapped"):
                node.output[i] = name[: -len(".swapped")]
        for i, name in enumerate(node.input):
            if name.endswith(".swapped"):
                node.input[i] = name[: -len(".swapped")]
    _save(model, export_dir)


def nan_output(export_dir: Path, name: str) -> None:
    """Multiply graph output ``name`` by NaN."""
    model = _load(export_dir)
    for node in model.graph.node:
        for i, out in enumerate(node.output):
            if out == name:
                node.output[i] = name + ".pre_nan"
        for i, inp in enumerate(node.input):
            if inp == name:
                node.input[i] = name + ".pre_nan"
    elem = next(o for o in model.graph.output if o.name == name).type.tensor_type.elem_type
    nan = helper.make_tensor("planted_nan", elem, [], [float("nan")])
    model.graph.initializer.append(nan)
    model.graph.node.append(helper.make_node("Mul", [name + ".pre_nan", "planted_nan"], [name], name="/planted/Mul"))
    _save(model, export_dir)


def rename_layer_nodes(export_dir: Path, layer: int, prefix: str) -> None:
    """Rename every node of decoder layer ``layer`` (``/model/layers.{layer}/…`` -> ``{prefix}/…``),
    as a fusing or renaming tool would; the graph computes the same."""
    model = _load(export_dir)
    for node in model.graph.node:
        node.name = node.name.replace(f"/model/layers.{layer}/", f"{prefix}/")
    _save(model, export_dir)
