"""Pass: let a second graph reuse the first graph's external weight file.

The decode graph (``decode.onnx``) holds the same weights as ``model.onnx``. Instead of a second
copy, every initializer whose name and bytes equal a tensor already stored in ``weights.data``
is pointed at that tensor's offset; only what differs goes to the decode graph's own file.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data


def external_index(model_path: str | Path) -> dict[str, tuple[str, int, int]]:
    """``{initializer: (location, offset, length)}`` of a saved model's external tensors."""
    model = onnx.load(str(model_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def share_initializers(model: onnx.ModelProto, model_dir: str | Path, index: dict[str, tuple[str, int, int]]) -> int:
    """Point ``model``'s initializers at identical tensors listed in ``index`` (in place).

    Args:
        model: In-memory model whose initializers carry ``raw_data``.
        model_dir: Directory both models live in (``index`` locations are relative to it).
        index: From `external_index` of the already-saved model.

    Returns:
        Bytes shared (not written again).
    """
    shared = 0
    maps: dict[str, mmap.mmap] = {}
    try:
        for t in model.graph.initializer:
            if t.name not in index or not t.HasField("raw_data"):
                continue
            location, offset, length = index[t.name]
            if len(t.raw_data) != length:
                continue
            if location not in maps:
                with open(Path(model_dir) / location, "rb") as f:
                    maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if maps[location][offset : offset + length] != t.raw_data:
                continue
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            shared += length
    finally:
        for m in maps.values():
            m.close()
    return shared
