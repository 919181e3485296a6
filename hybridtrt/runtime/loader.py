"""`load(path)`: the right backend for an artefact, chosen from what the path is.

========================================  ============================
artefact                                  backend
========================================  ============================
export directory (has ``hybridtrt.json``)  `OrtModel` (ONNX Runtime)
``*.onnx`` inside an export directory     `OrtModel` of its directory
``*.engine`` (``*.engine.json`` beside)    `TrtModel` (TensorRT)
========================================  ============================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.manifest import MANIFEST_FILE, TP_MANIFEST, read_manifest


def _ort(path: Path, **kwargs: Any) -> Any:
    from hybridtrt.runtime.onnxruntime import OrtModel

    return OrtModel(path, **kwargs)


def _trt(path: Path, **kwargs: Any) -> Any:
    from hybridtrt.runtime.tensorrt import TrtModel

    return TrtModel(path, **kwargs)


#: File suffix -> (backend loader, how the path maps to the loader's argument).
SUFFIXES: dict[str, tuple[Callable[..., Any], Callable[[Path], Path]]] = {
    ".onnx": (_ort, lambda p: p.parent),
    ".engine": (_trt, lambda p: p),
}


def load(path: str | Path, **kwargs: Any) -> Any:
    """Load an exported artefact with its backend.

    Args:
        path: An export directory, a ``.onnx`` file of one, or a ``.engine`` file.
        **kwargs: Passed to the backend (`OrtModel`: ``use_decode_graph``, ``threads``, ``bf16``;
            `TrtModel`: ``plugins``, ``device``).

    Returns:
        An `OrtModel` or a `TrtModel`: both implement `Stepper` and have ``generate`` / ``stream``.

    Raises:
        ArtefactError: The path does not exist or is no known artefact.
        MissingDependencyError: A ``.engine`` without TensorRT or a GPU.
    """
    p = Path(path)
    if not p.exists():
        raise ArtefactError(f"{p} does not exist", fix="pass an export directory, a model.onnx in one, or a model.engine")
    if p.is_dir():
        if (p / MANIFEST_FILE).is_file():
            return _ort(p, **kwargs)
        if (p / TP_MANIFEST).is_file():
            read_manifest(p)  # says what a tensor-parallel export is and what runs it
        hint = "a checkpoint: export it first (`hybridtrt export DIR -o OUT`)" if (p / "config.json").is_file() else "not an export"
        raise ArtefactError(f"{p} has no {MANIFEST_FILE} ({hint})", fix="pass the directory written by `hybridtrt export`")
    if p.suffix in SUFFIXES:
        loader, target = SUFFIXES[p.suffix]
        return loader(target(p), **kwargs)
    raise ArtefactError(
        f"don't know how to load {p.name!r} (suffix {p.suffix or 'none'!r})",
        fix=f"pass an export directory or a file ending in {', '.join(sorted(SUFFIXES))}",
    )


__all__ = ["SUFFIXES", "load"]
