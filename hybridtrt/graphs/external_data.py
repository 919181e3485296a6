"""Pass: let a second graph reuse the first graph's external weight file.

The decode graph (``decode.onnx``) holds the same weights as ``model.onnx``. Instead of a second
copy, every initializer whose name and bytes equal a tensor already stored in ``weights.data``
is pointed at that tensor's offset; only what differs stays in the decode graph's own file.
Files are compared in chunks, never loaded whole, so memory stays flat for any model size.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

_CHUNK = 1 << 24


def _external_info(t: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def external_index(model_path: str | Path) -> dict[str, tuple[str, int, int]]:
    """``{initializer: (location, offset, length)}`` of a saved model's external tensors."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {t.name: _external_info(t) for t in model.graph.initializer if uses_external_data(t)}


def _same_bytes(a: Path, a_off: int, b: Path, b_off: int, length: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(a_off)
        fb.seek(b_off)
        remaining = length
        while remaining:
            n = min(remaining, _CHUNK)
            if fa.read(n) != fb.read(n):
                return False
            remaining -= n
    return True


def _point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def save_with_external_data(model: onnx.ModelProto, path: str | Path, data_name: str, size_threshold: int = 1024) -> None:
    """Save ``model`` with every initializer of at least ``size_threshold`` bytes in ``data_name``
    beside it. The data file must not exist yet: onnx appends to an existing one."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=size_threshold,
        convert_attribute=False,
    )


def share_external_data(model_path: str | Path, reference_path: str | Path, size_threshold: int = 1024) -> int:
    """Rewrite ``model_path`` so that initializers identical to ``reference_path``'s (same name,
    same bytes) point into the reference's data file. Both models live in one directory.

    The model's own data file is rewritten with only the tensors that differ (deleted when none
    do).

    Returns:
        Bytes shared.
    """
    model_path, reference_path = Path(model_path), Path(reference_path)
    root = model_path.parent
    index = external_index(reference_path)
    model = onnx.load(str(model_path), load_external_data=False)
    reference_files = {loc for loc, _, _ in index.values()}
    own_files = {_external_info(t)[0] for t in model.graph.initializer if uses_external_data(t)} - reference_files
    kept: set[str] = set()
    shared = 0
    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        location, offset, length = _external_info(t)
        ref = index.get(t.name)
        if ref and ref[2] == length and _same_bytes(root / location, offset, root / ref[0], ref[1], length):
            _point_at(t, *ref)
            shared += length
            continue
        kept.add(location)
        with open(root / location, "rb") as f:  # keep it: pull it inline, re-externalized below
            f.seek(offset)
            t.raw_data = f.read(length)
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    for name in own_files:
        (root / name).unlink()
    own = sorted(kept)[0] if kept else model_path.stem + ".weights.data"
    save_with_external_data(model, model_path, own, size_threshold)
    return shared
