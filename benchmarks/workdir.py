"""The set-up the CPU benchmarks share: a preset checkpoint and its export in a fresh work directory."""

from __future__ import annotations

import tempfile
from pathlib import Path


def exported_preset(preset: str, dtype: str | None = None) -> tuple[Path, Path, Path]:
    """``(work dir, checkpoint, export dir)``: ``preset`` written by `hybridtrt.models.create_checkpoint`
    and exported without verification (in ``dtype``; None: the checkpoint's declared dtype). The work
    directory is kept (the benchmark's child processes read it)."""
    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models import create_checkpoint

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-bench-"))
    ckpt = create_checkpoint(preset, work / "ckpt")
    export(ckpt, work / "export", ExportOptions(verify=False) if dtype is None else ExportOptions(dtype=dtype, verify=False))
    return work, ckpt, work / "export"
