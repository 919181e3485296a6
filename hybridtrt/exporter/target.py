"""The export's output directory: one writer at a time, nothing half-done that looks done.

`OutputDir` is entered before any real work and

- locks the directory (``flock`` on the directory itself, so no lock file is left behind): a
  second export into it refuses at once with a typed error naming the holder's pid;
- removes ``.partial-*`` directories left by killed exports (the lock proves nobody owns them)
  and reports them;
- refuses a directory that holds anything but hybridtrt artefacts, or the checkpoint directory
  itself, unless ``force``;
- gives the export a fresh ``.partial-<id>`` directory to write and verify in; `publish` moves
  the files into place with ``hybridtrt.json`` last (the previous manifest goes first), and removes
  artefacts of a previous export that this one does not write.

Disk-full errors inside `writing` become an `ExportError` naming the directory and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from hybridtrt.errors import ExportError

PARTIAL_PREFIX = ".partial-"
_PID_FILE = "pid"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
        removed_partials: Stale ``.partial-*`` directories that were removed.
    """

    def __init__(self, path: Path, artefacts: set[str], manifest: str, checkpoint: Path | None = None, force: bool = False) -> None:
        self.path = Path(path)
        self.artefacts = set(artefacts) | {manifest}
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.force = force
        self.partial = self.path / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}"
        self.removed_partials: list[str] = []
        self._fd: int | None = None

    def __enter__(self) -> OutputDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ExportError(f"output directory {self.path} is not writable ({e.strerror or e})", fix="choose a directory you can write to with -o/--output") from None
        try:
            self._lock()
            self._refuse_foreign()
            self._remove_stale_partials()
            try:
                self.partial.mkdir()
                (self.partial / _PID_FILE).write_text(str(os.getpid()))
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

    def _lock(self) -> None:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = sorted(p.name for p in self.path.glob(f"{PARTIAL_PREFIX}*"))
            pids = []
            for name in holders:
                with contextlib.suppress(OSError):
                    pids.append((self.path / name / _PID_FILE).read_text().strip())
            raise ExportError(
                f"another hybridtrt export is writing into {self.path}" + (f" (pid {', '.join(pids)})" if pids else ""),
                fix="wait for it to finish, or export into another directory with -o",
            ) from None

    def _unlock(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _refuse_foreign(self) -> None:
        if self.force:
            return
        if self.checkpoint is not None and self.path.resolve() == Path(self.checkpoint).resolve():
            raise ExportError(
                f"-o {self.path} is the checkpoint directory itself",
                fix="export into a directory of its own (or pass --force to write beside the checkpoint's files)",
            )
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in self.artefacts and not p.name.startswith(PARTIAL_PREFIX))
        if foreign:
            shown = ", ".join(foreign[:6]) + (f" … (+{len(foreign) - 6} more)" if len(foreign) > 6 else "")
            raise ExportError(
                f"output directory {self.path} is not empty and not a hybridtrt export (it holds {shown})",
                fix="export into an empty or new directory, or pass --force to write beside those files",
            )

    def _remove_stale_partials(self) -> None:
        for p in sorted(self.path.glob(f"{PARTIAL_PREFIX}*")):
            if p != self.partial and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                self.removed_partials.append(p.name)

    def check_space(self, nbytes: int) -> None:
        """Refuse up front when the file system has less than ``nbytes`` free."""
        free = shutil.disk_usage(self.partial).free
        if nbytes > free:
            raise ExportError(
                f"not enough disk space in {self.path}: the export needs {_human(nbytes)}, {_human(free)} are free",
                fix="free space, or export to another file system with -o",
            )

    @contextlib.contextmanager
    def writing(self, nbytes: int) -> Iterator[None]:
        """Turn a full disk (ENOSPC/EDQUOT) while writing ``nbytes`` into an `ExportError`."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(self.path).free
            raise ExportError(
                f"disk full while writing the export into {self.path}: it needs {_human(nbytes)} ({_human(free)} free now)",
                fix="free space, or export to another file system with -o",
            ) from None

    def publish(self, names: list[str]) -> None:
        """Move ``names`` from the partial directory into place; the manifest goes first out and
        last in, so an interrupted publish never leaves a directory that claims to be complete.
        Artefacts of a previous export that are not in ``names`` are removed."""
        stale = self.path / self.manifest
        if stale.exists():
            stale.unlink()
        for name in sorted(self.artefacts - set(names)):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        for name in names:
            if name != self.manifest:
                os.replace(self.partial / name, self.path / name)
        os.replace(self.partial / self.manifest, self.path / self.manifest)


__all__ = ["PARTIAL_PREFIX", "OutputDir"]
