"""Small file-system helpers shared by the writers (presets, exporter)."""

from __future__ import annotations

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
