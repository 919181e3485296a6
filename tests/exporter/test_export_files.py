"""Determinism, atomic output, the output directory's rules and typed errors of the exporter (API
level; the same through the CLI in test_export_cli.py)."""

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
    """Tracing needs no PyTorch kernels (fake weights), the verifying reference does."""
    from hybridtrt.models.model import HybridLM

    def no_half(self, *a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(HybridLM, "forward", no_half)
    with pytest.raises(ExportError, match="fp16 is not supported by PyTorch on this machine"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "o", ExportOptions(dtype="fp16"))
    assert list((tmp_path / "o").iterdir()) == []


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


def _perturbed_chunks(monkeypatch, parameter: str, factor: float = 2.0, dtype: str = "<f4") -> None:
    """Write ``parameter`` scaled by ``factor`` (a wrong weights.data the verification must catch)."""
    import numpy as np

    from hybridtrt.exporter.streaming import Deferred

    original = Deferred.chunks

    def chunks(self, checkpoint):
        for part in original(self, checkpoint):
            yield (part.view(dtype) * np.dtype(dtype).type(factor)).view("u1") if self.parameter == parameter else part

    monkeypatch.setattr(Deferred, "chunks", chunks)


@pytest.mark.parametrize(("mode", "dtype"), [("full", "fp32"), ("layers", "fp32"), ("full", "fp16"), ("layers", "fp16")])
def test_verification_runs_before_publishing(make_checkpoint, tmp_path, monkeypatch, mode, dtype):
    """A wrong graph never gets hybridtrt.json, and a previous export stays as it was: fp32 with
    one weight doubled, fp16 with one weight 10% off (judged against the fp32 reference, the
    fp16 reference as the yardstick)."""
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "out", FAST)
    before = _digests(tmp_path / "out")
    if dtype == "fp32":
        _perturbed_chunks(monkeypatch, "layers.1.mixer.in_proj.weight")
    else:
        _perturbed_chunks(monkeypatch, "layers.1.mixer.in_proj.weight", 1.1, "<f2")
    with pytest.raises(ExportError, match=("layers 1..1 " if mode == "layers" else "") + f"disagrees with the fp32 reference beyond the {dtype} gate"):
        export(ckpt, tmp_path / "out", ExportOptions(dtype=dtype, verify_mode=mode))
    assert _digests(tmp_path / "out") == before
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_concurrent_export_is_refused(make_checkpoint, tmp_path):
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running export holds
    try:
        with pytest.raises(ExportError, match=f"another hybridtrt export is writing into {out}"):
            export(make_checkpoint("tiny-mamba2"), out, FAST)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []


def test_stale_partials_are_removed_and_old_artefacts_replaced(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("tiny-mamba2")
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(split=True, verify=False))
    assert (out / "decode.onnx").exists()
    (out / ".partial-dead1234").mkdir()
    (out / ".partial-dead1234" / "model.onnx").write_bytes(b"half written")
    result = export(ckpt, out, ExportOptions(split=False, verify=False))
    assert result.removed_partials == [".partial-dead1234"]
    assert sorted(p.name for p in out.iterdir()) == ["hybridtrt.json", "model.onnx", "weights.data"]


def test_foreign_or_checkpoint_directory_needs_force(make_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(make_checkpoint("tiny-mamba2"), ckpt)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ExportError, match="not empty and not a hybridtrt export \\(it holds cat.jpg\\)"):
        export(ckpt, foreign, FAST)
    with pytest.raises(ExportError, match="is the checkpoint directory itself"):
        export(ckpt, ckpt, FAST)
    before = _digests(ckpt)
    export(ckpt, ckpt, ExportOptions(verify=False, force=True))
    after = _digests(ckpt)
    assert {k: after[k] for k in before} == before  # the checkpoint's own files are untouched
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


def test_disk_full_is_a_typed_error(make_checkpoint, tmp_path, monkeypatch):
    import errno
    import shutil

    from hybridtrt.exporter import target

    ckpt = make_checkpoint("tiny-mamba2")
    out = tmp_path / "out"
    export(ckpt, out, FAST)
    before = _digests(out)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "write_external_data", enospc)
    with pytest.raises(ExportError, match=f"disk full while writing the export into {out}: it needs 4[0-9.]+ KiB"):
        export(ckpt, out, FAST)
    assert _digests(out) == before
    monkeypatch.undo()
    real = shutil.disk_usage
    monkeypatch.setattr(target.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ExportError, match="not enough disk space in .*: the export needs 4[0-9.]+ KiB, 1000 B are free"):
        export(ckpt, out, FAST)
    assert _digests(out) == before
