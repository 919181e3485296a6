"""A checkpoint's tensors without loading them: the safetensors headers of every weight file,
and reads of one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
little-endian tensor bytes. `WeightIndex` parses only the headers (names, dtypes, shapes,
offsets), so refusals (missing tensors, wrong shapes, integer weights, a layer pattern that does
not match) cost milliseconds even for a 100 GB checkpoint. `WeightIndex.read` reads one tensor
with ordinary file reads into a fresh buffer — never a memory map, so the process holds exactly
the tensors it is working on and nothing of the page cache counts against it.
"""

from __future__ import annotations

import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hybridtrt.errors import CheckpointError, HybridTrtError

#: safetensors dtype code -> torch dtype (the codes safetensors defines that torch can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Stored dtypes a float model can be loaded from (converted per tensor to the model dtype).
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
#: A header larger than this is not a safetensors header (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
_FIX = "re-download or re-save the checkpoint (transformers' save_pretrained writes safetensors)"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives.

    Attributes:
        name: Checkpoint name (``model.layers.0.mixer.in_proj.weight``).
        file: The safetensors file.
        dtype: safetensors dtype code (``"BF16"``, ``"F32"``, ``"I8"`` ...).
        shape: Tensor shape.
        start: Absolute byte offset of the data in ``file``.
        nbytes: Bytes of data.
    """

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header_and_metadata(path: Path, *, error: type[HybridTrtError] = CheckpointError, fix: str = _FIX) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header: its tensors and its ``__metadata__`` (str -> str).

    Nothing is trusted: the file must be a regular file; the header length must fit the file; the
    header must be UTF-8 JSON (nesting capped, `hybridtrt.reading.parse_json`) holding an object;
    every entry needs a known ``dtype`` string, a ``shape`` of non-negative integers and integer
    ``data_offsets`` ``[begin, end]`` that match the shape and lie inside the file.

    Args:
        path: The file.
        error: The typed error to raise (a snapshot reader passes `InputError`).
        fix: The fix to print.

    Raises:
        error: The file is not a well-formed safetensors file (naming what is wrong).
    """
    from hybridtrt.reading import parse_json

    def bad(why: str) -> HybridTrtError:
        return error(f"{path.name} is not a readable safetensors file: {why}", fix=fix)

    try:
        info = path.stat()
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})", fix=fix) from None
    if not stat.S_ISREG(info.st_mode):
        raise bad("not a regular file")
    size = info.st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})", fix=fix) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"header is not UTF-8 (byte {e.start})") from None
    header = parse_json(text, source=f"{path.name} is not a readable safetensors file: its header", error=error, fix=fix)
    if not isinstance(header, dict):
        raise bad(f"header must be a JSON object, it is a {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is a {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}, which this reader does not know")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not two integers [begin, end]")
        begin, end = offsets
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if end - begin != math.prod(shape) * itemsize or not 0 <= begin <= end <= size - data_start:
            raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}) disagree with {dtype} {shape} or run past the file")
        out[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)
    return out, dict(metadata)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header (see `read_header_and_metadata`).

    Raises:
        CheckpointError: The file is not a well-formed safetensors file (not a regular file, bad
            header length, bad JSON, unknown dtype, offsets that are not integers, disagree with the
            shape or run past the file).
    """
    return read_header_and_metadata(path)[0]


class WeightIndex:
    """Every tensor of a set of safetensors files, by name (headers only).

    Args:
        files: The weight files (one checkpoint).

    Raises:
        CheckpointError: A malformed file, or a tensor that appears in more than one file.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears in more than one shard ({self.tensors[name].file.name}, {path.name})")
                self.tensors[name] = info

    @classmethod
    def from_headers(cls, tensors: dict[str, TensorInfo]) -> WeightIndex:
        """An index of tensors whose headers were parsed already (e.g. by `read_header_and_metadata`)."""
        index = cls([])
        index.tensors = dict(tensors)
        index.files = sorted({t.file for t in tensors.values()})
        return index

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> Tensor:
        """One tensor as stored (its own dtype), read into a new buffer.

        Raises:
            CheckpointError: The file is shorter than its header says.
        """
        info = self.tensors[name]
        return self._read(info, 0, info.nbytes).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor's first dimension as stored (a contiguous byte range:
        an embedding lookup or a slice of the LM head without the whole matrix).

        Raises:
            CheckpointError: The file is shorter than its header says.
        """
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 0
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows {start}:{stop} of {name} {list(info.shape)}")
        row_bytes = info.nbytes // rows if rows else 0
        return self._read(info, start * row_bytes, (stop - start) * row_bytes).reshape(stop - start, *info.shape[1:])

    def _read(self, info: TensorInfo, offset: int, nbytes: int) -> Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with info.file.open("rb") as f:
            f.seek(info.start + offset)
            done = 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{info.file.name} ends inside tensor {info.name!r}", fix="the file is truncated; re-download it")
                done += n
        return buf.view(SAFETENSORS_DTYPES[info.dtype])


__all__ = ["FLOAT_CODES", "SAFETENSORS_DTYPES", "TensorInfo", "WeightIndex", "read_header", "read_header_and_metadata"]
