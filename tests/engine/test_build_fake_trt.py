"""`build_engine` with TensorRT faked: version gates, the proof after parsing, the polygraphy calls, atomic writes.

Polygraphy's `Profile` and `CreateConfig` are the real ones (they do not touch TensorRT until called); the
`tensorrt` module, `NetworkFromOnnxPath` (parsing) and `EngineBytesFromNetwork` (building) are faked. The fake
parser turns each custom node of the graph into an IPluginV3 layer when the plugin library registered its
creators, into its function body otherwise — and can be told that registration silently failed (the old
library's ``getCreators`` returning nothing), which the proof after parsing must catch.
"""

from __future__ import annotations

import json
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
    return make_export("tiny-nemotron-h", ExportOptions(split=True, opset=22))[1]  # opset 22: parsable by TensorRT 10.2+


class FakeLayer:
    def __init__(self, layer_type, plugin=None, name=""):
        self.type = layer_type
        self._plugin = plugin
        self.name = name
        self._attention = types.SimpleNamespace(decomposable=False)  # the parser's default (importAttention)


class FakeTrt:
    """The parts of the tensorrt module the build uses, with a registry and a parser the test controls."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.loaded: list[str] = []
        self.registration_works = True
        self.registered: set[tuple[str, str]] = set()
        self.networks: list[types.SimpleNamespace] = []
        #: What the engine inspector reports: None -> one engine layer per attention layer; an exception -> raised.
        self.inspector: object = None

    def module(self) -> types.ModuleType:
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        trt.init_libnvinfer_plugins = lambda logger, ns: True
        trt.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", MATRIX_MULTIPLY="MATRIX_MULTIPLY", ATTENTION_INPUT="ATTENTION_INPUT")
        trt.IAttentionInputLayer = type("IAttentionInputLayer", (FakeLayer,), {"attention": property(lambda self: self._attention)})
        trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
        trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                if isinstance(fake.inspector, Exception):
                    raise fake.inspector
                names = [layer.name for net in fake.networks for layer in net.layers if layer.type == "ATTENTION_INPUT"]
                report = fake.inspector or {"Layers": [{"Name": f"{{ForeignNode[{n}]}}", "LayerType": "Myelin"} for n in names]}
                inspector = types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(report))
                return types.SimpleNamespace(create_engine_inspector=lambda: inspector)

        trt.Runtime = Runtime
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
            elif node.op_type == "Attention":
                layers.append(FakeLayer("ATTENTION_INPUT", name=node.name))
        network = types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__, strongly_typed=True, path=onnx_path, layers=layers)
        self.networks.append(network)
        return network


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
    with pytest.raises(EngineError, match="documents ONNX opsets up to 20.*this graph is opset 22"):
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


@pytest.fixture(scope="module")
def attention_export(make_export):
    return make_export("tiny-nemotron-h", ExportOptions())[1]  # opset 24: two Attention nodes


def test_attention_is_decomposable_and_the_engine_says_what_it_holds(attention_export, tmp_path, fake):
    """The parser makes fused-only IAttention layers; the build marks them decomposable, builds with detailed
    profiling verbosity, and the sidecar records what the engine inspector shows for each."""
    trt = fake("11.1.0")
    result = _build(attention_export, tmp_path / "model.engine", plugins=None)
    (network,) = trt.networks
    attention = [layer for layer in network.layers if layer.type == "ATTENTION_INPUT"]
    assert len(attention) == 2 and all(layer.attention.decomposable for layer in attention)
    assert fake.calls[-1]["config"].profiling_verbosity == "DETAILED"
    recorded = read_sidecar(result.engine)["attention"]
    assert recorded["layers"] == 2 and recorded["mode"] == "decomposable" and recorded["inspection_error"] is None
    assert set(recorded["engine"].values()) == {"fused: 1 engine layer (Myelin)"}
    assert result.attention.summary() == "2 IAttention, decomposable; engine: fused: 1 engine layer (Myelin)"


def test_fused_only_attention_and_a_decomposed_engine(attention_export, tmp_path, fake):
    trt = fake("11.1.0")
    names = [n.name for n in onnx.load(str(attention_export / "model.onnx"), load_external_data=False).graph.node if n.op_type == "Attention"]
    trt.inspector = {"Layers": [{"Name": f"{names[0]}_bmm1", "LayerType": "MatrixMultiply"}, {"Name": "softmax", "Metadata": f"[ONNX Layer: {names[0]}]", "LayerType": "Softmax"}]}
    result = _build(attention_export, tmp_path / "model.engine", plugins=None, attention="fused")
    assert not any(layer.attention.decomposable for layer in trt.networks[0].layers if layer.type == "ATTENTION_INPUT")
    recorded = read_sidecar(result.engine)["attention"]
    assert recorded["mode"] == "fused" and read_sidecar(result.engine)["build"]["attention"] == "fused"
    assert recorded["engine"] == {names[0]: "decomposed: 2 engine layers (MatrixMultiply, Softmax)", names[1]: "not found in the inspector's layers"}


def test_an_engine_that_cannot_be_inspected_still_builds(attention_export, tmp_path, fake):
    fake("11.1.0").inspector = RuntimeError("no GPU")
    result = _build(attention_export, tmp_path / "model.engine", plugins=None)
    recorded = read_sidecar(result.engine)["attention"]
    assert recorded["engine"] is None and recorded["inspection_error"] == "RuntimeError: no GPU"
    assert result.attention.summary() == "2 IAttention, decomposable; engine not inspected (RuntimeError: no GPU)"


def test_every_build_applies_the_parser_rules_before_parsing(attention_export, tmp_path, fake):
    """An export of the previous release (softmax_precision on its Attention nodes) is refused by the build itself,
    before TensorRT parses anything and before anything is written."""
    import shutil

    from onnx import helper

    from tests.validation.faults import reseal

    planted = shutil.copytree(attention_export, tmp_path / "old_export")
    model = onnx.load(str(planted / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "Attention":
            node.attribute.append(helper.make_attribute("softmax_precision", 1))
    onnx.save(model, str(planted / "model.onnx"))
    reseal(planted)  # recorded: an export of the previous release as it was written
    trt = fake("11.1.0")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EngineError, match="softmax_precision"):
        _build(planted, out / "model.engine", plugins=None)
    assert trt.networks == [] and list(out.iterdir()) == []


def test_build_of_a_tensor_parallel_export_builds_every_rank(tp_export, fake, tmp_path, capsys):
    """``hybridtrt build OUT -o NAME`` on ``export --tp 4``: one engine per rank in its rank directory, each
    parsed from that rank's graph, each sidecar recording its rank and the world (what the N-process runtime
    checks); ``-o`` with a directory in it is refused (it names the file each rank directory gets)."""
    from hybridtrt.cli.main import main

    _, out = tp_export
    fake("11.1.0")
    name = f"built-{tmp_path.name}.engine"  # the export is shared: a name of this test's own
    assert main(["build", str(out), "-o", name, "--max-batch", "2", "--max-input-len", "8", "--max-cache-len", "16"]) == 0
    printed = capsys.readouterr().out
    assert "4 rank engines" in printed and f"hybridtrt generate {out / 'rank0' / name}" in " ".join(printed.split())
    parsed = [Path(call["network"][1].path) for call in fake.calls]
    assert parsed == [out / f"rank{r}" / "model.onnx" for r in range(4)]
    for rank in range(4):
        engine = out / f"rank{rank}" / name
        assert engine.read_bytes() == b"serialized engine"
        sidecar = read_sidecar(engine)
        assert sidecar["tensor_parallel"] == {"rank": rank, "world": 4, "vocab": "parallel"}
        assert sidecar["source"]["export_dir"] == str((out / f"rank{rank}").resolve())
        engine.unlink()
        engine.with_name(name + ".json").unlink()
    assert main(["build", str(out), "-o", str(tmp_path / "x.engine")]) == 2
    assert "-o names the engine file each rank's directory gets" in " ".join(capsys.readouterr().err.split())
