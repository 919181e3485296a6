"""Checks ``hybridtrt validate`` makes in its first second, before anything heavy is imported or
loaded: argument values and combinations, and that every file it will write can be written.
Imports nothing but the error types, so a bad flag costs no torch import."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hybridtrt.errors import InputError

BACKENDS = ("ort", "trt")
REFERENCES = ("pytorch", "hf")


def check_counts(*, steps: int | None = None, random_n: int | None = None) -> None:
    """``--steps`` ≥ 0 and ``--random`` ≥ 1, as typed errors."""
    if steps is not None and steps < 0:
        raise InputError(f"--steps must be ≥ 0, got {steps}", fix="give the number of decode steps to compare, e.g. --steps 8")
    if random_n is not None and random_n < 1:
        raise InputError(f"--random needs N ≥ 1, got {random_n}", fix="give the number of random prompts, e.g. --random 4")


def check_arguments(
    *,
    backend: str = "ort",
    reference: str = "pytorch",
    steps: int = 8,
    random_n: int | None = None,
    load_outputs: Sequence[str | Path] | None = None,
    target_cosine: float | None = None,
) -> None:
    """Refuse bad values and combinations (typed `InputError`s)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", fix=f"use one of {BACKENDS}")
    if reference not in REFERENCES:
        raise InputError(f"unknown reference {reference!r}", fix=f"use one of {REFERENCES}")
    check_counts(steps=steps, random_n=random_n)
    if target_cosine is not None and not 0 < target_cosine <= 1:
        raise InputError(f"--target-cosine must be in (0, 1], got {target_cosine}", fix="e.g. --target-cosine 0.99")
    if load_outputs and (backend != "ort" or reference != "pytorch"):
        raise InputError(
            "--load-outputs compares recorded outputs with the PyTorch reference; it takes no --backend/--reference",
            fix="drop --backend/--reference",
        )


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_output_file(path: str | Path, flag: str) -> None:
    """``flag FILE`` will be written: its directory exists and is writable, and it is not a directory."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {p} is a directory", fix=f"give a file name, e.g. {flag} {p / 'report.json'}")
    parent = p.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {p}: directory {parent} does not exist", fix=f"create it first (mkdir -p {parent}) or write elsewhere")
    if not _writable_dir(parent):
        raise InputError(f"{flag} {p}: directory {parent} is not writable", fix="write somewhere you can write to")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{flag} {p} exists and is not writable", fix="remove it or write elsewhere")


def check_output_dir(path: str | Path, flag: str) -> None:
    """``flag DIR`` will be created if needed and written into: it is not a file, and it (or the
    nearest existing parent that would hold it) is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {p} is a file, not a directory", fix=f"give a directory, e.g. {flag} {p.with_suffix('')}-report")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {p}: {existing} is a file, so the directory cannot be created", fix="write elsewhere")
    if not _writable_dir(existing):
        raise InputError(f"{flag} {p}: {existing} is not writable", fix="write somewhere you can write to")


__all__ = ["BACKENDS", "REFERENCES", "check_arguments", "check_counts", "check_output_dir", "check_output_file"]
