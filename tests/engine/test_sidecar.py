"""Engine sidecar: contents, atomic write, read errors, plugin checks (pure; no TensorRT)."""

from __future__ import annotations

import json

import pytest

from hybridtrt.engine.profiles import engine_profiles
from hybridtrt.engine.sidecar import (
    SIDECAR_VERSION,
    check_plugin_library,
    file_sha256,
    make_sidecar,
    read_sidecar,
    sidecar_path,
    sidecar_profiles,
    write_sidecar,
)
from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest


@pytest.fixture(scope="module")
def export(make_export):
    _, out = make_export("tiny-nemotron-h", ExportOptions(split=True))
    return out, read_manifest(out)


def _sidecar(export, plugin=None, graph="unified"):
    out, manifest = export
    profiles = engine_profiles(manifest, graph=graph, max_batch=2, max_input_len=8, max_cache_len=16)
    return make_sidecar(
        manifest,
        out,
        profiles,
        graph=graph,
        tensorrt_version="11.1.0",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        plugin_library=plugin,
        build_flags={"max_batch": 2, "strongly_typed": True},
    )


def test_contents_without_plugins(export):
    out, manifest = export
    s = _sidecar(export)
    assert s["sidecar_version"] == SIDECAR_VERSION
    assert s["tensorrt"] == "11.1.0"
    assert s["gpu"] == {"name": "NVIDIA H100", "compute_capability": "9.0"}
    assert s["plugins"] == {"path": None, "sha256": None, "custom_nodes": {}, "layers": {}, "function_bodies": True}
    assert s["source"]["export_dir"] == str(out.resolve())
    assert s["source"]["manifest_sha256"] == file_sha256(out / "hybridtrt.json")
    assert s["source"]["graph"] == "unified" and s["source"]["onnx"] == "model.onnx"
    assert [i["name"] for i in s["inputs"]] == [i["name"] for i in manifest.graphs["unified"].inputs]
    assert s["states"] == manifest.states
    assert (s["dtype"], s["state_dtype"]) == ("fp32", "fp32")
    assert [p["name"] for p in s["profiles"]] == ["prefill", "decode"]
    assert s["model"]["eos_token_id"] == 2 and s["model"]["vocab_size"] == 256
    assert (s["kv_cache"], s["max_cache_len"]) == ("dynamic", None)
    json.dumps(s)  # serializable


def test_kv_cache_flavour_on_read(export, tmp_path):
    """An old sidecar (no kv_cache) reads as dynamic; an unknown flavour is refused with the fix."""
    from hybridtrt.engine.sidecar import sidecar_flavour

    s = _sidecar(export)
    del s["kv_cache"], s["max_cache_len"]
    engine = tmp_path / "m.engine"
    write_sidecar(s, engine)
    read = read_sidecar(engine)
    assert (read["kv_cache"], read["max_cache_len"]) == ("dynamic", None) and not sidecar_flavour(read).static
    s["kv_cache"] = "paged"
    write_sidecar(s, engine)
    with pytest.raises(ArtefactError, match="kv_cache 'paged'.*\n  fix: rebuild the engine"):
        read_sidecar(engine)


def test_plugin_library_hash(export, tmp_path):
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"not really a library")
    s = _sidecar(export, plugin=lib)
    assert s["plugins"]["function_bodies"] is False
    assert s["plugins"]["sha256"] == file_sha256(lib)
    assert check_plugin_library(s) == lib.resolve()
    lib.write_bytes(b"changed")
    with pytest.raises(ArtefactError, match="sha256"):
        check_plugin_library(s)
    lib.unlink()
    with pytest.raises(ArtefactError, match="not at"):
        check_plugin_library(s)
    assert check_plugin_library(_sidecar(export)) is None
    with pytest.raises(ArtefactError, match="does not exist"):
        _sidecar(export, plugin=tmp_path / "missing.so")


def test_plugins_report_the_parsed_network(export, tmp_path):
    """With a network summary, the sidecar says what the network holds, not what was loaded."""
    from hybridtrt.engine.network import NetworkPlugins

    lib = tmp_path / "libhybridtrt_trt.so"
    lib.write_bytes(b"plugins")
    op = "hybridtrt::Mamba2ChunkScan"
    full = _sidecar_with(export, lib, NetworkPlugins({op: 4}, {op: 4}))
    assert full["plugins"]["layers"] == {op: 4} and full["plugins"]["custom_nodes"] == {op: 4}
    assert full["plugins"]["function_bodies"] is False and check_plugin_library(full) == lib.resolve()
    partial = _sidecar_with(export, lib, NetworkPlugins({op: 4}, {op: 3}))  # --allow-function-bodies
    assert partial["plugins"]["function_bodies"] is True
    assert check_plugin_library(partial) == lib.resolve()  # 3 plugin layers still need the library
    bodies = _sidecar_with(export, None, NetworkPlugins({op: 4}, {op: 0}))
    assert bodies["plugins"]["path"] is None and bodies["plugins"]["function_bodies"] is True
    assert check_plugin_library(bodies) is None


def _sidecar_with(export, plugin, network):
    out, manifest = export
    profiles = engine_profiles(manifest, max_batch=2, max_input_len=8, max_cache_len=16)
    return make_sidecar(
        manifest, out, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None,
        plugin_library=plugin, build_flags={}, network=network,
    )  # fmt: skip


def test_write_read_roundtrip(export, tmp_path):
    s = _sidecar(export, graph="decode")
    engine = tmp_path / "model.engine"
    path = write_sidecar(s, engine)
    assert path == sidecar_path(engine) == tmp_path / "model.engine.json"
    assert read_sidecar(engine) == s
    assert read_sidecar(path) == s
    assert [p.name for p in sidecar_profiles(s)] == ["decode"]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert path.read_text() == write_sidecar(s, engine).read_text()  # deterministic


def test_read_errors(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(ArtefactError, match="hybridtrt build"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ArtefactError, match="not valid JSON"):
        read_sidecar(engine)
    for hostile, needle in [("[1, 2]", "must be a JSON object, it is a list"), ("[" * 50_000 + "]" * 50_000, "nests"),
                            ('{"sidecar_version": NaN}', "NaN")]:  # fmt: skip
        sidecar_path(engine).write_text(hostile)
        with pytest.raises(ArtefactError, match=needle):
            read_sidecar(engine)
    sidecar_path(engine).write_bytes(b"\xff\xfe binary")
    with pytest.raises(ArtefactError, match="not UTF-8"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"sidecar_version": 999}))
    with pytest.raises(ArtefactError, match="sidecar_version"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"sidecar_version": SIDECAR_VERSION}))
    with pytest.raises(ArtefactError, match="lacks"):
        read_sidecar(engine)


def test_unknown_graph(export):
    out, manifest = export
    manifest_copy = type(manifest).from_dict(json.loads(manifest.to_json()))
    del manifest_copy.graphs["decode"]
    with pytest.raises(ArtefactError, match="--split"):
        make_sidecar(manifest_copy, out, [], graph="decode", tensorrt_version="11", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={})
