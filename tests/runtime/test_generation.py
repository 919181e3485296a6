"""The backend-independent generation loop: sampling rules, EOS handling, input checks."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.errors import InputError
from hybridtrt.models import load_model
from hybridtrt.runtime.generation import SamplingConfig, TorchStepper, chunk_bounds, iter_generate, next_tokens
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, -1.0]])
    assert next_tokens(logits, SamplingConfig(), None).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen_k = {int(next_tokens(logits, SamplingConfig(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(next_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), gen)) for _ in range(200)}
    assert seen_p == {0, 1}  # 0.5 < 0.7, the token crossing p (0.3) is kept, the rest dropped
    seen_all = {int(next_tokens(logits, SamplingConfig(temperature=1.0), gen)) for _ in range(400)}
    assert seen_all == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible(make_checkpoint):
    model = load_model(make_checkpoint())
    ids = torch.randint(3, 256, (2, 9))
    a = TorchStepper(model).generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7)).tokens
    b = TorchStepper(model).generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7)).tokens
    greedy = TorchStepper(model).generate(ids, max_new_tokens=10).tokens
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_eos_stops_rows_and_pads(make_checkpoint):
    model = load_model(make_checkpoint())
    ids = torch.randint(3, 256, (2, 6))
    free = TorchStepper(model).generate(ids, max_new_tokens=6).tokens
    eos = int(free[0, 2])
    out = TorchStepper(model).generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0).tokens
    row0 = out[0].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, : row0.index(eos) + 1].tolist()
    assert all(t == 0 for t in row0[row0.index(eos) + 1 :])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k")],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplingConfig(**kwargs)


def test_right_padding_is_refused(make_checkpoint):
    model = load_model(make_checkpoint())
    ids = torch.randint(3, 256, (1, 4))
    with pytest.raises(InputError, match="left padding"):
        TorchStepper(model).generate(ids, torch.tensor([[1, 1, 1, 0]]), max_new_tokens=2)


@pytest.mark.parametrize("length, chunk", [(1, 4), (10, 4), (9, 4), (2049, 2048), (4096, 2048), (7, 100), (3, 3), (5, 3), (7, 3)])
def test_chunk_bounds_cover_the_prompt_without_a_one_token_tail(length, chunk):
    bounds = chunk_bounds(length, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) <= chunk and len(sizes) == -(-length // chunk)
    assert length == 1 or min(sizes) >= 2  # a one-token call would be a decode step for the graph


def test_chunked_prefill_equals_one_prefill_on_the_reference(make_checkpoint):
    model = load_model(make_checkpoint())
    ids, mask = left_padded_batch([45, 30, 3], model.config.vocab_size, seed=21)
    whole = TorchStepper(model).generate(ids, mask, max_new_tokens=6, keep_logits=True, prefill_chunk=100)
    chunked = TorchStepper(model).generate(ids, mask, max_new_tokens=6, keep_logits=True, prefill_chunk=8)
    assert torch.equal(whole.tokens, chunked.tokens)
    assert max(rel_l2(a, b) for a, b in zip(chunked.logits, whole.logits)) <= 1e-5


@pytest.mark.parametrize("bad", [-1, 256, 10_000])
def test_token_ids_outside_the_vocabulary_are_refused(make_checkpoint, bad):
    model = load_model(make_checkpoint())
    ids = torch.tensor([[5, bad, 7]])
    with pytest.raises(InputError, match=f"token id {bad} is outside .*\\[0, 256\\)"):
        TorchStepper(model).generate(ids, max_new_tokens=2)


def test_padding_ids_are_checked_too(make_checkpoint):
    """Padding positions are looked up in the embedding like any other id."""
    model = load_model(make_checkpoint())
    ids, mask = torch.tensor([[-1, 5, 6]]), torch.tensor([[0, 1, 1]])
    with pytest.raises(InputError, match="token id -1"):
        TorchStepper(model).generate(ids, mask, max_new_tokens=2)


def test_a_request_the_backend_cannot_hold_is_refused_before_any_step():
    class Limited:
        vocab_size = 10
        calls = 0

        def zero_state(self, batch):
            return None

        def step(self, ids, mask, state, decode):
            Limited.calls += 1
            return torch.zeros(ids.shape[0], 10), state

        def check_request(self, batch, positions, chunk):
            if positions > 8:
                raise InputError(f"{positions} positions > 8")

    with pytest.raises(InputError, match="9 positions > 8"):
        list(iter_generate(Limited(), torch.tensor([[1, 2, 3]]), max_new_tokens=7))
    assert Limited.calls == 0
    assert len(list(iter_generate(Limited(), torch.tensor([[1, 2, 3]]), max_new_tokens=6))) == 6


def test_ort_prefill_calls_fit_the_attention_budget(make_export):
    """A small attention budget shortens the calls as the cache grows; the result is the same."""
    from hybridtrt.runtime.generation import prefill
    from hybridtrt.runtime.onnxruntime import SCORE_BYTES, OrtModel

    _, out = make_export("tiny-nemotron-h")
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(5))
    tight = OrtModel(out, attention_budget=4 * 24 * 80 * SCORE_BYTES)  # H=4: about 24 × 80 scores
    calls = []
    original = tight.step
    tight.step = lambda i, m, s, decode: calls.append((i.shape[1], m.shape[1])) or original(i, m, s, decode)
    logits, _ = prefill(tight, ids, torch.ones_like(ids), tight.zero_state(1), 64)
    whole, _ = prefill(OrtModel(out), ids, torch.ones_like(ids), OrtModel(out).zero_state(1), 64)
    assert rel_l2(logits, whole) <= 1e-5
    assert sum(n for n, _ in calls) == 120 and len(calls) > 2
    assert all(n * total <= 24 * 80 for n, total in calls) and min(n for n, _ in calls) >= 3
