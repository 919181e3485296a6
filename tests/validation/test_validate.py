"""`hybridtrt validate`: passes on correct exports, fails on planted faults and names where."""

from __future__ import annotations

import json
import shutil

import pytest

from hybridtrt.cli.main import main
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.validation.artefact import validate_artefact
from tests.validation.faults import nan_output, perturb_weight, rename_layer_nodes, scale_initializers, swap_outputs

#: Per-layer outputs in the unified graph; decode steps run on it too (decode.onnx is validated with the
#: default exports: tests/validation/test_architectures.py, test_moe_routing.py), one trace instead of two.
PER_LAYER = ExportOptions(per_layer=True, verify=False, split=False)


#: Nano-v2's per-head sizes (head_dim 80, d_state 128, G 8) are validated on their own structure in bf16
#: (tests/validation/test_architectures.py) and against HF in fp32 (tests/models/test_hf_parity.py).
@pytest.mark.parametrize(("preset", "overrides"), [("tiny-nemotron-h", {}), ("tiny-mamba2", {})])
def test_validate_passes_on_fp32_exports(make_export, preset, overrides):
    _, out = make_export(preset, PER_LAYER, **overrides)
    report = validate_artefact(out, random_n=3, steps=4, per_layer=True)
    assert report.passed, [(c.name, c.failures) for c in report.failures]
    assert report.token_agreement == 1.0
    assert report.first_divergence is None
    assert {c.phase for c in report.checks} == {"prefill", "layer", "decode"}


@pytest.fixture
def faulty(make_export, tmp_path):
    _, out = make_export("tiny-nemotron-h", PER_LAYER)
    return shutil.copytree(out, tmp_path / "faulty")


def test_perturbed_weight_names_its_layer(faulty):
    perturb_weight(faulty, "model.layers.4.mixer.in_proj.weight_t", 1.5)
    report = validate_artefact(faulty, random_n=2, steps=2, per_layer=True)
    assert not report.passed
    assert report.first_divergence["layer"] == 4
    assert all(c.passed for c in report.checks if c.phase == "layer" and c.layer < 4)


def test_swapped_state_outputs_are_caught(faulty):
    swap_outputs(faulty, "present_ssm_state.2", "present_ssm_state.4")
    report = validate_artefact(faulty, random_n=2, steps=2, per_layer=True)
    assert not report.passed
    assert report.first_divergence == {"layer": 2, "tensor": "present_ssm_state.2", "why": report.first_divergence["why"], "step": None}


# -- per layer on any export: layer outputs located by node name, not exported -------------------


def _first_divergence_is(report, layer: int) -> None:
    assert not report.passed
    assert report.first_divergence["layer"] == layer, report.first_divergence
    earlier = [c for c in report.checks if c.phase == "layer" and c.layer < layer]
    assert earlier and all(c.passed for c in earlier)
    names = {c.name for c in report.checks if c.phase == "layer" and c.layer == layer}
    assert f"layer_output.{layer}" in names  # the layer's output was compared, not only its states


@pytest.mark.parametrize(
    ("layer", "weight", "kind"),
    [(1, "o_proj", "attention"), (4, "out_proj", "mamba"), (6, "down_proj", "mlp"), (7, "in_proj", "last mamba")],
)
def test_planted_fault_in_a_plain_export_names_its_layer_first(make_export, tmp_path, layer, weight, kind):
    _, out = make_export("tiny-nemotron-h")  # exported without --per-layer
    bad = shutil.copytree(out, tmp_path / "bad")
    perturb_weight(bad, f"model.layers.{layer}.mixer.{weight}.weight_t", 1.5)
    _first_divergence_is(validate_artefact(bad, random_n=2, steps=1, per_layer=True), layer)


def test_per_layer_on_a_plain_export_equals_the_per_layer_export(make_export):
    _, plain = make_export("tiny-nemotron-h")
    _, exported = make_export("tiny-nemotron-h", PER_LAYER)
    a = validate_artefact(plain, random_n=2, steps=1, per_layer=True)
    b = validate_artefact(exported, random_n=2, steps=1, per_layer=True)
    assert a.passed and b.passed and not a.notes
    layer_a = {c.name: c.comparison.rel_l2 for c in a.checks if c.phase == "layer"}
    layer_b = {c.name: c.comparison.rel_l2 for c in b.checks if c.phase == "layer"}
    assert layer_a.keys() == layer_b.keys() and len([n for n in layer_a if n.startswith("layer_output.")]) == 8
    # Same graph, same inputs: the located tensors are the exported ones (up to ORT scheduling).
    assert all(abs(layer_a[n] - layer_b[n]) < 1e-6 for n in layer_a)


@pytest.mark.parametrize(("layer", "weight"), [(2, "in_proj"), (5, "o_proj")])
def test_planted_fault_in_an_fp8_export_names_its_layer_first(fp8_export, tmp_path, layer, weight):
    _, out = fp8_export
    bad = shutil.copytree(out, tmp_path / "bad")
    scale_initializers(bad, {f"model.layers.{layer}.mixer.{weight}.weight_scale"}, 3.0)
    report = validate_artefact(bad, random_n=4, steps=1, per_layer=True)
    assert report.precision == "fp8"
    _first_divergence_is(report, layer)


def test_planted_fault_in_an_fp16_export_names_its_layer_first(make_export, tmp_path):
    _, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16", verify=False))
    clean = validate_artefact(out, random_n=1, steps=1, per_layer=True)
    assert clean.passed and clean.first_divergence is None
    bad = shutil.copytree(out, tmp_path / "bad")
    perturb_weight(bad, "model.layers.4.mixer.out_proj.weight_t", 1.5)
    _first_divergence_is(validate_artefact(bad, random_n=1, steps=1, per_layer=True), 4)


def test_a_layer_that_cannot_be_located_falls_back_to_its_states(make_export, tmp_path):
    _, out = make_export("tiny-nemotron-h")
    bad = shutil.copytree(out, tmp_path / "renamed")
    rename_layer_nodes(bad, 2, "/fused")
    clean = validate_artefact(bad, random_n=2, steps=1, per_layer=True)
    assert clean.passed
    assert any("layer_output.2: not located" in n and "/model/layers.2/" in n for n in clean.notes)
    names = {c.name for c in clean.checks if c.phase == "layer"}
    assert "layer_output.2" not in names and {"present_conv_state.2", "present_ssm_state.2", "layer_output.1", "layer_output.3"} <= names
    # A fault in that layer is still found, by its states.
    perturb_weight(bad, "model.layers.2.mixer.in_proj.weight_t", 1.5)
    report = validate_artefact(bad, random_n=2, steps=1, per_layer=True)
    assert report.first_divergence["layer"] == 2 and report.first_divergence["tensor"].startswith("present_")


def test_nan_state_fails_first_as_non_finite(faulty, tmp_path, capsys):
    nan_output(faulty, "present_conv_state.7")
    code = main(["validate", str(faulty), "--random", "2", "--steps", "2", "--per-layer", "--json", str(tmp_path / "r.json")])
    assert code == 1
    out = capsys.readouterr().out
    assert "first divergence: layer 7" in out and "present_conv_state.7" in out and "FAIL" in out
    data = json.loads((tmp_path / "r.json").read_text())
    bad = [c for c in data["checks"] if not c["passed"]]
    assert all(c["failures"] == ["non-finite values (NaN/Inf)"] for c in bad)
    # In the prefill only the planted state is wrong; decode steps then feed the NaN back.
    assert {c["name"] for c in bad if c["phase"] == "prefill"} == {"present_conv_state.7"}


def test_cli_report_writes_png_html_json(make_export, tmp_path):
    _, out = make_export("tiny-nemotron-h", PER_LAYER)
    code = main(["validate", str(out), "--random", "2", "--steps", "3", "--per-layer", "--report", str(tmp_path / "rep")])
    assert code == 0
    png = (tmp_path / "rep" / "errors.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64," in page and "PASS" in page
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["passed"] is True


def test_reference_against_hf(make_checkpoint):
    pytest.importorskip("transformers")
    report = validate_artefact(None, make_checkpoint(), reference="hf", random_n=3, steps=6)
    assert report.passed, [(c.name, c.failures) for c in report.failures]
    assert report.backend == "pytorch" and report.reference == "hf-transformers"
    assert any(c.name.startswith("present_ssm_state") for c in report.checks)


def test_prompts_file_uses_the_checkpoint_tokenizer(make_export, tmp_path):
    ckpt, out = make_export("tiny-nemotron-h", PER_LAYER)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nMamba layers carry state.\nhi\n")
    report = validate_artefact(out, prompts=prompts, steps=4)
    assert report.passed
    from hybridtrt.models.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    assert report.prompt_lengths == [len(tok.encode(p).ids) for p in ("The capital of France is", "Mamba layers carry state.", "hi")]


@pytest.mark.parametrize("preset", ["tiny-nemotron-h", "tiny-nemotron3-moe"])
def test_prefill_with_layers_is_the_prefill_and_the_layer_run(make_checkpoint, preset):
    """A PyTorch subject gives its per-layer outputs from the prefill's own pass (one prefill, not
    two, per subject in `validate --per-layer`): the same logits, states and layer outputs, bit for
    bit, as the plain prefill and the separate layer run; routing recorded alike."""
    import torch

    from hybridtrt.models import load_model
    from hybridtrt.models.moe import RoutingHold
    from hybridtrt.validation.runner import random_prompts
    from hybridtrt.validation.subjects import torch_subject

    model = load_model(make_checkpoint(preset))
    subject = torch_subject(model)
    ids, mask = random_prompts(3, model.config.vocab_size, seed=2, min_len=4, max_len=9)
    holds = [RoutingHold(), RoutingHold()]
    with subject.hold(holds[0]):
        logits, state, layers = subject.prefill_with_layers(ids, mask, subject.stepper.zero_state(3))
    with subject.hold(holds[1]):
        want_logits, want_state = subject.stepper.step(ids, mask, subject.stepper.zero_state(3), False)
    want_layers = subject.layer_outputs(ids, mask)
    assert torch.equal(logits, want_logits) and layers.keys() == want_layers.keys()
    assert all(torch.equal(layers[k], v) for k, v in want_layers.items())
    named, want_named = subject.named_states(state), subject.named_states(want_state)
    assert all(torch.equal(named[k], v) for k, v in want_named.items())
    assert holds[0].all_ids().keys() == holds[1].all_ids().keys() and all(torch.equal(holds[0].all_ids()[k], v) for k, v in holds[1].all_ids().items())


def test_fp64_yardstick_decodes_at_once_with_the_same_numbers(make_export, monkeypatch):
    """The fp64 yardstick runs the teacher-forced decode steps in one call (`decode_at_once`): its
    distance from the reference on every checked tensor is the one it has step by step (to 1e-6 of
    itself: fp64 paths differ by ~1e-15, the fp32 rounding it measures is ~1e-7), and the verdicts,
    bounds and routing tallies are the same. A planted fault is still caught: the fault tests above
    run with it."""
    from hybridtrt.validation import subjects

    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(split=True))  # Mamba and attention layers
    at_once = validate_artefact(out, ckpt, random_n=3, steps=5, per_layer=True)
    plain = subjects.torch_subject

    def stepwise(*args, **kwargs):
        subject = plain(*args, **kwargs)
        subject.decode_at_once = None
        return subject

    monkeypatch.setattr(subjects, "torch_subject", stepwise)
    monkeypatch.setattr("hybridtrt.validation.artefact.torch_subject", stepwise)
    step_by_step = validate_artefact(out, ckpt, random_n=3, steps=5, per_layer=True)
    assert at_once.yardstick == step_by_step.yardstick == "pytorch-fp64"
    assert [(c.phase, c.name, c.step, c.passed) for c in at_once.checks] == [(c.phase, c.name, c.step, c.passed) for c in step_by_step.checks]
    for a, b in zip(at_once.checks, step_by_step.checks):
        assert a.yardstick is not None and a.yardstick.rel_l2 == pytest.approx(b.yardstick.rel_l2, rel=1e-6, abs=1e-12), (a.phase, a.name, a.step)
    assert at_once.yardstick_top1 == step_by_step.yardstick_top1


def test_an_moe_yardstick_decodes_step_by_step(make_checkpoint):
    """Not at once with MoE layers: their router scores in fp32, which the path changes."""
    import torch

    from hybridtrt.models import load_model
    from hybridtrt.validation.subjects import torch_subject

    assert torch_subject(load_model(make_checkpoint("tiny-nemotron3-moe")).double(), torch.float64).decode_at_once is None
    assert torch_subject(load_model(make_checkpoint("tiny-nemotron-h")).double(), torch.float64).decode_at_once is not None
    assert torch_subject(load_model(make_checkpoint("tiny-nemotron-h"))).decode_at_once is None  # fp32: the path rounds
