"""Pass: give graph inputs/outputs the contract's symbolic dimension names (DESIGN.md §6).

``torch.export`` invents symbols (``s21``, ``s10 + s70``); users and TensorRT profiles want
``batch``, ``seq``, ``past``, ``past+seq``.
"""

from __future__ import annotations

import onnx

from hybridtrt.errors import ExportError


def set_dims(value: onnx.ValueInfoProto, dims: tuple[int | str, ...]) -> None:
    """Overwrite ``value``'s shape with ``dims`` (ints fixed, strings symbolic)."""
    shape = value.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise ExportError(f"graph value {value.name!r} has rank {len(shape.dim)}, the contract says {len(dims)}")
    for dim, want in zip(shape.dim, dims):
        if isinstance(want, int):
            dim.Clear()
            dim.dim_value = want
        else:
            dim.Clear()
            dim.dim_param = want


def name_io_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int | str, ...]]) -> onnx.ModelProto:
    """Apply ``{io_name: dims}`` to the graph's inputs and outputs, in place."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in shapes:
            set_dims(value, shapes[value.name])
    return model
