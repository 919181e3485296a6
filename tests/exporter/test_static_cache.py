"""The static-cache flavour (``--kv-cache static --max-cache-len N``) against the reference:
same numbers as the growing cache, standard in-place ops, constant decode shapes, typed refusals."""

from __future__ import annotations

import onnx
import pytest
import torch

from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.errors import ExportError, InputError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.io import input_names
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.graphs.aliasing import check_in_place
from hybridtrt.models import load_model
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch
from tests.static_capacity import CAPACITY

TOL = 1e-5
STATIC = ExportOptions(kv_cache="static", max_cache_len=CAPACITY, split=True)


@pytest.fixture(scope="module", params=["tiny-nemotron-h", "tiny-mamba2"])
def static(request, make_export):
    ckpt, out = make_export(request.param, STATIC)
    return load_model(ckpt), out


@pytest.mark.parametrize("use_decode_graph", [False, True])
def test_prefill_and_32_steps_match_reference_left_padded(static, use_decode_graph):
    model, out = static
    ort = OrtModel(out, use_decode_graph=use_decode_graph)
    ids, mask = left_padded_batch([29, 17, 5], model.config.vocab_size, seed=11)
    ref = TorchStepper(model).generate(ids, mask, max_new_tokens=32, keep_logits=True)
    got = ort.generate(ids, mask, max_new_tokens=32, keep_logits=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert rel_l2(got.logits[0], ref.logits[0]) <= TOL  # the prefill call
    # fp32 rounding compounds through 32 fed-back states: 10x the one-call gate (as test_export).
    assert max(rel_l2(a, b) for a, b in zip(got.logits, ref.logits)) <= 10 * TOL


def test_states_equal_the_growing_cache_states(static):
    """Every state after a padded prefill and a few steps, KV trimmed to the written positions."""
    model, out = static
    ort = OrtModel(out)
    ids, mask = left_padded_batch([23, 9, 2], model.config.vocab_size, seed=12)
    ref_state, got_state = model.new_cache(3), ort.zero_state(3)
    step_ids = ids
    for k in range(4):
        with torch.no_grad():
            ref = model(step_ids, mask, ref_state, logits="last")
        ref_state = ref.cache
        logits, got_state = ort.step(step_ids, mask, got_state, decode=k > 0)
        assert rel_l2(logits, ref.logits) <= TOL
        step_ids = ref.logits.argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    got = ort.named_states(got_state)
    for name, t in ref_state.named_states().items():
        assert got[name].shape == tuple(t.shape), name
        assert rel_l2(got[name], t) <= TOL, name


def test_graph_uses_standard_in_place_ops_and_constant_decode_shapes(make_export):
    ckpt, out = make_export("tiny-nemotron-h", STATIC)
    model = load_model(ckpt)
    manifest = read_manifest(out)
    assert (manifest.kv_cache, manifest.max_cache_len, manifest.opset) == ("static", CAPACITY, 24)
    kv_layers = len(model.config.layers_of("*"))
    for role, entry in manifest.graphs.items():
        proto = onnx.load(str(out / entry.file), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("TensorScatter") == 2 * kv_layers and ops.count("Attention") == kv_layers
        assert "Expand" not in [n.op_type for n in proto.graph.node if "mixer" in n.name and "layers.1/" in n.name]
        assert ("Conv" in ops) == (role == "unified")  # decode: the depthwise conv as shifted multiply-adds
        assert [i.name for i in proto.graph.input] == input_names(model.config, manifest.cache_flavour)
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*proto.graph.input, *proto.graph.output]}
        assert dims["cache_position"] == dims["padding_length"] == ["batch"]
        assert dims["past_key_values.1.key"] == dims["present.1.key"] == ["batch", 2, CAPACITY, 16]
        if role == "decode":  # every decode-step shape is fixed once the batch is
            assert all(d == "batch" or isinstance(d, int) for ds in dims.values() for d in ds)
        check_in_place(proto)  # every present_* may share its past_*'s buffer


def test_chunked_prefill_equals_one_call(static):
    model, out = static
    ort = OrtModel(out)
    ids, mask = left_padded_batch([61, 40], model.config.vocab_size, seed=13)
    whole = ort.generate(ids, mask, max_new_tokens=4, keep_logits=True, prefill_chunk=1000)
    chunked = ort.generate(ids, mask, max_new_tokens=4, keep_logits=True, prefill_chunk=16)
    assert torch.equal(whole.tokens, chunked.tokens)
    assert max(rel_l2(a, b) for a, b in zip(chunked.logits, whole.logits)) <= TOL


def test_capacity_is_refused_before_running(static):
    model, out = static
    ort = OrtModel(out)
    prompt = CAPACITY - 16
    ids, mask = left_padded_batch([prompt], model.config.vocab_size, seed=14)
    with pytest.raises(InputError, match=f"--max-cache-len is {CAPACITY}"):
        ort.generate(ids, mask, max_new_tokens=20)
    ort.generate(ids, mask, max_new_tokens=17)  # prompt + 17 - 1 = CAPACITY positions fit


@pytest.mark.parametrize(
    "options, match",
    [
        (ExportOptions(kv_cache="static"), "needs --max-cache-len"),
        (ExportOptions(kv_cache="static", max_cache_len=64, opset=22), "opset ≥ 24"),
        (ExportOptions(max_cache_len=64), "only applies to --kv-cache static"),
    ],
)
def test_bad_flavour_options_are_refused(make_checkpoint, tmp_path, options, match):
    with pytest.raises(ExportError, match=match):
        export(make_checkpoint(), tmp_path / "out", options)
