"""Determinism, atomic output and typed errors of the exporter."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from hybridtrt.errors import CheckpointError, ConfigError, ExportError
from hybridtrt.exporter import export as export_mod
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest

FAST = ExportOptions(verify=False)


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_export_is_byte_identical(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "a", FAST)
    export(ckpt, tmp_path / "b", FAST)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert set(a) == {"model.onnx", "decode.onnx", "weights.data", MANIFEST_FILE}  # decode.onnx by default, sharing weights.data
    assert a == b


def test_failed_export_leaves_nothing_complete(make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint("tiny-mamba2")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "_fix_permissions", boom)  # after the graph and weights are written
    with pytest.raises(RuntimeError, match="simulated"):
        export(ckpt, tmp_path / "out", FAST)
    assert list((tmp_path / "out").iterdir()) == []  # no model, no manifest, no partial dir


def test_failed_reexport_keeps_previous_complete_export(make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "out", FAST)
    before = _digests(tmp_path / "out")
    monkeypatch.setattr(export_mod, "_fix_permissions", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    with pytest.raises(RuntimeError):
        export(ckpt, tmp_path / "out", FAST)
    assert _digests(tmp_path / "out") == before
    read_manifest(tmp_path / "out")


def test_unwritable_output_dir(make_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="not writable"):
        export(make_checkpoint("tiny-mamba2"), blocker / "sub", FAST)


def test_dtype_pytorch_cannot_run_here(make_checkpoint, tmp_path, monkeypatch):
    from hybridtrt.models.model import HybridLM

    def no_half(self, *a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(HybridLM, "forward", no_half)
    with pytest.raises(ExportError, match="fp16 is not supported by PyTorch on this machine"):
        export(make_checkpoint("tiny-mamba2"), tmp_path / "o", ExportOptions(dtype="fp16", verify=False))


def test_bad_opset(make_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export(make_checkpoint("tiny-mamba2"), tmp_path / "o", ExportOptions(opset=13))


def test_refused_checkpoints(make_checkpoint, tmp_path):
    import json
    import shutil

    bad = tmp_path / "moe"
    shutil.copytree(make_checkpoint(), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "M*E-M*-M"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_routed_experts"):  # E layers without the MoE fields
        export(bad, tmp_path / "o", FAST)
    assert not (tmp_path / "o" / MANIFEST_FILE).exists()
    with pytest.raises(CheckpointError):
        export(tmp_path / "missing", tmp_path / "o2", FAST)


def test_cli_error_has_no_traceback(make_checkpoint, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(make_checkpoint(), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "MXM"
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "hybridtrt.cli.main", "export", str(bad), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "[config]" in proc.stderr and "'X'" in proc.stderr and "fix:" in proc.stderr
