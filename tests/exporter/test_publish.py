"""The publish step (`hybridtrt.exporter.target.OutputDir.publish`) killed after each of its steps, in a real
process (SIGKILL), on both paths:

- **swap** (a previous export is there): afterwards the output directory holds the previous export or the new
  one, byte for byte (sha256 of every file), never anything else;
- **in place** (the swap made impossible): it holds the previous export, the new one, or no manifest at all —
  never a half-made export that a command accepts.

Then `hybridtrt inspect` (the real CLI, all cases in one interpreter) accepts the output directory exactly when it
holds a complete export and refuses every ``.partial-*`` left behind (in it or beside it), and the next export
into it removes those leftovers (they are marked and their owner is dead) and nothing else.

The files are two real tiny exports (the previous one with ``decode.onnx``, the new one without), copied into the
partial directory by a small child script: publish is exercised as the exporter calls it, without re-exporting.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridtrt.errors import ExportError
from hybridtrt.exporter import target
from hybridtrt.exporter.export import ARTEFACTS, ExportOptions
from hybridtrt.exporter.manifest import MANIFEST_FILE
from hybridtrt.exporter.target import MARKER_FILE, PARTIAL_PREFIX, OutputDir, read_marker
from tests.cli.batch import run_batch

#: The child: publish the files of NEW into OUT through OutputDir, SIGKILLed right after step KILL_AT.
_CHILD = """
import os, shutil, signal, sys
from pathlib import Path
from hybridtrt.errors import ExportError
from hybridtrt.exporter import target
out, new, kill_at, mode = sys.argv[1:5]
def reached(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
target._reached = reached
if mode == "in-place":
    target.OutputDir._swap_blocker = lambda self: "made impossible by the test"
artefacts = {"model.onnx", "decode.onnx", "weights.data", "decode.weights.data"}
with target.OutputDir(Path(out), artefacts, "hybridtrt.json") as t:
    names = sorted(p.name for p in Path(new).iterdir())
    for name in names:
        shutil.copyfile(Path(new) / name, t.partial / name)
    t.publish([n for n in names if n != "hybridtrt.json"] + ["hybridtrt.json"])
"""


def _digests(path: Path) -> dict[str, str]:
    """sha256 of the export's files (the directory's regular files but a publish marker)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER_FILE}


def _steps(out: Path, new: Path, mode: str, monkeypatch) -> list[str]:
    """The publish steps, in order, recorded on an uninterrupted run."""
    seen: list[str] = []
    monkeypatch.setattr(target, "_reached", seen.append)
    if mode == "in-place":
        monkeypatch.setattr(OutputDir, "_swap_blocker", lambda self: "made impossible by the test")
    with OutputDir(out, ARTEFACTS, MANIFEST_FILE) as t:
        for p in new.iterdir():
            shutil.copyfile(p, t.partial / p.name)
        t.publish(sorted(p.name for p in new.iterdir() if p.name != MANIFEST_FILE) + [MANIFEST_FILE])
    monkeypatch.undo()
    assert t.publish_note == ("swap" if mode == "swap" else "in place: made impossible by the test")
    return seen


def _leftovers(case: Path) -> list[Path]:
    return sorted(case.glob(f"{PARTIAL_PREFIX}*")) + sorted((case / "out").glob(f"{PARTIAL_PREFIX}*"))


@pytest.fixture(scope="module")
def exports(make_export):
    """(previous export, new export): tiny-mamba2 with decode.onnx, and without (a file fewer, other bytes)."""
    _, previous = make_export("tiny-mamba2", ExportOptions(verify=False))
    _, new = make_export("tiny-mamba2", ExportOptions(verify=False, split=False))
    return previous, new


@pytest.mark.parametrize("mode", ["swap", "in-place"])
def test_kill_after_each_publish_step(mode, exports, tmp_path, monkeypatch):
    previous, new = exports
    old, fresh = _digests(previous), _digests(new)
    assert old != fresh and "decode.onnx" in old and "decode.onnx" not in fresh

    trial = tmp_path / "trial"
    shutil.copytree(previous, trial / "out")
    steps = _steps(trial / "out", new, mode, monkeypatch)
    assert _digests(trial / "out") == fresh and not _leftovers(trial)
    expected = {"swap": 6, "in-place": 7}[mode]  # see OutputDir._publish_by_swap / _publish_in_place
    assert len(steps) == expected, steps

    cases = []
    for k, step in enumerate(steps):
        case = tmp_path / f"k{k}"
        shutil.copytree(previous, case / "out")
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(case / "out"), str(new), step, mode], capture_output=True, text=True, timeout=60)
        assert proc.returncode == -9, (step, proc.stderr)
        now = _digests(case / "out")
        complete = (case / "out" / MANIFEST_FILE).exists()
        if mode == "swap":
            assert now in (old, fresh), f"after {step!r}: neither the previous nor the new export: {sorted(now)}"
        else:
            assert now in (old, fresh) or not complete, f"after {step!r}: a manifest over files that are not its export"
        stray = case / "out" / MARKER_FILE
        assert not stray.exists() or read_marker(case / "out") is not None
        for leftover in _leftovers(case):
            assert read_marker(leftover) is not None, f"after {step!r}: {leftover} is not marked, the next export would leave it"
        cases.append((case, step, now in (old, fresh) and complete))

    argv = []
    for case, _, _ in cases:
        argv.append(["inspect", str(case / "out")])
        argv += [["inspect", str(p)] for p in _leftovers(case)]
    outcomes = iter(run_batch(argv))
    for case, step, complete in cases:
        got = next(outcomes)
        assert "Traceback" not in got.output
        assert (got.code == 0) == complete, f"after {step!r}: inspect gave {got.code} on {'a complete' if complete else 'an incomplete'} export:\n{got.output}"
        for leftover in _leftovers(case):
            got = next(outcomes)
            assert got.code == 2 and "Traceback" not in got.output, (step, leftover, got.output)
            if (leftover / MANIFEST_FILE).exists():  # a complete export under a partial's name: refused by name
                assert "still being written" in got.output, (step, leftover, got.output)

    for case, step, _ in cases:  # the next export removes what the killed one left, and says so
        left = _leftovers(case)
        with OutputDir(case / "out", ARTEFACTS, MANIFEST_FILE) as t:
            pass
        assert len(t.removed_partials) == len(left) and all("no longer running" in line for line in t.removed_partials), (step, t.removed_partials)
        assert not _leftovers(case) and not (case / "out" / MARKER_FILE).exists(), step


def _publish(out: Path, new: Path) -> OutputDir:
    with OutputDir(out, ARTEFACTS, MANIFEST_FILE) as t:
        for p in new.iterdir():
            shutil.copyfile(p, t.partial / p.name)
        t.publish(sorted(p.name for p in new.iterdir() if p.name != MANIFEST_FILE) + [MANIFEST_FILE])
        with pytest.raises(ExportError, match="another hybridtrt export is writing into"):  # the swapped-in directory is locked too
            OutputDir(out, ARTEFACTS, MANIFEST_FILE).__enter__()
    return t


def test_swap_keeps_a_symlinked_output_and_falls_back_when_refused(exports, tmp_path, monkeypatch):
    """``-o LINK``: the directory behind the link is exchanged, the link stays a link. A file system that refuses
    RENAME_EXCHANGE: the move beside is undone and the export is published in place, saying why."""
    import errno
    import os

    previous, new = exports
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(previous, real)
    os.chmod(real, 0o750)
    link.symlink_to(real, target_is_directory=True)
    t = _publish(link, new)
    assert t.publish_note == "swap" and link.is_symlink() and _digests(real) == _digests(new)
    assert os.stat(real).st_mode & 0o777 == 0o750  # the new directory keeps the old one's permissions
    assert not _leftovers(tmp_path)

    shutil.rmtree(real)
    shutil.copytree(previous, real)
    renameat2 = target._renameat2

    def no_exchange(source, dest, flags):
        if flags == target._RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "Invalid argument")
        renameat2(source, dest, flags)

    monkeypatch.setattr(target, "_renameat2", no_exchange)
    t = _publish(real, new)
    assert t.publish_note == "in place: the file system refused renameat2(RENAME_EXCHANGE): Invalid argument"
    assert _digests(real) == _digests(new) and not _leftovers(tmp_path) and not (real / MARKER_FILE).exists()
