"""`hybridtrt export --quantize fp8` then `hybridtrt validate` with the FP8 gates, end to end."""

from __future__ import annotations

import json
import shutil

import onnx

from hybridtrt.cli.main import main
from hybridtrt.exporter.manifest import read_manifest
from tests.validation.faults import scale_initializers


def _scale_activation_quantizer(export_dir, factor: float) -> None:
    """Plant a bad scale: every activation QuantizeLinear scale multiplied by ``factor``."""
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    scale_initializers(export_dir, {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}, factor)


def test_fp8_export_validates_and_bad_scale_fails(make_checkpoint, tmp_path, capsys):
    # Trained-like weight scale (initializer_range 0.05): see docs/fp8.md for why 0.3 cannot pass.
    ckpt = make_checkpoint("tiny-nemotron-h", initializer_range=0.05)
    out = tmp_path / "fp8"
    assert main(["export", str(ckpt), "-o", str(out), "--quantize", "fp8", "--calib-random", "16", "--split"]) == 0
    manifest = read_manifest(out)
    assert manifest.quantization["scheme"] == "fp8"
    assert manifest.quantization["calibration"]["hash"].startswith("sha256:")
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == len(manifest.quantization["quantized"])

    assert main(["validate", str(out), "--random", "8", "--steps", "4", "--json", str(tmp_path / "ok.json")]) == 0
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["precision"] == "fp8" and report["passed"] and report["reference"] == "pytorch-fp8"
    assert report["yardstick"] == "pytorch-fp8-fp32-dithered"  # an fp32 export (the preset's dtype)
    assert all(c["rel_l2"] <= c["allowed"] for c in report["checks"])
    prefill = next(c for c in report["checks"] if c["phase"] == "prefill" and c["name"] == "logits")
    assert prefill["rel_l2"] < 1e-5 and prefill["top1"] is not None  # the FP8 reference, computed by ONNX Runtime
    quality = next(c for c in report["quality"]["checks"] if c["phase"] == "prefill" and c["name"] == "logits")
    assert quality["cosine"] >= 0.99 and report["quality"]["passed"]  # the recipe's cost at a trained-like scale

    bad = shutil.copytree(out, tmp_path / "bad")
    _scale_activation_quantizer(bad, 1e-3)
    assert main(["validate", str(bad), "--random", "3", "--steps", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_fp8_flags_need_quantize(make_checkpoint, tmp_path, capsys):
    assert main(["export", str(make_checkpoint()), "-o", str(tmp_path / "o"), "--calib-random", "4"]) == 2
    assert "--quantize fp8" in capsys.readouterr().err
