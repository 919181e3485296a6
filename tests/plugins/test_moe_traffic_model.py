"""benchmarks/gpu/moe_traffic.py: the MoE layer's byte and FLOP model (issue 26), its routing statistics
against simulated routing, and its shapes against the architectures' configs (no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_script
import torch

from hybridtrt.models.architectures import ARCHITECTURES

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "moe_traffic.py"


@pytest.fixture(scope="module")
def model():
    return load_script("moe_traffic", SCRIPT)


def _simulate(e: int, k: int, t: int, trials: int) -> tuple[float, float]:
    """Mean distinct experts and mean largest per-expert pair count of uniform top-k routing."""
    gen = torch.Generator().manual_seed(0)
    distinct, largest = 0.0, 0.0
    for _ in range(trials):
        ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices  # k distinct experts per token
        counts = torch.bincount(ids.reshape(-1), minlength=e)
        distinct += float((counts > 0).sum())
        largest += float(counts.max())
    return distinct / trials, largest / trials


@pytest.mark.parametrize(("e", "k", "t"), [(128, 6, 8), (128, 6, 2048), (512, 22, 64)])
def test_routing_statistics_match_simulated_routing(model, e, k, t):
    distinct, largest = _simulate(e, k, t, trials=40)
    assert model.chosen_experts(e, k, t) == pytest.approx(distinct, rel=0.02)
    assert model.capacity(e, k, t) == pytest.approx(largest, rel=0.08)


def test_shapes_are_the_architectures(model):
    super_ = model.Layer.of("nemotron-3-super-120b-a12b")
    config = ARCHITECTURES["nemotron-3-super-120b-a12b"]
    assert (super_.experts, super_.top_k, super_.inner, super_.dim) == (512, 22, config["moe_intermediate_size"], config["moe_latent_size"])
    nano = model.Layer.of("nemotron-3-nano-30b-a3b")
    assert nano.dim == ARCHITECTURES["nemotron-3-nano-30b-a3b"]["hidden_size"]


def test_the_plugin_reads_each_chosen_expert_once_and_the_body_three_times(model):
    """At decode the weights are nearly all the bytes: the plugin's weight term is the ideal's (each chosen
    expert read once), the bf16 body's three times it (the gathered copy written and read again); the
    FP8 body casts every expert, so it grows with E / A."""
    nano = model.Layer.of("nemotron-3-nano-30b-a3b")
    one = model.Call(nano, 1, "bf16")
    assert model.plugin(one) / model.ideal(one) == pytest.approx(1.0, abs=0.01)
    assert model.function_body(one) / model.ideal(one) == pytest.approx(3.0, abs=0.02)
    fp8 = model.Call(nano, 1, "fp8")
    assert model.function_body(fp8) / model.ideal(fp8) > nano.experts / nano.top_k
    flops = model.flops(model.Call(nano, 2048, "bf16"))
    assert flops["ideal"] < flops["body"] < flops["dense"]


def test_the_table_fits_80_columns(model, capsys):
    assert model.main([]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 80
