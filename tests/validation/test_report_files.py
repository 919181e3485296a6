"""Reports are published whole or not at all, say what bounded each tensor and where the numbers
come from; a full disk is a typed error that leaves the previous report as it was."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from hybridtrt.judge.metrics import compare
from hybridtrt.validation import report as report_module
from hybridtrt.validation.report import ReportWriteError, provenance, publish, write_report
from hybridtrt.validation.runner import Check, Report


def _report(scale: float = 1.0) -> Report:
    """A small report: prefill logits and one per-layer output (one over its bound when scale > 1)."""
    torch.manual_seed(0)
    ref = torch.randn(2, 64)
    r = Report("onnxruntime", "pytorch", "fp32", 2, [5, 3], 0, pattern="M*", yardstick="pytorch-fp64")
    for phase, name, layer, allowed in (("prefill", "logits", None, 1e-5), ("layer", "layer_output.1", 1, 4.2e-5)):
        got = ref * (1 + 1e-6) if scale == 1.0 else ref * scale
        c = compare(got, ref)
        fails = [] if c.rel_l2 <= allowed else [f"rel L2 {c.rel_l2:.2e} > {allowed:.2g}"]
        r.checks.append(Check(phase, name, c, fails, layer=layer, yardstick=compare(ref * (1 + 1e-7), ref), allowed=allowed))
    return r


ORIGIN = {"export": "/x/out (model.onnx sha256 ab12)", "checkpoint": "/x/ckpt", "checkpoint sha256": "cd34", "exported by": "hybridtrt 0.1.0", "validated by": "hybridtrt 0.1.0", "date": "2026-12-06T00:00:00+00:00"}


def test_report_shows_each_tensors_bound_and_the_provenance(tmp_path):
    paths = write_report(_report(), tmp_path / "rep", provenance=ORIGIN)
    page = paths["html"].read_text()
    assert "<th>allowed</th>" in page and "<td>4.20e-05</td>" in page and "<td>1.00e-05</td>" in page  # per-tensor bound
    assert "<th>yardstick</th>" in page and "pytorch-fp64" in page
    for key, value in ORIGIN.items():
        assert f"<th>{key}</th><td>{value}</td>" in page
    record = json.loads(paths["json"].read_text())
    assert record["provenance"] == ORIGIN and [c["allowed"] for c in record["checks"]] == [1e-5, 4.2e-5]
    assert not list((tmp_path / "rep").glob(".tmp-*"))


def test_provenance_of_an_export(make_export):
    ckpt, out = make_export("tiny-nemotron-h")
    manifest = json.loads((out / "hybridtrt.json").read_text())
    p = provenance(out)
    assert p["checkpoint sha256"] == manifest["source"]["sha256"] and p["checkpoint"] == str(ckpt)
    assert str(out.resolve()) in p["export"] and manifest["files"]["model.onnx"]["sha256"] in p["export"]
    assert p["validated by"].startswith("hybridtrt ") and p["date"].endswith("+00:00")


def test_full_disk_is_a_typed_error_and_the_previous_report_stays(tmp_path, monkeypatch):
    """ENOSPC halfway through the last file (report.html, after report.json and errors.png were
    written): nothing is replaced, no temporary file is left, and the error says how much is needed."""
    out = tmp_path / "rep"
    write_report(_report(), out, provenance=ORIGIN)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = report_module._write

    def full_disk(path, data):
        if path.name.endswith("report.html"):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(report_module, "_write", full_disk)
    with pytest.raises(ReportWriteError, match=r"no space left on the device writing .*report\.html \(the report needs [\d.]+ KiB\)") as e:
        write_report(_report(scale=1.5), out, provenance=ORIGIN)
    assert e.value.fix and "elsewhere" in e.value.fix and e.value.exit_code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous report, byte for byte


def test_publish_renames_only_after_every_file_is_written(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old a")
    monkeypatch.setattr(report_module, "_write", lambda path, data: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")) if path.name.endswith("b.json") else path.write_bytes(data))
    with pytest.raises(ReportWriteError, match="no space left"):
        publish({a: b"new a", b: b"new b"})
    assert a.read_text() == "old a" and not b.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
