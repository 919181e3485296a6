"""Small file-system helpers shared by the writers (presets, exporter), and `human_bytes`."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


def usual_permissions(paths: Iterable[str | Path]) -> None:
    """Give files the permissions ``open()`` would (``0o666 & ~umask``).

    safetensors, onnx and onnx_ir create some files ``0600``, which surprises users who share a
    checkpoint or an export directory.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        if Path(path).is_file():
            os.chmod(path, 0o666 & ~umask)


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (what a rename makes visible must be on the disk first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (created, renamed, removed names) to the disk.

    File systems that cannot sync a directory (EINVAL: some network and FUSE file systems) are
    skipped: there the rename order is the only guarantee there is.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (B, KiB, MiB, GiB, TiB): the one size format of every message and table."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
