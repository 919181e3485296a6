"""The dt rule (DESIGN.md §3) in prefill, decode and chunk tails, and the table of what each
transformers release does instead (`hybridtrt.validation.hf.HF_DT_RULES`), checked against the
transformers that is installed.

The checkpoints here make every clamp bite: ``time_step_min`` 0.8 and ``time_step_limit`` [1.0, 1.5]
with HF's own dt init in [0.8, 2.0] and in_proj noise of initializer_range 0.3, so the three
candidate rules (limit, time_step_min, none) give clearly different outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from hybridtrt.judge.metrics import rel_l2
from hybridtrt.models import load_model
from hybridtrt.validation.hf import HF_DT_RULES, clamp_bounds, hf_differences, hf_dt_rule
from tests.models.hf import hf_states, load_hf, save_hf_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BITING = {"time_step_min": 0.8, "time_step_max": 2.0, "time_step_limit": [1.0, 1.5]}


@pytest.fixture(scope="module")
def biting(tmp_path_factory):
    path = save_hf_checkpoint("tiny-nemotron-h", tmp_path_factory.mktemp("biting"), **BITING)
    return path, load_hf(path)


def _ours(path, bounds: tuple[float, float]):
    """Our reference with its dt clamp set to ``bounds`` (to emulate another rule)."""
    model = load_model(path)
    for block in model.layers:
        if block.kind == "M":
            block.mixer.dt_min, block.mixer.dt_max = bounds
    return model


def _gap(ours, theirs, layer_types: str) -> float:
    """The larger rel L2 of the logits and of the worst SSM state (where dt acts first)."""
    mine, hf = ours.cache.named_states(), hf_states(theirs.cache, layer_types)
    states = [rel_l2(mine[name], hf[name]) for name in hf if name.startswith("present_ssm_state")]
    return max([rel_l2(ours.logits, theirs.logits), *states])


def _raw(path) -> dict:
    import json

    return json.loads((path / "config.json").read_text())


def test_reference_clamps_to_time_step_limit(biting):
    path, _ = biting
    assert load_model(path).config.time_step_limit == (1.0, 1.5)


def test_time_step_limit_defaults_to_no_clamp_and_reads_hf_alias(tmp_path):
    """No limit in config.json → (0, inf) (mamba_ssm's default); ``mamba_dt_limit`` is HF's alias;
    ``time_step_min`` is an initialisation range and never a clamp."""
    from hybridtrt.models.config import load_config

    path = save_hf_checkpoint("tiny-nemotron-h", tmp_path / "a", time_step_min=0.05)
    raw = _raw(path)
    assert load_config(path).time_step_limit == (0.0, math.inf)
    raw["mamba_dt_limit"] = raw.pop("time_step_limit")
    raw["mamba_dt_limit"] = [0.01, 0.5]
    (path / "config.json").write_text(__import__("json").dumps(raw))
    assert load_config(path).time_step_limit == (0.01, 0.5)


def test_the_installed_transformers_is_in_the_table():
    rule = hf_dt_rule(transformers.__version__)
    assert rule is not None, f"transformers {transformers.__version__}: add its dt rule to HF_DT_RULES from its source"


def test_the_table_covers_each_release_once():
    for version in ("5.3.0", "5.14.1", "5.15.0", "5.24.0", "5.25.0", "6.0.0"):
        assert sum(rule.covers(version) for rule in HF_DT_RULES) == 1, version
    assert hf_dt_rule("5.2.0") is None  # no NemotronH before 5.3


def test_installed_prefill_follows_the_table(biting):
    """HF's prefill equals our reference run with the table's prefill clamp, and not with the
    other candidates: the table is data checked against the real release."""
    path, hf = biting
    rule = hf_dt_rule(transformers.__version__)
    ids = torch.randint(3, 256, (2, 37))
    with torch.no_grad():
        theirs = hf(ids, use_cache=True)
    gaps = {}
    for clamp in ("time_step_limit", "time_step_min", "none"):
        with torch.no_grad():
            model = _ours(path, clamp_bounds(clamp, _raw(path)))
            gaps[clamp] = _gap(model(ids), theirs, model.config.layer_types)
    assert gaps[rule.prefill] <= TOL, gaps
    assert all(gap > 1e-3 for clamp, gap in gaps.items() if clamp != rule.prefill), gaps


def test_installed_decode_follows_the_table(biting):
    """One decode step on HF's own prefill state: HF equals our reference that prefills with the
    table's prefill clamp and decodes with its decode clamp."""
    path, hf = biting
    rule = hf_dt_rule(transformers.__version__)
    raw = _raw(path)
    ids = torch.randint(3, 256, (2, 21))
    nxt = torch.randint(3, 256, (2, 1))
    with torch.no_grad():
        first = hf(ids, use_cache=True)
        theirs = hf(nxt, cache=first.cache, use_cache=True)
        prefill = _ours(path, clamp_bounds(rule.prefill, raw))(ids)
        decoded = _ours(path, clamp_bounds(rule.decode, raw))(nxt, cache=prefill.cache)
        other = _ours(path, clamp_bounds(rule.prefill, raw))(nxt, cache=prefill.cache)
    types = load_model(path).config.layer_types
    assert _gap(decoded, theirs, types) <= TOL
    if clamp_bounds(rule.decode, raw) != clamp_bounds(rule.prefill, raw):
        assert _gap(other, theirs, types) > 1e-3


def test_reference_decode_equals_prefill_with_the_clamp_biting(biting):
    """DESIGN.md §4 with every clamp active: prefill + decode steps == prefill of the whole, and
    chunks of any split (1-token chunks included) == one call, because the rule is the same on every
    token. (HF's one-token path does not clamp, so HF itself breaks this where the limit bites.)"""
    path, _ = biting
    model = load_model(path)
    ids = torch.randint(3, 256, (2, 29))
    with torch.no_grad():
        whole = model(ids)
        state = model(ids[:, :20]).cache
        for t in range(20, 29):
            step = model(ids[:, t : t + 1], cache=state)
            state = step.cache
        tail = model(ids[:, 16:], cache=model(ids[:, :16]).cache)
    assert rel_l2(step.logits[:, -1], whole.logits[:, -1]) <= TOL
    assert rel_l2(tail.logits[:, -1], whole.logits[:, -1]) <= TOL
    for name, value in whole.cache.named_states().items():
        assert rel_l2(state.named_states()[name], value) <= 1e-4, name


def test_differences_are_named_for_the_checkpoint(biting, tmp_path):
    path, _ = biting
    limit = load_model(path).config.time_step_limit
    assert hf_differences(path, limit, "5.25.0") == [
        f"transformers 5.25.0 clamps {where} dt to [0, ∞] where the reference clamps to [1, 1.5] (DESIGN.md §3): "
        "expect differences wherever such a dt falls outside"
        for where in ("decode", "speculative tail")
    ]
    assert len(hf_differences(path, limit, "5.24.0")) == 2  # prefill to [0.8, ∞), decode unclamped
    plain = save_hf_checkpoint("tiny-nemotron-h", tmp_path / "plain")  # limit (0, inf), time_step_min 0.001
    plain_limit = load_model(plain).config.time_step_limit
    assert hf_differences(plain, plain_limit, "5.25.0") == []
    assert [line.split(" clamps ")[1][:7] for line in hf_differences(plain, plain_limit, "5.24.0")] == ["prefill"]


@pytest.mark.skipif(hf_dt_rule(transformers.__version__) is None or hf_dt_rule(transformers.__version__).tail is None,
                    reason="this transformers release has no recorded-past tail path")
def test_speculative_tail_of_the_installed_release(tmp_path, biting):
    """transformers ≥ 5.25 runs the last ``recurrent_states_to_keep`` tokens of a call made while the
    cache records past states (speculative verification) through its one-token path. With the
    default limit that equals our prefill; with a biting limit it does not clamp there (the table's
    ``tail``), so it departs from the reference by the clamp alone."""
    for path, bites in ((save_hf_checkpoint("tiny-nemotron-h", tmp_path / "plain"), False), (biting[0], True)):
        hf = load_hf(path)
        ids = torch.randint(3, 256, (1, 24))
        draft = torch.randint(3, 256, (1, 5))
        with torch.no_grad():
            cache = hf(ids, use_cache=True).cache
            cache.activate_past_recording(recurrent_states_to_keep=3)
            theirs = hf(draft, cache=cache, use_cache=True, logits_to_keep=0)
            ours = load_model(path)
            mine = ours(draft, cache=ours(ids).cache, logits="all")
        gap = _gap(mine, theirs, ours.config.layer_types)
        assert (gap > 1e-3) if bites else (gap <= TOL), (path, gap)
