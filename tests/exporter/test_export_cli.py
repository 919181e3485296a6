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
from hybridtrt.exporter.target import MARKER_FILE, read_marker

PREVIOUS = ExportOptions(verify=False)

#: Python run in the child before the CLI, to simulate what a test cannot cause for real.
_PATCHES = {
    "enospc": (
        "import errno, hybridtrt.exporter.export as e\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "e.write_external_data = full\n"
    ),
    "rlimit-as": (  # a real address-space limit, set once torch is loaded: what `ulimit -v` does to an export
        "import resource, hybridtrt.exporter.export\n"
        "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))\n"
    ),
    "kill-after-exchange": (
        "import os, signal, hybridtrt.exporter.target as t\n"
        "t._reached = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 'exchanged' else None\n"
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
    "disk-full": (None, ["--no-verify"], "previous", "enospc", "[export]", "disk full while writing weights.data and model.onnx into"),
    "memory-limit": (None, [], "previous", "rlimit-as", "[export]", "is available: RLIMIT_AS (ulimit -v)"),
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
    if case == "disk-full":  # names the directory and the bytes needed (never "0 B")
        assert str(out) in proc.stderr and "for the whole export" in proc.stderr and " 0 B" not in proc.stderr, proc.stderr
    if case in ("fp8-without-calibration", "verify-and-no-verify", "malformed-index", "pattern-longer-than-weights", "memory-limit"):
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


def test_kill_during_verification_and_publish(make_checkpoint, make_export, previous, tmp_path):
    """SIGKILL while verifying: the previous export is intact and the unfinished one has no manifest that
    inspect would accept. SIGKILL in publish, right after the swap: the new export is in place. The next export
    removes what the killed ones left (in the directory and beside it) and says so, one line each."""
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

    proc = _cli([str(ckpt), "-o", str(out), "--no-verify", "--no-split"], "kill-after-exchange")
    assert proc.returncode == -signal.SIGKILL
    now = _digests(out)
    assert now.pop(MARKER_FILE) and read_marker(out) is not None  # the new export still carries the swap's marker
    assert now == _digests(make_export("tiny-mamba2", ExportOptions(verify=False, split=False))[1])  # the new export, whole
    assert not partial.exists()  # the first run's, removed
    (beside,) = tmp_path.glob(".partial-*")  # the previous export, swapped out, marked

    again = _cli([str(ckpt), "-o", str(out), "--no-verify"])
    assert again.returncode == 0, again.stderr
    assert f"removed an unfinished export left by a killed run: {beside} (made by pid" in again.stdout, again.stdout
    assert not list(out.glob(".partial-*")) and not list(tmp_path.glob(".partial-*")) and not (out / MARKER_FILE).exists()


def test_partials_through_the_cli(make_checkpoint, previous, tmp_path):
    """A user's own .partial-* folder: refused, untouched. Marked leftovers: a dead owner's removed, a live
    one's kept, each on its own line; with a partial kept, the previous export is replaced in place and the
    CLI says why."""
    from tests.cli.batch import run_batch
    from tests.exporter.test_export_files import _dead_pid, _plant

    ckpt = make_checkpoint("tiny-mamba2")
    user = tmp_path / "user"
    shutil.copytree(previous[1], user)
    (user / ".partial-thesis").mkdir()
    (user / ".partial-thesis" / "chapter1.tex").write_text("mine")
    user_before = _digests(user / ".partial-thesis") | _digests(user)
    mixed = tmp_path / "mixed"
    shutil.copytree(previous[1], mixed)
    dead = _plant(mixed / ".partial-dead", mixed, pid=_dead_pid())
    live = _plant(mixed / ".partial-live", mixed)  # this test's process: running
    refused, cleaned = run_batch([["export", ckpt, "-o", user, "--no-verify"], ["export", ckpt, "-o", mixed, "--no-verify"]])
    assert refused.code == 2 and "Traceback" not in refused.output
    assert "[export]" in refused.stderr and ".partial-thesis carries no hybridtrt marker" in refused.stderr and "fix:" in refused.stderr
    assert _digests(user / ".partial-thesis") | _digests(user) == user_before
    assert cleaned.code == 0, cleaned.output
    assert "removed an unfinished export left by a killed run: .partial-dead (made by pid" in cleaned.stdout
    assert "kept an unfinished export that may not be this run's to remove: .partial-live (made by pid" in cleaned.stdout
    assert "replaced the previous export in place, not by one atomic swap" in cleaned.stdout and ".partial-live besides the export" in cleaned.stdout
    assert not dead.exists() and live.exists()
