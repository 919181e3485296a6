"""The test-suite trace cache replays exactly what tracing produces: byte-identical exports in any
position of an export (FP8 keys added between graphs included), a miss for another checkpoint, and
no trace at all on a hit."""

from __future__ import annotations

import hashlib

import pytest

import hybridtrt.exporter.export as export_mod
from hybridtrt.exporter import trace_cache
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.quantize import QuantizeOptions

FAST = ExportOptions(split=True, verify=False)
ONE = ExportOptions(split=False, verify=False)


def _files(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != "hybridtrt.json"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_hit_traces_nothing_and_writes_the_same_bytes(make_checkpoint, tmp_path, cache_dir, monkeypatch):
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "first", ONE)
    assert len(list(cache_dir.iterdir())) == 1
    monkeypatch.setattr(export_mod, "fake_model", lambda *a: pytest.fail("traced although cached"))
    export(ckpt, tmp_path / "second", ONE)
    monkeypatch.undo()  # tracing back
    monkeypatch.delenv(trace_cache.ENV)  # and no cache at all
    export(ckpt, tmp_path / "traced", ONE)
    assert _files(tmp_path / "second") == _files(tmp_path / "traced")


def test_replayed_decode_graph_is_rekeyed_after_fp8_keys(make_checkpoint, tmp_path, cache_dir, monkeypatch):
    """FP8 adds its recipes to the table between the two graphs, so the decode graph's placeholder
    keys differ from those of the fp32 export that filled the cache: a replay must re-key them."""
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "fill", FAST)
    export(ckpt, tmp_path / "replayed", FAST, quantize=QuantizeOptions(calib_random=2, seq_len=16))
    monkeypatch.delenv(trace_cache.ENV)
    export(ckpt, tmp_path / "traced", FAST, quantize=QuantizeOptions(calib_random=2, seq_len=16))
    assert _files(tmp_path / "replayed") == _files(tmp_path / "traced")


def test_another_checkpoint_or_spec_misses(make_checkpoint, tmp_path, cache_dir):
    export(make_checkpoint("tiny-mamba2"), tmp_path / "a", ONE)
    export(make_checkpoint("tiny-mamba2", seed=1), tmp_path / "b", ONE)
    export(make_checkpoint("tiny-mamba2"), tmp_path / "c", ExportOptions(split=False, verify=False, logits="all"))
    assert len(list(cache_dir.iterdir())) == 3
