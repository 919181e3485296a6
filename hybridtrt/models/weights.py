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

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hybridtrt.errors import CheckpointError

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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header.

    Raises:
        CheckpointError: The file is not a well-formed safetensors file (bad header length, bad
            JSON, unknown dtype, offsets that disagree with the shape or run past the file).
    """
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path.name} is not a readable safetensors file: {why}",
            fix="re-download or re-save the checkpoint (transformers' save_pretrained writes safetensors)",
        )

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"entry {name!r} is malformed ({e})") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}, which this reader does not know")
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * itemsize or not 0 <= begin <= end <= size - data_start:
            raise bad(f"tensor {name!r}: offsets [{begin}, {end}) disagree with {dtype} {list(shape)} or run past the file")
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return out


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


__all__ = ["FLOAT_CODES", "SAFETENSORS_DTYPES", "TensorInfo", "WeightIndex", "read_header"]
