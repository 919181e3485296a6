"""Planting faults in an exported graph, to prove that validation catches and locates them."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from hybridtrt.graphs.external_data import save_with_external_data


def _load(export_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(export_dir / "model.onnx"))


def _save(model: onnx.ModelProto, export_dir: Path) -> None:
    (export_dir / "weights.data").unlink()
    save_with_external_data(model, export_dir / "model.onnx", "weights.data")


def scale_initializers(export_dir: Path, names: set[str], factor: float) -> None:
    """Multiply each named initializer by ``factor`` (all must exist)."""
    model = _load(export_dir)
    found = set()
    for t in model.graph.initializer:
        if t.name in names:
            array = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(array * array.dtype.type(factor), t.name))
            found.add(t.name)
    if found != names:
        raise KeyError(sorted(names - found))
    _save(model, export_dir)


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
