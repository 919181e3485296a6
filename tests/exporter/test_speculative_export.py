"""``export --speculative``: every position's logits, ``last_hidden_state``, and the MTP head as
``mtp.onnx`` (`hybridtrt.exporter.mtp_graph`), verified against the reference head; MTP drafting on
ONNX Runtime emits the greedy tokens."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hybridtrt.errors import ExportError
from hybridtrt.exporter import wrapper
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.exporter.mtp_graph import MTP_FILE, verify_mtp_graph
from hybridtrt.exporter.verify import verify_export
from hybridtrt.graphs.external_data import external_index
from hybridtrt.models import load_model
from hybridtrt.models.loading import open_checkpoint
from hybridtrt.models.mtp import load_mtp
from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.runtime.speculative import MtpDrafter, SpeculationStats, generate_speculative
from tests.conftest import left_padded_batch

SUPER = "tiny-nemotron3-super"
SPECULATIVE = ExportOptions(speculative=True)


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export(SUPER, SPECULATIVE)


def test_the_export_has_the_mtp_graph_and_every_position(exported):
    _, out = exported
    m = read_manifest(out)
    assert m.logits == "all" and m.hidden_states
    assert m.graphs["mtp"].file == MTP_FILE and m.graphs["mtp"].data == ["mtp.data", "weights.data"]
    # The embedding table and the LM head are the main graph's bytes in weights.data, not a second copy.
    mtp, main = external_index(out / MTP_FILE), external_index(out / "model.onnx")
    shared = {k: v for k, v in mtp.items() if v[0] == "weights.data"}
    assert sorted(shared.values()) == sorted([main["model.embeddings.weight"], main["model.lm_head.weight_t"]])
    assert all(v[0] == "mtp.data" for k, v in mtp.items() if k.startswith("model.layers."))
    assert [o["name"] for o in m.graphs["unified"].outputs][-1] == "last_hidden_state"
    assert [i["name"] for i in m.graphs["mtp"].inputs][:3] == ["last_hidden_state", "input_ids", "attention_mask"]
    worst = m.verification["graphs"][MTP_FILE]["worst"]
    assert worst["rel_l2"] < 1e-5 and worst["bound"] > 0
    assert "exported as mtp.onnx" in m.source["mtp"]
    assert {"mtp.onnx", "mtp.data"} <= set(m.files)


def test_onnxruntime_mtp_drafts_are_the_references_and_the_tokens_greedys(exported):
    ckpt, out = exported
    model = load_model(ckpt)
    ort = OrtModel(out, threads=1)
    ids, mask = left_padded_batch([5, 9, 1], 256, seed=1)
    drafts = {}
    for name, backend, drafter in (("reference", TorchStepper(model), MtpDrafter(model, load_mtp(ckpt, model))), ("onnxruntime", ort, MtpDrafter(ort.mtp_head()))):
        logits, hidden, _ = backend.verify(ids, mask, backend.zero_state(3))
        assert hidden is not None and hidden.shape == (3, ids.shape[1], 64)
        drafter.observe(hidden, torch.cat([ids[:, 1:], logits[:, -1].argmax(-1, keepdim=True)], 1), mask)
        drafts[name] = drafter.draft([], 5)
        greedy = backend.generate(ids, mask, max_new_tokens=300).tokens
        stats = SpeculationStats()
        spec = generate_speculative(backend, drafter.__class__(drafter.head), ids, mask, max_new_tokens=300, stats=stats)
        assert torch.equal(spec.tokens, greedy), name
        assert stats.drafted > 0 and stats.draft_calls >= stats.verify_calls  # observe + chained drafts per iteration
    assert drafts["reference"] == drafts["onnxruntime"]


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_the_hidden_state_output_is_judged(exported, monkeypatch, mode):
    """Planted: the reference's ``last_hidden_state`` 1 % off; verification names that output in
    both modes (whole graph, and the head window of the layer windows)."""
    ckpt, out = exported
    forward = wrapper.GraphModule.forward

    def off(self, *args):
        outs = forward(self, *args)
        return (*outs[:-1], outs[-1] * 1.01) if self.hidden else outs

    monkeypatch.setattr(wrapper.GraphModule, "forward", off)
    with pytest.raises(ExportError, match="last_hidden_state"):
        verify_export(out, load_model(ckpt, lazy=True), read_manifest(out), mode=mode, parameter_bytes=1)


def test_a_fault_in_the_mtp_weights_is_caught(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    index = external_index(bad / MTP_FILE)
    name = next(n for n in index if "eh_proj" in n)
    location, offset, length = index[name]
    with open(bad / location, "r+b") as f:
        f.seek(offset)
        w = np.frombuffer(f.read(length), dtype=np.float32) * np.float32(1.05)
        f.seek(offset)
        f.write(w.tobytes())
    ckpt = read_manifest(out).source["checkpoint"]
    with pytest.raises(ExportError, match=r"mtp.onnx disagrees with the reference MTP head .*logits"):
        verify_mtp_graph(bad, open_checkpoint(ckpt), read_manifest(out, integrity=None))


def test_an_mtp_head_that_cannot_be_built_is_refused_before_anything_is_traced(make_checkpoint, tmp_path):
    from hybridtrt.errors import ConfigError

    import json

    mamba = tmp_path / "mamba-mtp"
    shutil.copytree(make_checkpoint(SUPER), mamba)
    config = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**config, "mtp_hybrid_override_pattern": "ME"}))
    with pytest.raises(ConfigError, match="Mamba block"):
        export(mamba, tmp_path / "b", SPECULATIVE)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_the_mtp_graph_passes_tensorrts_rules(exported, make_export, tmp_path):
    """``build --graph mtp --check-tensorrt``: the parser emulator on ``mtp.onnx`` with its own
    profiles (prefill and decode over the same dims); a full build, and an export without the
    graph, are refused with the fix."""
    from tests.cli.batch import run_batch

    _, plain = make_export()
    out = run_batch(
        [
            ["build", exported[1], "--graph", "mtp", "--check-tensorrt", "11.1"],
            ["build", exported[1], "--graph", "mtp", "-o", tmp_path / "mtp.engine"],
            ["build", plain, "--graph", "mtp", "--check-tensorrt", "11.1"],
        ]
    )
    assert out[0].code == 0 and "TensorRT 11.1 would build mtp.onnx as asked" in out[0].stdout, out[0].output
    assert "last_hidden_state" in out[0].stdout and "IAttention" in out[0].stdout
    assert out[1].code == 2 and "no TensorRT runtime drafts with an MTP engine yet" in out[1].output and "fix:" in out[1].output
    assert out[2].code == 2 and "the export has no 'mtp' graph" in out[2].output and "--speculative" in out[2].output
    assert not (tmp_path / "mtp.engine").exists()


def test_sharing_by_content_shares_equal_bytes_only(tmp_path):
    """`share_external_data(by_content=True)`: a tensor of another name but the same type, shape and
    bytes points into the reference's file; one that differs in a single value stays in the model's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hybridtrt.graphs.external_data import save_with_external_data, share_external_data

    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 32)).astype(np.float32)
    other = table.copy()
    other[5, 7] += 1e-3

    def graph(names_values, path, data):
        inits = [numpy_helper.from_array(v, n) for n, v in names_values]
        nodes = [helper.make_node("Identity", [n], [f"out_{n}"]) for n, _ in names_values]
        outs = [helper.make_tensor_value_info(f"out_{n}", TensorProto.FLOAT, list(v.shape)) for n, v in names_values]
        save_with_external_data(helper.make_model(helper.make_graph(nodes, "g", [], outs, inits)), path, data)

    graph([("model.embeddings.weight", table)], tmp_path / "model.onnx", "weights.data")
    graph([("parts.embeddings.weight", table), ("parts.other", other)], tmp_path / "mtp.onnx", "mtp.data")
    assert share_external_data(tmp_path / "mtp.onnx", tmp_path / "model.onnx", by_content=True) == table.nbytes
    index = external_index(tmp_path / "mtp.onnx")
    assert index["parts.embeddings.weight"][0] == "weights.data" and index["parts.other"][0] == "mtp.data"
    loaded = onnx.load(str(tmp_path / "mtp.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert np.array_equal(values["parts.embeddings.weight"], table) and np.array_equal(values["parts.other"], other)
