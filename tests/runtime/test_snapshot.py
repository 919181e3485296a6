"""State snapshots: a prefix prefilled once and continued equals the uninterrupted generation, in
every runtime and across runtimes."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.errors import InputError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.models import load_model
from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.runtime.snapshot import Snapshot, snapshot_prompt
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch

TOL = 1e-5
FLAVOURS = {"dynamic": ExportOptions(), "static": ExportOptions(kv_cache="static", max_cache_len=80)}


@pytest.fixture(scope="module")
def reference(make_checkpoint):
    return load_model(make_checkpoint())


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def ort(request, make_export):
    return OrtModel(make_export("tiny-nemotron-h", FLAVOURS[request.param])[1])


def _prompts(vocab):
    prefix, prefix_mask = left_padded_batch([21, 12], vocab, seed=31)
    tail = torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(32))
    return prefix, prefix_mask, tail


def _steppers(reference, ort):
    return {"pytorch": TorchStepper(reference), "onnxruntime": ort}


@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_round_trip_equals_uninterrupted_generation(reference, ort, runtime):
    stepper = _steppers(reference, ort)[runtime]
    prefix, prefix_mask, tail = _prompts(256)
    whole_ids = torch.cat([prefix, tail], 1)
    whole_mask = torch.cat([prefix_mask, torch.ones_like(tail)], 1)
    from hybridtrt.runtime.generation import generate

    straight = generate(stepper, whole_ids, whole_mask, max_new_tokens=12, keep_logits=True)
    snap = snapshot_prompt(stepper, prefix, prefix_mask)
    assert (snap.batch, snap.past) == (2, 21)
    resumed = generate(stepper, tail, max_new_tokens=12, keep_logits=True, snapshot=snap)
    again = generate(stepper, tail, max_new_tokens=12, keep_logits=True, snapshot=snap)  # still valid
    assert torch.equal(resumed.tokens, straight.tokens) and torch.equal(again.tokens, straight.tokens)
    assert max(rel_l2(a, b) for a, b in zip(resumed.logits, straight.logits)) <= 10 * TOL


def test_snapshot_moves_between_runtimes(reference, ort, tmp_path):
    """A snapshot of the reference continues on ONNX Runtime (either KV flavour), via a file."""
    prefix, prefix_mask, tail = _prompts(256)
    snap = snapshot_prompt(TorchStepper(reference), prefix, prefix_mask)
    loaded = Snapshot.load(snap.save(tmp_path / "prefix.safetensors"))
    assert set(loaded.states) == set(snap.states) and torch.equal(loaded.attention_mask, snap.attention_mask)
    ref = TorchStepper(reference).generate(tail, max_new_tokens=8, keep_logits=True, snapshot=snap)
    got = ort.generate(tail, max_new_tokens=8, keep_logits=True, snapshot=loaded)
    assert torch.equal(got.tokens, ref.tokens)
    assert rel_l2(got.logits[0], ref.logits[0]) <= TOL


def test_one_row_prefix_serves_a_batch(reference, ort):
    prefix = torch.randint(3, 256, (1, 17), generator=torch.Generator().manual_seed(33))
    tails = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(34))
    snap = snapshot_prompt(ort, prefix)
    got = ort.generate(tails, max_new_tokens=5, snapshot=snap).tokens
    for row in range(3):
        whole = torch.cat([prefix, tails[row : row + 1]], 1)
        assert torch.equal(got[row], TorchStepper(reference).generate(whole, max_new_tokens=5).tokens[0])


def test_bad_continuations_are_refused(reference):
    stepper = TorchStepper(reference)
    prefix, prefix_mask, tail = _prompts(256)
    snap = snapshot_prompt(stepper, prefix, prefix_mask)
    with pytest.raises(InputError, match="cannot be padded"):
        TorchStepper(reference).generate(tail, torch.tensor([[0, 1, 1, 1, 1]] * 2), snapshot=snap)
    with pytest.raises(InputError, match="snapshot has 2 rows"):
        TorchStepper(reference).generate(tail[:1].repeat(3, 1), snapshot=snap)
