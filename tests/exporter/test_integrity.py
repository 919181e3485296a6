"""An export is what its manifest says: every file's size and sha256 are recorded and checked by every command,
and every name the manifest or a graph holds stays inside the export directory.

The refusal table runs through the real CLI (one interpreter, `tests.cli.batch`): each case plants one kind of
tampering into a copy of a real export and asserts exit 2, no traceback, the file named with the expected and the
found value, a ``fix:``, and the export's bytes unchanged by the command. The sampled check is measured against a
file larger than the fully hashed size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.integrity import FULL, FULL_HASH_BELOW, SAMPLED, check_files, record_files
from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
from tests.cli.batch import run_batch
from tests.validation.faults import reseal


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h")[1]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_FILE
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _external_location(root: Path, location: str) -> None:
    """Point every external initializer of model.onnx at ``location`` and re-record the hashes (an attacker who
    also rewrites the manifest)."""
    model = onnx.load(str(root / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(root / "model.onnx"))
    reseal(root)


def _plant(case: str, root: Path, outside: Path) -> None:
    weights = root / "weights.data"
    if case == "weights-same-size-other-bytes":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)  # another export's block, same size
        weights.write_bytes(bytes(data))
    elif case == "weights-truncated":
        os.truncate(weights, 1000)
    elif case == "weights-missing":
        weights.unlink()
    elif case == "weights-symlink-outside":
        shutil.copy(weights, outside / "weights.data")
        weights.unlink()
        weights.symlink_to(outside / "weights.data")
    elif case == "graph-random-bytes":
        (root / "model.onnx").write_bytes(os.urandom((root / "model.onnx").stat().st_size))
    elif case == "graph-absolute-path":
        shutil.copy(root / "model.onnx", outside / "model.onnx")
        _edit_manifest(root, lambda d: d["graphs"]["unified"].update(file=str(outside / "model.onnx")))
    elif case == "graph-dotdot-path":
        _edit_manifest(root, lambda d: d["graphs"]["unified"].update(file="../elsewhere/model.onnx"))
    elif case == "graph-file-not-recorded":
        shutil.copy(root / "model.onnx", root / "other.onnx")
        _edit_manifest(root, lambda d: d["graphs"]["unified"].update(file="other.onnx"))
    elif case == "external-data-outside":
        shutil.copy(weights, outside / "weights.data")
        _external_location(root, "../" + outside.name + "/weights.data")
    elif case == "manifest-a-list":
        (root / MANIFEST_FILE).write_text("[1, 2, 3]")
    elif case == "manifest-binary":
        (root / MANIFEST_FILE).write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    elif case == "manifest-deeply-nested":
        (root / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    elif case == "manifest-nan":
        text = (root / MANIFEST_FILE).read_text().replace('"opset": 24', '"opset": NaN')
        (root / MANIFEST_FILE).write_text(text)
    elif case == "manifest-contract-1":
        _edit_manifest(root, lambda d: (d.update(contract_version=1), d.pop("files")))
    elif case == "manifest-files-malformed":
        _edit_manifest(root, lambda d: d["files"].update({"weights.data": "trust me"}))
    else:
        raise AssertionError(case)


#: case -> (command template, what the message must contain)
CASES = {
    "weights-same-size-other-bytes": (["generate", "{dir}", "--ids", "1 2 3", "--max-new-tokens", "2"], ["weights.data", "sha256", "the manifest records"]),
    "weights-truncated": (["validate", "{dir}", "--steps", "1"], ["weights.data is 1000 bytes", "the manifest records"]),
    "weights-missing": (["inspect", "{dir}"], ["weights.data is missing"]),
    "weights-symlink-outside": (["generate", "{dir}", "--ids", "1 2"], ["'weights.data'", "leaves its folder"]),
    "graph-random-bytes": (["build", "{dir}", "--check-tensorrt", "11.1"], ["model.onnx has sha256"]),
    "graph-absolute-path": (["generate", "{dir}", "--ids", "1 2"], ["outside its folder"]),
    "graph-dotdot-path": (["inspect", "{dir}"], ["'../elsewhere/model.onnx'", "outside its folder"]),
    "graph-file-not-recorded": (["compare", "{dir}", "-o", "{tmp}/pg"], ["'other.onnx'", "records no size or sha256"]),
    "external-data-outside": (["generate", "{dir}", "--ids", "1 2"], ["external data", "outside its folder"]),
    "manifest-a-list": (["inspect", "{dir}"], ["must be a JSON object, it is a list"]),
    "manifest-binary": (["generate", "{dir}", "--ids", "1 2"], ["not UTF-8"]),
    "manifest-deeply-nested": (["inspect", "{dir}"], ["nests"]),
    "manifest-nan": (["inspect", "{dir}"], ["not valid JSON", "NaN"]),
    "manifest-contract-1": (["generate", "{dir}", "--ids", "1 2"], ["contract_version 1", "re-export"]),
    "manifest-files-malformed": (["inspect", "{dir}"], ["malformed record for 'weights.data'"]),
}


def test_tampered_exports_are_refused_by_every_command(export_dir, tmp_path):
    roots, before = {}, {}
    for case in CASES:
        root = shutil.copytree(export_dir, tmp_path / case / "export")
        outside = tmp_path / case / "outside"
        outside.mkdir()
        _plant(case, root, outside)
        roots[case], before[case] = root, _digest(root)
    argv = [[a.format(dir=roots[c], tmp=tmp_path / c) for a in command] for c, (command, _) in CASES.items()]
    argv.append(["generate", str(export_dir), "--ids", "1 2 3", "--max-new-tokens", "2"])  # the untouched export runs
    outcomes = run_batch(argv, columns=200)
    for (case, (_, needles)), outcome in zip(CASES.items(), outcomes):
        text = outcome.output
        assert outcome.code == 2 and "Traceback" not in text, (case, text[-3000:])
        assert "error [artefact]" in text and "fix:" in text, (case, text)
        for needle in needles:
            assert needle in text, (case, needle, text)
        assert _digest(roots[case]) == before[case], case  # nothing written into the export
    assert outcomes[-1].code == 0, outcomes[-1].output[-2000:]


def test_a_partial_directory_is_not_an_export(export_dir, tmp_path):
    partial = shutil.copytree(export_dir, tmp_path / "out" / ".partial-1234")
    with pytest.raises(ArtefactError, match="still being written"):
        read_manifest(partial)


def test_the_sampled_check_and_the_full_check_on_a_large_file(tmp_path):
    """Above FULL_HASH_BELOW the default check reads 64 blocks: another file of the same size is caught; one byte
    between the sampled blocks is caught only by --check-integrity (FULL)."""
    big = tmp_path / "weights.data"
    size = FULL_HASH_BELOW + 3 * 2**20
    with open(big, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 8 * 2**20):
            f.seek(offset)
            f.write(os.urandom(4096))
    files = record_files(tmp_path, ["weights.data"])
    assert check_files(tmp_path, files).files == {"weights.data": "sample"}
    assert check_files(tmp_path, files).bytes_read == 64 * 64 * 1024
    with open(big, "r+b") as f:  # one byte off every sampled block: between blocks 0 and 1
        f.seek(size // 128)
        f.write(b"\x01")
    assert check_files(tmp_path, files, level=SAMPLED).files == {"weights.data": "sample"}  # the documented limit
    with pytest.raises(ArtefactError, match="has sha256"):
        check_files(tmp_path, files, level=FULL)
    with open(big, "r+b") as f:  # another export's file of the same size differs everywhere, sampled blocks included
        f.seek(0)
        f.write(os.urandom(4096))
    with pytest.raises(ArtefactError, match="sampled sha256"):
        check_files(tmp_path, files)


def test_every_published_file_is_recorded(export_dir):
    manifest = read_manifest(export_dir)
    published = {p.name for p in export_dir.iterdir() if p.is_file()} - {MANIFEST_FILE}
    assert set(manifest.files) == published
    for name, record in manifest.files.items():
        assert record["bytes"] == (export_dir / name).stat().st_size
        assert record["sha256"] == hashlib.sha256((export_dir / name).read_bytes()).hexdigest()
