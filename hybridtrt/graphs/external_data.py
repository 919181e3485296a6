"""External weight data: a streaming writer for graphs whose large tensors are produced at write
time, and the pass that lets a second graph reuse the first graph's weight file.

**Deferred tensors.** An initializer may be a placeholder: ``data_location = EXTERNAL`` with a
``location`` of ``hybridtrt-deferred:<key>``. Its dims and type are real; its bytes are produced
by the caller (``chunks(tensor)``) when `write_external_data` writes it, so a graph of any size is
written with one tensor in flight. `write_external_data` lays the file out exactly as one of the
two libraries would (`LAYOUT_RULES`), so a streamed export is byte-identical to one saved from
memory.

**Sharing.** The decode graph (``decode.onnx``) holds the same weights as ``model.onnx``. Instead
of a second copy, every initializer whose name and bytes equal a tensor already stored in
``weights.data`` is pointed at that tensor's offset; only what differs stays in the decode graph's
own file. Files are compared in chunks, never loaded whole, so memory stays flat for any model size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

_CHUNK = 1 << 24

#: ``location`` prefix of a placeholder whose bytes the caller produces at write time.
DEFERRED = "hybridtrt-deferred:"

#: Which initializers go to external data, as ``rule(nbytes, size_threshold)``; each reproduces a
#: library's writer so that files are byte-identical to the ones it writes (both pack densely, in
#: initializer order).
LAYOUT_RULES: dict[str, Callable[[int, int], bool]] = {
    # onnx_ir.save(size_threshold_bytes=...): tensors strictly larger than the threshold.
    "onnx_ir": lambda nbytes, threshold: nbytes > threshold,
    # onnx.save_model(size_threshold=...): sys.getsizeof(raw_data) >= threshold (counts the bytes
    # object's header).
    "onnx": lambda nbytes, threshold: nbytes + sys.getsizeof(b"") >= threshold,
}

#: ``chunks(tensor) -> buffers`` producing a deferred tensor's bytes, in order.
Chunks = Callable[[onnx.TensorProto], Iterable[bytes | memoryview | np.ndarray]]


def is_deferred(t: onnx.TensorProto) -> bool:
    """A placeholder whose bytes are produced at write time."""
    return uses_external_data(t) and any(e.key == "location" and e.value.startswith(DEFERRED) for e in t.external_data)


def deferred_key(t: onnx.TensorProto) -> str:
    """``hybridtrt-deferred:<key>`` -> ``<key>``."""
    return external_info(t)[0][len(DEFERRED) :]


def deferred_tensor(name: str, elem_type: int, dims: Iterable[int], key: str) -> onnx.TensorProto:
    """A placeholder initializer (see the module docstring)."""
    t = onnx.TensorProto(name=name, data_type=elem_type, dims=list(dims))
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", DEFERRED + key
    return t


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type (inline or not)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    from hybridtrt.graphs.quantized_types import stored_nbytes

    return stored_nbytes(t.data_type, t.dims)


def _stored(t: onnx.TensorProto) -> bool:
    """Has bytes that a writer would place (inline raw data or a placeholder)."""
    return t.HasField("raw_data") or is_deferred(t)


def planned_external_bytes(model: onnx.ModelProto, rule: str, size_threshold: int) -> int:
    """Bytes `write_external_data` will write for ``model`` with this rule and threshold."""
    decide = LAYOUT_RULES[rule]
    return sum(n for t in model.graph.initializer if _stored(t) and decide(n := tensor_nbytes(t), size_threshold))


def write_external_data(
    model: onnx.ModelProto,
    directory: str | Path,
    data_name: str,
    *,
    rule: str,
    size_threshold: int,
    chunks: Chunks,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``model``'s large initializers (inline or deferred) to ``directory/data_name``, in
    initializer order, packed densely; point them at their bytes. Small deferred tensors are
    inlined. The model itself is not saved (``onnx.save_model(model, path)`` afterwards).

    Args:
        model: The graph (modified in place).
        directory: Where the data file goes (beside the model).
        data_name: Data file name; must not exist yet.
        rule: A `LAYOUT_RULES` key.
        size_threshold: Tensors the rule selects for this threshold go to the file.
        chunks: Produces a deferred tensor's bytes.
        progress: Called with the number of bytes after each write.

    Returns:
        Bytes written (0 and no file when nothing qualifies).

    Raises:
        OSError: From the file system (the caller turns ENOSPC into a user error).
        ValueError: A deferred tensor produced a different number of bytes than its dims say.
    """
    decide = LAYOUT_RULES[rule]
    path = Path(directory) / data_name
    offset = 0
    out = None
    try:
        for t in model.graph.initializer:
            if not _stored(t):
                continue
            nbytes = tensor_nbytes(t)
            parts: Iterable = chunks(t) if is_deferred(t) else (t.raw_data,)
            if not decide(nbytes, size_threshold):
                if is_deferred(t):  # inline, as if it had never been a placeholder
                    del t.external_data[:]
                    t.ClearField("data_location")
                    t.raw_data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
                continue
            if out is None:
                out = open(path, "xb")  # noqa: SIM115 (closed in finally)
            written = 0
            for part in parts:
                view = memoryview(part).cast("B")
                out.write(view)
                written += view.nbytes
                if progress is not None:
                    progress(view.nbytes)
            if written != nbytes:
                raise ValueError(f"tensor {t.name}: wrote {written} bytes, its dims and type say {nbytes}")
            t.ClearField("raw_data")
            point_at(t, data_name, offset, nbytes)
            offset += nbytes
    finally:
        if out is not None:
            out.close()
    return offset


def external_info(t: onnx.TensorProto) -> tuple[str, int, int]:
    """``(location, offset, length)`` of an external tensor (length -1: to the end of the file)."""
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info.get("length", -1))


def external_index(model_path: str | Path) -> dict[str, tuple[str, int, int]]:
    """``{initializer: (location, offset, length)}`` of a saved model's external tensors."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {t.name: external_info(t) for t in model.graph.initializer if uses_external_data(t)}


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


def point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` an external tensor at ``length`` bytes from ``offset`` of ``location``."""
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


def share_external_data(model_path: str | Path, reference_path: str | Path, size_threshold: int = 1024, *, by_content: bool = False) -> int:
    """Rewrite ``model_path`` so that initializers identical to ``reference_path``'s (same name,
    same bytes; with ``by_content``, any reference tensor of the same type, shape and bytes: the
    two graphs were traced from different modules) point into the reference's data file. Both
    models live in one directory.

    The model's own data file is rewritten with only the tensors that differ (deleted when none
    do).

    Returns:
        Bytes shared.
    """
    model_path, reference_path = Path(model_path), Path(reference_path)
    root = model_path.parent
    index = external_index(reference_path)
    model = onnx.load(str(model_path), load_external_data=False)
    if by_content:  # each of the model's tensors is looked up under the name of its same-shaped twin
        reference = onnx.load(str(reference_path), load_external_data=False)
        shapes: dict[tuple, list[str]] = {}
        for r in reference.graph.initializer:
            if uses_external_data(r):
                shapes.setdefault((r.data_type, tuple(r.dims)), []).append(r.name)
        by_name = {}
        for t in model.graph.initializer:
            if not uses_external_data(t):
                continue
            location, offset, length = external_info(t)
            for name in shapes.get((t.data_type, tuple(t.dims)), []):
                ref = index[name]
                if ref[2] == length and _same_bytes(root / location, offset, root / ref[0], ref[1], length):
                    by_name[t.name] = ref
                    break
        index = by_name
    reference_files = {loc for loc, _, _ in index.values()}
    own_files = {external_info(t)[0] for t in model.graph.initializer if uses_external_data(t)} - reference_files
    kept: set[str] = set()
    shared = 0
    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        location, offset, length = external_info(t)
        ref = index.get(t.name)
        if ref and ref[2] == length and _same_bytes(root / location, offset, root / ref[0], ref[1], length):
            point_at(t, *ref)
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


def same_as_file(parts: Iterable[bytes | memoryview | np.ndarray], path: Path, offset: int, length: int) -> bool:
    """Whether the concatenated ``parts`` equal ``length`` bytes of ``path`` at ``offset`` (read in chunks)."""
    with open(path, "rb") as f:
        f.seek(offset)
        seen = 0
        for part in parts:
            view = memoryview(part).cast("B")
            for i in range(0, view.nbytes, _CHUNK):
                piece = view[i : i + _CHUNK]
                if seen + piece.nbytes > length or f.read(piece.nbytes) != piece:
                    return False
                seen += piece.nbytes
    return seen == length


def share_before_write(
    model: onnx.ModelProto,
    reference_path: str | Path,
    *,
    rule: str,
    size_threshold: int,
    same: Callable[[onnx.TensorProto, Path, int, int], bool],
) -> int:
    """`share_external_data` for a graph that is not written yet (inline or deferred tensors).

    Every initializer that the first save would have put in external data (``rule``,
    ``size_threshold``) and that has the name and bytes of an external tensor of
    ``reference_path`` is pointed at that tensor, in place; the rest is left for
    `write_external_data`.

    Args:
        model: The graph (modified in place).
        reference_path: The saved model whose external data is reused (same directory).
        rule: `LAYOUT_RULES` key of the first save.
        size_threshold: Its threshold.
        same: ``same(tensor, data_file, offset, length)``: whether the tensor's bytes equal the
            file's there (`same_as_file` over its bytes).

    Returns:
        Bytes shared.
    """
    reference_path = Path(reference_path)
    index = external_index(reference_path)
    decide = LAYOUT_RULES[rule]
    shared = 0
    for t in model.graph.initializer:
        if not _stored(t) or not decide(n := tensor_nbytes(t), size_threshold):
            continue
        ref = index.get(t.name)
        if ref and ref[2] == n and same(t, reference_path.parent / ref[0], ref[1], ref[2]):
            t.ClearField("raw_data")
            point_at(t, *ref)
            shared += n
    return shared
