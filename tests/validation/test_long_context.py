"""`hybridtrt validate --context N`: the drift curve of logits and SSM states against position."""

from __future__ import annotations

import json
import shutil

import pytest

from hybridtrt.cli.main import main
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.validation.long_context import validate_context
from tests.validation.faults import perturb_weight
from tests.static_capacity import CAPACITY

STATIC = ExportOptions(kv_cache="static", max_cache_len=CAPACITY)


@pytest.mark.parametrize("options", [ExportOptions(), STATIC], ids=["dynamic", "static"])
def test_fp32_export_stays_within_gates_at_every_position(make_export, options):
    _, out = make_export("tiny-nemotron-h", options)
    report = validate_context(out, context=150, prefill_chunk=32)
    assert report.passed, [p.failures for p in report.points if p.failures]
    assert [p.position for p in report.points] == [30, 60, 90, 120, 150]  # balanced chunks
    assert set(report.points[0].states) == {f"present_ssm_state.{i}" for i in (0, 2, 4, 7)}
    assert report.precision == "fp32" and report.state_dtype == "fp32"


def test_half_state_curve_is_measured_against_the_fp32_reference(make_export):
    _, out = make_export("tiny-mamba2", ExportOptions(state_dtype="fp16"))
    report = validate_context(out, context=96, prefill_chunk=32)
    worst = [max(c.rel_l2 for c in p.states.values()) for p in report.points]
    assert report.precision == "fp16" and all(1e-6 < w < 1e-2 for w in worst), worst  # fp16 rounding, visible
    assert report.passed  # cosine gate of half-precision states


def test_cli_context_report_and_planted_fault(make_export, tmp_path, capsys):
    _, out = make_export("tiny-nemotron-h")
    rc = main(["validate", str(out), "--context", "64", "--prefill-chunk", "32", "--report", str(tmp_path / "r"), "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "drift.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    faulty = shutil.copytree(out, tmp_path / "faulty")
    perturb_weight(faulty, "model.layers.4.mixer.in_proj.weight_t", 1.01)
    rc = main(["validate", str(faulty), "--context", "64", "--prefill-chunk", "32"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out
