"""bf16 exports on ONNX Runtime CPU (issue 29, goal 4): `OrtModel` computes them in fp32 from their
bf16 weights by default (`hybridtrt.graphs.bf16_emulation.widen_bf16`), while validation judges
them rounded as a bf16 executor computes them (`emulate_bf16`); in both, every session of the
process reads one widened copy of the weights. Speed and memory side by side with the fp32 export:
benchmarks/bf16_cpu.py (README "Benchmarks (CPU)")."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from hybridtrt.errors import InputError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.graphs.bf16_emulation import RAW_SUFFIX, emulate_bf16, fp32_reads, widen_bf16
from hybridtrt.judge.metrics import compare
from hybridtrt.models.loading import load_model
from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.runtime.onnxruntime import OrtModel, OrtSession, SharedWeights

BF16 = ExportOptions(dtype="bf16", verify=False)


@pytest.fixture(scope="module")
def bf16_export(make_export):
    return make_export("tiny-nemotron-h", BF16)


def _prefill_and_step(model, ids, mask):
    logits, state = model.step(ids, mask, model.zero_state(ids.shape[0]), False)
    token = logits.argmax(-1)[:, None]
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    step, _ = model.step(token, mask, state, True)
    return logits.numpy(), step.numpy(), token, mask


def test_default_is_fp32_inference_of_the_bf16_weights(bf16_export, tmp_path):
    """The default runs the bf16 weights in fp32 (rel L2 ~1e-6 against PyTorch fp32 on the same
    weights, prefill and a decode step); the emulation is a bf16 execution (rel L2 ~1e-2 there), so
    a default that still rounded would fail the first gate by four orders of magnitude."""
    ckpt, exported = bf16_export
    out = shutil.copytree(exported, tmp_path / "export")
    torch.manual_seed(3)
    ids = torch.randint(3, 250, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    truth_model = load_model(ckpt, "bf16").float()  # the export's weights, computed in fp32
    fast, emulated = OrtModel(out), OrtModel(out, bf16="emulate")
    assert fast.unified.widened_bf16 and not fast.unified.emulated_bf16 and emulated.unified.emulated_bf16
    got, got_step, token, mask2 = _prefill_and_step(fast, ids, mask)
    rounded, _, _, _ = _prefill_and_step(emulated, ids, mask)
    with torch.no_grad():
        truth, truth_step, _, _ = _prefill_and_step(TorchStepper(truth_model), ids, mask)
    assert compare(got, truth).rel_l2 < 2e-5, compare(got, truth)
    assert compare(got_step.reshape(truth_step.shape), truth_step).rel_l2 < 2e-5
    assert compare(rounded, truth).rel_l2 > 1e-3  # the emulation rounds: the gate above can tell


def test_every_session_reads_one_widened_copy(bf16_export, tmp_path):
    """The unified and decode sessions (and routing/variant copies) share the fp32 widening of each
    bf16 weight, made once per process; ONNX Runtime's own loading (pre-packed, one folded copy per
    session) computes the same numbers."""
    _, exported = bf16_export
    out = shutil.copytree(exported, tmp_path / "export")
    model = OrtModel(out)
    shared = SharedWeights.of(out)
    assert model.unified.weights is model.decode.weights is shared
    widened = fp32_reads(model.unified.graph) | fp32_reads(model.decode.graph)
    external = {t.name for g in (model.unified.graph, model.decode.graph) for t in g.graph.initializer if t.external_data and t.name in widened}
    assert external and len(shared._widened) == len(external)  # one array per external weight, both graphs (small ones are inline)
    name = next(iter(fp32_reads(model.unified.graph) & fp32_reads(model.decode.graph) & external))
    assert shared.values(model.unified.graph, widened)[name] is shared.values(model.decode.graph, widened)[name]
    OrtModel(out, bf16="emulate")  # the emulation reads the same copies
    assert len(shared._widened) == len(external)
    own = OrtModel(out, prepack=True)
    assert own.unified.weights is None
    ids = torch.tensor([[5, 17, 99, 42, 7], [0, 0, 3, 8, 1]])
    mask = (ids != 0).long()
    a = model.generate(ids, mask, max_new_tokens=4, keep_logits=True)
    b = own.generate(ids, mask, max_new_tokens=4, keep_logits=True)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.logits, b.logits):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_widened_graph_rounds_nothing_and_supplied_weights_are_declared_fp32(bf16_export):
    _, out = bf16_export
    bare = onnx.load(str(out / "model.onnx"), load_external_data=False)
    supplied = fp32_reads(bare)
    wide = widen_bf16(bare, supplied)
    g = wide.graph
    assert not [n for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.BFLOAT16 for a in n.attribute)]
    assert all(t.data_type == TensorProto.FLOAT for t in g.initializer if t.name in supplied)
    # only embedding rows gathered from a bf16 table are widened after their producer
    raw = [n for n in g.node if any(o.endswith(RAW_SUFFIX) for o in n.output)]
    assert {n.op_type for n in raw} <= {"Gather"}
    rounded = emulate_bf16(bare, supplied)
    assert any(n.op_type == "MatMul" for n in rounded.graph.node if any(o.endswith(RAW_SUFFIX) for o in n.output))
    with pytest.raises(ValueError, match="not bf16 weights read in fp32"):
        widen_bf16(bare, {"no-such-weight"})


def test_validation_judges_the_bf16_arithmetic(bf16_export, monkeypatch):
    """validate's ONNX Runtime subject is the emulation, whatever `OrtModel`'s default."""
    from hybridtrt.validation import artefact

    _, out = bf16_export
    made = []
    monkeypatch.setattr(artefact, "ort_subject", lambda model: made.append(model) or model)
    artefact._backend_subject(out, None, "ort", None)
    assert made and made[0].unified.emulated_bf16


def test_unknown_mode_is_refused(bf16_export):
    _, out = bf16_export
    with pytest.raises(InputError, match="bf16='bf8'"):
        OrtSession(out / "model.onnx", bf16="bf8")
