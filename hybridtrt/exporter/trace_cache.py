"""An opt-in cache of traced graphs, for test suites that export the same checkpoints many times.

Tracing (``torch.export`` → ONNX → optimizer → graph passes) is 95 % of a small model's export time,
and the test suite exports the same few checkpoints with the same flags in many tests and in each
pytest-xdist worker. With ``HYBRIDTRT_TRACE_CACHE=<dir>`` set, two things are kept there.

The unoptimized trace (`traced`; `hybridtrt.exporter.streaming.FrozenTrace`),
90 % of the tracing time, is replayed for any checkpoint of the same structure, whatever its
values: the trace runs on fake weights, so it depends only on

- the config, the model dtype, and every parameter's name, shape and dtype (and, for one rank of a
  tensor-parallel export, the world and vocabulary split: `RankCheckpoint.trace_tag`);
- the graph's spec (logits, decode, per-layer outputs, state dtype, opset, KV flavour);
- every source file of the ``hybridtrt`` package and the versions of torch, onnx, onnxscript and
  onnx-ir.

The optimizer and the graph passes then run as for a fresh trace (byte-identical results). Their
result, `trace_streamed`'s (`load`, `store`), is replayed when everything it depends on is the same:

- the checkpoint's bytes (`checkpoint_hash`: config, weights, tokenizer) and the model dtype — the
  optimizer folds small parameters' real values into the graph;
- the graph's spec (logits, decode, per-layer outputs, state dtype, opset, KV flavour);
- every source file of the ``hybridtrt`` package and the versions of torch, onnx, onnxscript and
  onnx-ir;
- the streaming limits (`FOLD_LIMIT`, `REAL_MAX_DIMS`).

Placeholders (`hybridtrt.exporter.streaming.Deferred` recipes) are stored by recipe and re-keyed
into the export's own `DeferredTable` on replay, so a replayed graph is byte-identical to a traced
one in any position of an export. Writes are atomic (temporary name, then rename), so concurrent
workers may share a directory. A test that monkeypatches tracing must unset the variable, and one
that patches what follows the trace must not replay `load`'s graphs (the keys cannot see a patched
function). Users never need it: it is not set unless asked for.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pickle
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from hybridtrt.exporter.manifest import checkpoint_hash
from hybridtrt.graphs.external_data import DEFERRED, deferred_key, is_deferred

ENV = "HYBRIDTRT_TRACE_CACHE"
_PACKAGE = Path(__file__).resolve().parents[1]


def directory() -> Path | None:
    """The cache directory, or None when the cache is off."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


@cache
def _code_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json") and path.is_file():
            h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    for pkg in ("torch", "onnx", "onnxscript", "onnx-ir"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            continue
    return h.hexdigest()


@cache
def _checkpoint_digest(root: str, stamp: tuple) -> str:
    """`checkpoint_hash` once per checkpoint state: ``stamp`` (names, sizes, mtimes) is only part of
    the memo key, so a rewritten checkpoint is hashed again."""
    return checkpoint_hash(root)


def _key(checkpoint: Any, spec: Any) -> str:
    from hybridtrt.exporter import streaming

    root = Path(checkpoint.root)
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()))
    parts = [
        _checkpoint_digest(str(root.resolve()), stamp),
        str(checkpoint.dtype),
        repr(spec),
        _code_digest(),
        streaming.FOLD_LIMIT,
        streaming.REAL_MAX_DIMS,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _trace_key(checkpoint: Any, spec: Any) -> str:
    parts = [
        "unoptimized trace",
        dataclasses.asdict(checkpoint.config),
        str(checkpoint.dtype),
        [(name, list(p.shape), str(p.dtype)) for name, p in checkpoint.parameters.items()],
        repr(spec),
        _code_digest(),
        getattr(checkpoint, "trace_tag", None),  # what else the traced module depends on (a tensor-parallel rank's world)
    ]
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def traced(checkpoint: Any, spec: Any, trace: Callable[[], Any]) -> Any:
    """The unoptimized trace of ``spec`` (`hybridtrt.exporter.streaming.FrozenTrace`): the cached
    one of a checkpoint of this structure, else ``trace()``'s, kept for later exports. Workers that
    miss the same key at once trace it once: the others wait for it (a lock file per key)."""
    where = directory()
    if where is None:
        return trace()
    path = where / f"trace-{_trace_key(checkpoint, spec)}.pkl"
    if not path.is_file():
        where.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if not path.is_file():
                frozen = trace()
                _write(path, pickle.dumps(frozen))
                return frozen
    return pickle.loads(path.read_bytes())


def load(checkpoint: Any, spec: Any, table: Any) -> onnx.ModelProto | None:
    """The cached graph of ``spec`` with its placeholders keyed into ``table``, or None."""
    where = directory()
    if where is None:
        return None
    path = where / f"{_key(checkpoint, spec)}.pkl"
    if not path.is_file():
        return None
    return adopt(path.read_bytes(), table)


def store(checkpoint: Any, spec: Any, table: Any, proto: onnx.ModelProto) -> None:
    """Keep ``proto`` (its placeholders as recipes) for later exports."""
    where = directory()
    if where is None:
        return
    _write(where / f"{_key(checkpoint, spec)}.pkl", portable(proto, table))


def portable(proto: onnx.ModelProto, table: Any) -> bytes:
    """``proto`` with its placeholders' recipes, independent of ``table``'s keys (for `adopt`)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    recipes = []
    for t in copy.graph.initializer:
        if is_deferred(t):
            recipes.append(table.recipe(t))
            _relocate(t, str(len(recipes) - 1))
    return pickle.dumps((copy.SerializeToString(), recipes))


def adopt(blob: bytes, table: Any) -> onnx.ModelProto:
    """The graph of `portable`'s ``blob`` with its placeholders keyed into ``table``."""
    data, recipes = pickle.loads(blob)
    proto = onnx.ModelProto.FromString(data)
    for t in proto.graph.initializer:
        if is_deferred(t):
            _relocate(t, table.key(recipes[int(deferred_key(t))]))
    return proto


def _write(path: Path, data: bytes) -> None:
    """Atomically: concurrent workers may share the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _relocate(t: onnx.TensorProto, key: str) -> None:
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = DEFERRED + key
