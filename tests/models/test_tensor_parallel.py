"""Tensor parallelism by the architecture (`hybridtrt.models.tensor_parallel`, DESIGN.md §12): every
rank's `RankLM`, run in lock step with the collectives done in PyTorch (`emulate_ranks`), computes the
unsharded reference's logits and keeps exactly its slice of every state; planted sharding faults are
caught by the same comparison; every published architecture splits over 2, 4 and 8 ranks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hybridtrt.errors import ConfigError
from hybridtrt.models.architectures import ARCHITECTURES
from hybridtrt.models.collectives import RankFailed, emulate_ranks
from hybridtrt.models.config import MAMBA, config_from_dict
from hybridtrt.models.loading import load_model
from hybridtrt.models.tensor_parallel import TensorParallelPlan, rank_model, split_range
from hybridtrt.validation.runner import random_prompts

STEPS = 3
#: fp32 rank sums in another order than the unsharded matmuls: measured 0.7–1.8e-6 (logits) and ≤ 6.3e-6 (states).
LOGITS_TOL, STATE_TOL = 1e-5, 3e-5

#: (preset, overrides): the attention head counts raised so that 8 ranks divide them.
MODELS = {
    # Mamba groups 2 and KV heads 2: N = 4 and 8 share each group's gated norm and replicate KV heads.
    "dense": ("tiny-nemotron-h", {"num_attention_heads": 8}),
    # Uneven expert and shared-expert splits at N = 8 (36 = 5·4 + 4·4, 60 = 8·4 + 7·4).
    "moe": ("tiny-nemotron3-moe", {"num_attention_heads": 8, "moe_intermediate_size": 36, "moe_shared_expert_intermediate_size": 60}),
    # Latent MoE and the MTP layers' tensors (not part of the main model).
    "latent-moe": ("tiny-nemotron3-super", {"num_attention_heads": 8}),
    # Plain Mamba-2: one group replicated on every rank, tied embeddings (the head's rows of the embedding).
    "mamba2": ("tiny-mamba2", {}),
}


def _greedy(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Prefill logits, the states after it, ``STEPS`` greedy tokens, and the states after them."""
    with torch.no_grad():
        out = model(ids, mask)
        prefill, states, cache = out.logits, out.cache.named_states(), out.cache
        tokens, token = [], out.logits[:, -1].argmax(-1)
        for _ in range(STEPS):
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step = model(token[:, None], mask, cache)
            cache, token = step.cache, step.logits[:, -1].argmax(-1)
    return prefill, states, torch.stack(tokens, 1), cache.named_states()


def _ranks(model, plan: TensorParallelPlan, ids, mask):
    return emulate_ranks(plan.world, lambda rank, comm: _greedy(rank_model(model, plan, rank, comm), ids, mask))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _worst_state(plan: TensorParallelPlan, ranks, states, which: int = 1) -> tuple[float, str]:
    """The largest rel L2 of any rank's state (``which``: 1 after the prefill, 3 after the decode
    steps) against its slice of the reference's, and where."""
    worst = (0.0, "")
    for r, got in enumerate(rank[which] for rank in ranks):
        for name, ref in states.items():
            worst = max(worst, (_rel(got[name], plan.state_slice(name, ref, r)), f"rank {r} {name}"))
    return worst


@pytest.fixture(scope="module")
def reference(make_checkpoint):
    made = {}

    def get(kind: str):
        if kind not in made:
            preset, overrides = MODELS[kind]
            model = load_model(make_checkpoint(preset, **overrides))
            ids, mask = random_prompts(3, model.config.vocab_size, max_len=37, seed=1)  # 2 chunks + 5, left-padded
            made[kind] = model, ids, mask, _greedy(model, ids, mask)
        return made[kind]

    return get


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("kind", list(MODELS))
def test_ranks_compute_the_unsharded_model(reference, kind, world):
    """Logits of every prefill position, every rank's conv/SSM/KV states against its slice of the
    reference's, the same logits on every rank, and the same greedy tokens."""
    model, ids, mask, (logits, states, tokens, final) = reference(kind)
    plan = TensorParallelPlan(model.config, world)
    ranks = _ranks(model, plan, ids, mask)
    assert _rel(ranks[0][0], logits) <= LOGITS_TOL
    assert all(torch.equal(r[0], ranks[0][0]) for r in ranks)  # the all-reduced stream is the same bits everywhere
    for which, truth in ((1, states), (3, final)):  # after the prefill, after the one-token decode steps
        worst, where = _worst_state(plan, ranks, truth, which)
        assert worst <= STATE_TOL, where
    assert all(torch.equal(r[2], tokens) for r in ranks)


def test_vocabulary_replicated(reference):
    model, ids, mask, (logits, _, tokens, _) = reference("dense")
    plan = TensorParallelPlan(model.config, 4, vocab="replicated")
    ranks = _ranks(model, plan, ids, mask)
    assert _rel(ranks[0][0], logits) <= LOGITS_TOL and torch.equal(ranks[3][2], tokens)


def test_in_proj_rows_are_z_x_b_c_dt_each_sliced_on_its_own(reference):
    model, *_ = reference("dense")
    c = model.config
    plan = TensorParallelPlan(c, 4)
    name = f"layers.{c.layers_of(MAMBA)[0]}.mixer.in_proj.weight"
    w = model.state_dict()[name]
    heads, groups, p, s = plan.mamba_heads(1), plan.mamba_groups(1), c.mamba_head_dim, c.ssm_state_size
    assert (heads, groups) == (range(2, 4), range(0, 1))  # 8 heads, 2 groups over 4 ranks: group 0 on ranks 0, 1
    d, gn = c.d_inner, c.n_groups * s
    want = torch.cat([
        w[heads.start * p : heads.stop * p],                              # z
        w[d + heads.start * p : d + heads.stop * p],                      # x
        w[2 * d + groups.start * s : 2 * d + groups.stop * s],            # B
        w[2 * d + gn + groups.start * s : 2 * d + gn + groups.stop * s],  # C
        w[2 * d + 2 * gn + heads.start : 2 * d + 2 * gn + heads.stop],    # dt
    ])  # fmt: skip
    assert torch.equal(plan.shard(name, w, 1), want)


#: The most parameters a rank holds, as a multiple of 1/N of the model's (the published configs, on
#: the meta device): what is replicated (norms, the router, latent projections, B/C of a shared group,
#: replicated KV heads) is all that exceeds 1/N.
SHARE_LIMITS = {"nemotron-nano-9b-v2": 1.01, "nemotron-3-super-120b-a12b": 1.03}  # measured 1.002 and 1.025 at N = 8


@pytest.mark.parametrize("name", list(SHARE_LIMITS))
def test_a_rank_holds_about_one_nth_of_the_parameters(name):
    from hybridtrt.models.model import HybridLM, meta_modules

    c = config_from_dict(ARCHITECTURES[name])
    with meta_modules():
        weights = HybridLM(c).state_dict()
    total = sum(v.numel() for v in weights.values())
    for n in (2, 4, 8):  # rank 0 holds the most: split_range gives the first ranks the extra rows
        most = sum(TensorParallelPlan(c, n).shard(k, v, 0).numel() for k, v in weights.items())
        assert most * n / total <= SHARE_LIMITS[name], (n, most * n / total)
    most = sum(TensorParallelPlan(c, 8, vocab="replicated").shard(k, v, 0).numel() for k, v in weights.items())
    assert most * 8 / total > SHARE_LIMITS[name]  # the vocabulary is what vocab="parallel" saves


def test_split_range_is_contiguous_and_covers():
    for n, world, unit in ((36, 8, 1), (8, 8, 1), (60, 8, 1), (5, 2, 1), (1856, 8, 16), (64, 4, 16)):
        parts = [split_range(n, world, r, unit) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= unit
        assert all(len(p) % unit == 0 and p.start % unit == 0 for p in parts)


@pytest.mark.parametrize("name", ["nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b"])
def test_every_ranks_experts_are_shapes_the_moe_kernels_take(name):
    """The MoE kernels take intermediate widths in multiples of 16 (moeKernels.h): Nano-30B's 1,856 rows
    over 8 ranks are 240 or 224 per rank (an even split, 232, would not be)."""
    c = config_from_dict(ARCHITECTURES[name])
    for n in (2, 4, 8):
        plan = TensorParallelPlan(c, n)
        widths = [plan.rank_config(r).moe.intermediate_size for r in range(n)]
        assert sum(widths) == c.moe.intermediate_size and all(w % 16 == 0 for w in widths), (n, widths)
    if name == "nemotron-3-nano-30b-a3b":  # not vacuous: the even split is no shape the kernels take
        assert (c.moe.intermediate_size // 8) % 16 != 0


def test_every_ranks_mlp_is_whole_16_input_blocks():
    """A rank's part of an MLP's ``down_proj`` inputs is whole blocks of 16 (NVFP4's blocks, INT4's smallest):
    Nemotron-Nano-9B-v2's 15,680 rows over 8 ranks are 1,968 or 1,952 (an even split, 1,960, would cut a block
    on every rank but the first)."""
    c = config_from_dict(ARCHITECTURES["nemotron-nano-9b-v2"])
    for n in (2, 4, 8):
        plan = TensorParallelPlan(c, n)
        parts = [plan.mlp_rows(r) for r in range(n)]
        assert sum(map(len, parts)) == c.intermediate_size and all(p.start % 16 == 0 and len(p) % 16 == 0 for p in parts), (n, parts)
    assert (c.intermediate_size // 8) % 16 != 0  # not vacuous


# ---------------------------------------------------------------------------------------------------
# Planted sharding faults: the comparison above fails, at the rank and layer of the fault.


def test_planted_b_and_c_swapped_on_one_rank_is_caught(reference, monkeypatch):
    model, ids, mask, (logits, states, _, _) = reference("dense")
    plan = TensorParallelPlan(model.config, 2)
    right = TensorParallelPlan._xbc_channels

    def swapped(self, rank):
        ch = right(self, rank)
        if rank != 1:
            return ch
        x, s = len(self.mamba_heads(rank)) * self.config.mamba_head_dim, len(self.mamba_groups(rank)) * self.config.ssm_state_size
        return ch[:x] + ch[x + s :] + ch[x : x + s]

    monkeypatch.setattr(TensorParallelPlan, "_xbc_channels", swapped)
    ranks = _ranks(model, plan, ids, mask)
    monkeypatch.setattr(TensorParallelPlan, "_xbc_channels", right)
    assert _rel(ranks[0][0], logits) > 100 * LOGITS_TOL
    # The first Mamba layer's conv state: right on rank 0, wrong on rank 1 (before any all-reduce).
    name = f"present_conv_state.{model.config.layers_of(MAMBA)[0]}"
    assert _rel(ranks[0][1][name], plan.state_slice(name, states[name], 0)) <= STATE_TOL
    assert _rel(ranks[1][1][name], plan.state_slice(name, states[name], 1)) > 100 * STATE_TOL


def test_planted_local_norm_of_a_shared_group_is_caught(reference, monkeypatch):
    """N > n_groups: normalising a rank's part of a group alone (no all-reduce) moves the logits."""
    model, ids, mask, (logits, _, _, _) = reference("dense")
    plan = TensorParallelPlan(model.config, 4)
    monkeypatch.setattr(TensorParallelPlan, "norm_group", lambda self, rank: None)
    ranks = _ranks(model, plan, ids, mask)
    assert _rel(ranks[0][0], logits) > 100 * LOGITS_TOL


def test_planted_wrong_kv_head_is_caught(reference, monkeypatch):
    """N > n_kv: a rank reading the other KV head than its query heads' fails its KV state slice."""
    model, ids, mask, (logits, states, _, _) = reference("dense")
    plan = TensorParallelPlan(model.config, 4)
    right = TensorParallelPlan.kv_heads
    monkeypatch.setattr(TensorParallelPlan, "kv_heads", lambda self, rank: right(self, (rank + 2) % 4))
    ranks = _ranks(model, plan, ids, mask)
    monkeypatch.setattr(TensorParallelPlan, "kv_heads", right)
    assert _rel(ranks[0][0], logits) > 100 * LOGITS_TOL
    assert _worst_state(plan, ranks, states)[0] > 100 * STATE_TOL


# ---------------------------------------------------------------------------------------------------
# Which models split how


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_published_architecture_splits_over_2_4_and_8(name):
    c = config_from_dict(ARCHITECTURES[name])
    for n in (2, 4, 8):
        plan = TensorParallelPlan(c, n)
        configs = [plan.rank_config(r) for r in range(n)]
        assert sum(rc.mamba_num_heads for rc in configs) == c.mamba_num_heads
        if c.num_attention_heads:
            assert sum(rc.num_attention_heads for rc in configs) == c.num_attention_heads
        if c.moe is not None:
            assert sum(rc.moe.intermediate_size for rc in configs) == c.moe.intermediate_size


def test_a_world_that_does_not_divide_the_heads_is_refused_with_the_worlds_that_do(make_checkpoint):
    c = load_model(make_checkpoint()).config  # 8 Mamba heads, 4 query heads
    with pytest.raises(ConfigError, match=r"--tp 3: .*mamba_num_heads=8") as e:
        TensorParallelPlan(c, 3)
    assert e.value.fix == "use --tp 2 or 4"
    with pytest.raises(ConfigError, match=r"--tp 8: .*num_attention_heads=4"):
        TensorParallelPlan(c, 8)
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        TensorParallelPlan(c, 1)


# ---------------------------------------------------------------------------------------------------
# The emulated collectives


def test_a_rank_that_raises_stops_every_rank_and_is_named():
    def fn(rank, comm):
        if rank == 2:
            raise ValueError("planted")
        return comm.all_reduce(torch.ones(2))

    start = time.perf_counter()
    with pytest.raises(RankFailed, match="rank 2 of 4: ValueError: planted"):
        emulate_ranks(4, fn)
    assert time.perf_counter() - start < 10 and threading.active_count() < 50


def test_collectives_sum_in_rank_order_and_gather_uneven_parts():
    def fn(rank, comm):
        total = comm.all_reduce(torch.tensor([float(rank)]))
        pair = comm.all_reduce(torch.tensor([float(rank)]), group=(rank // 2 * 2, rank // 2 * 2 + 1))
        gathered = comm.all_gather(torch.full((1, rank + 1), float(rank)), dim=-1)
        return float(total), float(pair), gathered, comm.calls

    out = emulate_ranks(4, fn)
    assert [o[0] for o in out] == [6.0] * 4 and [o[1] for o in out] == [1.0, 1.0, 5.0, 5.0]
    assert out[0][2].tolist() == [[0, 1, 1, 2, 2, 2, 3, 3, 3, 3]]
    assert all([kind for kind, *_ in o[3]] == ["all_reduce", "all_reduce", "all_gather"] for o in out)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_bf16_ranks_are_as_close_to_the_fp32_truth_as_one_device(make_checkpoint, kind):
    """In bf16 the ranks' partial sums round where one device's matmul does not: the distance to the
    fp32 truth stays within 2× the single-device bf16 model's (its yardstick), logits and states."""
    preset, overrides = MODELS[kind]
    ckpt = make_checkpoint(preset, **overrides)
    truth, half = load_model(ckpt), load_model(ckpt, "bf16")
    ids, mask = random_prompts(3, truth.config.vocab_size, max_len=37, seed=1)
    logits, states, *_ = _greedy(truth, ids, mask)
    one, one_states, *_ = _greedy(half, ids, mask)
    plan = TensorParallelPlan(half.config, 4)
    ranks = _ranks(half, plan, ids, mask)
    yard, got = _rel(one.float(), logits), _rel(ranks[0][0].float(), logits)
    assert 0 < yard and got <= 2 * yard, (got, yard)
    for r, rank in enumerate(ranks):
        for name, ref in states.items():
            want = plan.state_slice(name, ref, r)
            assert _rel(rank[1][name].float(), want) <= 2 * max(_rel(plan.state_slice(name, one_states[name], r).float(), want), 1e-3), (r, name)


def test_ranks_built_in_threads_leave_torchs_initializers_intact(reference):
    """`meta_modules` swaps ``torch.nn.init``'s functions for the process: 8 ranks building their models at
    once must leave the originals (once, unlocked, a thread saved another's no-op stand-ins as the
    originals, and every model made later in the process, HF's included, kept uninitialised memory)."""
    originals = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")}
    model, *_ = reference("dense")
    plan = TensorParallelPlan(model.config, 8)
    for _ in range(3):
        emulate_ranks(8, lambda rank, comm: rank_model(model, plan, rank, comm) and None)
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals
    torch.manual_seed(0)
    assert torch.nn.Embedding(64, 8).weight.std() > 0.5  # normal_ ran: N(0, 1), not zeros or garbage
