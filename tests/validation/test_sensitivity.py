"""FP8 sensitivity per quantized linear layer: ranking, the rebuild reproducing the export exactly,
a deliberately mis-scaled layer ranked first, and printed ``--exclude`` flags that, passed to a real
re-export, reach the target cosine that was measured."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil

import onnx
import pytest
from onnx import numpy_helper

from hybridtrt.cli.main import main
from hybridtrt.errors import InputError
from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
from hybridtrt.validation.artefact import validate_artefact
from hybridtrt.validation.sensitivity import describe_node, exclude_pattern, smallest_exclusion
from tests.validation.faults import scale_initializers

MIS_SCALED = "/model/layers.6/mixer/down_proj/MatMul"


@pytest.fixture(scope="module")
def measured(fp8_export, tmp_path_factory):
    """``(export_dir, report JSON, report dir, printed text)`` of one CLI run with --sensitivity."""
    _, out = fp8_export
    rep = tmp_path_factory.mktemp("sensitivity_report")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["validate", str(out), "--random", "8", "--steps", "1", "--sensitivity", "--target-cosine", "0.999", "--report", str(rep)])
    assert code == 0
    return out, json.loads((rep / "report.json").read_text()), rep, printed.getvalue()


def test_every_quantized_layer_is_measured_and_ranked(measured):
    out, report, _, _ = measured
    sens = report["extras"]["sensitivity"]
    recipe = read_manifest(out).quantization
    layers = sens["layers"]
    assert sorted(s["node"] for s in layers) == sorted(recipe["quantized"]) and len(layers) == 20
    errors = [s["one_minus_cosine"] for s in layers]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    assert {(s["kind"], s["projection"]) for s in layers} >= {("mamba", "in_proj"), ("attention", "q_proj"), ("mlp", "down_proj")}
    assert {r["kind"] for r in sens["by_kind"]} == {"mamba", "attention", "mlp"}
    # The rebuild from the checkpoint and the recorded recipe is the export itself, bit for bit.
    assert sens["export_max_abs"] == 0.0
    assert sens["none"]["cosine"] > 0.999999 and sens["full"]["cosine"] < sens["none"]["cosine"]
    # Same prompts, same recipe: the FP8 reference's cost (validate's recipe judgement) is the
    # rebuilt graph's, to fp32 rounding (the artefact computes the FP8 reference to ~1e-7).
    prefill = next(c for c in report["quality"]["checks"] if c["phase"] == "prefill" and c["name"] == "logits")
    assert prefill["cosine"] == pytest.approx(sens["full"]["cosine"], abs=1e-6)


def test_exclusions_are_the_most_sensitive_and_reach_the_target(measured):
    _, report, _, _ = measured
    sens = report["extras"]["sensitivity"]
    assert sens["full"]["cosine"] < 0.999 <= sens["reached"]["cosine"]
    assert sens["exclude"] == [s["node"] for s in sens["layers"][: len(sens["exclude"])]]
    assert sens["flags"] == [a for node in sens["exclude"] for a in ("--exclude", exclude_pattern(node))]


def test_printed_flags_reach_the_target_on_a_real_re_export(fp8_export, measured, tmp_path):
    ckpt, _ = fp8_export
    _, report, _, _ = measured
    sens = report["extras"]["sensitivity"]
    argv = shlex.split(sens["command"])
    assert argv[:3] == ["hybridtrt", "export", str(ckpt)] and "--calib-random" in argv
    out = tmp_path / "excluded"
    argv[argv.index("-o") + 1] = str(out)
    assert main([*argv[1:], "--no-verify"]) == 0
    excluded = read_manifest(out).quantization["excluded"]
    assert all(excluded[node].startswith("matches --exclude") for node in sens["exclude"])
    again = validate_artefact(out, random_n=8, steps=0)
    prefill = next(c for c in again.quality.checks if c.phase == "prefill" and c.name == "logits").comparison
    assert prefill.cosine == pytest.approx(sens["reached"]["cosine"], abs=1e-6) and prefill.cosine >= 0.999


def test_the_table_flags_and_report(measured):
    _, report, rep, text = measured
    assert "FP8 sensitivity" in text and "by kind" in text and "hybridtrt export" in text
    assert f"excluding the {len(report['extras']['sensitivity']['exclude'])} most sensitive" in text
    png = (rep / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = (rep / "report.html").read_text()
    assert "FP8 sensitivity" in page and page.count("data:image/png;base64,") == 2 and "--exclude" in page


def test_a_mis_scaled_layer_is_ranked_first(fp8_export, measured, tmp_path):
    """Layer 6's down_proj activation scale 50x too fine (its large relu² activations saturate at
    ±448), in the graph and in the recorded recipe alike, as a broken calibration would leave it."""
    _, report, _, _ = measured
    rank = [s["node"] for s in report["extras"]["sensitivity"]["layers"]].index(MIS_SCALED)
    assert rank >= 5  # unplanted, it is far from the top
    _, out = fp8_export
    bad = shutil.copytree(out, tmp_path / "bad")
    scale_initializers(bad, {"model.layers.6.mixer.down_proj.input_scale"}, 0.02)
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    # the record holds exactly the planted fp32 value (x64 * 0.02 may round to another fp32)
    planted = next(t for t in onnx.load(str(bad / "model.onnx")).graph.initializer if t.name == "model.layers.6.mixer.down_proj.input_scale")
    manifest["quantization"]["activation_scales"][MIS_SCALED] = float(numpy_helper.to_array(planted))
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    sens = validate_artefact(bad, random_n=8, steps=0, sensitivity=True).extras["sensitivity"]
    assert sens.layers[0].node == MIS_SCALED, [(s.label, s.error) for s in sens.layers[:3]]
    assert sens.export_max_abs == 0.0  # the mis-scaled record is what the graph holds
    assert sens.exclude[:1] == [MIS_SCALED]


def test_exclusion_search_is_the_smallest_measured_prefix():
    calls = []

    def reaches(threshold):
        def f(k):
            calls.append(k)
            return k >= threshold

        return f

    assert smallest_exclusion(20, reaches(0)) == 0
    assert smallest_exclusion(20, reaches(7)) == 7 and len(calls) <= 2 + 20 .bit_length() + 1
    assert smallest_exclusion(20, reaches(20)) == 20
    assert smallest_exclusion(20, reaches(21)) is None  # out of reach even with nothing quantized


def test_needs_a_quantized_export_and_says_so_before_loading(make_export, capsys):
    _, out = make_export("tiny-nemotron-h")
    with pytest.raises(InputError, match="needs an FP8 or INT4 export"):
        validate_artefact(out, sensitivity=True)
    assert main(["validate", str(out), "--sensitivity"]) == 2
    assert "--quantize fp8" in capsys.readouterr().err


def test_quantized_nodes_without_a_recorded_scale_are_refused(fp8_export):
    """MoE routed experts keep per-expert scales elsewhere in the recipe: refused, not guessed."""
    from hybridtrt.validation.sensitivity import check_recipe

    _, out = fp8_export
    manifest = read_manifest(out)
    assert check_recipe(manifest, out) == manifest.quantization["quantized"]
    manifest.quantization["quantized"].append("/model/layers.3/mixer/experts/MoeExpertsFp8")
    with pytest.raises(InputError, match="MoeExpertsFp8") as e:
        check_recipe(manifest, out)
    assert "--exclude 'experts/'" in str(e.value)


def test_node_names_map_to_layer_kind_and_projection():
    kinds = ["mamba", "attention", "mamba", "mlp", "moe"]
    assert describe_node("/model/layers.1/mixer/q_proj/MatMul", kinds) == (1, "attention", "q_proj")
    assert describe_node("/model/layers.4/mixer/experts.3/up_proj/MatMul", kinds) == (4, "moe", "experts.3/up_proj")
    assert describe_node("/model/MatMul", kinds) == (None, "other", "/model/MatMul")
    pattern = exclude_pattern("/model/layers.4/mixer/out_proj/MatMul")
    names = ["/model/layers.4/mixer/out_proj/MatMul", "/model/layers.41/mixer/out_proj/MatMul", "/model/layers.4/mixer/in_proj/MatMul"]
    assert [bool(re.search(pattern, n)) for n in names] == [True, False, False]
