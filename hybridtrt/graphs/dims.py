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


def read_dims_off_first_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every named dim of the graph inputs off the first input that has it, once, first, in place.

    A ``Shape`` node that reads one axis of a graph input whose dim is named (``torch.export``'s
    symbols before `name_io_dims`, equal names for equal dims) is rewritten to read that dim off
    the first graph input and axis that has it; equal reads are merged, and they go to the front
    of the graph in input and axis order. ``torch.export`` reads a dim that several inputs share
    (the batch) off whichever input its solver chose, at whichever point of the graph, and that
    choice differs between a model of 15 layers and one of 4: after this pass the graph depends on
    the computation alone (`hybridtrt.exporter.stitch`), and no state input is read for its shape.
    """
    g = model.graph
    position = {v.name: k for k, v in enumerate(g.input)}
    named = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in g.input}
    first: dict[str, tuple[str, int]] = {}
    for name, dims in named.items():
        for axis, dim in enumerate(dims):
            if dim:
                first.setdefault(dim, (name, axis))
    reads: dict[tuple[str, int], onnx.NodeProto] = {}
    merged: dict[str, str] = {}
    rest: list[onnx.NodeProto] = []
    for node in g.node:
        axis = _one_axis(node, named)
        if axis is None:
            rest.append(node)
            continue
        source = first[named[node.input[0]][axis]]
        if source in reads:
            merged[node.output[0]] = reads[source].output[0]
            continue
        node.input[0] = source[0]
        del node.attribute[:]
        node.attribute.extend([onnx.helper.make_attribute("end", source[1] + 1), onnx.helper.make_attribute("start", source[1])])
        reads[source] = node
    if not reads:
        return model
    hoisted = [reads[k] for k in sorted(reads, key=lambda k: (position[k[0]], k[1]))]
    nodes = [onnx.NodeProto() for _ in range(len(hoisted) + len(rest))]
    for new, node in zip(nodes, hoisted + rest):
        new.CopyFrom(node)
        for k, name in enumerate(new.input):
            new.input[k] = merged.get(name, name)
    del g.node[:]
    g.node.extend(nodes)
    return model


def _one_axis(node: onnx.NodeProto, named: dict[str, list[str]]) -> int | None:
    """The axis of a graph input whose named dim ``node`` reads alone (a ``Shape`` of one axis), or None."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] not in named:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(named[node.input[0]])
    start = attrs.get("start", 0) % rank if rank else 0
    end = attrs.get("end", rank)
    end = end % rank if end < 0 else min(end, rank)
    if end != start + 1 or not named[node.input[0]][start]:
        return None
    return start
