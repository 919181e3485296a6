"""fp16 exports validate at batch ≥ 2 with left padding (the reliability issue's fp16 failure)."""

from __future__ import annotations

from hybridtrt.exporter.export import ExportOptions
from hybridtrt.validation.artefact import validate_artefact


def test_fp16_export_passes_validation_on_a_left_padded_batch(make_export):
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16"))
    report = validate_artefact(out, ckpt, random_n=4, steps=4, seed=0)
    assert report.batch == 4 and len(set(report.prompt_lengths)) > 1  # really left-padded
    states = [c for c in report.checks if c.name.startswith("present")]
    assert states and all(c.passed for c in states), [(c.name, c.comparison.cosine) for c in states if not c.passed]
    assert report.passed
