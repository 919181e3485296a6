"""State snapshots: prefill a shared prompt prefix once, continue from it many times.

A `Snapshot` is the full hybrid state after a prefix — every conv and SSM state and the KV cache up
to the prefix's last position (DESIGN.md §4 layouts, ``present_*`` names) — plus the prefix's
attention mask, as CPU tensors that belong to no backend: a snapshot taken on one runtime restores
on any other with the same model (reference, ONNX Runtime of either KV flavour, TensorRT).

Backends implement two methods next to the `Stepper` protocol::

    snapshot(state, attention_mask [B, past]) -> Snapshot
    restore(snapshot) -> state          # a fresh state; the snapshot stays valid

``generate(..., snapshot=snap)`` then continues after the prefix. For a Mamba layer this is the
prefix caching that peers offer for SSM states: the state after the prefix is all there is to keep.

**A snapshot file is checked before it is used.** `Snapshot.save` records, in the safetensors
``__metadata__``: the format and its version, the identity of the model it belongs to (the sha256 of
the source checkpoint, as the export's ``hybridtrt.json`` records it) and a sha256 over every tensor.
`Snapshot.load` reads the file with the checkpoint reader's own header checks (never a memory map,
never more than the header says), then refuses: a file without the record; a checksum that does not
match (the tensors were edited after the snapshot was written); NaN/Inf in a state; a mask that is
not int64 ``[B, past]`` of 0/1 with left padding only; a state whose batch or KV length disagrees with
the mask. `check_snapshot` then holds it against the model that will continue it: the same state
names, shapes and dtypes as the backend's own snapshot, and the same checkpoint identity when both
sides know it. The checksum catches edits and corruption, not a forger (anyone can recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hybridtrt.errors import InputError

MASK_KEY = "__attention_mask__"
#: ``__metadata__["format"]`` of a snapshot file, and the version of its record.
FORMAT, FORMAT_VERSION = "hybridtrt-snapshot", "1"
#: Identity key compared between a snapshot and the model that continues it.
CHECKPOINT_SHA256 = "checkpoint_sha256"
_KV = re.compile(r"^present\.\d+\.(key|value)$")
_FIX_REMAKE = "write the snapshot again with `hybridtrt generate ARTEFACT --prompt … --save-snapshot FILE` on this model"


def _is_kv(name: str) -> bool:
    return bool(_KV.match(name))


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """The state of ``batch`` rows after ``past`` positions.

    Attributes:
        states: ``{present_name: CPU tensor}``: conv ``[B, conv_dim, K]``, SSM ``[B, H, P, N]``,
            KV ``[B, H_kv, past, D]``.
        attention_mask: ``[B, past]`` int64 (left padding of the prefix).
        identity: What model the states belong to (``checkpoint_sha256``, ...; see `check_snapshot`).
    """

    states: dict[str, Tensor]
    attention_mask: Tensor
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def past(self) -> int:
        return int(self.attention_mask.shape[1])

    def rows(self, batch: int) -> Snapshot:
        """This snapshot for ``batch`` rows: itself, or a one-row snapshot repeated.

        Raises:
            InputError: A multi-row snapshot asked for a different number of rows.
        """
        if batch == self.batch:
            return self
        if self.batch != 1:
            raise InputError(
                f"the snapshot has {self.batch} rows, the continuation has {batch}",
                fix="continue with as many rows as the snapshot, or snapshot a single-row prefix (it repeats to any batch)",
            )
        expand = lambda t: t.expand(batch, *t.shape[1:]).contiguous()  # noqa: E731
        return Snapshot({k: expand(v) for k, v in self.states.items()}, expand(self.attention_mask), self.identity)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the snapshot as one safetensors file (states by name, the mask, and the record of
        the module docstring), atomically: a temporary file in the same directory, then renamed.

        Raises:
            InputError: ``path`` exists and ``overwrite`` is False, or it cannot be written.
        """
        from safetensors.torch import save_file

        path = Path(path)
        check_writable(path, overwrite=overwrite)
        tensors = {**{k: v.detach().cpu().contiguous() for k, v in self.states.items()}, MASK_KEY: self.attention_mask.detach().cpu().contiguous()}
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "identity": json.dumps(self.identity, sort_keys=True), "sha256": tensors_sha256(tensors)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except OSError as e:
            raise InputError(f"the snapshot cannot be written to {path} ({e.strerror or e})", fix="write it somewhere with room and permission") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a file written by `save`, checked (see the module docstring).

        Raises:
            InputError: Not a readable snapshot, no record, a checksum mismatch, NaN/Inf states, a bad
                mask or state shapes that disagree with it.
        """
        from hybridtrt.errors import CheckpointError
        from hybridtrt.memory import check_memory
        from hybridtrt.models.weights import WeightIndex, read_header_and_metadata
        from hybridtrt.reading import expect_object, parse_json

        path = Path(path)
        fix = _FIX_REMAKE
        infos, metadata = read_header_and_metadata(path, error=InputError, fix=fix)
        if metadata.get("format") != FORMAT or MASK_KEY not in infos:
            raise InputError(f"{path} has no hybridtrt snapshot record (written by another tool, or by hybridtrt before snapshots were checked)", fix=fix)
        if metadata.get("version") != FORMAT_VERSION:
            raise InputError(f"snapshot {path} has record version {metadata.get('version')!r}; this hybridtrt reads version {FORMAT_VERSION}", fix=fix)
        identity = expect_object(parse_json(metadata.get("identity", "{}"), source=f"the identity record of snapshot {path}", error=InputError, fix=fix), source=f"the identity record of snapshot {path}", error=InputError, fix=fix)
        if not all(isinstance(v, str) for v in identity.values()):
            raise InputError(f"the identity record of snapshot {path} holds non-string values", fix=fix)
        check_memory(sum(i.nbytes for i in infos.values()), what=f"snapshot {path}", fix="continue on a machine with more memory, or snapshot a shorter prefix")
        index = WeightIndex.from_headers(infos)
        try:
            tensors = {name: index.read(name) for name in infos}
        except CheckpointError as e:
            raise InputError(f"snapshot {path}: {e.message}", fix=fix) from None
        if tensors_sha256(tensors) != metadata.get("sha256"):
            raise InputError(f"snapshot {path} fails its checksum: its tensors were changed after it was written", fix=fix)
        mask = tensors.pop(MASK_KEY)
        snapshot = cls(tensors, mask, dict(identity))
        snapshot.check(str(path))
        return snapshot

    def check(self, source: str = "the snapshot") -> None:
        """Refuse a snapshot that is not self-consistent (see the module docstring).

        Raises:
            InputError: naming the tensor and what is wrong.
        """
        mask = self.attention_mask
        if mask.dtype != torch.int64 or mask.dim() != 2 or mask.shape[0] < 1:
            raise InputError(f"{source}: the attention mask is {mask.dtype} {list(mask.shape)}, not int64 [batch ≥ 1, past]", fix=_FIX_REMAKE)
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError(f"{source}: the attention mask holds values other than 0 and 1 (e.g. {int(mask[(mask != 0) & (mask != 1)][0])})", fix=_FIX_REMAKE)
        if self.past and not bool((mask[:, 1:] >= mask[:, :-1]).all() and (mask[:, -1] == 1).all()):
            raise InputError(f"{source}: the attention mask has padding on the right of a row; hybridtrt prefixes use left padding", fix=_FIX_REMAKE)
        for name, t in self.states.items():
            if not t.is_floating_point() or t.dim() < 2 or t.shape[0] != self.batch:
                raise InputError(f"{source}: state {name} is {t.dtype} {list(t.shape)}, not a float tensor of {self.batch} row(s)", fix=_FIX_REMAKE)
            if _is_kv(name) and (t.dim() != 4 or t.shape[2] != self.past):
                raise InputError(f"{source}: state {name} {list(t.shape)} does not hold the mask's {self.past} positions (dimension 2)", fix=_FIX_REMAKE)
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise InputError(f"{source}: state {name} has {bad} NaN/Inf value(s)", fix=_FIX_REMAKE)


def check_writable(path: str | Path, *, overwrite: bool = False, flag: str = "--save-snapshot") -> None:
    """``path`` can be written as a new file (cheap: run before the prefill).

    Raises:
        InputError: ``path`` is a directory, its directory is missing or not writable, or it exists
            and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory", fix=f"give a file name, e.g. {flag} {path / 'prefix.safetensors'}")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: directory {path.parent} does not exist", fix=f"create it first (mkdir -p {path.parent}) or write elsewhere")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: directory {path.parent} is not writable", fix="write somewhere you can write to")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(f"{flag} {path} exists", fix="pass --force to replace it, or write to a new file")


def expected_layout(stepper: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{present_name: (shape of one row at past 0, dtype)}``: the backend's own snapshot of a zero state."""
    probe = take_snapshot(stepper, stepper.zero_state(1), torch.zeros(1, 0, dtype=torch.long))
    return {name: (tuple(t.shape[1:]), t.dtype) for name, t in probe.states.items()}


def check_snapshot(snapshot: Snapshot, stepper: Any, identity: dict[str, str] | None = None, *, source: str = "the snapshot") -> None:
    """Refuse a snapshot the model behind ``stepper`` cannot continue.

    Args:
        snapshot: A loaded (self-consistent) snapshot.
        stepper: The backend that will continue it.
        identity: The backend's model identity (``checkpoint_sha256``); compared where both know it.
        source: How to name the snapshot in messages (its file).

    Raises:
        InputError: Other state names (another model), other shapes or dtypes, or another checkpoint.
    """
    expected = expected_layout(stepper)
    missing = [n for n in expected if n not in snapshot.states]
    extra = [n for n in snapshot.states if n not in expected]
    if missing or extra:
        parts = ([f"lacks {', '.join(missing[:4])}"] if missing else []) + ([f"has {', '.join(extra[:4])}, which this model does not"] if extra else [])
        raise InputError(f"{source} is of another model: it {' and '.join(parts)}", fix=_FIX_REMAKE)
    for name, (shape, dtype) in expected.items():
        t = snapshot.states[name]
        got = tuple(t.shape[1:])
        same_shape = got == shape if not _is_kv(name) else (len(got) == len(shape) and got[0] == shape[0] and got[2:] == shape[2:])
        if not same_shape or t.dtype != dtype:
            want = list(shape) if not _is_kv(name) else [*shape[:1], "past", *shape[2:]]
            raise InputError(
                f"{source}: state {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, this model's is "
                f"{str(dtype).removeprefix('torch.')} [batch, {', '.join(map(str, want))}] (another model, dtype or state dtype)",
                fix=_FIX_REMAKE,
            )
    ours, theirs = (identity or {}).get(CHECKPOINT_SHA256), snapshot.identity.get(CHECKPOINT_SHA256)
    if ours and theirs and ours != theirs:
        raise InputError(
            f"{source} was taken on another checkpoint (sha256 {theirs[:12]}…; this model's is {ours[:12]}…): same shapes, other weights",
            fix=_FIX_REMAKE,
        )


def supports_snapshots(stepper: Any) -> bool:
    return callable(getattr(stepper, "snapshot", None)) and callable(getattr(stepper, "restore", None))


def take_snapshot(stepper: Any, state: Any, attention_mask: Tensor) -> Snapshot:
    """``stepper.snapshot(state, attention_mask)``, with a typed error for backends without it."""
    if not supports_snapshots(stepper):
        raise InputError(f"{type(stepper).__name__} cannot take state snapshots", fix="use the reference, ONNX Runtime or TensorRT backend")
    return stepper.snapshot(state, attention_mask)


def snapshot_prompt(
    stepper: Any, input_ids: Tensor, attention_mask: Tensor | None = None, *, prefill_chunk: int | None = None, snapshot: Snapshot | None = None
) -> Snapshot:
    """Prefill ``input_ids [B, L]`` (chunked) and snapshot the result.

    Args:
        snapshot: Start from this snapshot instead of zero states (``input_ids`` then continue it,
            unpadded): the result is the snapshot of the longer prefix.
    """
    from hybridtrt.runtime.generation import DEFAULT_PREFILL_CHUNK, check_prompt, prefill

    ids, mask = check_prompt(stepper, input_ids, attention_mask)
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    if snapshot is None:
        state = stepper.zero_state(ids.shape[0])
    else:
        if bool((mask == 0).any()):
            raise InputError("the tokens after a snapshot cannot be padded (padding must come first in a row)", fix="continue every row with the same number of tokens")
        snapshot = snapshot.rows(ids.shape[0])
        mask = torch.cat([snapshot.attention_mask, mask], dim=1)
        state = stepper.restore(snapshot)
    _, state = prefill(stepper, ids, mask, state, chunk)
    return take_snapshot(stepper, state, mask)
