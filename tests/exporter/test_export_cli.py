"""Bad inputs to ``hybridtrt export`` through the real CLI in a subprocess (issue 10): exit code 2,
the stage and the offending value in the message, no traceback, and the output directory absent,
empty, or the previous export untouched (sha256)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hybridtrt.exporter.export import ExportOptions

PREVIOUS = ExportOptions(verify=False)

#: Python run in the child before the CLI, to simulate what a test cannot cause for real.
_PATCHES = {
    "enospc": (
        "import errno, hybridtrt.exporter.export as e\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "e.write_external_data = full\n"
    ),
    "kill-in-verify": (
        "import os, signal, hybridtrt.exporter.export as e\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.verify_export = die\n"
    ),
}


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _cli(args: list[str], patch: str | None = None) -> subprocess.CompletedProcess:
    code = (_PATCHES[patch] if patch else "") + "import sys\nfrom hybridtrt.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, "export", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def previous(make_export):
    """A complete export to pre-populate output directories with."""
    return make_export("tiny-mamba2", PREVIOUS)


def _copy_ckpt(make_checkpoint, tmp_path, edit=None) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("tiny-mamba2"), ckpt)
    if edit:
        edit(ckpt)
    return ckpt


def _nan_in_in_proj(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["backbone.layers.1.mixer.in_proj.weight"][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")


def _bad_index(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _pattern_too_long(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_008
    (ckpt / "config.json").write_text(json.dumps(cfg))


#: id -> (checkpoint edit, extra CLI args, output dir: "absent" | "empty" | "previous" | "foreign"
#: | "checkpoint", child patch, stage, offending text)
CASES = {
    "fp8-without-calibration": (None, ["--quantize", "fp8"], "absent", None, "[quantize]", "--calib PROMPTS.txt"),
    "verify-and-no-verify": (None, ["--verify", "full", "--no-verify"], "absent", None, "[input]", "--verify full and --no-verify"),
    "foreign-directory": (None, [], "foreign", None, "[export]", "holds notes.txt"),
    "checkpoint-directory": (None, [], "checkpoint", None, "[export]", "is the checkpoint directory itself"),
    "malformed-index": (_bad_index, [], "absent", None, "[checkpoint]", "'weight_map' must map tensor names to shard file names (found list)"),
    "pattern-longer-than-weights": (_pattern_too_long, [], "absent", None, "[checkpoint]", "describes 100,008 decoder layers"),
    "nan-weight": (_nan_in_in_proj, ["--no-verify"], "previous", None, "[checkpoint]", "backbone.layers.1.mixer.in_proj.weight has 1 NaN/Inf"),
    "disk-full": (None, ["--no-verify"], "previous", "enospc", "[export]", "disk full while writing the export into"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_export_inputs(case, make_checkpoint, previous, tmp_path):
    edit, args, state, patch, stage, offending = CASES[case]
    ckpt = _copy_ckpt(make_checkpoint, tmp_path, edit)
    out = {"checkpoint": ckpt}.get(state, tmp_path / "out")
    if state == "previous":
        shutil.copytree(previous[1], out)
    if state == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = _digests(out) if out.exists() else None
    ckpt_before = _digests(ckpt)
    start = time.perf_counter()
    proc = _cli([str(ckpt), "-o", str(out), *args], patch)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert stage in proc.stderr and offending in proc.stderr, proc.stderr
    assert "fix:" in proc.stderr
    if state == "absent":
        assert not out.exists() or list(out.iterdir()) == []
    else:
        assert _digests(out) == before
        assert not list(out.glob(".partial-*"))
    assert _digests(ckpt) == ckpt_before
    if case == "disk-full":  # names the directory and the bytes needed
        assert str(out) in proc.stderr and "it needs" in proc.stderr, proc.stderr
    if case in ("fp8-without-calibration", "verify-and-no-verify", "malformed-index", "pattern-longer-than-weights"):
        assert elapsed < 30, f"refused after {elapsed:.1f} s: must be before any loading or tracing"


def test_concurrent_export_is_refused(make_checkpoint, previous, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(previous[1], out)
    before = _digests(out)
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = _cli([str(make_checkpoint("tiny-mamba2")), "-o", str(out)])
    finally:
        os.close(fd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another hybridtrt export is writing into" in proc.stderr
    assert _digests(out) == before


def test_kill_during_verification_leaves_nothing_that_looks_complete(make_checkpoint, previous, tmp_path):
    """SIGKILL while verifying: the previous export is intact, the unfinished one has no manifest
    that inspect/validate would accept, and the next export removes it and says so."""
    ckpt = make_checkpoint("tiny-mamba2")
    out = tmp_path / "out"
    shutil.copytree(previous[1], out)
    before = _digests(out)
    proc = _cli([str(ckpt), "-o", str(out)], "kill-in-verify")
    assert proc.returncode == -signal.SIGKILL
    assert _digests(out) == before
    (partial,) = out.glob(".partial-*")
    assert not (partial / "hybridtrt.json").exists() and (partial / "model.onnx").exists()
    inspect = subprocess.run([sys.executable, "-m", "hybridtrt.cli.main", "inspect", str(partial)], capture_output=True, text=True)
    assert inspect.returncode == 2 and "Traceback" not in inspect.stderr
    again = _cli([str(ckpt), "-o", str(out), "--no-verify"])
    assert again.returncode == 0, again.stderr
    assert f"removed 1 unfinished export(s) left by killed runs: {partial.name}" in again.stdout
    assert not list(out.glob(".partial-*"))
