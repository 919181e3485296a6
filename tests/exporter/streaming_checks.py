"""What the streaming tests share: real tracing (no replayed traces) and the byte-identity check."""

from __future__ import annotations

import hashlib

import pytest

from hybridtrt.exporter.manifest import MANIFEST_FILE


@pytest.fixture(autouse=True)
def optimize_for_real(monkeypatch):
    """These modules are about what follows the trace (stand-ins, the optimizer, the graph passes,
    streaming) and patch its internals: no replayed optimized graphs. The unoptimized trace, on fake
    weights, may be replayed (`trace_cache.traced`), by both paths: it holds no value, and a trace of
    the loaded model is the same program (tests/exporter/test_trace_cache.py); the eager path optimizes
    it with every weight real, the streamed one with stand-ins."""
    from hybridtrt.exporter import trace_cache

    monkeypatch.setattr(trace_cache, "load", lambda *a: None)
    monkeypatch.setattr(trace_cache, "store", lambda *a: None)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_identical(streamed, eager, names):
    """Every file the eager path wrote is in the streamed export, byte for byte, and nothing else."""
    assert names, "the eager path wrote nothing"
    for name in names:
        assert (streamed / name).is_file(), f"streamed export lacks {name}"
        assert sha(streamed / name) == sha(eager / name), f"{name} differs"
    ours = {p.name for p in streamed.iterdir()} - {MANIFEST_FILE}
    assert ours == set(names)
