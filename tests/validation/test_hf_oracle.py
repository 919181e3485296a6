"""`validate --reference hf` can fail: our reference with a small systematic error, judged against
HF transformers with HF's own fp64 run as the yardstick, fails and names the tensor; the old
yardstick (our own fp64 run, which carries the same error) would have passed it."""

from __future__ import annotations

import pytest
import torch

import hybridtrt.validation.artefact as artefact
from hybridtrt.judge.metrics import compare
from hybridtrt.judge.tolerances import gate
from hybridtrt.judge.yardsticks import yardstick_for
from hybridtrt.models import load_model
from hybridtrt.validation.artefact import validate_artefact

pytest.importorskip("transformers", reason="HF transformers is the oracle judged against")


def _planted(monkeypatch, plant):
    """Make `validate_artefact` load our reference with ``plant(model)`` applied."""

    def load(checkpoint, dtype="fp32", **kwargs):
        model = load_model(checkpoint, dtype, **kwargs)
        with torch.no_grad():
            plant(model)
        return model

    monkeypatch.setattr(artefact, "load_model", load)


def _mamba(model, n: int = 0):
    return [b.mixer for b in model.layers if b.kind == "M"][n]


def test_the_yardstick_runs_the_truths_code():
    spec = yardstick_for("reference", "fp32")
    assert (spec.implementation, spec.dtype, spec.name) == ("hf", "fp64", "hf-fp64")
    assert yardstick_for("artefact", "fp32").implementation == "reference"
    assert yardstick_for("artefact", "bf16").dtype == "bf16"
    # FP8: the FP8 reference in the export's dtype; the recipe's cost: ideal scales, nothing calibrated.
    assert yardstick_for("artefact", "fp8", "bf16").name == "pytorch-fp8-bf16"
    assert yardstick_for("artefact", "fp8", "fp32").name == "pytorch-fp8-fp32-dithered"
    assert yardstick_for("artefact", "fp8-recipe").name == "pytorch-fp8-dynamic-fp32"


def test_an_exact_reference_passes(make_checkpoint):
    report = validate_artefact(None, make_checkpoint(), reference="hf", random_n=3, steps=6)
    assert report.passed, [(c.name, c.failures) for c in report.failures]
    assert (report.backend, report.reference, report.yardstick) == ("pytorch", "hf-transformers", "hf-fp64")
    assert report.token_gate == 1.0, "the HF yardstick agrees on every token here, so agreement is gated"
    assert any(c.name.startswith("present_ssm_state") for c in report.checks)


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda m: _mamba(m).dt_bias[0].add_(1e-3), "present_ssm_state.0"),  # one head's dt_bias, 1e-3
        (lambda m: setattr(_mamba(m, 1).norm, "eps", _mamba(m, 1).norm.eps * 10), "present"),  # gated-norm eps
        (lambda m: setattr(m.layers[0].norm, "eps", m.layers[0].norm.eps * 10), "present"),  # block-norm eps
    ],
    ids=["dt_bias+1e-3", "gated-norm-eps", "block-norm-eps"],
)
def test_a_small_systematic_error_of_the_reference_fails(make_checkpoint, monkeypatch, plant, named):
    _planted(monkeypatch, plant)
    report = validate_artefact(None, make_checkpoint(), reference="hf", random_n=3, steps=4)
    assert not report.passed
    assert any(c.name.startswith(named) for c in report.failures), [(c.name, c.failures) for c in report.failures]


def test_the_old_dt_rule_fails_where_the_old_yardstick_passed_it(make_checkpoint, monkeypatch):
    """The 5.3–5.14-style rule (dt clamped to time_step_min) planted in our reference on a checkpoint
    where that clamp bites. Judged with HF's fp64 run it fails; judged with our own fp64 run (the old
    yardstick, which clamps the same way) every tensor would have been within 4× of the yardstick."""
    ckpt = make_checkpoint(time_step_min=0.05)

    def old_rule(model):
        for block in model.layers:
            if block.kind == "M":
                block.mixer.dt_min = 0.05

    _planted(monkeypatch, old_rule)
    report = validate_artefact(None, ckpt, reference="hf", random_n=3, steps=4)
    assert not report.passed

    ours = load_model(ckpt)
    old_rule(ours)
    ours64 = load_model(ckpt).double()
    old_rule(ours64)
    from hybridtrt.validation.hf import load_hf

    hf = load_hf(ckpt)
    ids = torch.randint(3, 256, (2, 40))
    with torch.no_grad():
        got, truth, old_yard = ours(ids).logits, hf(ids).logits, ours64(ids).logits
    shared = compare(old_yard, truth)
    error = compare(got, truth)
    assert error.rel_l2 > gate("fp32", "call").max_rel_l2
    assert error.rel_l2 <= gate("fp32", "call").bound(shared), "the old yardstick carries the same error"


def test_rowwise_hf_equals_batched_hf(make_checkpoint):
    """The fp64 yardstick runs rows alone (HF fp64 turns left padding into NaN): in fp32, where HF
    handles padding, rows alone give the batch's logits and states at real positions."""
    from hybridtrt.validation.hf import HfStepper, RowwiseHfStepper, load_hf
    from hybridtrt.validation.runner import random_prompts, real_positions

    ckpt = make_checkpoint()
    hf = load_hf(ckpt)
    pattern = load_model(ckpt).config.pattern
    batched, rowwise = HfStepper(hf, pattern), RowwiseHfStepper(hf, pattern)
    ids, mask = random_prompts(3, 256, seed=3)
    a, sa = batched.step(ids, mask, batched.zero_state(3), False)
    b, sb = rowwise.step(ids, mask, rowwise.zero_state(3), False)
    token = a.argmax(-1)[:, None]
    mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    a, sa = batched.step(token, mask, sa, True)
    b, sb = rowwise.step(token, mask, sb, True)
    assert compare(b, a).rel_l2 <= 1e-5  # fp32 rounding of other shapes
    named_a, named_b = batched.named_states(sa), rowwise.named_states(sb)
    assert set(named_a) == set(named_b)
    for name, value in named_a.items():
        got, ref = real_positions(name, named_b[name], mask), real_positions(name, value, mask)
        assert compare(got, ref).rel_l2 <= 1e-5, name
