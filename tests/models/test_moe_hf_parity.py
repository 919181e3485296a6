"""Our MoE reference vs HF transformers' NemotronHForCausalLM, both loading a checkpoint HF itself
wrote (``save_pretrained``: ``backbone.`` prefix, per-expert tensors), random weights with
initializer_range 0.3 and a random router correction bias, fp32."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.models import load_model
from tests.models.hf import load_hf
from tests.models.moe_hf import save_hf_moe, strip_shared_experts

# The Nemotron-H parity tests, collected again here with this module's `pair` fixture: logits and
# every state at L in {1, 5, 16, 37} (rel L2 ≤ 1e-5), a left-padded batch of 3, 32 greedy tokens.
from tests.models.test_hf_parity import (  # noqa: F401
    test_greedy_32_tokens_identical,
    test_left_padded_batch_matches_hf,
    test_logits_and_states_match_hf,
)

#: id -> HF config overrides. Covers top-k 1/2/6, groups off/on, shared experts 0/1,
#: norm_topk_prob true/false, routed_scaling_factor, latent MoE.
VARIANTS = {
    "nano-top6-E16-nogroups-shared1-norm": {},
    "top1-E8-nogroups-shared0-nonorm": {
        "n_routed_experts": 8, "num_experts_per_tok": 1, "n_shared_experts": 0,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    },
    "top2-E16-groups4of2-shared1-norm": {
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
    },
    "top6-E32-groups8of3-shared1-nonorm-latent24": {
        "n_routed_experts": 32, "n_group": 8, "topk_group": 3, "norm_topk_prob": False, "moe_latent_size": 24,
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    overrides = VARIANTS[request.param]
    hf_dir = save_hf_moe(tmp_path_factory.mktemp("hf_moe"), seed=len(request.param), **overrides)
    ours_dir = hf_dir if overrides.get("n_shared_experts", 1) else strip_shared_experts(hf_dir, tmp_path_factory.mktemp("ours"))
    return load_model(ours_dir), load_hf(hf_dir)


def test_routing_is_not_degenerate(pair):
    """At least half of the experts of the first MoE layer are chosen by some token, and the correction bias changes
    the choice of some tokens: routing, not a fixed set of experts, decides the output."""
    ours, _ = pair
    layer = ours.config.layers_of("E")[0]
    mixer = ours.layers[layer].mixer
    h = torch.randn(256, ours.config.hidden_size)
    with torch.no_grad():
        _, chosen = mixer.gate(h)
        bias = mixer.gate.e_score_correction_bias.clone()
        mixer.gate.e_score_correction_bias.zero_()
        _, unbiased = mixer.gate(h)
        mixer.gate.e_score_correction_bias.copy_(bias)
    assert len(set(chosen.flatten().tolist())) >= mixer.moe.num_experts // 2
    assert not torch.equal(chosen.sort(-1).values, unbiased.sort(-1).values)
