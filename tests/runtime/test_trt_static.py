"""`TrtModel` on both KV-cache flavours through its public `generate`, and plugin libraries loaded once per process,
with TensorRT and CUDA faked (tests/runtime/fake_trt.py: the engine is the ONNX Runtime session of the same graph,
CUDA graphs replay what they captured)."""

from __future__ import annotations

import re

import pytest
import torch

from hybridtrt.engine.profiles import engine_profiles
from hybridtrt.engine.sidecar import make_sidecar, read_sidecar, write_sidecar
from hybridtrt.errors import ArtefactError, EngineError, InputError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.runtime.onnxruntime import OrtModel
from tests.conftest import left_padded_batch
from tests.runtime.fake_trt import STREAM, cpu_trt_model
from tests.static_capacity import CAPACITY

B, L = 2, 16


def _sidecar(export_dir, plugin_library=None, graph="unified"):
    manifest = read_manifest(export_dir)
    profiles = engine_profiles(manifest, graph=graph, max_batch=B, max_input_len=L, max_cache_len=CAPACITY)
    return make_sidecar(
        manifest, export_dir, profiles, graph=graph, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None,
        plugin_library=plugin_library, build_flags={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def static_export(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(kv_cache="static", max_cache_len=CAPACITY))[1]


@pytest.fixture(scope="module")
def dynamic_export(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))[1]


def _generates_as_onnxruntime(model, export, ids, mask, **kwargs):
    """``model.generate`` == ONNX Runtime's on the same export: the same tokens, bit-equal logits."""
    got = model.generate(ids, mask, **kwargs)
    ref = OrtModel(export, use_decode_graph=False).generate(ids, mask, **kwargs)
    assert torch.equal(got.tokens, ref.tokens)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _kv_aliases(sidecar):
    """What TensorRT's IKVCacheUpdateLayer reports: every KV output aliased to its input."""
    return {s["present_name"]: s["past_name"] for s in sidecar["states"] if s["kind"] in ("key", "value")}


@pytest.mark.parametrize("flavour", ["dynamic", "static"])
def test_generate_equals_onnxruntime_on_both_flavours(monkeypatch, tmp_path, static_export, dynamic_export, flavour):
    """Public API, both flavours: greedy tokens and logits equal ONNX Runtime's on the same export (chunked prefill,
    left padding). The static engine's decode steps are CUDA graphs: one capture per buffer parity, then replays that
    run with the captured addresses; every call on the model's one non-default stream."""
    export = static_export if flavour == "static" else dynamic_export
    sidecar = _sidecar(export)
    aliases = _kv_aliases(sidecar) if flavour == "static" else None
    model, ctx = cpu_trt_model(monkeypatch, export, sidecar, tmp_path / "model.engine", aliases)
    ids, mask = left_padded_batch([27, 9], vocab=256, seed=41)
    _generates_as_onnxruntime(model, export, ids, mask, max_new_tokens=8, keep_logits=True, prefill_chunk=L)
    assert model.flavour.static == (flavour == "static")
    assert ctx.calls == [(0, (2, 14)), (0, (2, 13))] + [(1, (2, 1))] * 7  # prefill profile (two chunks), then decode
    assert ctx.streams == {STREAM}
    if flavour == "static":
        assert "attention_mask" not in ctx.addresses and {"cache_position", "padding_length"} <= set(ctx.addresses)
        assert (model.decode_graphs.captures, model.decode_graphs.replays) == (2, 5)
        assert model.in_place == frozenset(aliases.values())  # one buffer per KV state, conv/SSM ping-pong
    else:
        assert model.decode_graphs is None


def test_static_engine_snapshot_restore_and_a_second_generation(monkeypatch, tmp_path, static_export):
    sidecar = _sidecar(static_export)
    model, _ = cpu_trt_model(monkeypatch, static_export, sidecar, tmp_path / "model.engine", _kv_aliases(sidecar))
    ort = OrtModel(static_export, use_decode_graph=False)
    prefix = torch.randint(3, 256, (1, 6))
    logits, state = model.step(prefix, torch.ones_like(prefix), model.zero_state(1), decode=False)
    snap = model.snapshot(state, torch.ones_like(prefix))
    _, ort_state = ort.step(prefix, torch.ones_like(prefix), ort.zero_state(1), decode=False)
    expected = ort.named_states(ort_state)
    assert list(snap.states) == list(expected)
    for name, value in expected.items():  # KV trimmed to the positions written, as ONNX Runtime's snapshot
        torch.testing.assert_close(snap.states[name], torch.from_numpy(value), rtol=0, atol=0)
    tail = torch.randint(3, 256, (1, 3))
    want = ort.generate(tail, snapshot=ort.snapshot(ort_state, torch.ones_like(prefix)), max_new_tokens=4).tokens
    assert torch.equal(model.generate(tail, snapshot=snap, max_new_tokens=4).tokens, want)
    # a new batch size: zero states (KV included), its own graphs
    again = torch.randint(3, 256, (2, 5))
    assert torch.equal(model.generate(again, max_new_tokens=4).tokens, ort.generate(again, max_new_tokens=4).tokens)
    assert {k[0] for k in model.decode_graphs.graphs} == {1, 2}


def test_static_engine_refusals(monkeypatch, tmp_path, static_export):
    sidecar = _sidecar(static_export)
    model, ctx = cpu_trt_model(monkeypatch, static_export, sidecar, tmp_path / "model.engine", _kv_aliases(sidecar))
    with pytest.raises(InputError, match=f"--max-cache-len {CAPACITY + 1}"):  # before anything runs
        model.generate(torch.randint(3, 256, (1, CAPACITY - 4)), max_new_tokens=6)  # one position past the capacity
    assert ctx.calls == []
    old = model.zero_state(1)
    model.zero_state(1)
    with pytest.raises(InputError, match="stale"):
        model.step(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long), old, decode=False)
    with pytest.raises(InputError, match="--max-input-len"):
        model.prefill(torch.ones(1, L + 1, dtype=torch.long))


def test_static_engine_without_aliasing_ping_pongs_kv(monkeypatch, tmp_path, static_export):
    """Buffers follow the engine: one that does not alias its KV outputs gets every state ping-ponged (binding one
    buffer to an unaliased input and output would be undefined), with the same tokens; eager mode too."""
    sidecar = _sidecar(static_export)
    model, _ = cpu_trt_model(monkeypatch, static_export, sidecar, tmp_path / "model.engine", {}, cuda_graphs=False)
    assert model.in_place == frozenset() and model.decode_graphs is None
    ids = torch.randint(3, 256, (2, 7))
    assert torch.equal(model.generate(ids, max_new_tokens=5).tokens, OrtModel(static_export).generate(ids, max_new_tokens=5).tokens)


# -- MoE engines: CUDA graphs with the MoE plugins, eager with their function bodies ----------------------------


@pytest.fixture(scope="module")
def moe_static_export(make_export):
    """Nemotron-3 MoE (three MoeExperts layers) with a static cache; the fake engine runs the experts' ONNX body in ONNX
    Runtime, standing in for the plugin the real engine holds."""
    return make_export("tiny-nemotron3-moe", ExportOptions(kv_cache="static", max_cache_len=CAPACITY, split=False, verify=False))[1]


@pytest.mark.parametrize("experts", ["plugins", "function bodies"])
def test_moe_static_engine_decode_steps_are_graphs_with_the_moe_plugins(monkeypatch, tmp_path, moe_static_export, experts):
    """What the build proved the network holds (the sidecar's ``plugins``) decides the capture: with libhybridtrt_trt.so
    every custom node — the Mamba scans and the MoeExperts nodes — is a plugin layer and the decode steps are CUDA
    graphs (one capture per buffer parity, then replays, as for the SSD-only engines); MoE experts built from their
    function bodies have data-dependent shapes (a host sync inside the step), so those decode steps run eagerly and
    the model says why. Tokens and logits equal ONNX Runtime's either way."""
    sidecar = _sidecar(moe_static_export)
    custom = {f"hybridtrt::{op}": n for op, n in read_manifest(moe_static_export).graphs["unified"].custom_ops.items()}
    assert custom.get("hybridtrt::MoeExperts") == 3, custom
    layers = custom if experts == "plugins" else {**custom, "hybridtrt::MoeExperts": 0}
    sidecar["plugins"].update(custom_nodes=custom, layers=layers, function_bodies=experts != "plugins")
    model, ctx = cpu_trt_model(monkeypatch, moe_static_export, sidecar, tmp_path / "model.engine", _kv_aliases(sidecar))
    ids, mask = left_padded_batch([9, 5], vocab=256, seed=43)
    _generates_as_onnxruntime(model, moe_static_export, ids, mask, max_new_tokens=4, keep_logits=True, prefill_chunk=L)
    assert ctx.calls == [(0, (2, 9))] + [(1, (2, 1))] * 3 and ctx.streams == {STREAM}
    if experts == "plugins":
        assert model.capture_blocker is None
        assert (model.decode_graphs.captures, model.decode_graphs.replays) == (2, 1)
    else:
        assert model.decode_graphs is None
        assert "3x hybridtrt::MoeExperts run as ONNX function bodies" in model.capture_blocker
        assert "hybridtrt plugins build" in model.capture_blocker


def test_old_sidecar_reads_as_dynamic_and_an_old_static_one_is_refused(monkeypatch, tmp_path, static_export, dynamic_export):
    old = _sidecar(dynamic_export)
    del old["kv_cache"], old["max_cache_len"]  # written before the fields existed
    model, _ = cpu_trt_model(monkeypatch, dynamic_export, old, tmp_path / "old.engine")
    assert not model.flavour.static
    ids = torch.tensor([[5, 17, 99]])
    assert torch.equal(model.generate(ids, max_new_tokens=3).tokens, OrtModel(dynamic_export).generate(ids, max_new_tokens=3).tokens)
    old_static = _sidecar(static_export)
    del old_static["kv_cache"], old_static["max_cache_len"]
    write_sidecar(old_static, tmp_path / "static.engine")
    with pytest.raises(ArtefactError, match="static-cache export.*\n  fix: rebuild the engine"):
        read_sidecar(tmp_path / "static.engine")


# -- plugin libraries: once per process --------------------------------------------------------------------------


def test_build_then_two_models_load_the_library_once(monkeypatch, tmp_path, dynamic_export):
    """The build's load, then two TrtModels in the same process: TensorRT's loadLibrary is called once (a second
    call would return None: the fake registry follows the documented rule, as the old code's second load shows)."""
    from hybridtrt.engine.build import _load_plugins

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugins v1")
    sidecar = _sidecar(dynamic_export, plugin_library=lib)
    first, _ = cpu_trt_model(monkeypatch, dynamic_export, sidecar, tmp_path / "a.engine")
    trt = __import__("sys").modules["tensorrt"]
    _load_plugins(trt, lib)  # what build_engine calls
    second, _ = cpu_trt_model(monkeypatch, dynamic_export, sidecar, tmp_path / "b.engine", trt=trt)
    assert trt.registry.calls == [str(lib.resolve())]
    assert trt.registry.load_library(str(lib)) is None  # the old behaviour: every further raw load fails
    ids = torch.tensor([[5, 17, 99]])
    assert torch.equal(first.generate(ids, max_new_tokens=3).tokens, second.generate(ids, max_new_tokens=3).tokens)


def test_another_library_with_the_same_creators_is_refused(monkeypatch, tmp_path, dynamic_export):
    from hybridtrt.engine.plugin_registry import load_plugin_library

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugins v1")
    copy = tmp_path / "copy" / "libhybridtrt_trt.so"
    copy.parent.mkdir()
    copy.write_bytes(lib.read_bytes())
    cpu_trt_model(monkeypatch, dynamic_export, _sidecar(dynamic_export, plugin_library=lib), tmp_path / "a.engine")
    trt = __import__("sys").modules["tensorrt"]
    assert load_plugin_library(trt, copy).path == lib.resolve()  # byte-identical: the first load's handle
    other = tmp_path / "other" / "libhybridtrt_trt.so"
    other.parent.mkdir()
    other.write_bytes(b"plugins v2")
    both = f"{re.escape(str(other))} would register the creators .* that {re.escape(str(lib.resolve()))} already registered"
    with pytest.raises(EngineError, match=both + ".*\n  fix: use one plugin library per process"):
        load_plugin_library(trt, other)
    lib.write_bytes(b"plugins v1, rebuilt")
    with pytest.raises(EngineError, match="changed on disk since this process loaded it"):
        load_plugin_library(trt, lib)
    assert trt.registry.calls == [str(lib.resolve())]


def test_creators_registered_by_another_loader_are_named(monkeypatch, tmp_path, dynamic_export):
    from hybridtrt.engine.plugin_registry import load_plugin_library
    from tests.runtime.fake_trt import fake_tensorrt

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugins")
    trt = fake_tensorrt(None, {}, [])
    trt.registry.load_library("/elsewhere/libhybridtrt_trt_autoreg.so")  # e.g. the shim, dlopened by another tool
    with pytest.raises(EngineError, match="already registered in this process by a loader other than hybridtrt"):
        load_plugin_library(trt, lib)


def test_build_refuses_plugin_layers_without_a_recorded_library():
    """A network whose plugin layers came from creators another loader registered (this build loaded no library)
    would get a sidecar naming no library: refused. With the library, or without plugin layers, it is fine."""
    from pathlib import Path

    from hybridtrt.engine.network import NetworkPlugins
    from hybridtrt.engine.plugin_registry import required_library

    op = "hybridtrt::Mamba2ChunkScan"
    with pytest.raises(EngineError, match=r"holds plugin layers \(4 hybridtrt::Mamba2ChunkScan\).*loaded no plugin library"):
        required_library(NetworkPlugins({op: 4}, {op: 4}), None)
    assert required_library(NetworkPlugins({op: 4}, {op: 4}), Path("/lib.so")) == Path("/lib.so")
    assert required_library(NetworkPlugins({op: 4}, {op: 0}), Path("/lib.so")) is None
    assert required_library(NetworkPlugins({op: 4}, {op: 0}), None) is None
