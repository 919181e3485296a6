"""The collectives of a tensor-parallel rank as torch ops, and their ONNX node (DESIGN.md §12).

``hybridtrt::all_reduce(x, ranks, world)`` sums ``x`` over ``ranks`` (``[]``: every rank of the
``world``); ``hybridtrt::all_gather(x, world)`` concatenates every rank's ``x`` along axis 0. They exist to be traced: a rank's model calls them
through `hybridtrt.models.tensor_parallel.TracingCommunicator`, and the export writes each as one
``trt::DistCollective`` node, the form Polygraphy's ``multi-device shard`` writes for TensorRT's parser
(tools/Polygraphy/polygraphy/tools/multi_device/subtool/shard.py: op ``DistCollective``, STRING
attributes ``collective_operation`` and ``reduce_op``, INT ``root`` and ``group_size``, INTS ``groups``;
all-gather along axis 0, which is why it transposes the gathered axis to the front). The parser
imports it since TensorRT 10.16 (CHANGELOG) into ``IDistCollectiveLayer`` (NvInfer.h
``addDistCollective(input, CollectiveOperation, ReduceOperation, root, groups, groupSize)``: ``groups``
the participating ranks, ``root = -1`` where the operation has none). Its domain is ``trt``, TensorRT's
own ops' (the parser's builtin importers are keyed by op type, whatever the domain: `hybridtrt.engine.
trt_rules`), so that the graph stays valid ONNX with a model-local function body: its meaning on a
single rank (N = 1), the identity.

Eagerly the ops refuse to run: their value needs the other ranks (`hybridtrt.models.collectives.
emulate_ranks` runs ranks in PyTorch, `hybridtrt.runtime.rank_emulator` in ONNX Runtime).
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper
from onnx.defs import OpSchema
from torch import Tensor

TRT_DOMAIN = "trt"
DIST_COLLECTIVE = "DistCollective"
ALL_REDUCE, ALL_GATHER = "all_reduce", "all_gather"
#: The node's attributes (Polygraphy's shard.py `_make_attrs` plus ``groups``).
ATTRIBUTES = ("collective_operation", "reduce_op", "root", "group_size", "groups")


def _needs_ranks(name: str) -> RuntimeError:
    return RuntimeError(
        f"hybridtrt::{name} combines the tensors of several ranks, so it has no value in one process: run "
        "the ranks with hybridtrt.models.collectives.emulate_ranks (PyTorch) or hybridtrt.runtime.rank_emulator "
        "(ONNX Runtime), or on N GPUs"
    )


@torch.library.custom_op("hybridtrt::all_reduce", mutates_args=())
def all_reduce(x: Tensor, ranks: list[int], world: int) -> Tensor:
    """The sum of ``x`` over ``ranks`` of the ``world`` (every rank of the group gets it; ``[]``:
    all of them). Same shape and dtype."""
    raise _needs_ranks(ALL_REDUCE)


@all_reduce.register_fake
def _all_reduce_fake(x: Tensor, ranks: list[int], world: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("hybridtrt::all_gather", mutates_args=())
def all_gather(x: Tensor, world: int) -> Tensor:
    """``x [n, ...]`` of every rank concatenated in rank order along axis 0: ``[world·n, ...]``."""
    raise _needs_ranks(ALL_GATHER)


@all_gather.register_fake
def _all_gather_fake(x: Tensor, world: int) -> Tensor:
    return x.new_empty((x.shape[0] * world, *x.shape[1:]))


def node_attributes(operation: str, ranks: list[int], world: int) -> dict:
    """The ``DistCollective`` attributes of ``operation`` over ``ranks`` of ``world`` as Polygraphy
    writes them: ``group_size`` the number of GPUs (``IDistCollectiveLayer::setNbRanks``), ``groups``
    the participating ranks or ``[]`` for all of them, ``reduce_op`` ``"sum"`` (a gather's too), no root."""
    return {"collective_operation": operation, "reduce_op": "sum", "root": -1, "group_size": world, "groups": list(ranks)}


def register_schema() -> None:
    """Register ``trt::DistCollective`` with ``onnx.defs`` (once per process), so the exporter can emit
    it and the checker validate it. Types: what ``IDistCollectiveLayer`` reduces (NvInfer.h
    ``ReduceOperation``: float, half, bfloat16 via float)."""
    if onnx.defs.has(DIST_COLLECTIVE, TRT_DOMAIN):
        return
    kinds = {"collective_operation": OpSchema.AttrType.STRING, "reduce_op": OpSchema.AttrType.STRING,
             "root": OpSchema.AttrType.INT, "group_size": OpSchema.AttrType.INT, "groups": OpSchema.AttrType.INTS}  # fmt: skip
    schema = OpSchema(
        DIST_COLLECTIVE,
        TRT_DOMAIN,
        1,
        doc="A collective over tensor-parallel ranks (TensorRT IDistCollectiveLayer); all-gather along axis 0.",
        inputs=[OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "the collected tensor")],
        attributes=[OpSchema.Attribute(name, kind, required=False) for name, kind in kinds.items()],
    )
    schema.set_type_and_shape_inference_function(_infer)
    onnx.defs.register_schema(schema)


def _infer(ctx: onnx.shape_inference.InferenceContext) -> None:
    """y has x's type; its shape is x's, but for an all-gather's axis 0 (left unknown: the world
    multiplies it)."""
    known = ctx.get_input_type(0) if ctx.has_input(0) else None
    if known is None:
        return
    t = onnx.TypeProto()
    t.CopyFrom(known)
    operation = ctx.get_attribute("collective_operation")
    if operation is not None and operation.s == ALL_GATHER.encode() and t.tensor_type.shape.dim:
        t.tensor_type.shape.dim[0].Clear()
    ctx.set_output_type(0, t)


def dist_collective_function(opset: int) -> onnx.FunctionProto:
    """``trt::DistCollective(x) -> y`` on one rank (N = 1): ``y = x`` for every operation."""
    return helper.make_function(
        TRT_DOMAIN,
        DIST_COLLECTIVE,
        ["x"],
        ["y"],
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
    )
