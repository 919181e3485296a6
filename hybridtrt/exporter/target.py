"""The export's output directory: one writer at a time, nothing half-done that looks done, and the
previous export or the new one at every instant.

`OutputDir` is entered before any real work and

- locks the directory (``flock`` on the directory itself, so no lock file is left behind): a
  second export into it refuses at once with a typed error naming the holder's pid;
- refuses a directory that holds anything but hybridtrt artefacts (an unmarked ``.partial-*``
  folder included), or the checkpoint directory itself, unless ``force``;
- removes the ``.partial-*`` directories this tool left behind when killed, and only those: every
  partial it creates holds an ownership marker (`MARKER_FILE`: tool, version, pid, its start time,
  host, boot id, creation time, output directory); one is removed when its owner is gone (same
  host and boot, pid not running or now another process; another host's only after
  `OTHER_HOST_STALE_S` untouched), every removal and every partial kept is reported, and a folder
  without a valid marker is never touched;
- gives the export a fresh ``.partial-<id>`` directory (locked too) to write and verify in.

`publish` makes the new export appear at once. Its files are fsynced, then:

- **swap** (a previous export is there): the partial directory is moved beside the output
  directory and the two are exchanged with ``renameat2(RENAME_EXCHANGE)`` (Linux ≥ 3.15; one
  atomic step), then the previous export, now in the sibling, is deleted (anything in it that is
  not an export file — put there while publishing — is moved back). Both sides carry the marker
  through the exchange, so a kill at any step leaves the output directory holding the previous
  export or the new one, and a marked ``.partial-*`` that readers refuse by name and the next
  export removes.
- **in place** (no previous export, so the directory goes from "no export" to the new one; or a
  swap is impossible — no ``renameat2``, the directory is a mount point, its parent is not
  writable, it holds files besides the export's): the previous manifest goes first, the files are
  moved in, the directory is fsynced, and ``hybridtrt.json`` comes last. A kill then leaves no
  complete export rather than a wrong one; `publish_note` says why the swap was not possible.

Disk-full errors inside `writing` become an `ExportError` naming the directory, what was being
written, and the bytes the export needs against the bytes free.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridtrt.errors import ExportError, HybridTrtError
from hybridtrt.exporter.manifest import PARTIAL_DIR_PREFIX
from hybridtrt.files import fsync_dir, fsync_file, human_bytes

PARTIAL_PREFIX = PARTIAL_DIR_PREFIX  # readers refuse such a directory by name (manifest.read_manifest)
#: Ownership marker inside every partial directory this tool creates (and, while publishing, in
#: the output directory, so the previous export carries it through the swap).
MARKER_FILE = ".hybridtrt-partial.json"
#: A partial made on another host is removed only when it and its marker are older than this.
OTHER_HOST_STALE_S = 7 * 24 * 3600
_TOOL = "hybridtrt"
_MARKER_LIMIT = 64 * 1024
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100




def _reached(step: str) -> None:
    """Called after each step of `OutputDir.publish` (a seam for the kill tests; does nothing)."""


# --- ownership markers -------------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def marker(output: Path) -> dict[str, Any]:
    """The ownership marker of a partial directory made by this process for ``output``."""
    from hybridtrt import __version__

    now = time.time()
    return {
        "tool": _TOOL,
        "version": __version__,
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "created": now,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "output": str(output),
    }


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` if it is a real directory holding a valid one, else None (not ours)."""
    from hybridtrt.reading import read_json

    path = folder / MARKER_FILE
    if folder.is_symlink() or not folder.is_dir() or path.is_symlink():
        return None
    try:
        value = read_json(path, what="marker", error=HybridTrtError, fix="", limit=_MARKER_LIMIT)
    except HybridTrtError:
        return None
    if not isinstance(value, dict) or value.get("tool") != _TOOL:
        return None
    if not isinstance(value.get("pid"), int) or not isinstance(value.get("host"), str) or not isinstance(value.get("created"), (int, float)):
        return None
    return value


def owner_gone(mark: dict[str, Any], folder: Path) -> tuple[bool, str]:
    """Whether the process that made a partial is gone, and how that is known (or why it may not be)."""
    pid, host = mark["pid"], mark["host"]
    if host != socket.gethostname():
        newest = max([mark["created"], *(p.lstat().st_mtime for p in [folder, *folder.iterdir()])])
        age = time.time() - newest
        if age > OTHER_HOST_STALE_S:
            return True, f"made by pid {pid} on host {host}, untouched for {age / 86400:.0f} days"
        return False, f"made by pid {pid} on host {host} {age / 3600:.1f} h ago: it may still be running there"
    if mark.get("boot_id") and _boot_id() and mark["boot_id"] != _boot_id():
        return True, f"made by pid {pid} before this machine restarted"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, f"made by pid {pid}, which is no longer running"
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    if mark.get("pid_start") and start and start != mark["pid_start"]:
        return True, f"made by pid {pid}, which is no longer running (the pid is another process's now)"
    return False, f"made by pid {pid}, which is still running"


def _empty_dir(folder: Path) -> bool:
    try:
        return folder.is_dir() and not folder.is_symlink() and next(folder.iterdir(), None) is None
    except OSError:
        return False


def _remove_marked(folder: Path) -> None:
    """Delete a partial directory with its marker last (a kill midway leaves it still marked)."""
    for child in folder.iterdir():
        if child.name == MARKER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / MARKER_FILE).unlink()
    folder.rmdir()


# --- renameat2 ---------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    """Remove an artefact: a file, or a directory of files (a tensor-parallel export's ``rank{r}/``)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _renameat2(source: Path, dest: Path, flags: int) -> None:
    """``renameat2(2)``; OSError(ENOSYS) where the C library has no such call."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux-only")
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is None:
        raise OSError(errno.ENOSYS, "the C library has no renameat2")
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(dest), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(source), None, str(dest))


class _NoSwap(Exception):
    """The swap is not possible here (the message says why); publish in place instead."""


class OutputDir:
    """Context manager around one export into ``path`` (see the module docstring).

    Args:
        path: The output directory (created).
        artefacts: File names an export writes (the only ones a reused directory may hold).
        manifest: The manifest file name (published last, removed first).
        checkpoint: The source checkpoint directory (never exported into without ``force``).
        force: Export into a foreign non-empty directory or the checkpoint directory anyway.

    Attributes:
        partial: The directory to write into (inside ``path``).
        removed_partials: ``"PATH (whose, why it was safe)"`` for each leftover partial removed.
        kept_partials: ``"PATH (whose, why it was kept)"`` for each marked partial left alone.
        planned: Bytes the export needs on disk (set by `check_space`; named by disk-full errors).
        publish_note: How `publish` published: ``"swap"``, ``"in place"`` (nothing to replace),
            or ``"in place: <why the swap was impossible>"``.
    """

    def __init__(self, path: Path, artefacts: set[str], manifest: str, checkpoint: Path | None = None, force: bool = False) -> None:
        self.path = Path(path)
        self.artefacts = set(artefacts) | {manifest}
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.force = force
        self.partial = self.path / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}"
        self.removed_partials: list[str] = []
        self.kept_partials: list[str] = []
        self.planned = 0
        self.publish_note = ""
        self._fds: list[int] = []
        self._real: Path = self.path

    def __enter__(self) -> OutputDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fds.append(os.open(self.path, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            raise ExportError(f"output directory {self.path} is not writable ({e.strerror or e})", fix="choose a directory you can write to with -o/--output") from None
        try:
            self._real = self.path.resolve()
            self._lock(self._fds[0])
            self._refuse_foreign()
            self._remove_stale_partials()
            try:
                self.partial.mkdir()
                self._fds.append(os.open(self.partial, os.O_RDONLY | os.O_DIRECTORY))
                fcntl.flock(self._fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)  # held through the swap, when it becomes the output directory
                (self.partial / MARKER_FILE).write_text(json.dumps(marker(self._real), indent=1) + "\n")
            except OSError as e:
                raise ExportError(f"output directory {self.path} is not writable ({e.strerror or e})", fix="choose a directory you can write to with -o/--output") from None
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._unlock()

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = sorted({str(m["pid"]) for p in self.path.glob(f"{PARTIAL_PREFIX}*") if (m := read_marker(p))})
            raise ExportError(
                f"another hybridtrt export is writing into {self.path}" + (f" (pid {', '.join(pids)})" if pids else ""),
                fix="wait for it to finish, or export into another directory with -o",
            ) from None

    def _unlock(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds = []

    def _refuse_foreign(self) -> None:
        if self.force:
            return
        if self.checkpoint is not None and self._real == Path(self.checkpoint).resolve():
            raise ExportError(
                f"-o {self.path} is the checkpoint directory itself",
                fix="export into a directory of its own (or pass --force to write beside the checkpoint's files)",
            )
        foreign = sorted(p.name for p in self.path.iterdir() if not self._ours(p))
        if foreign:
            shown = ", ".join(foreign[:6]) + (f" … (+{len(foreign) - 6} more)" if len(foreign) > 6 else "")
            unmarked = [n for n in foreign if n.startswith(PARTIAL_PREFIX)]
            raise ExportError(
                f"output directory {self.path} is not empty and not a hybridtrt export (it holds {shown})"
                + (f"; {', '.join(unmarked)} carries no hybridtrt marker, so this tool did not make it and will not remove it" if unmarked else ""),
                fix="export into an empty or new directory, move those files away, or pass --force to write beside them",
            )

    def _ours(self, entry: Path) -> bool:
        """An export file, a publish marker, a partial directory with our marker, or an empty one (a
        kill between creating a partial and marking it; left alone, but not in the way)."""
        if entry.name in self.artefacts or entry.name == MARKER_FILE:
            return True
        return entry.name.startswith(PARTIAL_PREFIX) and (read_marker(entry) is not None or _empty_dir(entry))

    def _remove_stale_partials(self) -> None:
        """Remove marked partials whose owner is gone: in the output directory, and beside it the
        ones a swap left (their marker names this output directory). Unmarked ones are not touched."""
        candidates = sorted(self.path.glob(f"{PARTIAL_PREFIX}*"))
        with contextlib.suppress(OSError):  # an unreadable parent has nothing of ours to clean
            candidates += sorted(p for p in self._real.parent.glob(f"{PARTIAL_PREFIX}*") if p.parent != self._real)
        for p in candidates:
            mark = read_marker(p)
            if p.parent == self.path and mark is None and _empty_dir(p):
                self.kept_partials.append(f"{p.name} (empty and unmarked: left alone; remove it yourself)")
                continue
            if p == self.partial or mark is None or (p.parent != self.path and mark.get("output") != str(self._real)):
                continue
            shown = p.name if p.parent == self.path else str(p)
            gone, why = owner_gone(mark, p)
            if not gone:
                self.kept_partials.append(f"{shown} ({why})")
                continue
            try:
                _remove_marked(p)
            except OSError as e:
                self.kept_partials.append(f"{shown} ({why}; could not remove it: {e.strerror or e})")
                continue
            self.removed_partials.append(f"{shown} ({why})")
        stray = self.path / MARKER_FILE  # a publish killed in its swap window
        if (mark := read_marker(self.path)) is not None and owner_gone(mark, self.path)[0]:
            stray.unlink()

    def check_space(self, nbytes: int) -> None:
        """Refuse up front when the file system has less than ``nbytes`` free (and remember
        ``nbytes`` as what the export needs)."""
        self.planned = max(self.planned, nbytes)
        free = shutil.disk_usage(self.partial).free
        if nbytes > free:
            raise ExportError(
                f"not enough disk space in {self.path}: the export needs {human_bytes(nbytes)}, {human_bytes(free)} are free",
                fix=f"free {human_bytes(nbytes - free)} or more, or export to another file system with -o",
            )

    @contextlib.contextmanager
    def writing(self, nbytes: int, what: str = "the export") -> Iterator[None]:
        """Turn a full disk (ENOSPC/EDQUOT) while writing ``what`` (``nbytes``) into an `ExportError`."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(self.path).free
            needs = [f"{human_bytes(nbytes)} for it"] if nbytes else []
            needs += [f"about {human_bytes(self.planned)} for the whole export"] if self.planned > nbytes else []
            raise ExportError(
                f"disk full while writing {what} into {self.path}: "
                + (f"it needs {', '.join(needs)}; " if needs else "")
                + f"{human_bytes(free)} are free now",
                fix="free space, or export to another file system with -o",
            ) from None

    # --- publish ---------------------------------------------------------------------------

    def publish(self, names: list[str]) -> None:
        """Make the files ``names`` of the partial directory the output directory's export, with
        the previous export or the new one there at every instant (see the module docstring).
        Artefacts of a previous export that are not in ``names`` are removed."""
        with self.writing(0, "the published files' names"):
            for name in names:
                fsync_file(self.partial / name)
            fsync_dir(self.partial)
            _reached("synced")
            if not (self.path / self.manifest).is_file():
                self._publish_in_place(names)
                self.publish_note = "in place"
                return
            try:
                self._publish_by_swap(names)
                self.publish_note = "swap"
            except _NoSwap as e:
                self._publish_in_place(names)
                self.publish_note = f"in place: {e}"

    def _publish_in_place(self, names: list[str]) -> None:
        previous = self.path / self.manifest
        if previous.exists():
            previous.unlink()
            fsync_dir(self.path)
            _reached("previous manifest removed")
        for name in sorted(self.artefacts - set(names)):
            with contextlib.suppress(FileNotFoundError):
                _remove(self.path / name)
                _reached(f"removed {name}")
        for name in names:
            if name != self.manifest:
                if (self.path / name).is_dir() and not (self.path / name).is_symlink():
                    shutil.rmtree(self.path / name)  # an artefact directory (a tensor-parallel export's rank{r}/) left without a manifest
                os.replace(self.partial / name, self.path / name)
                _reached(f"moved {name}")
        fsync_dir(self.path)
        _reached("files synced")
        os.replace(self.partial / self.manifest, self.path / self.manifest)
        fsync_dir(self.path)
        _reached("manifest published")

    def _swap_blocker(self) -> str | None:
        """Why the output directory cannot be exchanged with a sibling, or None."""
        parent = self._real.parent
        if not sys.platform.startswith("linux"):
            return "renameat2(RENAME_EXCHANGE) is Linux-only"
        if os.path.ismount(self._real):
            return f"{self.path} is a mount point"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"its parent directory {parent} is not writable"
        extra = sorted(p.name for p in self.path.iterdir() if p != self.partial and p.name not in self.artefacts and p.name != MARKER_FILE)
        if extra:
            return f"{self.path} holds {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''} besides the export"
        return None

    def _publish_by_swap(self, names: list[str]) -> None:
        blocker = self._swap_blocker()
        if blocker:
            raise _NoSwap(blocker)
        parent = self._real.parent
        for extra in self.partial.iterdir():  # only the new export and its marker go through the exchange
            if extra.name in names or extra.name == MARKER_FILE:
                continue
            if extra.is_dir() and not extra.is_symlink():
                shutil.rmtree(extra)
            else:
                extra.unlink()
        mode = os.stat(self._real).st_mode & 0o7777
        os.chmod(self.partial, mode)  # the new directory keeps the old one's permissions
        shutil.copyfile(self.partial / MARKER_FILE, self.path / MARKER_FILE)  # the previous export carries a marker out
        fsync_file(self.path / MARKER_FILE)
        fsync_dir(self.path)
        _reached("previous export marked")
        sibling = self._move_beside(parent)
        _reached("new export moved beside")
        try:
            _renameat2(sibling, self._real, _RENAME_EXCHANGE)
        except OSError as e:  # unsupported here (file system, kernel, bind mount): undo, publish in place
            os.rename(sibling, self.partial)
            (self.path / MARKER_FILE).unlink()
            fsync_dir(parent)
            fsync_dir(self.path)
            raise _NoSwap(f"the file system refused renameat2(RENAME_EXCHANGE): {e.strerror or e}") from None
        fsync_dir(parent)
        _reached("exchanged")
        (self._real / MARKER_FILE).unlink()
        fsync_dir(self._real)
        _reached("new export unmarked")
        self._retire(sibling)
        _reached("previous export removed")

    def _move_beside(self, parent: Path) -> Path:
        """Move the partial directory next to the output directory (a fresh ``.partial-*`` name)."""
        for _ in range(8):
            sibling = parent / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}"
            try:
                _renameat2(self.partial, sibling, _RENAME_NOREPLACE)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EBUSY, errno.EROFS):
                    raise _NoSwap(f"the partial directory cannot be moved beside {self.path} ({e.strerror or e})") from None
                raise
            fsync_dir(parent)
            fsync_dir(self.path)
            return sibling
        raise _NoSwap(f"no free .partial-* name beside {self.path}")

    def _retire(self, sibling: Path) -> None:
        """Delete the previous export (now in ``sibling``); move anything else in it back."""
        for child in sibling.iterdir():
            if child.name in self.artefacts:
                _remove(child)
            elif child.name != MARKER_FILE:  # not ours: put there while publishing
                with contextlib.suppress(OSError):  # a name taken meanwhile: reported below
                    _renameat2(child, self.path / child.name, _RENAME_NOREPLACE)
        if any(p.name != MARKER_FILE for p in sibling.iterdir()):
            self.kept_partials.append(f"{sibling} (the previous export's folder, holding files that could not be moved back into {self.path})")
            return
        (sibling / MARKER_FILE).unlink()
        sibling.rmdir()
        fsync_dir(self._real.parent)

__all__ = ["MARKER_FILE", "PARTIAL_PREFIX", "OutputDir", "owner_gone", "read_marker"]
