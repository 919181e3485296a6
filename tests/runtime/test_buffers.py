"""Device-buffer plan, profile choice and ping-pong bookkeeping (pure; no TensorRT, no GPU)."""

from __future__ import annotations

import pytest

from hybridtrt.engine.profiles import engine_profiles
from hybridtrt.engine.sidecar import make_sidecar
from hybridtrt.errors import InputError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.runtime.buffers import BufferPlan, PingPong, choose_profile

B, L, S = 2, 8, 16


def _sidecar(out, graph="unified"):
    manifest = read_manifest(out)
    profiles = engine_profiles(manifest, graph=graph, max_batch=B, max_input_len=L, max_cache_len=S)
    return make_sidecar(
        manifest, out, profiles, graph=graph, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={}
    )


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))[1]


@pytest.fixture(scope="module")
def plan(export_dir):
    return BufferPlan.from_sidecar(_sidecar(export_dir))


def test_limits_and_states(plan):
    assert (plan.max_batch, plan.max_cache_len) == (B, S)
    kinds = [s.kind for s in plan.states]
    # tiny-nemotron-h "M*M-M*-M": 4 mamba layers (conv+ssm), 2 attention layers (key+value)
    assert kinds.count("conv") == kinds.count("ssm") == 4 and kinds.count("key") == kinds.count("value") == 2
    assert [s.past_name for s in plan.states][:3] == ["past_conv_state.0", "past_ssm_state.0", "past_key_values.1.key"]
    assert all(s.dtype == "float32" for s in plan.states)
    assert [s.grows for s in plan.states][:4] == [False, False, True, True]
    assert set(plan.outputs) == {"logits"}


def test_bytes_at_max_shapes(plan):
    by_name = {s.past_name: s for s in plan.states}
    assert plan.state_bytes(by_name["past_conv_state.0"]) == B * 192 * 4 * 4
    assert plan.state_bytes(by_name["past_ssm_state.0"]) == B * 8 * 16 * 16 * 4
    assert plan.state_bytes(by_name["past_key_values.1.key"]) == B * 2 * S * 16 * 4
    assert plan.output_max_shape("logits") == (B, 256)
    states = 4 * (B * 192 * 4 * 4 + B * 8 * 16 * 16 * 4) + 4 * (B * 2 * S * 16 * 4)
    assert plan.total_bytes() == 2 * states + B * 256 * 4


@pytest.mark.parametrize(
    "seq, past, expected",
    [(5, 0, 0), (1, 0, 0), (1, 7, 1), (3, 4, 0)],
)
def test_profile_choice_unified(plan, seq, past, expected):
    assert choose_profile(list(plan.profiles), seq, past) == expected


def test_profile_choice_decode_only(export_dir):
    plan = BufferPlan.from_sidecar(_sidecar(export_dir, graph="decode"))
    assert choose_profile(list(plan.profiles), 1, 0) == 0
    assert choose_profile(list(plan.profiles), 1, 9) == 0
    with pytest.raises(InputError, match="one token at a time"):
        choose_profile(list(plan.profiles), 4, 0)


def test_binding_shapes(plan):
    shapes = plan.binding_shapes(batch=2, seq=1, past=5)
    assert shapes["input_ids"] == (2, 1)
    assert shapes["attention_mask"] == (2, 6)
    assert shapes["past_key_values.5.key"] == (2, 2, 5, 16)
    assert shapes["past_conv_state.7"] == (2, 192, 4)
    presents = plan.present_shapes(batch=2, seq=1, past=5)
    assert presents["present.5.key"] == (2, 2, 6, 16)
    assert presents["present_ssm_state.0"] == (2, 8, 16, 16)


def test_check_call_limits(plan):
    assert plan.check_call(2, 8, 0) == 0
    assert plan.check_call(1, 1, 15) == 1
    with pytest.raises(InputError, match="--max-batch 3"):
        plan.check_call(3, 1, 0)
    with pytest.raises(InputError, match="--max-cache-len 17"):
        plan.check_call(1, 1, 16)
    with pytest.raises(InputError, match="--max-input-len 9"):
        plan.check_call(1, 9, 0)


def test_ping_pong():
    pp = PingPong(batch=2)
    seen = []
    for seq in (5, 1, 1, 1):
        seen.append((pp.past_index, pp.present_index, pp.past))
        pp.swap(seq)
    assert seen == [(0, 1, 0), (1, 0, 5), (0, 1, 6), (1, 0, 7)]
    assert (pp.past, pp.steps) == (8, 4)
    pp.reset(1)
    assert (pp.batch, pp.past, pp.parity, pp.steps) == (1, 0, 0, 0)


def test_ping_pong_never_aliases_past_and_present():
    pp = PingPong(batch=1)
    for _ in range(10):
        assert pp.past_index != pp.present_index
        pp.swap(1)


# -- TrtModel's use of the plan, with TensorRT and CUDA faked -------------------------------------
# A fake `tensorrt` module whose "engine" is the ONNX Runtime session of the same graph runs
# `TrtModel` on the CPU: it checks the shapes set against the active profile, that every state's past
# and present share a buffer exactly when the engine aliases them (get_aliased_input_tensor) and
# never otherwise, and reads/writes the bound buffers by address. Greedy generation must then
# equal `OrtModel`'s exactly: the ping-pong, profile switching and shape bookkeeping are right.

import sys  # noqa: E402

import torch  # noqa: E402

from hybridtrt.runtime.onnxruntime import OrtModel  # noqa: E402
from tests.runtime.fake_trt import cpu_trt_model  # noqa: E402
from tests.runtime.fake_trt import fake_tensorrt as _fake_tensorrt  # noqa: E402
from hybridtrt.engine.sidecar import write_sidecar  # noqa: E402


def _cpu_trt_model(monkeypatch, export_dir, tmp_path, graph="unified", aliases=None):
    return cpu_trt_model(monkeypatch, export_dir, _sidecar(export_dir, graph=graph), tmp_path / f"{graph}.engine", aliases)


def test_trt_model_bookkeeping_matches_onnxruntime(monkeypatch, export_dir, tmp_path):
    from tests.conftest import left_padded_batch

    model, ctx = _cpu_trt_model(monkeypatch, export_dir, tmp_path)
    ids, mask = left_padded_batch([5, 3], vocab=256, seed=1)
    ort = OrtModel(export_dir, use_decode_graph=False).generate(ids, mask, max_new_tokens=6, keep_logits=True)
    trt = model.generate(ids, mask, max_new_tokens=6, keep_logits=True)
    assert torch.equal(trt.tokens, ort.tokens)
    for a, b in zip(trt.logits, ort.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ctx.calls == [(0, (2, 5))] + [(1, (2, 1))] * 5  # prefill profile once, then decode
    # a second generation reuses the same buffers from zero states
    again = model.generate(ids[:1], mask[:1], max_new_tokens=3)
    assert torch.equal(again.tokens, OrtModel(export_dir).generate(ids[:1], mask[:1], max_new_tokens=3).tokens)


def test_trt_model_decode_only_engine_feeds_prompt_token_by_token(monkeypatch, export_dir, tmp_path):
    model, ctx = _cpu_trt_model(monkeypatch, export_dir, tmp_path, graph="decode")
    ids = torch.tensor([[5, 17, 99]])
    expected = OrtModel(export_dir).generate(ids, max_new_tokens=4).tokens
    assert torch.equal(model.generate(ids, max_new_tokens=4).tokens, expected)
    assert [c[1] for c in ctx.calls] == [(1, 1)] * 6


def test_trt_model_refuses_stale_state_and_limits(monkeypatch, export_dir, tmp_path):
    model, _ = _cpu_trt_model(monkeypatch, export_dir, tmp_path)
    old = model.zero_state(1)
    model.zero_state(1)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(InputError, match="stale"):
        model.step(ids, torch.ones_like(ids), old, decode=False)
    with pytest.raises(InputError, match="--max-batch"):
        model.zero_state(B + 1)
    with pytest.raises(InputError, match="--max-input-len"):
        model.prefill(torch.ones(1, L + 1, dtype=torch.long))
    logits, state = model.prefill(torch.tensor([[3, 4, 5]]))
    assert logits.shape == (1, 256) and logits.dtype == torch.float32 and state.past == 3
    states = model.state_tensors()
    assert states["past_key_values.1.key"].shape == (1, 2, 3, 16)
    assert states["past_ssm_state.0"].abs().sum() > 0
    assert model.device_bytes == model.plan.total_bytes()
    named = model.named_states(state)
    ort = OrtModel(export_dir)
    _, ort_state = ort.step(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long), ort.zero_state(1), decode=False)
    expected = ort.named_states(ort_state)
    assert list(named) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(named[name], torch.from_numpy(value), rtol=0, atol=0)


def test_trt_model_refuses_changed_plugin_library(monkeypatch, export_dir, tmp_path):
    from hybridtrt.errors import ArtefactError
    from hybridtrt.runtime import tensorrt as trt_runtime

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"v1")
    manifest = read_manifest(export_dir)
    profiles = engine_profiles(manifest, max_batch=B, max_input_len=L, max_cache_len=S)
    sidecar = make_sidecar(manifest, export_dir, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=lib, build_flags={})
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"fake")
    write_sidecar(sidecar, engine)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(None, sidecar, []))
    monkeypatch.setattr(trt_runtime.TrtModel, "_select_device", lambda self, index: torch.device("cpu"))
    lib.write_bytes(b"v2")
    with pytest.raises(ArtefactError, match="sha256"):
        trt_runtime.TrtModel(engine)
    sidecar["tensorrt"] = "10.3.0"
    write_sidecar(sidecar, engine)
    from hybridtrt.errors import EngineError

    with pytest.raises(EngineError, match="TensorRT 10.3.0"):
        trt_runtime.TrtModel(engine)


def test_trt_model_binds_what_the_engine_aliases(monkeypatch, export_dir, tmp_path):
    """Our engines alias nothing (the plugins declare no alias): every state is ping-ponged, past and present
    in separate buffers (asserted at every call by the fake context) — the test above. An engine that updates
    states in place (TensorRT's KV-cache update layer reports it through get_aliased_input_tensor) gets one
    buffer bound as both, for exactly those states, and still generates what ONNX Runtime does."""
    from tests.conftest import left_padded_batch

    plan = BufferPlan.from_sidecar(_sidecar(export_dir))
    ssm = {s.present_name: s.past_name for s in plan.states if s.kind == "ssm"}
    model, ctx = _cpu_trt_model(monkeypatch, export_dir, tmp_path, aliases=ssm)
    assert model.in_place == frozenset(ssm.values())
    ids, mask = left_padded_batch([4, 2], vocab=256, seed=3)
    expected = OrtModel(export_dir, use_decode_graph=False).generate(ids, mask, max_new_tokens=5).tokens
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5).tokens, expected)
    assert len(ctx.calls) == 5
    saved = sum(plan.state_bytes(s) for s in plan.states if s.kind == "ssm")
    assert model.device_bytes == plan.total_bytes() - saved


def test_trt_model_refuses_unexpected_aliasing(monkeypatch, export_dir, tmp_path):
    from hybridtrt.errors import EngineError

    with pytest.raises(EngineError, match="aliases output present_ssm_state.0 to input past_ssm_state.3"):
        _cpu_trt_model(monkeypatch, export_dir, tmp_path, aliases={"present_ssm_state.0": "past_ssm_state.3"})
    with pytest.raises(EngineError, match="aliases output logits"):
        _cpu_trt_model(monkeypatch, export_dir, tmp_path, aliases={"logits": "input_ids"})
