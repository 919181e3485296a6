"""The test-suite trace cache replays exactly what tracing produces: byte-identical exports in any
position of an export (FP8 keys added between graphs included), a miss for another checkpoint, and
no trace at all on a hit."""

from __future__ import annotations

import hashlib

import onnx
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
    """The first export traces (and keeps the unoptimized trace and the finished graph); the second
    replays the graph; a checkpoint of the same structure with other values replays the trace and
    gets its own values: the same bytes as a fresh trace of it (the small parameters the optimizer
    folds, A = -exp(A_log), D, the conv biases, differ between the two checkpoints)."""
    ckpt, other = make_checkpoint("tiny-mamba2"), make_checkpoint("tiny-mamba2", seed=1)
    export(ckpt, tmp_path / "traced", ONE)
    assert sorted(p.name.startswith("trace-") for p in cache_dir.glob("*.pkl")) == [False, True]
    real_fake_model = export_mod.fake_model
    monkeypatch.setattr(export_mod, "fake_model", lambda *a: pytest.fail("traced although cached"))
    export(ckpt, tmp_path / "replayed", ONE)
    assert _files(tmp_path / "replayed") == _files(tmp_path / "traced")
    export(other, tmp_path / "other-replayed", ONE)
    monkeypatch.setattr(export_mod, "fake_model", real_fake_model)
    monkeypatch.delenv(trace_cache.ENV)
    export(other, tmp_path / "other-traced", ONE)
    assert _files(tmp_path / "other-replayed") == _files(tmp_path / "other-traced")
    assert _files(tmp_path / "other-traced")["model.onnx"] != _files(tmp_path / "traced")["model.onnx"]


def test_replayed_decode_graph_is_rekeyed_after_fp8_keys(make_checkpoint, tmp_path, monkeypatch):
    """FP8 adds its recipes to the table between the two graphs, so the decode graph's placeholder
    keys differ from those of the fp32 export that filled the cache: a replay must re-key them.
    The suite's own cache (tests/conftest.py) is used: other tests have usually filled it already."""
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "fill", FAST)
    export(ckpt, tmp_path / "replayed", FAST, quantize=QuantizeOptions(calib_random=2, seq_len=16))
    monkeypatch.delenv(trace_cache.ENV)
    export(ckpt, tmp_path / "traced", FAST, quantize=QuantizeOptions(calib_random=2, seq_len=16))
    assert _files(tmp_path / "replayed") == _files(tmp_path / "traced")


def test_another_checkpoint_spec_or_limit_misses(make_checkpoint, tmp_path, cache_dir, monkeypatch):
    """A graph stored for one checkpoint, spec and streaming limit is not replayed for another
    checkpoint (same preset, other seed), another graph spec, or another folding limit."""
    from hybridtrt.exporter import streaming
    from hybridtrt.exporter.export import GraphSpec
    from hybridtrt.exporter.streaming import DeferredTable
    from hybridtrt.models.loading import open_checkpoint

    first, other = open_checkpoint(make_checkpoint("tiny-mamba2")), open_checkpoint(make_checkpoint("tiny-mamba2", seed=1))
    spec = GraphSpec()
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "stored", [], []))
    trace_cache.store(first, spec, DeferredTable(first), proto)
    assert trace_cache.load(first, spec, DeferredTable(first)) == proto
    assert trace_cache.load(other, spec, DeferredTable(other)) is None
    assert trace_cache.load(first, GraphSpec(logits="all"), DeferredTable(first)) is None
    monkeypatch.setattr(streaming, "FOLD_LIMIT", streaming.FOLD_LIMIT // 2)
    assert trace_cache.load(first, spec, DeferredTable(first)) is None


def test_an_unoptimized_trace_is_kept_per_structure(make_checkpoint, cache_dir):
    """The unoptimized trace is replayed for another seed (values are not in it), and for nothing
    of another structure: model dtype, config, graph spec."""
    from hybridtrt.exporter.export import GraphSpec
    from hybridtrt.models.loading import open_checkpoint

    first = open_checkpoint(make_checkpoint("tiny-mamba2"))
    spec = GraphSpec()
    assert trace_cache.traced(first, spec, lambda: "traced") == "traced"
    replayed = "replayed"
    assert trace_cache.traced(first, spec, lambda: replayed) == "traced"
    assert trace_cache.traced(open_checkpoint(make_checkpoint("tiny-mamba2", seed=1)), spec, lambda: replayed) == "traced"
    assert trace_cache.traced(open_checkpoint(make_checkpoint("tiny-mamba2"), "fp16"), spec, lambda: replayed) == replayed
    assert trace_cache.traced(open_checkpoint(make_checkpoint("tiny-mamba2", num_hidden_layers=3)), spec, lambda: replayed) == replayed
    assert trace_cache.traced(first, GraphSpec(decode=True), lambda: replayed) == replayed


def test_workers_missing_the_same_trace_trace_it_once(make_checkpoint, cache_dir):
    """Two processes missing the same key at once: one traces, the other waits and replays."""
    import multiprocessing

    from hybridtrt.exporter.export import GraphSpec

    ckpt = make_checkpoint("tiny-mamba2")
    ctx = multiprocessing.get_context("fork")
    calls = ctx.Queue()
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_trace_after, args=(ckpt, GraphSpec(), barrier, calls)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(calls.get(timeout=5) for _ in range(2)) == ["replayed", "traced"]


def _trace_after(ckpt, spec, barrier, calls) -> None:
    import time

    from hybridtrt.models.loading import open_checkpoint

    checkpoint = open_checkpoint(ckpt)
    barrier.wait()
    traced = []

    def slow_trace():
        traced.append(1)
        time.sleep(1.0)  # the other worker misses too, and must wait
        return "frozen"

    assert trace_cache.traced(checkpoint, spec, slow_trace) == "frozen"
    calls.put("traced" if traced else "replayed")


def test_a_trace_of_the_loaded_model_is_the_trace_of_fake_weights(make_checkpoint, monkeypatch):
    """What lets the eager oracle (`hybridtrt.exporter.eager`) replay the streamed export's trace:
    torch.export of the loaded model on `example_inputs` and of fake weights on `trace_inputs` give the
    same unoptimized program, bytes and name counters, on Mamba, attention and MoE layers (routed
    experts and the shared MLP) in a half dtype, where casts are inserted. Not vacuous: the same
    checkpoint traced in fp32 differs. The checkpoint is the preset cut to its prototype
    (`hybridtrt.exporter.stitch`: one layer per kind), so the fake trace is the one the suite's
    exports of the preset replay; a stitched trace is another program that optimizes to the
    same graphs (tests/exporter/test_stitch.py)."""
    from hybridtrt.exporter import stitch
    from hybridtrt.models.config import load_config

    preset, dtype = "tiny-nemotron3-moe", "fp16"
    pattern = stitch.prototype(load_config(make_checkpoint(preset))).config.pattern
    monkeypatch.setattr(export_mod, "STITCH", False)
    from hybridtrt.exporter.export import GraphSpec, export_program
    from hybridtrt.exporter.streaming import FrozenTrace
    from hybridtrt.exporter.wrapper import example_inputs
    from hybridtrt.models.loading import load_model, open_checkpoint

    ckpt, spec = make_checkpoint(preset, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern)), GraphSpec()
    model = load_model(ckpt, dtype)
    loaded = FrozenTrace(export_program(model, example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour), spec, optimize=False))
    fake = export_mod._trace_unoptimized(open_checkpoint(ckpt, dtype), spec)  # the suite's cache usually holds it
    assert (_program_bytes(loaded), loaded.names) == (_program_bytes(fake), fake.names)
    assert _program_bytes(export_mod._trace_unoptimized(open_checkpoint(ckpt, "fp32"), spec)) != _program_bytes(fake)


def _program_bytes(frozen) -> bytes:
    """The traced program without what the graph passes strip (`strip_metadata`: metadata and doc strings,
    which record torch.export's bookkeeping, e.g. the range constraints of the symbols the example inputs
    gave rise to and FX node names numbered by what the process traced before)."""
    from hybridtrt.graphs.cleanup import strip_metadata

    return strip_metadata(onnx.ModelProto.FromString(frozen.data)).SerializeToString()
