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
