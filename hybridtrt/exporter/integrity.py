"""An export is what its manifest says: the size and sha256 of every file it publishes, checked on every read.

The exporter records, per published file, its size, its sha256 and a *sample* sha256 (`sample_digest`: the size
and `SAMPLE_BLOCKS` blocks of `SAMPLE_BLOCK` bytes at fixed, evenly spread offsets). Every command that opens an
export (`hybridtrt.exporter.manifest.read_manifest`) checks, by default (`SAMPLED`):

- every recorded file exists inside the export directory (`hybridtrt.reading.inside`), and nothing but regular
  files are named;
- its size;
- its full sha256 when it is at most `FULL_HASH_BELOW` bytes (the graphs: kilobytes to a few MiB), else its
  sample sha256 (a few MiB read, whatever the file's size).

A weights file swapped for another export's of the same size differs in nearly every block, so the sample catches
it at a fixed cost. A single byte changed in a 18 GB weights file is caught by the full check only:
``--check-integrity`` (`FULL`) hashes every file in full (README: the cost measured on a 9B-sized export). The
ONNX graphs' external-data entries must name recorded files inside the directory too
(`check_external_data`), so a graph cannot read weights from elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridtrt.errors import ArtefactError
from hybridtrt.reading import inside

#: Blocks read by `sample_digest`.
SAMPLE_BLOCKS = 64
#: Bytes per sampled block.
SAMPLE_BLOCK = 64 * 1024
#: Files up to this size are hashed in full by the default check.
FULL_HASH_BELOW = 64 * 2**20

#: Check levels: sizes and sampled hashes (default), or every byte.
SAMPLED = "sampled"
FULL = "full"

_FIX = "re-export the model (`hybridtrt export CHECKPOINT -o DIR --force`), or restore the export's original files"


def full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sample_digest(path: Path, size: int) -> str:
    """sha256 of the size and `SAMPLE_BLOCKS` evenly spread blocks (the whole file when it is small)."""
    h = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()
        span = size - SAMPLE_BLOCK
        for i in range(SAMPLE_BLOCKS):
            f.seek(span * i // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def record_files(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256", "sample_sha256"}}`` of the files an export publishes (the manifest's ``files``)."""
    root = Path(root)
    out = {}
    for name in sorted(set(names)):
        path = root / name
        size = path.stat().st_size
        out[name] = {"bytes": size, "sha256": full_digest(path), "sample_sha256": sample_digest(path, size)}
    return out


@dataclass
class IntegrityReport:
    """What a check read (for ``inspect``).

    Attributes:
        level: `SAMPLED` or `FULL`.
        files: ``{name: "sha256" | "sample"}``: how each file was checked.
        bytes_read: Bytes hashed.
    """

    level: str
    files: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0


def check_files(export_dir: str | Path, files: dict[str, Any], *, level: str = SAMPLED) -> IntegrityReport:
    """Check the files recorded in a manifest against the export directory.

    Raises:
        ArtefactError: A recorded name that is not a file name inside the directory, a missing or non-regular
            file, or a size or hash that differs from the record — naming the file, what was expected and the fix.
    """
    root = Path(export_dir)
    report = IntegrityReport(level)
    if not isinstance(files, dict) or not files:
        raise ArtefactError(f"{root}'s manifest records no files (size and sha256 of every file)", fix=_FIX)
    for name, record in sorted(files.items()):
        path = inside(root, name, what=f"{root}'s manifest", error=ArtefactError, fix=_FIX)
        if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or not isinstance(record.get("sha256"), str):
            raise ArtefactError(f"{root}'s manifest has a malformed record for {name!r}: {record!r}", fix=_FIX)
        if not path.is_file():
            raise ArtefactError(f"{path} is missing from the export (its manifest records {record['bytes']} bytes)", fix=_FIX)
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ArtefactError(
                f"{path} is {size} bytes, the manifest records {record['bytes']}: the file is not the one exported "
                "(truncated, replaced or still being copied)",
                fix=_FIX,
            )
        if level == FULL or size <= FULL_HASH_BELOW:
            digest, expected, how = full_digest(path), record["sha256"], "sha256"
            report.bytes_read += size
        else:
            digest, expected, how = sample_digest(path, size), record.get("sample_sha256"), "sample"
            report.bytes_read += min(size, SAMPLE_BLOCKS * SAMPLE_BLOCK)
        if digest != expected:
            what = "sha256" if how == "sha256" else "sampled sha256 (64 blocks)"
            raise ArtefactError(
                f"{path} has {what} {digest[:16]}…, the manifest records {str(expected)[:16]}…: its bytes are not the "
                "ones exported (another export's file, or modified)",
                fix=_FIX,
            )
        report.files[name] = how
    return report


def check_external_data(export_dir: str | Path, graph_file: str, proto: Any, files: dict[str, Any]) -> None:
    """Every external-data ``location`` of ``proto`` (the graph ``graph_file``, loaded without its data) names a file
    the manifest records, inside the export directory.

    Raises:
        ArtefactError: A location outside the directory or not among the recorded files.
    """
    root = Path(export_dir)
    seen: set[str] = set()
    for tensor in _external_tensors(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location in seen:
            continue
        seen.add(location)
        inside(root, location, what=f"{root / graph_file}'s external data of {tensor.name!r}", error=ArtefactError, fix=_FIX)
        if location not in files:
            raise ArtefactError(
                f"{root / graph_file} reads tensor {tensor.name!r} from {location!r}, a file its manifest does not record",
                fix=_FIX,
            )


def _external_tensors(proto: Any) -> Iterable[Any]:
    import onnx

    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    yield a.t
                graphs.extend([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))


__all__ = ["FULL", "SAMPLED", "IntegrityReport", "check_external_data", "check_files", "record_files", "sample_digest"]
