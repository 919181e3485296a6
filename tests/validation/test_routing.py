"""The MoE routing-agreement metric: identical inputs agree, a perturbed layer input flips the
routing of the next MoE layer only, padding is ignored, models without MoE get no metric."""

from __future__ import annotations

import torch

from hybridtrt.models import load_model
from hybridtrt.validation.routing import routing_agreement, routing_for
from hybridtrt.validation.subjects import torch_subject
from tests.conftest import left_padded_batch


def _setup(make_checkpoint):
    model = load_model(make_checkpoint("tiny-nemotron3-moe"))
    ids, mask = left_padded_batch([24, 10, 3], model.config.vocab_size, seed=7)
    layers = torch_subject(model).layer_outputs(ids, mask)
    return model, ids, mask, layers


def test_identical_and_perturbed_layer_outputs(make_checkpoint):
    model, ids, mask, layers = _setup(make_checkpoint)
    assert model.config.layers_of("E") == [1, 3, 6]
    assert routing_agreement(model, ids, mask, layers, layers) == {1: 1.0, 3: 1.0, 6: 1.0}
    noisy = dict(layers)
    noisy["layer_output.2"] = layers["layer_output.2"] + torch.randn(layers["layer_output.2"].shape) * 3
    got = routing_agreement(model, ids, mask, layers, noisy)
    assert got[1] == 1.0 and got[6] == 1.0  # layer 6 reads layer_output.5, untouched here
    assert got[3] < 0.9


def test_padding_is_ignored(make_checkpoint):
    model, ids, mask, layers = _setup(make_checkpoint)
    noisy = {k: v.clone() for k, v in layers.items()}
    pad = ~mask.bool()
    for v in noisy.values():
        v[pad] = torch.randn(int(pad.sum()), v.shape[-1]) * 10
    assert routing_agreement(model, ids, mask, layers, noisy) == {1: 1.0, 3: 1.0, 6: 1.0}


def test_no_metric_without_moe(make_checkpoint):
    model = load_model(make_checkpoint())
    ids, mask = left_padded_batch([5], model.config.vocab_size)
    assert routing_for(model, ids, mask) is None
