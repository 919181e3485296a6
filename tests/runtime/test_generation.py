"""The backend-independent generation loop: sampling rules, EOS handling, input checks."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.errors import InputError
from hybridtrt.models import load_model
from hybridtrt.runtime.generation import SamplingConfig, next_tokens


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
    a = model.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7)).tokens
    b = model.generate(ids, max_new_tokens=10, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7)).tokens
    greedy = model.generate(ids, max_new_tokens=10).tokens
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_eos_stops_rows_and_pads(make_checkpoint):
    model = load_model(make_checkpoint())
    ids = torch.randint(3, 256, (2, 6))
    free = model.generate(ids, max_new_tokens=6).tokens
    eos = int(free[0, 2])
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0).tokens
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
        model.generate(ids, torch.tensor([[1, 1, 1, 0]]), max_new_tokens=2)
