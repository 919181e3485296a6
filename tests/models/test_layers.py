"""Layer forms that changed for speed keep the math: the shifted-add depthwise conv, GQA without
repeating K/V, the static cache write, and the padding rule of the attention mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridtrt.models import load_model
from hybridtrt.models.layers import depthwise_causal_conv
from hybridtrt.models.model import causal_mask, static_positions
from hybridtrt.ops.kv_cache import kv_cache_update_eager, kv_cache_update_ref
from hybridtrt.judge.metrics import rel_l2
from tests.conftest import left_padded_batch


@pytest.mark.parametrize("length", [1, 5, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_shifted_conv_equals_grouped_conv(length, bias):
    g = torch.Generator().manual_seed(length)
    window = torch.randn(2, 24, 4 + length, generator=g)
    w, b = torch.randn(24, 1, 4, generator=g), torch.randn(24, generator=g) if bias else None
    torch.testing.assert_close(depthwise_causal_conv(window, w, b), F.conv1d(window[:, :, 1:], w, b, groups=24), rtol=1e-6, atol=1e-6)


def test_fp64_mixer_takes_the_shifted_conv_with_the_grouped_conv_math(make_checkpoint, monkeypatch):
    """The fp64 model (the fp32 gates' yardstick) runs the shifted form at every length (torch's fp64
    grouped conv1d is 10-300x slower at validate's shapes); its mixer output is the grouped form's to
    fp64 rounding."""
    from hybridtrt.models import layers

    mixer = load_model(make_checkpoint()).double().layers[0].mixer
    h, mask = torch.randn(2, 37, 64, dtype=torch.float64), torch.ones(2, 37, dtype=torch.float64)
    conv = torch.zeros(2, mixer.conv_dim, mixer.conv_kernel, dtype=torch.float64)
    ssm = torch.zeros(2, mixer.num_heads, mixer.head_dim, mixer.d_state, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(layers, "depthwise_causal_conv", lambda *a: calls.append(1) or depthwise_causal_conv(*a))
    with torch.no_grad():
        shifted = mixer(h, mask, conv, ssm, False)[0]
        assert calls == [1]
        grouped = mixer.float()(h.float(), mask.float(), conv.float(), ssm.float(), False)[0]  # fp32: the grouped Conv
    assert calls == [1]
    assert rel_l2(shifted, grouped.double()) < 1e-5


def test_modules_built_on_meta_skip_their_initializers_and_restore_them():
    from torch import nn

    from hybridtrt.models.model import meta_modules

    before = nn.init.normal_
    with pytest.raises(RuntimeError, match="inside"):
        with meta_modules():
            emb = nn.Embedding(10, 4)
            assert emb.weight.is_meta and nn.init.normal_ is not before
            raise RuntimeError("inside")
    assert nn.init.normal_ is before
    assert nn.Embedding(10, 4).weight.std() > 0  # initialized again outside


def test_gqa_attention_equals_repeated_heads(make_checkpoint):
    """The layer's SDPA(enable_gqa) against the textbook form with K/V repeated per head."""
    attn = load_model(make_checkpoint()).layers[1].mixer
    h = torch.randn(2, 6, 64)
    allowed = causal_mask(torch.ones(2, 9, dtype=torch.long), 6)
    past = torch.randn(2, attn.num_kv_heads, 3, attn.head_dim)
    with torch.no_grad():
        out, key, value = attn(h, allowed, past, past * 0.5)
        q = attn.q_proj(h).reshape(2, 6, attn.num_heads, attn.head_dim).transpose(1, 2)
        rep = attn.num_heads // attn.num_kv_heads
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(2, 3)) * attn.scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        expected = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_kv_cache_update_matches_ref_per_row():
    cache = torch.randn(3, 2, 10, 4)
    update = torch.randn(3, 2, 3, 4)
    index = torch.tensor([0, 4, 7])
    got = kv_cache_update_eager(cache, update, index)
    torch.testing.assert_close(got, kv_cache_update_ref(cache, update, index), rtol=0, atol=0)
    assert torch.equal(got[1, :, 4:7], update[1]) and torch.equal(got[1, :, :4], cache[1, :, :4])


def test_padding_queries_attend_only_to_themselves_in_both_flavours():
    _, mask = left_padded_batch([2, 5], 256)
    grow = causal_mask(mask, 5)[:, 0]  # [B, L, T]
    static = static_positions(torch.tensor([0, 0]), torch.tensor([3, 0]), 5, 8, torch.float32).allowed[:, 0, :, :5]
    assert torch.equal(grow, static)
    assert grow[0, 0].tolist() == [True, False, False, False, False]  # a padding query: itself only
    assert grow[0, 4].tolist() == [False, False, False, True, True]  # a real query: real keys ≤ itself
    assert bool(grow.any(-1).all())  # no fully masked row


def test_static_forward_equals_growing_forward(make_checkpoint):
    model = load_model(make_checkpoint())
    ids, mask = left_padded_batch([11, 4], 256, seed=7)
    with torch.no_grad():
        grow = model(ids, mask, logits="all")
        cache = model.new_cache(2)
        cache.key = {i: torch.zeros(2, 2, 16, 16) for i in cache.key}
        cache.value = {i: torch.zeros(2, 2, 16, 16) for i in cache.value}
        static = model.forward_static(ids, torch.tensor([0, 0]), torch.tensor([0, 7]), cache, logits="all")
    assert rel_l2(static.logits, grow.logits) <= 1e-5
    for i in grow.cache.key:
        assert rel_l2(static.cache.key[i][:, :, :11], grow.cache.key[i]) <= 1e-5
        assert not static.cache.key[i][:, :, 11:].any()
