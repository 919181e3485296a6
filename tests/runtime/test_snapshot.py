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
from tests.static_capacity import CAPACITY

TOL = 1e-5
FLAVOURS = {"dynamic": ExportOptions(), "static": ExportOptions(kv_cache="static", max_cache_len=CAPACITY)}


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


# -- the record: identity, checksum, extension, no silent overwrite (issue 24) -------------------


def test_extending_a_snapshot_equals_the_snapshot_of_the_longer_prefix(reference):
    """``snapshot_prompt(..., snapshot=s)`` (``--snapshot A --save-snapshot B``) continues ``s``: its
    states are those of prefilling the whole prefix at once."""
    stepper = TorchStepper(reference)
    ids = torch.randint(3, 256, (1, 19), generator=torch.Generator().manual_seed(35))
    first = snapshot_prompt(stepper, ids[:, :11])
    longer = snapshot_prompt(stepper, ids[:, 11:], snapshot=first)
    whole = snapshot_prompt(stepper, ids)
    assert longer.past == whole.past == 19 and set(longer.states) == set(whole.states)
    assert max(rel_l2(longer.states[k], whole.states[k]) for k in whole.states) <= TOL


def test_save_keeps_the_record_and_refuses_to_overwrite(reference, tmp_path):
    import dataclasses

    snap = dataclasses.replace(snapshot_prompt(TorchStepper(reference), torch.tensor([[5, 6, 7]])), identity={"checkpoint_sha256": "ab" * 32})
    path = snap.save(tmp_path / "s.safetensors")
    loaded = Snapshot.load(path)
    assert loaded.identity == snap.identity and all(torch.equal(loaded.states[k], v) for k, v in snap.states.items())
    with pytest.raises(InputError, match="exists"):
        snap.save(path)
    before = path.read_bytes()
    dataclasses.replace(snap, identity={}).save(path, overwrite=True)
    assert path.read_bytes() != before and Snapshot.load(path).identity == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temporary left behind


def test_cli_extends_a_snapshot_and_force_replaces(make_checkpoint, tmp_path, capsys):
    """``generate --snapshot A --save-snapshot B`` writes the longer prefix; continuing after B equals
    the straight generation; ``--force`` is what lets B be replaced."""
    from hybridtrt.cli.main import main

    ckpt = str(make_checkpoint())
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["generate", ckpt, "--ids", "5 6 7 8", "--save-snapshot", str(a)]) == 0
    assert main(["generate", ckpt, "--ids", "9 10", "--snapshot", str(a), "--save-snapshot", str(b)]) == 0
    assert Snapshot.load(b).past == 6 and Snapshot.load(b).identity == Snapshot.load(a).identity
    capsys.readouterr()
    assert main(["generate", ckpt, "--ids", "11", "--snapshot", str(b), "--max-new-tokens", "4", "--ignore-eos"]) == 0
    resumed = capsys.readouterr().out.split("\n")[0]
    assert main(["generate", ckpt, "--ids", "5 6 7 8 9 10 11", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == resumed
    assert main(["generate", ckpt, "--ids", "5 6", "--save-snapshot", str(b)]) == 2
    assert main(["generate", ckpt, "--ids", "5 6", "--save-snapshot", str(b), "--force"]) == 0
    assert Snapshot.load(b).past == 2
