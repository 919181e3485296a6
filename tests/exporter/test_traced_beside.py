"""The decode graph traced in a second process beside the unified graph (`TracedBeside`): the same
files as tracing both here, a failed child traced here instead, no child left behind by a failed
export. The suite turns it off elsewhere (tests/conftest.py: each child imports torch)."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

import hybridtrt.exporter.export as export_mod
from hybridtrt.exporter.export import BESIDE_ENV, ExportOptions, export

FAST = ExportOptions(split=True, verify=False)

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs (the exporter traces in one process otherwise)")


@pytest.fixture(autouse=True)
def beside(monkeypatch):
    monkeypatch.setenv(BESIDE_ENV, "1")


def _files(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture
def traced_here(monkeypatch):
    """The roles of the graphs `trace_streamed` traced in this process."""
    calls: list[str] = []
    real = export_mod.trace_streamed

    def trace_streamed(checkpoint, table, spec=None):
        calls.append("decode" if spec.decode else "unified")
        return real(checkpoint, table, spec)

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
    planted = [sys.executable, "-c", "import sys; sys.exit('planted: the tracer died')"]
    monkeypatch.setattr(export_mod.TracedBeside, "command", staticmethod(lambda: planted))
    traced_here.clear()
    export(ckpt, tmp_path / "fallback", FAST)
    assert traced_here == ["unified", "decode"]
    assert "tracing process failed (planted: the tracer died); tracing it here" in caplog.text
    assert _files(tmp_path / "fallback") == _files(tmp_path / "here")


def test_a_child_that_cannot_start_is_traced_here(make_checkpoint, tmp_path, monkeypatch, traced_here, caplog):
    def no_python():
        raise FileNotFoundError("planted: no interpreter")

    monkeypatch.setattr(export_mod.TracedBeside, "command", staticmethod(no_python))
    export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", FAST)
    assert traced_here == ["unified", "decode"]
    assert "no second tracing process (FileNotFoundError: planted: no interpreter)" in caplog.text


def test_a_failed_export_leaves_no_child(make_checkpoint, tmp_path, monkeypatch):
    children: list[int] = []
    real_init = export_mod.TracedBeside.__init__

    def init(self, *a):
        real_init(self, *a)
        children.append(self.process.pid)

    def fail(*a, **k):
        raise OSError("planted: disk gone")

    monkeypatch.setattr(export_mod.TracedBeside, "__init__", init)
    monkeypatch.setattr(export_mod, "write_external_data", fail)  # fails while the child may still trace
    with pytest.raises(OSError, match="planted"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", FAST)
    assert len(children) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(children[0], os.WNOHANG)  # stopped and reaped
