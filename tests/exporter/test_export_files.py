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


def test_export_is_byte_identical(make_checkpoint, tmp_path, monkeypatch):
    """Two exports of one checkpoint. The suite's trace cache would replay the first one's finished
    graphs: the second only replays the trace (its determinism: tests/exporter/test_streaming.py,
    fresh traces against the loaded model's), and the optimizer, the graph passes, streaming and
    the manifest run again."""
    from hybridtrt.exporter import trace_cache

    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "a", FAST)
    monkeypatch.setattr(trace_cache, "load", lambda *a: None)
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
        export(make_checkpoint("tiny-mamba2"), tmp_path / "o", ExportOptions(dtype="fp16", split=False))
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


@pytest.mark.parametrize(("mode", "dtype"), [("full", "fp32"), ("full", "fp16"), ("layers", "fp16")])  # layer windows: one dtype
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


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(folder, output, files=("model.onnx",), **marker_fields):
    """A partial directory with this tool's marker (fields overridden), as a killed export leaves it."""
    import json

    from hybridtrt.exporter.target import MARKER_FILE, marker

    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"half written")
    (folder / MARKER_FILE).write_text(json.dumps({**marker(output.resolve()), **marker_fields}))
    return folder


def test_stale_partials_are_removed_and_old_artefacts_replaced(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("tiny-mamba2")
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(split=True, verify=False))
    assert (out / "decode.onnx").exists()
    pid = _dead_pid()
    _plant(out / ".partial-dead1234", out, pid=pid)
    result = export(ckpt, out, ExportOptions(split=False, verify=False))
    assert result.removed_partials == [f".partial-dead1234 (made by pid {pid}, which is no longer running)"]
    assert result.publish_note == "swap"
    assert sorted(p.name for p in out.iterdir()) == ["hybridtrt.json", "model.onnx", "weights.data"]
    assert not list(tmp_path.glob(".partial-*"))  # the swap's sibling is gone too


def test_only_marked_partials_of_dead_owners_are_removed(tmp_path):
    """Each ownership case, planted: removed only when marked and the owner is provably gone."""
    import os
    import time

    from hybridtrt.exporter.export import ARTEFACTS
    from hybridtrt.exporter.target import MARKER_FILE, OutputDir

    out = tmp_path / "out"
    old = time.time() - 8 * 86400
    gone = {
        "dead": _plant(out / ".partial-dead", out, pid=_dead_pid()),
        "reused": _plant(out / ".partial-reused", out, pid_start="1"),  # our pid, another start time
        "rebooted": _plant(out / ".partial-rebooted", out, boot_id="another-boot"),
        "far-old": _plant(out / ".partial-far-old", out, host="elsewhere.example", created=old),
        "beside": _plant(tmp_path / ".partial-beside", out, pid=_dead_pid()),  # a swap's sibling, naming out
    }
    os.utime(gone["far-old"], (old, old))
    os.utime(gone["far-old"] / "model.onnx", (old, old))
    os.utime(gone["far-old"] / MARKER_FILE, (old, old))
    kept = {
        "live": _plant(out / ".partial-live", out),  # this process: running
        "far-new": _plant(out / ".partial-far-new", out, host="elsewhere.example"),
    }
    untouched = [
        _plant(tmp_path / ".partial-other-output", tmp_path / "other", pid=_dead_pid()),  # beside, but another output's
        _plant(tmp_path / ".partial-mine", tmp_path / "x", files=("thesis.tex",), tool="not-hybridtrt"),
    ]
    (out / ".partial-empty").mkdir()  # killed between creating its partial and marking it: not in the way, not removed
    kept["empty"] = out / ".partial-empty"
    with OutputDir(out, ARTEFACTS, "hybridtrt.json") as t:
        pass
    removed, still = "\n".join(t.removed_partials), "\n".join(t.kept_partials)
    assert all(not p.exists() for p in gone.values()), removed
    assert all(p.exists() and (p / "model.onnx").exists() for n, p in kept.items() if n != "empty") and kept["empty"].is_dir()
    assert all(p.exists() for p in untouched)
    assert len(t.removed_partials) == len(gone) and len(t.kept_partials) == len(kept)
    for text in ("no longer running", "the pid is another process's now", "before this machine restarted", "on host elsewhere.example, untouched for 8 days", str(gone["beside"])):
        assert text in removed, (text, removed)
    assert "which is still running" in still and "it may still be running there" in still and "empty and unmarked" in still, still


@pytest.mark.parametrize(
    "plant",
    ["unmarked", "bad-json", "not-an-object", "other-tool", "symlink"],
)
def test_unmarked_partial_is_never_removed(plant, tmp_path):
    """A .partial-* folder without a valid marker of ours (a user's own, a forged marker, a link to a marked
    folder elsewhere) is refused as foreign without --force, and left untouched with it."""
    import hashlib
    import json

    from hybridtrt.exporter.export import ARTEFACTS
    from hybridtrt.exporter.target import MARKER_FILE, OutputDir

    out = tmp_path / "out"
    folder = out / ".partial-thesis"
    if plant == "symlink":
        real = _plant(tmp_path / "elsewhere", out, pid=_dead_pid())
        out.mkdir()
        folder.symlink_to(real, target_is_directory=True)
    else:
        folder.mkdir(parents=True)
        (folder / "thesis.tex").write_text("chapter 1")
        marker = {"bad-json": "{not json", "not-an-object": json.dumps([1, 2]), "other-tool": json.dumps({"tool": "other", "pid": 1, "host": "h", "created": 0})}
        if plant in marker:
            (folder / MARKER_FILE).write_text(marker[plant])
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.resolve().rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match="holds .partial-thesis\\); .partial-thesis carries no hybridtrt marker"):
        OutputDir(out, ARTEFACTS, "hybridtrt.json").__enter__()
    with OutputDir(out, ARTEFACTS, "hybridtrt.json", force=True) as t:
        pass
    assert t.removed_partials == [] and t.kept_partials == []
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.resolve().rglob("*") if p.is_file()} == before


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
    from hybridtrt.exporter.manifest import Manifest

    ckpt = make_checkpoint("tiny-mamba2")
    out = tmp_path / "out"
    export(ckpt, out, FAST)
    before = _digests(out)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "write_external_data", enospc)
    with pytest.raises(ExportError, match=f"disk full while writing weights.data and model.onnx into {out}: it needs [0-9.]+ KiB for it, about 8.[0-9] MiB for the whole export"):
        export(ckpt, out, FAST)
    assert _digests(out) == before
    monkeypatch.undo()
    monkeypatch.setattr(Manifest, "write", enospc)  # the last write: its size, not "0 B"
    size = len(read_manifest(out).to_json())
    with pytest.raises(ExportError, match=f"disk full while writing hybridtrt.json into {out}: it needs {size / 1024:.1f} KiB for it"):
        export(ckpt, out, FAST)
    assert _digests(out) == before
    monkeypatch.undo()
    real = shutil.disk_usage
    monkeypatch.setattr(target.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    monkeypatch.setattr(export_mod, "trace_streamed", lambda *a, **k: pytest.fail("traced before the disk check"))
    with pytest.raises(ExportError, match="not enough disk space in .*: the export needs 8.[0-9] MiB, 1000 B are free"):
        export(ckpt, out, FAST)
    assert _digests(out) == before


def test_memory_is_checked_before_tracing(make_checkpoint, tmp_path, monkeypatch):
    """A memory limit too small for the export is refused from the headers, before anything is traced or made."""
    from hybridtrt.exporter import preflight

    from hybridtrt.memory import Available

    monkeypatch.setattr(preflight, "available_memory", lambda: Available(64 << 20, "the cgroup's memory.max less its usage"))
    monkeypatch.setattr(export_mod, "trace_streamed", lambda *a, **k: pytest.fail("traced before the memory check"))
    with pytest.raises(ExportError, match="needs at least 2[0-9.]+ MiB of memory for tracing .* 64.0 MiB is available: the cgroup's memory.max") as e:
        export(make_checkpoint("tiny-mamba2"), tmp_path / "out", FAST)
    assert "raise the limit" in str(e.value)
    assert not (tmp_path / "out").exists()
    # a whole-graph verification larger than what is left: the fix names the cheaper verifications
    monkeypatch.setattr(preflight, "available_memory", lambda: Available(300 << 20, "MemAvailable"))
    with pytest.raises(ExportError, match="for verification \\(whole graph\\)") as e:
        preflight.check_memory(preflight.memory_bytes(1 << 30, 1 << 20, 4, "full"))
    assert "--verify layers" in str(e.value) and "--no-verify" in str(e.value)
