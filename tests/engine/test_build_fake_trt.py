"""`build_engine` with TensorRT faked: the polygraphy calls it makes, and its atomic writes.

Polygraphy's `Profile`, `CreateConfig` and `NetworkFromOnnxPath` are the real ones (they do not
touch TensorRT until called); only `EngineBytesFromNetwork` (which builds) and the `tensorrt`
module are faked.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from hybridtrt.engine.build import build_engine
from hybridtrt.engine.sidecar import read_sidecar
from hybridtrt.errors import EngineError
from hybridtrt.exporter.export import ExportOptions


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))[1]


@pytest.fixture
def fake_trt(monkeypatch):
    loaded: list[str] = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.1.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.init_libnvinfer_plugins = lambda logger, ns: True
    trt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=lambda path: loaded.append(path) or object())
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return loaded


@pytest.fixture
def fake_builder(monkeypatch):
    import polygraphy.backend.trt as poly

    calls: list[dict] = []

    class EngineBytesFromNetwork:
        fail = False

        def __init__(self, network, config=None, save_timing_cache=None):
            calls.append({"network": network, "config": config, "save_timing_cache": save_timing_cache})

        def __call__(self):
            if EngineBytesFromNetwork.fail:
                raise RuntimeError("builder said no")
            cache = calls[-1]["save_timing_cache"]
            if cache:
                Path(cache).write_bytes(b"timing")
            return b"serialized engine"

    monkeypatch.setattr(poly, "EngineBytesFromNetwork", EngineBytesFromNetwork)
    return calls, EngineBytesFromNetwork


def test_build_writes_engine_sidecar_and_cache(export_dir, tmp_path, fake_trt, fake_builder):
    calls, _ = fake_builder
    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugin")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache = out_dir / "timing.cache"
    result = build_engine(export_dir, out_dir / "model.engine", max_batch=2, max_input_len=8, max_cache_len=16, plugins=lib, timing_cache=cache)
    assert (out_dir / "model.engine").read_bytes() == b"serialized engine"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.engine", "model.engine.json", "timing.cache"]
    assert cache.read_bytes() == b"timing"
    assert fake_trt == [str(lib.resolve())]
    (call,) = calls
    assert call["network"].strongly_typed is True
    assert Path(call["network"].path).name == "model.onnx"
    config = call["config"]
    assert not any(getattr(config, f) for f in ("fp16", "bf16", "fp8", "int8", "tf32"))  # strongly typed: no precision flags
    prefill, decode = config.profiles
    assert tuple(prefill["input_ids"].max) == (2, 8)
    assert tuple(decode["past_key_values.1.key"].max) == (2, 2, 15, 16)
    sidecar = read_sidecar(result.engine)
    assert sidecar["tensorrt"] == "11.1.0" and sidecar["plugins"]["path"] == str(lib.resolve())
    assert sidecar["build"]["max_cache_len"] == 16 and sidecar["build"]["strongly_typed"] is True
    # a second build loads the saved timing cache
    build_engine(export_dir, out_dir / "model.engine", max_batch=2, max_input_len=8, max_cache_len=16, plugins=lib, timing_cache=cache)
    assert calls[-1]["config"].timing_cache_path == str(cache)


def test_failed_build_writes_nothing(export_dir, tmp_path, fake_trt, fake_builder):
    _, builder = fake_builder
    builder.fail = True
    with pytest.raises(EngineError, match="builder said no"):
        build_engine(export_dir, tmp_path / "model.engine", max_batch=1, max_input_len=4, max_cache_len=8, plugins=None, timing_cache=tmp_path / "t.cache")
    assert list(tmp_path.iterdir()) == []
