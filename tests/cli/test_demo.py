"""`hybridtrt demo` end to end (the README's main-job command)."""

from __future__ import annotations

import json

from hybridtrt.cli.main import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hybridtrt demo" in out and "PASS" in out and "polygraphy run" in out
    assert "PASS: per output: mean |Δ| ≤ gate" in out  # the preset's gates, not a fixed elementwise 1e-3
    report_page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Provenance</h2>" in report_page and "checkpoint sha256" in report_page
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and report["token_agreement"] == 1.0
    assert (tmp_path / "export" / "model.onnx").is_file() and (tmp_path / "export" / "hybridtrt.json").is_file()
    assert (tmp_path / "report" / "errors.png").stat().st_size > 20_000
    assert (tmp_path / "polygraphy" / "reference.json").is_file()
