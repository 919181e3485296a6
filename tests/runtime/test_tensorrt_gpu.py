"""TensorRT backend end to end: build engines from a tiny export and compare with ONNX Runtime.

Needs the TensorRT 11 Python bindings and a CUDA GPU; skipped (saying which is missing) otherwise.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hybridtrt.exporter.export import ExportOptions
from tests.static_capacity import CAPACITY

_missing = [
    what
    for what, ok in (
        ("the TensorRT Python bindings (`import tensorrt`)", importlib.util.find_spec("tensorrt") is not None),
        ("a CUDA GPU (torch.cuda.is_available())", torch.cuda.is_available()),
    )
    if not ok
]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason="needs " + " and ".join(_missing)),
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.slow,
]

LIMITS = {"max_batch": 2, "max_input_len": 16, "max_cache_len": 32}


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))


def _plugin_library():
    from hybridtrt.errors import PluginBuildError
    from hybridtrt.plugins import library_path

    try:
        return library_path("trt")
    except PluginBuildError:
        return None


@pytest.fixture(scope="module", params=["function_bodies", "plugins"])
def engine(request, exported, tmp_path_factory):
    from hybridtrt.engine.build import build_engine

    lib = _plugin_library()
    if request.param == "plugins" and lib is None:
        pytest.skip("libhybridtrt_trt.so is not built (`hybridtrt plugins build --tensorrt-root DIR`)")
    out = tmp_path_factory.mktemp("engine") / "model.engine"
    plugins = lib if request.param == "plugins" else None
    if request.param == "function_bodies":
        # no plugin library: force the function bodies even if one is built
        from hybridtrt.engine.build import plan_build

        plan = plan_build(exported[1], out, **LIMITS)
        plan.plugin_library = None
        return build_engine(exported[1], out, plan=plan).engine
    return build_engine(exported[1], out, plugins=plugins, **LIMITS).engine


def test_sidecar_written(engine):
    from hybridtrt.engine.sidecar import read_sidecar

    s = read_sidecar(engine)
    assert [p["name"] for p in s["profiles"]] == ["prefill", "decode"]
    assert s["gpu"]["compute_capability"] is not None
    plugins = s["plugins"]
    assert plugins["custom_nodes"] == {"hybridtrt::Mamba2ChunkScan": 4}
    if plugins["path"] is None:  # function bodies: the proof after parsing found no plugin layer
        assert plugins["function_bodies"] is True and plugins["layers"] == {"hybridtrt::Mamba2ChunkScan": 0}
    else:  # the real parser turned every custom node into our plugin
        assert plugins["function_bodies"] is False and plugins["layers"] == plugins["custom_nodes"]


def test_engine_aliases_nothing(engine):
    """The plugins declare no alias, so the runtime ping-pongs every state (the engine agrees)."""
    from hybridtrt.runtime import load

    assert load(engine).in_place == frozenset()


def test_greedy_matches_onnxruntime(engine, exported):
    from hybridtrt.runtime import load

    ids = torch.tensor([[5, 17, 99, 42, 7], [0, 0, 3, 4, 200]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ort = load(exported[1]).generate(ids, mask, max_new_tokens=8, keep_logits=True)
    trt = load(engine).generate(ids, mask, max_new_tokens=8, keep_logits=True)
    assert torch.equal(trt.tokens, ort.tokens)
    for a, b in zip(trt.logits, ort.logits):
        assert torch.isfinite(a).all()
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999


def test_prefill_states_match_onnxruntime(engine, exported):
    from hybridtrt.runtime import load

    ids = torch.tensor([[5, 17, 99, 42, 7]])
    ort = load(exported[1])
    trt = load(engine)
    ort_logits, ort_state = ort.step(ids, torch.ones_like(ids), ort.zero_state(1), decode=False)
    trt_logits, _ = trt.prefill(ids)
    torch.testing.assert_close(trt_logits, ort_logits, rtol=1e-4, atol=1e-4)
    for name, tensor in trt.state_tensors().items():
        torch.testing.assert_close(tensor.float(), torch.from_numpy(ort_state[name]).float(), rtol=1e-4, atol=1e-4)


def test_stale_state_refused(engine):
    from hybridtrt.errors import InputError
    from hybridtrt.runtime import load

    model = load(engine)
    old = model.zero_state(1)
    model.zero_state(1)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(InputError, match="stale"):
        model.step(ids, torch.ones_like(ids), old, decode=False)


def test_decode_graph_engine(exported, tmp_path):
    from hybridtrt.engine.build import build_engine
    from hybridtrt.runtime import load

    out = build_engine(exported[1], tmp_path / "decode.engine", graph="decode", plugins=_plugin_library(), **LIMITS).engine
    ids = torch.tensor([[5, 17, 99]])
    expected = load(exported[1]).generate(ids, max_new_tokens=5).tokens
    assert torch.equal(load(out).generate(ids, max_new_tokens=5).tokens, expected)  # prompt fed token by token


def test_static_cache_engine_replays_cuda_graphs(make_export, tmp_path):
    """A `--kv-cache static` engine (TensorRT >= 10.15: TensorScatter as IKVCacheUpdateLayer, aliased in place) runs
    through `TrtModel.generate` with decode steps replayed as CUDA graphs, and generates what ONNX Runtime does."""
    from hybridtrt.engine.build import build_engine
    from hybridtrt.runtime import load

    _, export = make_export("tiny-nemotron-h", ExportOptions(kv_cache="static", max_cache_len=CAPACITY))
    out = build_engine(export, tmp_path / "static.engine", plugins=_plugin_library(), **{**LIMITS, "max_cache_len": CAPACITY}).engine
    model = load(out)
    assert model.flavour.static and model.in_place == {s.past_name for s in model.plan.states if s.kind in ("key", "value")}
    ids = torch.tensor([[5, 17, 99, 42, 7], [0, 0, 3, 4, 200]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    expected = load(export, use_decode_graph=False).generate(ids, mask, max_new_tokens=8).tokens
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8).tokens, expected)
    assert (model.decode_graphs.captures, model.decode_graphs.replays) == (2, 5)
    assert torch.equal(load(out, cuda_graphs=False).generate(ids, mask, max_new_tokens=8).tokens, expected)
