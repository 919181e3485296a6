"""How much memory this process can still allocate, asked before a command allocates the bulk of it.

The least of what the machine and the process's limits allow:

- ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can hand out without swapping);
- the cgroup's ``memory.max`` less ``memory.current`` (v2; v1's ``memory.limit_in_bytes`` less
  ``memory.usage_in_bytes``), for this cgroup and every parent — a container's limit;
- ``RLIMIT_AS`` less what the process has mapped (``VmSize``) — ``ulimit -v``;
- ``HYBRIDTRT_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix), a cap the user sets on purpose.

Imports nothing heavy: the check runs before torch loads a checkpoint.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hybridtrt.errors import HybridTrtError, InputError
from hybridtrt.files import human_bytes

#: Environment variable that caps the memory a command may plan to use.
ENV = "HYBRIDTRT_MEMORY_LIMIT"
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}




@dataclass(frozen=True)
class Available:
    """Bytes this process may still allocate, and which limit says so (``None``: none is known)."""

    nbytes: int | None
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _env_limit() -> int | None:
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", raw, re.IGNORECASE)
    if not m:
        raise InputError(f"{ENV}={raw!r} is not a size", fix=f"give bytes or a size such as 8G ({ENV}=8G), or unset it")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Least ``limit - usage`` over this process's cgroup and its parents (None: unlimited/unknown)."""
    rooms: list[int] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, limit_file, usage_file = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            base, limit_file, usage_file = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            limit, usage = _read_int(path / limit_file), _read_int(path / usage_file)
            if limit is not None and limit < 2**60:
                rooms.append(max(limit - (usage or 0), 0))
            if path == base or base not in path.parents:
                break
            path = path.parent
    return min(rooms) if rooms else None


def _rlimit_room() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                mapped = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - mapped, 0)


def available_memory() -> Available:
    """The least of the limits above that are known (see the module docstring).

    Raises:
        InputError: ``HYBRIDTRT_MEMORY_LIMIT`` is set to something that is not a size.
    """
    found = [
        (n, source)
        for n, source in (
            (_env_limit(), ENV),
            (_meminfo("MemAvailable"), "MemAvailable"),
            (_cgroup_room(), "the cgroup's memory.max less its usage"),
            (_rlimit_room(), "RLIMIT_AS (ulimit -v) less what the process has mapped"),
        )
        if n is not None
    ]
    if not found:
        return Available(None, "unknown")
    n, source = min(found)
    return Available(n, source)


def check_memory(needed: int, *, what: str, fix: str, error: type[HybridTrtError] = InputError) -> None:
    """Refuse, before allocating, a plan that needs more than `available_memory`.

    Args:
        needed: Bytes the command will allocate.
        what: What needs them, for the message (``"the PyTorch reference of CKPT in fp32"``).
        fix: How to proceed with less memory.
        error: The typed error to raise.

    Raises:
        error: ``needed`` exceeds what is available (the message names both and the limit).
    """
    room = available_memory()
    if room.nbytes is not None and needed > room.nbytes:
        raise error(f"{what} needs {human_bytes(needed)} of memory; {human_bytes(room.nbytes)} is available ({room.source})", fix=fix)


__all__ = ["ENV", "Available", "available_memory", "check_memory"]
