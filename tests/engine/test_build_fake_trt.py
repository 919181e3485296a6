"""`build_engine` with TensorRT faked: version gates, the proof after parsing, the polygraphy calls, atomic writes.

Polygraphy's `Profile` and `CreateConfig` are the real ones (they do not touch TensorRT until called); the
`tensorrt` module, `NetworkFromOnnxPath` (parsing) and `EngineBytesFromNetwork` (building) are faked. The fake
parser turns each custom node of the graph into an IPluginV3 layer when the plugin library registered its
creators, into its function body otherwise — and can be told that registration silently failed (the old
library's ``getCreators`` returning nothing), which the proof after parsing must catch.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest

from hybridtrt.engine.build import build_engine
from hybridtrt.engine.sidecar import read_sidecar
from hybridtrt.errors import EngineError, MissingDependencyError
from hybridtrt.exporter.export import ExportOptions

SCAN = "hybridtrt::Mamba2ChunkScan"


@pytest.fixture(scope="module")
def export_dir(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))[1]


class FakeLayer:
    def __init__(self, layer_type, plugin=None):
        self.type = layer_type
        self._plugin = plugin


class FakeTrt:
    """The parts of the tensorrt module the build uses, with a registry and a parser the test controls."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.loaded: list[str] = []
        self.registration_works = True
        self.registered: set[tuple[str, str]] = set()

    def module(self) -> types.ModuleType:
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        trt.init_libnvinfer_plugins = lambda logger, ns: True
        trt.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", MATRIX_MULTIPLY="MATRIX_MULTIPLY")
        trt.PluginCapabilityType = types.SimpleNamespace(CORE="CORE")
        trt.IPluginV3Layer = type("IPluginV3Layer", (FakeLayer,), {"plugin": property(lambda self: self._plugin)})

        def load_library(path):
            self.loaded.append(path)
            if self.registration_works:
                self.registered |= {("hybridtrt", "Mamba2ChunkScan"), ("hybridtrt", "Mamba2StateUpdate")}
            return object()

        trt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=load_library)
        return trt

    def parse(self, onnx_path: str) -> types.SimpleNamespace:
        """The network a parser would make: one plugin layer per custom node whose creator is registered."""
        model = onnx.load(onnx_path, load_external_data=False)
        layers = [FakeLayer("MATRIX_MULTIPLY")]
        for node in model.graph.node:
            if node.domain == "hybridtrt" and (node.domain, node.op_type) in self.registered:
                core = types.SimpleNamespace(plugin_name=node.op_type, plugin_namespace=node.domain, plugin_version="1")
                plugin = types.SimpleNamespace(get_capability_interface=lambda kind, core=core: core if kind == "CORE" else None)
                layers.append(FakeLayer("PLUGIN_V3", plugin))
            elif node.domain == "hybridtrt":
                layers += [FakeLayer("MATRIX_MULTIPLY")] * 3  # the function body, flattened
        return types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__, strongly_typed=True, path=onnx_path)


@pytest.fixture
def fake(monkeypatch):
    """``fake(version)`` installs a fake TensorRT of that version and fakes polygraphy's parse and build."""
    import polygraphy.backend.trt as poly

    calls: list[dict] = []
    state: dict = {}

    class NetworkFromOnnxPath:
        def __init__(self, path, strongly_typed=None):
            self.path = path

        def __call__(self):
            return "builder", state["trt"].parse(self.path), "parser"

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

    monkeypatch.setattr(poly, "NetworkFromOnnxPath", NetworkFromOnnxPath)
    monkeypatch.setattr(poly, "EngineBytesFromNetwork", EngineBytesFromNetwork)

    def install(version: str = "11.1.0") -> FakeTrt:
        state["trt"] = FakeTrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", state["trt"].module())
        return state["trt"]

    install.calls = calls
    install.builder = EngineBytesFromNetwork
    return install


@pytest.fixture
def lib(tmp_path) -> Path:
    path = tmp_path / "libhybridtrt_trt.so"
    path.write_bytes(b"plugin")
    return path


def _build(export_dir, out: Path, **kwargs):
    return build_engine(export_dir, out, max_batch=2, max_input_len=8, max_cache_len=16, **kwargs)


def test_build_writes_engine_sidecar_and_cache(export_dir, tmp_path, fake, lib):
    trt = fake("11.1.0")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache = out_dir / "timing.cache"
    result = _build(export_dir, out_dir / "model.engine", plugins=lib, timing_cache=cache)
    assert (out_dir / "model.engine").read_bytes() == b"serialized engine"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.engine", "model.engine.json", "timing.cache"]
    assert cache.read_bytes() == b"timing"
    assert trt.loaded == [str(lib.resolve())]
    (call,) = fake.calls
    builder, network, parser = call["network"]  # the network that was proven is the one that is built
    assert network.strongly_typed is True and Path(network.path).name == "model.onnx"
    config = call["config"]
    assert not any(getattr(config, f) for f in ("fp16", "bf16", "fp8", "int8", "tf32"))  # strongly typed: no precision flags
    prefill, decode = config.profiles
    assert tuple(prefill["input_ids"].max) == (2, 8)
    assert tuple(decode["past_key_values.1.key"].max) == (2, 2, 15, 16)
    sidecar = read_sidecar(result.engine)
    assert sidecar["tensorrt"] == "11.1.0" and sidecar["plugins"]["path"] == str(lib.resolve())
    assert sidecar["plugins"]["layers"] == {SCAN: 4} == sidecar["plugins"]["custom_nodes"]
    assert sidecar["plugins"]["function_bodies"] is False
    assert result.network.summary() == f"4 plugin layers {SCAN}"
    assert sidecar["build"]["max_cache_len"] == 16 and sidecar["build"]["strongly_typed"] is True
    # a second build loads the saved timing cache
    _build(export_dir, out_dir / "model.engine", plugins=lib, timing_cache=cache)
    assert fake.calls[-1]["config"].timing_cache_path == str(cache)


def test_failed_registration_is_caught_after_parsing(export_dir, tmp_path, fake, lib):
    """The library loads but registers nothing (what loadLibrary saw from the old getCreators): the network holds
    function bodies. The proof after parsing refuses it before anything is built or written."""
    trt = fake("11.1.0")
    trt.registration_works = False
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EngineError, match=r"4 of 4 hybridtrt::Mamba2ChunkScan nodes are function bodies"):
        _build(export_dir, out / "model.engine", plugins=lib)
    assert list(out.iterdir()) == [] and fake.calls == []
    result = _build(export_dir, out / "model.engine", plugins=lib, allow_function_bodies=True)
    sidecar = read_sidecar(result.engine)
    assert sidecar["plugins"]["function_bodies"] is True and sidecar["plugins"]["layers"] == {SCAN: 0}
    assert sidecar["plugins"]["path"] is None  # the engine needs no plugin library: the sidecar says so
    assert sidecar["build"]["allow_function_bodies"] is True


def test_tensorrt_10_6_with_plugins_is_refused_before_parsing(export_dir, tmp_path, fake, lib):
    """TensorRT <= 10.6 always builds the local function: the plugins would be loaded and never used."""
    trt = fake("10.6.0")
    with pytest.raises(EngineError, match=r"NVIDIA/TensorRT#4113") as err:
        _build(export_dir, tmp_path / "model.engine", plugins=lib)
    assert "10.7" in err.value.message and "--allow-function-bodies" in err.value.message
    assert trt.loaded == [] and list(tmp_path.iterdir()) == [lib]
    result = _build(export_dir, tmp_path / "model.engine", plugins=lib, allow_function_bodies=True)
    assert trt.loaded == []  # never used on 10.6: not loaded either
    assert read_sidecar(result.engine)["plugins"] == {
        "path": None, "sha256": None, "custom_nodes": {SCAN: 4}, "layers": {SCAN: 0}, "function_bodies": True,
    }  # fmt: skip


@pytest.mark.parametrize("version", ["10.0.1", "10.1.0"])
def test_tensorrt_10_0_and_10_1_cannot_parse_opset_22(export_dir, tmp_path, fake, version):
    fake(version)
    with pytest.raises(EngineError, match="covers opsets up to 20.*this graph is opset 22"):
        _build(export_dir, tmp_path / "model.engine", plugins=None)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_9_is_refused(export_dir, tmp_path, fake):
    fake("9.3.0")
    with pytest.raises(MissingDependencyError, match="TensorRT 9.3 is too old"):
        _build(export_dir, tmp_path / "model.engine", plugins=None)


def test_function_bodies_without_plugins(export_dir, tmp_path, fake):
    trt = fake("10.9.0")
    result = _build(export_dir, tmp_path / "model.engine", plugins=None)
    plugins = read_sidecar(result.engine)["plugins"]
    assert trt.loaded == [] and plugins["path"] is None and plugins["function_bodies"] is True
    assert result.network.summary() == f"4 function bodies {SCAN}"


def test_decode_graph_gets_state_update_plugins(export_dir, tmp_path, fake, lib):
    fake("10.15.0")
    result = _build(export_dir, tmp_path / "decode.engine", plugins=lib, graph="decode")
    assert read_sidecar(result.engine)["plugins"]["layers"] == {"hybridtrt::Mamba2StateUpdate": 4}


def test_failed_build_writes_nothing(export_dir, tmp_path, fake):
    fake("11.1.0")
    fake.builder.fail = True
    with pytest.raises(EngineError, match="builder said no"):
        _build(export_dir, tmp_path / "model.engine", plugins=None, timing_cache=tmp_path / "t.cache")
    assert list(tmp_path.iterdir()) == []
