"""N tensor-parallel ranks' ONNX graphs run on one CPU (DESIGN.md §12): each graph is cut at its
``trt::DistCollective`` nodes into stages that ONNX Runtime runs, and the collectives between stages
are done in NumPy.

A value's *level* is the number of collectives on the longest path from the graph's inputs to it;
stage L runs every other node of level L (in graph order, so a stage is itself a valid graph), and the
collectives whose input has level L join the ranks between stage L and stage L + 1. Every rank's graph
has the same collectives in the same order (they are one architecture at the same widths), which the
emulator checks: the k-th collective of every rank's stage is one operation. All-reduce sums over the
node's ``groups`` in rank order (the same bits on every rank, as `hybridtrt.models.collectives` does);
all-gather concatenates every rank's tensor along axis 0 (TensorRT's all-gather).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from hybridtrt.ops.collectives import ALL_GATHER, ALL_REDUCE, DIST_COLLECTIVE, TRT_DOMAIN, register_schema
from hybridtrt.runtime.communicators import sum_in_rank_order


@dataclass(frozen=True)
class Collective:
    """One ``DistCollective`` node: its operation, the ranks taking part, its input and output."""

    operation: str
    groups: tuple[int, ...]
    source: str
    target: str
    name: str


@dataclass
class _Stage:
    session: object
    inputs: list[str]
    outputs: list[str]


def _is_collective(node: onnx.NodeProto) -> bool:
    return node.op_type == DIST_COLLECTIVE and node.domain == TRT_DOMAIN


def _collective(node: onnx.NodeProto) -> Collective:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    operation = attrs["collective_operation"].decode()
    if operation not in (ALL_REDUCE, ALL_GATHER):
        raise ValueError(f"{node.name}: the emulator runs all_reduce and all_gather, not {operation!r}")
    return Collective(operation, tuple(int(r) for r in attrs.get("groups", [])), node.input[0], node.output[0], node.name)


def _value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    register_schema()
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    for init in proto.graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


class RankGraph:
    """One rank's graph, cut into stages at its collectives.

    Args:
        proto: The rank's graph (weights inline).
        threads: ONNX Runtime intra-op threads per session.
        bf16: How a bf16 graph runs (ONNX Runtime's CPU provider has no bf16 kernels): ``"emulate"``
            (default: rounded to bf16 where produced, what validation judges) or ``"fp32"`` (fp32
            compute from the bf16 weights, `hybridtrt.graphs.bf16_emulation.widen_bf16`).
        folder: Where the graph's external weights are, when they are not loaded: ONNX Runtime reads them
            from there, not from a copy in this process (a layer window of a rank's graph, by
            `hybridtrt.exporter.tensor_parallel.WindowedRanks`), and does not pre-pack them.
    """

    def __init__(self, proto: onnx.ModelProto, threads: int = 1, bf16: str = "emulate", folder: str | None = None) -> None:
        import onnxruntime as ort

        from hybridtrt.graphs.bf16_emulation import emulate_bf16, widen_bf16
        from hybridtrt.graphs.fp4_emulation import emulate_fp4, graph_has_fp4

        #: The graph inputs' element types as exported (bf16 inputs take fp32 arrays of bf16 values below).
        self.input_types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        if graph_has_fp4(proto):  # no float4e2m1 DequantizeLinear on the CPU provider: emulated bit for bit, as OrtSession does
            proto = emulate_fp4(proto)
        if any(t == onnx.TensorProto.BFLOAT16 for t in self.input_types.values()) or any(
            i.data_type == onnx.TensorProto.BFLOAT16 for i in proto.graph.initializer
        ):
            proto = (emulate_bf16 if bf16 == "emulate" else widen_bf16)(proto)
        graph = proto.graph
        initializers = {i.name: i for i in graph.initializer}
        level: dict[str, int] = {name: 0 for name in (*initializers, *(i.name for i in graph.input))}
        staged: dict[int, list[onnx.NodeProto]] = {}
        self.collectives: dict[int, list[Collective]] = {}
        for node in graph.node:
            at = max((level.get(i, 0) for i in node.input if i), default=0)
            if _is_collective(node):
                self.collectives.setdefault(at, []).append(_collective(node))
                level[node.output[0]] = at + 1
            else:
                staged.setdefault(at, []).append(node)
                level.update({o: at for o in node.output if o})
        self.levels = max([*staged, *(k + 1 for k in self.collectives)], default=0) + 1
        types = _value_types(proto)
        # A stage hands on what a graph output is or another stage, or a collective, reads.
        stage_of = {o: level[o] for n in graph.node if not _is_collective(n) for o in n.output if o}
        handed = {o.name for o in graph.output}
        for node in graph.node:
            reader = None if _is_collective(node) else level[node.output[0]]
            handed.update(i for i in node.input if i in stage_of and stage_of[i] != reader)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            options.add_session_config_entry("session.disable_prepacking", "1")  # pre-packing keeps a second copy of every weight
        self.stages: dict[int, _Stage] = {}
        for at, nodes in sorted(staged.items()):
            made = {o for n in nodes for o in n.output if o}
            needed = [i for n in nodes for i in n.input if i and i not in made]
            ins = list(dict.fromkeys(i for i in needed if i not in initializers))
            inits = [initializers[i] for i in dict.fromkeys(needed) if i in initializers]
            outs = [o for n in nodes for o in n.output if o in handed]
            sub = helper.make_graph(
                nodes, f"stage{at}", [helper.make_value_info(i, types[i]) for i in ins], [helper.make_value_info(o, types[o]) for o in outs], inits
            )
            model = helper.make_model(sub, opset_imports=list(proto.opset_import), functions=list(proto.functions), ir_version=proto.ir_version)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self.stages[at] = _Stage(session, ins, outs)
        self.output_names = [o.name for o in graph.output]

    def run_stage(self, at: int, values: dict[str, np.ndarray]) -> None:
        """Run stage ``at`` on ``values`` (graph inputs and earlier results), adding its results."""
        stage = self.stages.get(at)
        if stage is None:
            return
        got = stage.session.run(stage.outputs, {name: values[name] for name in stage.inputs})
        values.update(zip(stage.outputs, got, strict=True))


    def run(self, feeds: Mapping[str, np.ndarray], communicator) -> dict[str, np.ndarray]:  # noqa: ANN001 - a GlooCommunicator or alike
        """The graph's outputs for ``feeds``, its collectives made through ``communicator`` (this
        process is one of the ranks: `hybridtrt.runtime.communicators.GlooCommunicator`)."""
        values = dict(feeds)
        for at in range(self.levels):
            self.run_stage(at, values)
            for node in self.collectives.get(at, []):
                part = values[node.source]
                values[node.target] = communicator.all_gather(part) if node.operation == ALL_GATHER else communicator.all_reduce(part, node.groups)
        return {name: values[name] for name in self.output_names}


def as_fed(elem: int, value: np.ndarray) -> np.ndarray:
    """``value`` as a rank graph's input of ONNX element type ``elem`` takes it: in that type, a bf16 input
    as fp32 holding bf16 values (the bf16 emulation's form)."""
    if elem == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return value.astype(ml_dtypes.bfloat16).astype(np.float32)
    return value.astype(helper.tensor_dtype_to_np_dtype(elem), copy=False)


class RankEmulator:
    """Every rank's graph, run in lock step (`RankGraph` stages, collectives in NumPy).

    Args:
        protos: Rank 0 … N − 1's graphs, one architecture at the same widths.
        threads: ONNX Runtime intra-op threads per session.
        folders: Each rank's directory of its external weights, when they are not loaded (`RankGraph`).
    """

    def __init__(self, protos: Sequence[onnx.ModelProto], threads: int = 1, folders: Sequence[str] | None = None) -> None:
        self.ranks = [RankGraph(p, threads, folder=None if folders is None else folders[r]) for r, p in enumerate(protos)]
        first = self.ranks[0]
        for r, graph in enumerate(self.ranks[1:], 1):
            ops = {k: [c.operation for c in v] for k, v in graph.collectives.items()}
            if ops != {k: [c.operation for c in v] for k, v in first.collectives.items()}:
                raise ValueError(f"rank {r}'s graph has other collectives than rank 0's: its graphs are not one tensor-parallel model")

    @property
    def world(self) -> int:
        return len(self.ranks)

    def feed(self, name: str, value: np.ndarray) -> np.ndarray:
        """``value`` as the graphs' input ``name`` takes it (`as_fed`)."""
        return as_fed(self.ranks[0].input_types[name], value)

    def run(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each rank's graph outputs for its ``feeds`` (``feeds[r]``: rank r's inputs)."""
        values = [dict(f) for f in feeds]
        levels = max(g.levels for g in self.ranks)
        for at in range(levels):
            for graph, vals in zip(self.ranks, values, strict=True):
                graph.run_stage(at, vals)
            for k, first in enumerate(self.ranks[0].collectives.get(at, [])):
                parts = [vals[graph.collectives[at][k].source] for graph, vals in zip(self.ranks, values, strict=True)]
                for r, (graph, vals) in enumerate(zip(self.ranks, values, strict=True)):
                    node = graph.collectives[at][k]
                    vals[node.target] = self._combine(node, parts, r)
        return [{name: vals[name] for name in graph.output_names} for graph, vals in zip(self.ranks, values, strict=True)]

    def _combine(self, node: Collective, parts: list[np.ndarray], rank: int) -> np.ndarray:
        if node.operation == ALL_GATHER:
            return np.concatenate(parts, axis=0)
        return sum_in_rank_order(parts, node.groups or tuple(range(self.world)), rank, f"{node.name}: ")


class CollectiveSession:
    """One rank's graph file run by this process as one of N (`RankGraph` stages on ONNX Runtime, its
    collectives through ``communicator``), with `hybridtrt.runtime.onnxruntime.OrtSession`'s ``run``.

    Args:
        path: The rank's ``model.onnx`` / ``decode.onnx`` (ONNX Runtime reads its weights from beside it).
        communicator: This rank's end of the collectives (``all_reduce``, ``all_gather``).
        threads: ONNX Runtime intra-op threads per stage.
        bf16: As `RankGraph`.
    """

    def __init__(self, path, communicator, threads: int | None = None, bf16: str = "fp32") -> None:  # noqa: ANN001
        from pathlib import Path

        proto = onnx.load(str(path), load_external_data=False)
        has_bf16 = any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in proto.graph.input) or any(
            i.data_type == onnx.TensorProto.BFLOAT16 for i in proto.graph.initializer
        )
        self.graph = RankGraph(proto, threads or 1, bf16, folder=str(Path(path).parent))
        del proto
        self.communicator = communicator
        self.emulated_bf16 = has_bf16 and bf16 == "emulate"
        self.widened_bf16 = has_bf16 and bf16 != "emulate"
        self.input_names = list(self.graph.input_types)
        self.output_names = list(self.graph.output_names)

    def run(self, feeds: Mapping[str, object], outputs: list[str] | None = None, *, shrink_arena: bool = False) -> dict[str, np.ndarray]:
        """One call (``shrink_arena`` is accepted and ignored: each stage has its own small session)."""
        import ml_dtypes

        from hybridtrt.runtime.onnxruntime import to_numpy

        arrays = {k: to_numpy(v) for k, v in feeds.items() if k in self.input_names}
        arrays = {k: a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a for k, a in arrays.items()}
        out = self.graph.run(arrays, self.communicator)
        return {name: out[name] for name in (outputs or self.output_names)}
