"""Which ``present_*`` outputs may share their ``past_*`` input's buffer (in-place state updates).

A runtime may bind an output to its input's memory when every node that reads the input runs before
the output is written — i.e. every reader of ``past_X`` is the producer of ``present_X`` or one of
its ancestors. Then the input is fully consumed before a single byte of the output exists, in any
execution order a backend may choose. The static-cache graphs meet this for every state by
construction (KV: ``TensorScatter`` is the only reader and the writer; conv: ``Concat`` → ``Slice``;
SSM: the scan op is the only reader and the writer), which is what lets ONNX Runtime run them in
place through I/O binding (DESIGN.md §6).
"""

from __future__ import annotations

import onnx

from hybridtrt.errors import ArtefactError


def state_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """``{present_name: past_name}`` for every ``past_*`` graph input with a matching output."""
    outputs = {o.name for o in model.graph.output}
    pairs = {}
    for i in model.graph.input:
        if i.name.startswith("past_"):
            present = i.name.replace("past_key_values.", "present.", 1).replace("past_", "present_", 1)
            if present in outputs:
                pairs[present] = i.name
    return pairs


def _ancestors(model: onnx.ModelProto, node_index: int, producer: dict[str, int]) -> set[int]:
    seen: set[int] = set()
    stack = [node_index]
    while stack:
        n = stack.pop()
        for name in model.graph.node[n].input:
            p = producer.get(name)
            if p is not None and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def in_place_violations(model: onnx.ModelProto) -> list[str]:
    """Human-readable reasons why some ``present_*`` may not alias its ``past_*`` (empty = all may)."""
    producer = {out: k for k, node in enumerate(model.graph.node) for out in node.output}
    problems = []
    for present, past in state_pairs(model).items():
        writer = producer.get(present)
        if writer is None:
            problems.append(f"{present} is not computed by a node")
            continue
        allowed = _ancestors(model, writer, producer) | {writer}
        for k, node in enumerate(model.graph.node):
            if past in node.input and k not in allowed:
                problems.append(f"{past} is read by {node.name or node.op_type!r}, which does not precede the writer of {present}")
    return problems


def check_in_place(model: onnx.ModelProto) -> None:
    """Raise `ArtefactError` unless every state output may share its input's buffer."""
    problems = in_place_violations(model)
    if problems:
        raise ArtefactError(
            "this graph cannot update its states in place: " + "; ".join(problems[:3]),
            fix="re-export with this hybridtrt (static-cache graphs are built to allow it)",
        )
