"""CUDA-graph decode bookkeeping for static-cache engines, on the CPU: a fake TensorRT execution
context backed by ONNX Runtime (same graph, buffers found by address, TensorRT's aliasing rules
enforced) and a fake graph API that replays with the addresses it captured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.io import LOGITS
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.runtime.cuda_graphs import StaticEngineSession, StaticEngineStepper, StaticLayout, capture_blocker
from hybridtrt.runtime.generation import generate
from hybridtrt.runtime.onnxruntime import OrtModel, OrtSession
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch
from tests.static_capacity import CAPACITY



class FakeContext:
    """``IExecutionContext`` over ORT. KV outputs must be bound to their input's address (TensorRT
    aliases IKVCacheUpdateLayer outputs); every other output to its own address."""

    def __init__(self, session: OrtSession, layout: StaticLayout) -> None:
        self.session, self.layout = session, layout
        self.buffers: dict[int, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.full((numel,), float("nan"), dtype=dtype) if dtype.is_floating_point else torch.full((numel,), -1, dtype=dtype)
        self.buffers[t.data_ptr()] = t
        return t

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self.execute(dict(self.addresses), dict(self.shapes))
        return True

    def _array(self, ptr: int, shape) -> np.ndarray:
        return self.buffers[ptr][: int(np.prod(shape))].view(shape).numpy()

    def execute(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        self.executions += 1
        feeds = {name: self._array(addresses[name], shape) for name, shape in shapes.items()}
        aliases = {}
        for s in self.layout.states:
            past, present = addresses[s["past_name"]], addresses[s["present_name"]]
            assert (past == present) == self.layout.in_place(s), f"TensorRT binding rule broken for {s['present_name']}"
            if past != present:  # write into the other ping-pong buffer, as an engine output would
                np.copyto(self._array(present, shapes[s["past_name"]]), feeds[s["past_name"]])
                feeds[s["past_name"]] = self._array(present, shapes[s["past_name"]])
            aliases[s["present_name"]] = s["past_name"]
        out = self.session.run_in_place(feeds, aliases)
        logits = out[LOGITS]
        np.copyto(self._array(addresses[LOGITS], logits.shape), logits)


class FakeGraphs:
    """Capture records the addresses and shapes and executes nothing; replay runs with them."""

    def __init__(self, context: FakeContext) -> None:
        self.context = context

    def capture(self, launch):
        return dict(self.context.addresses), dict(self.context.shapes)

    def replay(self, graph):
        self.context.execute(*graph)


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(kv_cache="static", max_cache_len=CAPACITY))[1]


def _stepper(export_dir, graphs=True):
    manifest = read_manifest(export_dir)
    layout = StaticLayout.from_manifest(manifest, max_batch=3, max_seq=16)
    context = FakeContext(OrtSession(export_dir / "model.onnx"), layout)
    session = StaticEngineSession(context, layout, context.empty, FakeGraphs(context) if graphs else None)
    return StaticEngineStepper(session, CAPACITY), session, context


def test_replayed_decode_steps_equal_onnxruntime(export_dir):
    ids, mask = left_padded_batch([27, 9], 256, seed=41)
    stepper, session, _ = _stepper(export_dir)
    got = generate(stepper, ids, mask, max_new_tokens=12, keep_logits=True, prefill_chunk=16)
    ref = OrtModel(export_dir, use_decode_graph=False).generate(ids, mask, max_new_tokens=12, keep_logits=True, prefill_chunk=16)  # the graph the fake engine runs
    assert torch.equal(got.tokens, ref.tokens)
    assert max(rel_l2(a, b) for a, b in zip(got.logits, ref.logits)) <= 1e-6
    graphs = session.decode_graphs
    assert (graphs.captures, graphs.replays) == (2, 11 - 2)  # one graph per parity, then replays only
    assert set(graphs.graphs) == {(2, 0), (2, 1)}


def test_a_new_batch_size_captures_its_own_graphs(export_dir):
    stepper, session, _ = _stepper(export_dir)
    generate(stepper, torch.randint(3, 256, (2, 5)), max_new_tokens=4)
    generate(stepper, torch.randint(3, 256, (3, 5)), max_new_tokens=4)
    generate(stepper, torch.randint(3, 256, (2, 5)), max_new_tokens=4)  # reuses batch 2's graphs
    assert set(session.decode_graphs.graphs) == {(2, 0), (2, 1), (3, 0), (3, 1)}
    assert session.decode_graphs.captures == 4


def test_eager_session_matches_and_decode_shapes_are_constant(export_dir):
    stepper, session, context = _stepper(export_dir, graphs=False)
    seen = []
    original = context.execute

    def spy(addresses, shapes):
        seen.append((tuple(sorted(shapes.items())), tuple(sorted(addresses.items()))))
        original(addresses, shapes)

    context.execute = spy
    ids = torch.randint(3, 256, (1, 6))
    got = generate(stepper, ids, max_new_tokens=7).tokens
    assert torch.equal(got, OrtModel(export_dir).generate(ids, max_new_tokens=7).tokens)
    decode = seen[1:]
    assert len({shapes for shapes, _ in decode}) == 1  # every decode step: identical shapes
    assert len({addresses for _, addresses in decode}) == 2  # two address sets (conv/SSM parity)


def test_capture_blocker_names_moe_function_bodies_only():
    """Plugin layers never block a capture (SSD or MoE); MoE experts built from their data-dependent bodies do, by op
    and count (a partial proof counts the difference); SSD function bodies have static shapes and do not; a sidecar
    made without a network names nothing."""
    ssd, moe, fp8, nvfp4 = (f"hybridtrt::{op}" for op in ("Mamba2ChunkScan", "MoeExperts", "MoeExpertsFp8", "MoeExpertsNvfp4"))
    assert capture_blocker({"custom_nodes": {ssd: 4, moe: 3, fp8: 2}, "layers": {ssd: 4, moe: 3, fp8: 2}}) is None
    assert capture_blocker({"custom_nodes": {ssd: 4}, "layers": {ssd: 0}, "function_bodies": True}) is None
    assert capture_blocker({"path": None, "sha256": None, "custom_nodes": {}, "layers": {}, "function_bodies": True}) is None
    blocked = capture_blocker({"custom_nodes": {ssd: 4, fp8: 3, nvfp4: 2}, "layers": {ssd: 4, fp8: 1}})
    assert blocked is not None and blocked.startswith(f"2x {fp8}, 2x {nvfp4} run as ONNX function bodies")
    assert "--dequantize-experts" in blocked
