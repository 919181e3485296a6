"""Exported graphs on ONNX Runtime (CPU) vs the PyTorch reference, from one file per model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.io import input_names, output_names
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.models import load_model
from hybridtrt.ops.onnx_functions import DOMAIN
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch

TOL = 1e-5
SPLIT = ExportOptions(split=True)


@pytest.fixture(scope="module", params=["tiny-nemotron-h", "tiny-mamba2"])
def exported(request, make_export):
    ckpt, out = make_export(request.param, SPLIT)
    return load_model(ckpt), OrtModel(out), out


def _compare_call(model, ort, ids, mask, cache=None):
    with torch.no_grad():
        ref = model(ids, mask, cache, logits="last", scan_mode="scan")
    state = ort.plan.zeros(ids.shape[0]) if cache is None else {
        spec.past_name: v for spec, v in zip(ort.plan.buffers, cache.named_states().values())
    }
    got = ort.run(ids, mask, state)
    assert rel_l2(got["logits"], ref.logits) <= TOL
    for name, t in ref.cache.named_states().items():
        assert rel_l2(got[name], t) <= TOL, name
    return ref


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_matches_reference_for_all_lengths(exported, batch):
    model, ort, _ = exported
    c = model.config.chunk_size
    for length in (1, c - 1, c, c + 1, 3 * c + 5):
        lengths = [length] if batch == 1 else [length, max(1, length // 2), 1]
        ids, mask = left_padded_batch(lengths, model.config.vocab_size, seed=length)
        _compare_call(model, ort, ids, mask)


def test_ort_continues_from_past_states(exported):
    """A second prefill on top of a first one (dynamic past) and a decode step through the
    unified graph."""
    model, ort, _ = exported
    ids, mask = left_padded_batch([20, 12, 5], model.config.vocab_size, seed=9)
    first = _compare_call(model, ort, ids, mask)
    more = torch.randint(3, model.config.vocab_size, (3, 7))
    mask2 = torch.cat([mask, torch.ones(3, 7, dtype=torch.long)], 1)
    second = _compare_call(model, ort, more, mask2, first.cache)
    mask3 = torch.cat([mask2, torch.ones(3, 1, dtype=torch.long)], 1)
    _compare_call(model, ort, more[:, :1], mask3, second.cache)


@pytest.mark.parametrize("use_decode_graph", [False, True])
def test_greedy_32_tokens_equal_reference(exported, use_decode_graph):
    model, _, out = exported
    ort = OrtModel(out, use_decode_graph=use_decode_graph)
    ids, mask = left_padded_batch([17, 6], model.config.vocab_size, seed=4)
    ref = TorchStepper(model).generate(ids, mask, max_new_tokens=32, keep_logits=True)
    got = ort.generate(ids, mask, max_new_tokens=32, keep_logits=True)
    assert torch.equal(got.tokens, ref.tokens)
    # fp32 rounding differences compound through 32 fed-back states: 10x the one-call gate.
    assert max(rel_l2(a, b) for a, b in zip(got.logits, ref.logits)) <= 10 * TOL


def test_graphs_are_valid_and_carry_function_bodies(exported):
    model, _, out = exported
    manifest = read_manifest(out)
    for role, entry in manifest.graphs.items():
        path = out / entry.file
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        custom = [n for n in proto.graph.node if n.domain == DOMAIN]
        mamba_layers = model.config.layers_of("M")
        assert len(custom) == len(mamba_layers)
        want = "Mamba2StateUpdate" if role == "decode" else "Mamba2ChunkScan"
        assert {n.op_type for n in custom} == {want}
        bodies = {(f.domain, f.name) for f in proto.functions}
        assert all((n.domain, n.op_type) in bodies for n in custom)
        for n in custom:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["plugin_namespace"] == b"hybridtrt" and attrs["plugin_version"] == b"1"
        assert [i.name for i in proto.graph.input] == input_names(model.config)
        assert [o.name for o in proto.graph.output] == output_names(model.config)
        names = [n.name for n in proto.graph.node]
        assert len(names) == len(set(names))
        i = mamba_layers[0]
        assert f"/model/layers.{i}/mixer/in_proj/MatMul" in names
        assert f"/model/layers.{i}/mixer/{want}" in names


def test_io_dims_are_named(exported):
    _, _, out = exported
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "past+seq"]
    for name, d in dims.items():
        if name.startswith("past_key_values"):
            assert d[0] == "batch" and d[2] == "past"


def test_weights_are_external_data(exported):
    _, _, out = exported
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert big, "weights must live in weights.data"
    assert all(len(t.raw_data) < 1024 for t in inline), "only tiny constants stay inline"
    locations = {dict((e.key, e.value) for e in t.external_data)["location"] for t in big}
    assert locations == {"weights.data"}
    assert (out / "model.onnx").stat().st_size < (out / "weights.data").stat().st_size
    # The decode graph reuses weights.data instead of writing a second copy.
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    shared = [t for t in decode.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {dict((e.key, e.value) for e in t.external_data)["location"] for t in shared} == {"weights.data"}
    assert not (out / "decode.weights.data").exists()
    assert read_manifest(out).graphs["decode"].data == ["weights.data"]


def test_fp16_export_runs_on_ort(make_export):
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16"))
    model = load_model(ckpt, "fp16")
    ids, mask = left_padded_batch([21, 9], 256, seed=5)
    ref = TorchStepper(model).generate(ids, mask, max_new_tokens=8, keep_logits=True)
    got = OrtModel(out).generate(ids, mask, max_new_tokens=8, keep_logits=True)
    from hybridtrt.judge.metrics import compare

    assert compare(got.logits[0], ref.logits[0]).cosine >= 0.999
    assert read_manifest(out).dtype == "fp16"


def test_all_logits_and_half_state(make_export):
    """--logits all gives [B, L, V] for every position; --state-dtype fp16 keeps SSM states in fp16."""
    ckpt, out = make_export("tiny-mamba2", ExportOptions(logits="all", state_dtype="fp16"))
    manifest = read_manifest(out)
    assert manifest.logits == "all" and manifest.state_dtype == "fp16"
    model = load_model(ckpt)
    ort = OrtModel(out)
    ids, mask = left_padded_batch([19, 11], model.config.vocab_size, seed=8)
    with torch.no_grad():
        ref = model(ids, mask, model.new_cache(2, torch.float16), scan_mode="scan")
    got = ort.run(ids, mask, ort.plan.zeros(2))
    assert got["logits"].shape == (2, 19, model.config.vocab_size)
    real = mask.bool()
    assert rel_l2(got["logits"][real.numpy()], ref.logits[real]) <= TOL
    ssm = [b for b in ort.plan.buffers if "ssm" in b.past_name]
    assert all(got[b.present_name].dtype == np.float16 for b in ssm)
    for b in ssm:
        assert rel_l2(got[b.present_name], ref.cache.named_states()[b.present_name]) <= 1e-3
