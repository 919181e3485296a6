"""The held-routing pass (`hybridtrt.graphs.held_routing`) and its reference twin
(`hybridtrt.models.moe.RoutingHold`): structure, and numbers before/after."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from hybridtrt.errors import ArtefactError
from hybridtrt.graphs.held_routing import HELD_EXPERTS, HOLD_ROUTING, ROUTED_EXPERTS, hold_routing, router_topks
from hybridtrt.models import load_model
from hybridtrt.models.moe import RoutingHold, held_routing
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.runtime.generation import left_pad

PRESET = "tiny-nemotron3-moe"  # MoE layers 1, 3, 6; 16 experts, top-6


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export(PRESET)


def _feeds(session: OrtSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for arg in session.session.get_inputs():
        if arg.name.startswith("past_"):
            shape = [ids.shape[0] if d == "batch" else (0 if isinstance(d, str) else d) for d in arg.shape]
            feeds[arg.name] = np.zeros(shape, np.float32)
    return feeds


def test_structure(exported):
    _, out = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sorted(router_topks(graph)) == [1, 3, 6]
    held = hold_routing(graph)
    assert held.layers == {1: 6, 3: 6, 6: 6}
    inputs, outputs = {i.name for i in held.model.graph.input}, [o.name for o in held.model.graph.output]
    assert {HELD_EXPERTS.format(i) for i in (1, 3, 6)} <= inputs
    assert outputs[-3:] == [ROUTED_EXPERTS.format(i) for i in (1, 3, 6)]
    assert HOLD_ROUTING in inputs
    topk = {n.output[1] for n in router_topks(held.model).values()}
    readers = sorted(n.op_type for n in held.model.graph.node if set(n.input) & topk)
    assert readers == sorted(["Identity", "Where"] * 3)  # only the switch and the exposed output read the own choice
    order = [n.name for n in held.model.graph.node]
    assert all(order.index(f"/model/layers.{i}/mixer/gate/HeldExperts") == order.index(f"/model/layers.{i}/mixer/gate/TopK") + 1 for i in (1, 3, 6))
    assert len(graph.graph.output) + 3 == len(held.model.graph.output)  # the input model is not modified
    assert hold_routing(onnx.helper.make_model(onnx.helper.make_graph([], "dense", [], []))).layers == {}


def test_refuses_an_unnamed_router():
    node = onnx.helper.make_node("TopK", ["x", "k"], ["v", "i"], name="/model/mixer/gate/TopK")
    graph = onnx.helper.make_graph([node], "g", [], [])
    with pytest.raises(ArtefactError, match="does not name its layer"):
        router_topks(onnx.helper.make_model(graph))


def test_held_to_its_own_choice_is_the_same_graph(exported):
    """Free, the copy computes bitwise what the graph does; held to the ids it chooses itself, too;
    held to other ids, the MoE layers' outputs move."""
    _, out = exported
    plain = OrtSession(out / "model.onnx")
    held = plain.variant(lambda g: hold_routing(g).model)
    ids = np.random.default_rng(0).integers(3, 256, (2, 9)).astype(np.int64)
    feeds = _feeds(plain, ids)
    want = plain.run(feeds)
    free = held.run({**feeds, HOLD_ROUTING: np.array(False), **{HELD_EXPERTS.format(i): np.zeros((1, 6), np.int64) for i in (1, 3, 6)}})
    chosen = {HELD_EXPERTS.format(i): free[ROUTED_EXPERTS.format(i)] for i in (1, 3, 6)}
    got = held.run({**feeds, HOLD_ROUTING: np.array(True), **chosen})
    for name, value in want.items():
        np.testing.assert_array_equal(free[name], value, err_msg=name)
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    other = {k: (v + 1) % 16 for k, v in chosen.items()}
    moved = held.run({**feeds, HOLD_ROUTING: np.array(True), **other})
    assert not np.array_equal(moved["logits"], want["logits"])
    np.testing.assert_array_equal(moved[ROUTED_EXPERTS.format(1)], chosen[HELD_EXPERTS.format(1)])  # layer 1's own choice is upstream of any hold


def test_reference_hold(make_checkpoint):
    """The reference's twin: held to its own choice it is bitwise unchanged; the hold hands out the
    held ids position by position across calls and refuses a call it has no ids for."""
    model = load_model(make_checkpoint(PRESET))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], pad_id=0)
    with torch.no_grad():
        free = model(ids, mask, model.new_cache(2), logits="last").logits
        record = RoutingHold()
        with held_routing(model, record):
            model(ids, mask, model.new_cache(2), logits="last")
        truth = {layer: record.ids(layer) for layer in record.chosen}
        assert sorted(truth) == [1, 3, 6] and truth[1].shape == (2, 5, 6)
        with held_routing(model, RoutingHold(truth)):
            again = model(ids, mask, model.new_cache(2), logits="last").logits
        assert torch.equal(again, free)
        moved = {layer: (t + 1) % 16 for layer, t in truth.items()}
        with held_routing(model, RoutingHold(moved)):
            assert not torch.equal(model(ids, mask, model.new_cache(2), logits="last").logits, free)
        hold = RoutingHold(truth)
        assert torch.equal(hold.held_ids(1, 2, 3), truth[1][:, :3]) and torch.equal(hold.held_ids(1, 2, 2), truth[1][:, 3:])
        with pytest.raises(ValueError, match="positions 5:6"):
            hold.held_ids(1, 2, 1)
        assert all(layer.mixer.__dict__.get("hold") is None for layer in model.layers)  # released
