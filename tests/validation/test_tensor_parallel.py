"""Tensor-parallel ranks as ONNX graphs (DESIGN.md §12): each rank's graph carries its collectives as
``trt::DistCollective`` nodes in Polygraphy's form and stays valid ONNX; the ranks run in ONNX Runtime
cut at those nodes (`hybridtrt.runtime.rank_emulator`), judged against the one-device reference with
the fp32 gates (`hybridtrt.validation.tensor_parallel`); a fault planted in one rank's weights is named
with its rank and layer.

One model with every block kind in four layers (MLP, attention, MoE, Mamba), 4 ranks: its 2 Mamba
groups are shared by 2 ranks each (the gated norm's all-reduce over a group of ranks) and its 2 KV heads
replicated."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from hybridtrt.exporter.export import GraphSpec
from hybridtrt.exporter.tensor_parallel import rank_graph, rank_graphs
from hybridtrt.models.loading import load_model
from hybridtrt.models.tensor_parallel import TensorParallelPlan
from hybridtrt.ops.collectives import DIST_COLLECTIVE, TRT_DOMAIN
from hybridtrt.runtime.rank_emulator import RankEmulator
from hybridtrt.validation.runner import random_prompts
from hybridtrt.validation.tensor_parallel import validate_ranks

WORLD = 4
PATTERN = ["mlp", "attention", "moe", "mamba"]
MAMBA_LAYER = 3


@pytest.fixture(scope="module")
def ranks(make_checkpoint):
    model = load_model(make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=PATTERN))
    plan = TensorParallelPlan(model.config, WORLD)
    protos = rank_graphs(model, plan, GraphSpec(per_layer=True))  # one trace, every rank thawed from it
    ids, mask = random_prompts(3, model.config.vocab_size, max_len=37, seed=2)
    return model, plan, protos, ids, mask


def _collectives(proto: onnx.ModelProto) -> list[tuple[str, str, list[int]]]:
    out = []
    for node in proto.graph.node:
        if node.op_type == DIST_COLLECTIVE:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out.append((node.name, attrs["collective_operation"].decode(), list(attrs["groups"])))
    return out


def test_rank_graphs_carry_the_collectives_in_the_parsers_form(ranks):
    """One all-reduce per block (the MoE layer's after its shared expert too), the Mamba gated norm's
    over the 2 ranks of its group, the embedding's all-reduce and the head's all-gather; Polygraphy's
    attributes; valid ONNX with the single-rank body attached."""
    _, _, protos, _, _ = ranks
    for rank, proto in enumerate(protos):
        onnx.checker.check_model(proto, full_check=True)
        assert [(f.domain, f.name) for f in proto.functions if f.domain == TRT_DOMAIN] == [(TRT_DOMAIN, DIST_COLLECTIVE)]
        got = {name: (op, groups) for name, op, groups in _collectives(proto)}
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        every = []  # Polygraphy's form: no groups, every rank
        assert got == {
            "/model/DistCollective": ("all_reduce", every),  # the vocabulary-parallel embedding
            "/model/layers.0/mixer/down_proj/DistCollective": ("all_reduce", every),
            "/model/layers.1/mixer/o_proj/DistCollective": ("all_reduce", every),
            "/model/layers.2/mixer/DistCollective": ("all_reduce", every),
            "/model/layers.3/mixer/norm/DistCollective": ("all_reduce", pair),
            "/model/layers.3/mixer/out_proj/DistCollective": ("all_reduce", every),
            "/model/DistCollective_1": ("all_gather", every),  # the head's logits
        }, got
        node = next(n for n in proto.graph.node if n.op_type == DIST_COLLECTIVE)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == TRT_DOMAIN and attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "root": -1, "group_size": WORLD, "groups": []}


def test_a_rank_thawed_from_the_shared_trace_is_the_rank_traced_alone(ranks):
    """`rank_graphs` traces once and gives each rank its weights and groups: rank 3 (other weights,
    other vocabulary rows, the other pair of ranks in its norm's group) is the bytes of tracing it."""
    model, plan, protos, _, _ = ranks
    alone = rank_graph(model, plan, 3, GraphSpec(per_layer=True))
    assert alone.SerializeToString() == protos[3].SerializeToString()


def test_emulated_ranks_pass_the_one_device_gates(ranks):
    model, plan, protos, ids, mask = ranks
    report = validate_ranks(model, plan, protos, ids, mask, steps=2)
    assert report.passed, [(c.name, c.failures) for c in report.failures()]
    logits = next(c for c in report.checks if c.phase == "prefill")
    assert logits.comparison.rel_l2 <= 1e-5  # fp32 sums in another order
    names = {c.name for c in report.checks}
    assert {f"present_ssm_state.{MAMBA_LAYER} (rank {r})" for r in range(WORLD)} <= names
    assert {f"present.1.key (rank {r})" for r in range(WORLD)} <= names and "layer_output.2 (rank 3)" in names


def test_a_fault_in_one_ranks_weights_is_named_with_its_rank_and_layer(ranks):
    """Rank 2's in_proj of the Mamba layer 10 % off: its states there fail first; ranks 0, 1 and 3
    hold theirs right at that layer."""
    model, plan, protos, ids, mask = ranks
    bad = onnx.ModelProto()
    bad.CopyFrom(protos[2])
    (weight,) = [t for t in bad.graph.initializer if t.name.startswith(f"model.layers.{MAMBA_LAYER}.mixer.in_proj.weight")]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.1), weight.name))
    report = validate_ranks(model, plan, [*protos[:2], bad, protos[3]], ids, mask, steps=0)
    assert not report.passed
    assert report.first_divergence["layer"] == MAMBA_LAYER and report.first_divergence["rank"] == 2, report.first_divergence
    states = {c.name: c.passed for c in report.checks if c.name.startswith(f"present_ssm_state.{MAMBA_LAYER} ")}
    assert states == {f"present_ssm_state.{MAMBA_LAYER} (rank {r})": r != 2 for r in range(WORLD)}


def test_the_emulator_refuses_ranks_whose_collectives_differ(ranks):
    """Ranks of one model meet at the same collectives; rank 1 gathering where rank 0 reduces is refused."""
    _, _, protos, _, _ = ranks
    other = onnx.ModelProto()
    other.CopyFrom(protos[1])
    node = next(n for n in other.graph.node if n.name == "/model/layers.0/mixer/down_proj/DistCollective")
    next(a for a in node.attribute if a.name == "collective_operation").s = b"all_gather"
    with pytest.raises(ValueError, match="rank 1's graph has other collectives than rank 0's"):
        RankEmulator([protos[0], other, protos[2], protos[3]])


def test_collectives_have_no_value_in_one_process():
    with pytest.raises(RuntimeError, match="combines the tensors of several ranks"):
        torch.ops.hybridtrt.all_reduce(torch.ones(2), [0, 1], 4)


def test_the_parser_emulator_builds_the_collectives_from_10_16_and_refuses_them_before(ranks):
    """`build --check-tensorrt`'s rules (`hybridtrt.engine.trt_rules`): DistCollective is TensorRT's
    own op (IDistCollectiveLayer) from 10.16, refused by name before; an operation TensorRT does not
    map is refused (planted)."""
    from hybridtrt.engine.dispatch import NATIVE, UNSUPPORTED, emulate_dispatch

    _, _, protos, _, _ = ranks
    report = emulate_dispatch(protos[1], "11.1.0")
    collectives = [n for n in report.nodes if n.op == f"{TRT_DOMAIN}::{DIST_COLLECTIVE}"]
    assert len(collectives) == 7 and {n.importer for n in collectives} == {NATIVE}
    assert not [p for p in report.problems if DIST_COLLECTIVE in p], report.problems
    assert any("setCommunicator" in note for note in report.notes)
    old = emulate_dispatch(protos[1], "10.15")
    assert {n.importer for n in old.nodes if n.op.endswith(DIST_COLLECTIVE)} == {UNSUPPORTED}
    assert any("DistCollective needs TensorRT >= 10.16" in p for p in old.problems)
    planted = onnx.ModelProto()
    planted.CopyFrom(protos[1])
    node = next(n for n in planted.graph.node if n.op_type == DIST_COLLECTIVE)
    next(a for a in node.attribute if a.name == "collective_operation").s = b"all_sum"
    assert any("collective_operation='all_sum'" in p for p in emulate_dispatch(planted, "11.1.0").problems)
