"""`hybridtrt preset tiny-nemotron3-moe` and `hybridtrt demo --preset tiny-nemotron3-moe`: the MoE
preset end to end (export, per-layer validation with routing held and gated, polygraphy --onnxrt)."""

from __future__ import annotations

import json

from hybridtrt.cli.main import main


def test_moe_preset_and_demo(tmp_path, capsys):
    assert main(["preset", "tiny-nemotron3-moe", "-o", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "top-6 of 16" in capsys.readouterr().out
    assert main(["demo", "--preset", "tiny-nemotron3-moe", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "3 MoeExperts" in out and "MoE routing" in out and "PASS" in out
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["passed"] and report["routing_agreement"] == {"1": 1.0, "3": 1.0, "6": 1.0}
    moe_layers = {c["layer"] for c in report["checks"] if c["phase"] == "layer" and c["name"].startswith("layer_output.")}
    assert {1, 3, 6} <= moe_layers  # the MoE layers are in the per-layer report
