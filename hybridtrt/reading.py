"""Reading the files users and other tools hand us — JSON and text read whole — without trusting them.

Every such file is read through `read_text` / `read_json`, which refuse with the caller's typed error (naming the
file, what was found and the fix), never a traceback or an allocation the size of the input:

- not a regular file (``/dev/zero``, a FIFO, a directory): refused before anything is read;
- larger than the caller's cap (default `MAX_TEXT_BYTES`): refused from its size, before reading it;
- not UTF-8 text (binary): refused;
- JSON that does not parse, or nests deeper than `MAX_JSON_DEPTH` (Python's parser would recurse until it
  raises RecursionError): refused;
- ``NaN`` / ``Infinity`` tokens: refused unless the caller accepts them (HF configs carry ``Infinity``).

`expect_object` turns "the top level must be an object" into the same kind of error.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from hybridtrt.errors import HybridTrtError
from hybridtrt.files import human_bytes

#: Default cap on a JSON or text file read whole (manifests, sidecars, configs, prompt files): 64 MiB.
MAX_TEXT_BYTES = 64 * 2**20
#: Deepest nesting accepted in a JSON file (ours nest ≤ 6; HF configs ≤ 4).
MAX_JSON_DEPTH = 64




def regular_file_size(path: str | Path, *, what: str, error: type[HybridTrtError], fix: str) -> int:
    """The size of ``path``, refused unless it is a regular file (not ``/dev/zero``, a FIFO or a directory).

    Raises:
        error: It cannot be stat'ed or is not a regular file.
    """
    try:
        info = Path(path).stat()
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})", fix=fix) from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file", fix=fix)
    return info.st_size


def read_text(path: str | Path, *, what: str, error: type[HybridTrtError], fix: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, read whole.

    Args:
        path: The file.
        what: What the file is, for the message (e.g. ``"the export manifest"``).
        error: The typed error to raise (`ArtefactError`, `ConfigError`, `InputError`, ...).
        fix: The fix to print.
        limit: Largest size accepted, in bytes.

    Raises:
        error: Missing, not a regular file, larger than ``limit``, or not UTF-8.
    """
    path = Path(path)
    size = regular_file_size(path, what=what, error=error, fix=fix)
    if size > limit:
        raise error(f"{what} {path} is {human_bytes(size)}, more than the {human_bytes(limit)} it may be", fix=fix)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})", fix=fix) from None
    if len(data) > limit:  # grew since stat
        raise error(f"{what} {path} is more than the {human_bytes(limit)} it may be", fix=fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}; a binary file?)", fix=fix) from None


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str, *, source: str, error: type[HybridTrtError], fix: str, allow_nonfinite: bool = False) -> Any:
    """``json.loads(text)`` with the refusals of `read_json` (``source`` names where the text came from)."""

    def refuse_constant(token: str) -> Any:
        raise ValueError(f"{token} is not a JSON number")

    try:
        value = json.loads(text) if allow_nonfinite else json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise error(f"{source} nests deeper than Python's JSON parser can follow", fix=fix) from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise error(f"{source} is not valid JSON ({e})", fix=fix) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise error(f"{source} nests {_depth(value)} levels deep, more than the {MAX_JSON_DEPTH} accepted", fix=fix)
    return value


def read_json(
    path: str | Path,
    *,
    what: str,
    error: type[HybridTrtError],
    fix: str,
    limit: int = MAX_TEXT_BYTES,
    allow_nonfinite: bool = False,
) -> Any:
    """The parsed JSON of ``path`` (see the module docstring for what is refused).

    Raises:
        error: See `read_text` and `parse_json`.
    """
    text = read_text(path, what=what, error=error, fix=fix, limit=limit)
    return parse_json(text, source=f"{what} {path}", error=error, fix=fix, allow_nonfinite=allow_nonfinite)


def expect_object(value: Any, *, source: str, error: type[HybridTrtError], fix: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``error`` naming what it is."""
    if not isinstance(value, dict):
        raise error(f"{source} must be a JSON object, it is a {type(value).__name__}", fix=fix)
    return value


def inside(root: str | Path, name: str, *, what: str, error: type[HybridTrtError], fix: str) -> Path:
    """``root / name`` for a file name read from a file in ``root`` (a manifest, a sidecar, an index, an ONNX
    external-data entry), refused unless it stays inside ``root``: no absolute path, no ``..``, and no symlink
    (of the file or a folder on the way) that leaves ``root``.

    Raises:
        error: ``name`` is not a non-empty relative path that resolves inside ``root``.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what} names the file {name!r}, which is not a file name", fix=fix)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise error(f"{what} names the file {name!r} outside its folder {root} (absolute or '..')", fix=fix)
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise error(f"{what} names the file {name!r}, a link that leaves its folder {root} (to {target})", fix=fix)
    return base / relative


__all__ = ["MAX_JSON_DEPTH", "MAX_TEXT_BYTES", "expect_object", "inside", "parse_json", "read_json", "read_text", "regular_file_size"]
