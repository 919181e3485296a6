"""One ONNX graph per tensor-parallel rank (DESIGN.md §12): each rank's `RankLM`, traced with its
collectives as ``trt::DistCollective`` nodes (`hybridtrt.ops.collectives`), through the same graph
passes as a one-device export.

This is the in-memory form (the weights inline, sliced from a loaded model), what the rank emulator
(`hybridtrt.runtime.rank_emulator`) and its tests run; ``export --tp N`` streaming each rank's slices
from the checkpoint into ``rank{r}/`` directories is the next step of issue 27.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch

from hybridtrt.exporter import io
from hybridtrt.exporter.export import GraphSpec, export_program, optimize_program, run_passes
from hybridtrt.exporter.streaming import PARAM_PREFIX, FrozenTrace
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.models.config import HybridConfig
from hybridtrt.models.model import HybridLM
from hybridtrt.models.tensor_parallel import TensorParallelPlan, TracingCommunicator, rank_model
from hybridtrt.ops.collectives import DIST_COLLECTIVE, TRT_DOMAIN, dist_collective_function


def rank_inputs(model: HybridLM, plan: TensorParallelPlan, rank: int, inputs: tuple[torch.Tensor, ...], flavour=io.DYNAMIC_CACHE) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s slice of the unsharded graph's inputs (ids and mask whole, every past state sliced)."""
    names = io.input_names(model.config, flavour)
    return tuple(plan.state_slice(n, t, rank) if n.startswith("past") else t for n, t in zip(names, inputs, strict=True))


def rank_graph(model: HybridLM, plan: TensorParallelPlan, rank: int, spec: GraphSpec = GraphSpec()) -> onnx.ModelProto:
    """Rank ``rank``'s graph of ``spec``: traced with example inputs sliced from the unsharded model's
    (a real prefill of past tokens), the graph passes run, the ``DistCollective`` body attached."""
    inputs = rank_inputs(model, plan, rank, example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour), spec.flavour)
    ranked = rank_model(model, plan, rank, TracingCommunicator(plan, rank))
    proto = export_program(ranked, inputs, spec, optimize=True).model_proto
    run_passes(proto, ranked.config, spec)
    return attach_dist_collective(proto, spec.opset)


def rank_graphs(model: HybridLM, plan: TensorParallelPlan, spec: GraphSpec = GraphSpec()) -> list[onnx.ModelProto]:
    """Every rank's `rank_graph`, tracing once per distinct rank config (with even splits: once).

    A rank's unoptimized trace does not depend on its weights (a trace of fake weights is the trace of
    the loaded model: tests/exporter/test_trace_cache.py) nor on its rank but for the ``groups`` of the
    collectives that join only some ranks (a shared Mamba group's norm). So each rank thaws the trace
    of its config (`FrozenTrace`), gets its own groups and its own weights, and is optimized: the bytes
    of tracing it alone (tests/validation/test_tensor_parallel.py).
    """
    traces: dict[HybridConfig, FrozenTrace] = {}
    graphs = []
    unsharded = example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour)
    for rank in range(plan.world):
        ranked = rank_model(model, plan, rank, TracingCommunicator(plan, rank))
        if ranked.config not in traces:
            inputs = rank_inputs(model, plan, rank, unsharded, spec.flavour)
            traces[ranked.config] = FrozenTrace(export_program(ranked, inputs, spec, optimize=False))
        program = traces[ranked.config].thaw()
        group = plan.norm_group(rank)
        for node in program.model.graph:
            if node.op_type == DIST_COLLECTIVE and group is not None and list(node.attributes["groups"].as_ints()):
                node.attributes["groups"] = ir.AttrInt64s("groups", list(group))  # the one collective over part of the ranks
        state = {**ranked.state_dict(), **dict(ranked.named_buffers())}
        program.apply_weights({name: state[name.removeprefix(PARAM_PREFIX)] for name in program.model.graph.initializers})
        optimize_program(program)
        proto = program.model_proto
        run_passes(proto, ranked.config, spec)
        graphs.append(attach_dist_collective(proto, spec.opset))
    return graphs


def attach_dist_collective(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Give a graph with ``trt::DistCollective`` nodes the op's single-rank body and its domain import
    (in place; idempotent)."""
    if not any(n.op_type == DIST_COLLECTIVE and n.domain == TRT_DOMAIN for n in proto.graph.node):
        return proto
    kept = [f for f in proto.functions if not (f.domain == TRT_DOMAIN and f.name == DIST_COLLECTIVE)]
    del proto.functions[:]
    proto.functions.extend([*kept, dist_collective_function(opset)])
    if not any(e.domain == TRT_DOMAIN for e in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    return proto
