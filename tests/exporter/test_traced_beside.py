"""The decode graph traced in a forked process beside the unified graph (`TracedBeside`): the same
files as tracing both here, a failed child traced here instead, no child left behind by a failed
export."""

from __future__ import annotations

import hashlib
import os

import pytest

import hybridtrt.exporter.export as export_mod
from hybridtrt.exporter import trace_cache
from hybridtrt.exporter.export import BESIDE_ENV, ExportOptions, export

FAST = ExportOptions(split=True, verify=False)

pytestmark = pytest.mark.skipif(not export_mod.TracedBeside.worthwhile(2), reason="needs Linux and two CPUs (the exporter traces in one process otherwise)")


def _files(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture
def traced_here(monkeypatch):
    """The roles of the graphs `trace_streamed` traced in this process (a forked child's calls stay
    in the child)."""
    calls: list[str] = []
    real = export_mod.trace_streamed

    def trace_streamed(checkpoint, table, spec=None):
        if os.getpid() == parent:
            calls.append("decode" if spec.decode else "unified")
        return real(checkpoint, table, spec)

    parent = os.getpid()
    monkeypatch.setattr(export_mod, "trace_streamed", trace_streamed)
    return calls


def test_the_decode_graph_traced_beside_is_the_one_traced_here(make_checkpoint, tmp_path, monkeypatch, traced_here):
    ckpt = make_checkpoint("tiny-nemotron-h")
    export(ckpt, tmp_path / "beside", FAST)
    assert traced_here == ["unified"]  # the decode graph came from the child
    monkeypatch.setenv(BESIDE_ENV, "0")
    export(ckpt, tmp_path / "here", FAST)
    assert traced_here == ["unified", "unified", "decode"]
    assert _files(tmp_path / "beside") == _files(tmp_path / "here")


def test_a_failed_child_is_traced_here(make_checkpoint, tmp_path, monkeypatch, traced_here, caplog):
    ckpt = make_checkpoint("tiny-nemotron-h")
    export(ckpt, tmp_path / "here", FAST)

    def broken(*a):
        raise RuntimeError("planted")

    monkeypatch.setattr(trace_cache, "portable", broken)  # the child inherits it and exits 1
    traced_here.clear()
    export(ckpt, tmp_path / "fallback", FAST)
    assert traced_here == ["unified", "decode"]
    assert "tracing process failed; tracing it here" in caplog.text
    assert _files(tmp_path / "fallback") == _files(tmp_path / "here")


def test_a_failed_export_leaves_no_child(make_checkpoint, tmp_path, monkeypatch):
    children: list[int] = []
    real_init = export_mod.TracedBeside.__init__

    def init(self, *a):
        real_init(self, *a)
        children.append(self.pid)

    def fail(*a, **k):
        raise OSError("planted: disk gone")

    monkeypatch.setattr(export_mod.TracedBeside, "__init__", init)
    monkeypatch.setattr(export_mod, "write_external_data", fail)  # fails while the child may still trace
    with pytest.raises(OSError, match="planted"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", FAST)
    assert len(children) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(children[0], os.WNOHANG)  # stopped and reaped
