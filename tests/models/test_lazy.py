"""The lazy reference (`load_model(..., lazy=True)`): eager numbers, one layer resident, and
lock-step sequential onloading."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.errors import CheckpointError
from hybridtrt.models import load_model
from hybridtrt.models.lazy import LazyHybridLM, group_of
from tests.conftest import left_padded_batch

CASES = [("tiny-nemotron-h", "fp32"), ("tiny-nemotron-h", "fp16"), ("tiny-nemotron-h", "bf16"), ("tiny-mamba2", "fp32")]


def test_group_of():
    assert group_of("layers.12.mixer.in_proj.weight") == "layers.12"
    assert group_of("embeddings.weight") == "embeddings.weight"
    assert group_of("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize(("preset", "dtype"), CASES)
def test_lazy_model_computes_exactly_the_eager_numbers(make_checkpoint, preset, dtype):
    ckpt = make_checkpoint(preset)
    eager, lazy = load_model(ckpt, dtype), load_model(ckpt, dtype, lazy=True)
    assert isinstance(lazy, LazyHybridLM) and lazy.dtype == eager.dtype
    assert lazy.weights.loads == 0, "nothing is read before the forward pass"
    ids, mask = left_padded_batch([13, 6], eager.config.vocab_size, seed=3)
    with torch.no_grad():
        a, b = eager(ids, mask), lazy(ids, mask)
        # a decode step on the returned states
        step = torch.randint(3, 200, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        a2, b2 = eager(step, mask2, a.cache), lazy(step, mask2, b.cache)
    assert torch.equal(a.logits, b.logits) and torch.equal(a2.logits, b2.logits)
    for name, t in a2.cache.named_states().items():
        assert torch.equal(t, b2.cache.named_states()[name]), name


def test_one_group_resident_and_each_read_once_per_pass(make_checkpoint):
    lazy = load_model(make_checkpoint("tiny-nemotron-h"), lazy=True)
    groups = lazy.weights.groups
    assert len(groups) == lazy.config.num_layers + 1  # layers, norm_f (embedding and head are read by rows)
    with torch.no_grad():
        lazy(torch.ones(1, 4, dtype=torch.long))
    assert lazy.weights.loads == len(groups)
    assert set(lazy.weights.resident) == {"norm_f.weight"}
    assert all(p.is_meta for p in lazy.parameters()), "the module itself holds no weights"


def test_lockstep_reads_each_layer_once_for_all_inputs(make_checkpoint):
    ckpt = make_checkpoint("tiny-nemotron-h")
    eager, lazy = load_model(ckpt), load_model(ckpt, lazy=True)
    batches = [left_padded_batch(lengths, 256, seed=i) for i, lengths in enumerate([[5, 9], [17], [3, 3, 30]])]
    seen = []
    out = lazy.weights.lockstep([lambda ids=ids, mask=mask: lazy(ids, mask, logits="last").logits for ids, mask in batches], lambda done, total: seen.append((done, total)))
    assert lazy.weights.loads == len(lazy.weights.groups)  # not 3x
    assert seen[-1] == (len(lazy.weights.groups), len(lazy.weights.groups))
    with torch.no_grad():
        for got, (ids, mask) in zip(out, batches):
            assert torch.equal(got, eager(ids, mask, logits="last").logits)


def test_lockstep_reraises_the_first_error(make_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    lazy = load_model(make_checkpoint("tiny-nemotron-h"), lazy=True)

    def boom():
        lazy(torch.ones(1, 2, dtype=torch.long), logits="last")
        raise ValueError("planted")

    with pytest.raises(ValueError, match="planted"):
        lazy.weights.lockstep([lambda: lazy(torch.ones(1, 3, dtype=torch.long)), boom, lambda: lazy(torch.ones(2, 2, dtype=torch.long))])
    # A bad weight met in the middle of the pass stops every input with the checkpoint's error.
    ckpt = tmp_path / "c"
    shutil.copytree(make_checkpoint("tiny-nemotron-h"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.2.mixer.D"][0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    bad = load_model(ckpt, lazy=True)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mixer\.D"):
        bad.weights.lockstep([lambda: bad(torch.ones(1, 3, dtype=torch.long))] * 3)


@pytest.mark.parametrize("preset", ["tiny-nemotron-h", "tiny-mamba2"])  # separate head / tied embeddings
def test_embedding_and_head_are_read_by_rows_never_whole(make_checkpoint, monkeypatch, preset):
    """The lookup reads only the rows of the ids it gets; the head is applied block by block
    (here 7 rows at a time: vocabulary blocks of uneven size); the logits are the eager model's
    up to the summation order the matrix kernel picks for a block's shape (fp32 rounding: 1.6e-7
    relative L2 measured at 7 rows, bit-identical at 64). Nano-9B-v2's embedding and head are
    2.3 GB each in fp32: never resident."""
    import hybridtrt.models.lazy as lazy_module

    ckpt = make_checkpoint(preset)
    eager, lazy = load_model(ckpt), load_model(ckpt, lazy=True)
    hidden = eager.config.hidden_size
    monkeypatch.setattr(lazy_module, "HEAD_BLOCK_BYTES", 7 * hidden * 4)
    reads: list[tuple[str, int, int]] = []
    whole: list[str] = []
    index = lazy.weights.checkpoint.index
    real_rows, real_read = index.read_rows, index.read
    monkeypatch.setattr(index, "read_rows", lambda name, a, b: reads.append((name, a, b)) or real_rows(name, a, b))
    monkeypatch.setattr(index, "read", lambda name: whole.append(name) or real_read(name))
    ids = torch.tensor([[5, 6, 7, 40], [40, 9, 200, 6]])
    with torch.no_grad():
        got = lazy(ids).logits
        want = eager(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    assert not [n for n in whole if "embeddings" in n or "lm_head" in n]
    embedding = next(n for n, *_ in reads)  # the lookup comes first
    lookups = [(a, b) for n, a, b in reads if n == embedding][: 4]
    assert lookups == [(5, 8), (9, 10), (40, 41), (200, 201)]  # distinct ids as runs of rows
    head = [(a, b) for n, a, b in reads[4:]]
    vocab = eager.config.vocab_size
    assert head[0] == (0, 7) and head[-1][1] == vocab and len(head) == -(-vocab // 7)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_routed_experts_are_read_one_expert_at_a_time(tmp_path, monkeypatch, dtype):
    """A Nemotron-3 checkpoint as HF's save_pretrained writes it (per-expert tensors): the lazy
    model reads each chosen expert alone (a layer's stacks of Nano-30B's size are 5.1 GB in fp32),
    never a stack, and computes the eager model's logits and states bit for bit."""
    from tests.models.moe_hf import save_hf_moe

    ckpt = save_hf_moe(tmp_path / "moe")
    eager, lazy = load_model(ckpt, dtype), load_model(ckpt, dtype, lazy=True)
    checkpoint = lazy.weights.checkpoint
    stacks: list[str] = []
    experts: list[tuple[str, int, int]] = []
    real_read, real_rows = checkpoint.read, checkpoint.read_rows
    monkeypatch.setattr(checkpoint, "read", lambda name: stacks.append(name) or real_read(name))
    monkeypatch.setattr(checkpoint, "read_rows", lambda name, a, b: experts.append((name, a, b)) or real_rows(name, a, b))
    ids, mask = left_padded_batch([9, 5], eager.config.vocab_size, seed=4)
    with torch.no_grad():
        a, b = eager(ids, mask), lazy(ids, mask)
    assert torch.equal(a.logits, b.logits)
    for name, t in a.cache.named_states().items():
        assert torch.equal(t, b.cache.named_states()[name]), name
    assert not [n for n in stacks if ".experts." in n], "an expert stack was read whole"
    from hybridtrt.models.moe import Experts

    stacked = {name: m.num_experts for name, m in eager.named_modules() if isinstance(m, Experts)}
    assert len(stacked) == 3  # MEMEM*E
    for name, num_experts in stacked.items():
        up = [(s, e) for n, s, e in experts if n == f"{name}.up_proj"]
        down = [(s, e) for n, s, e in experts if n == f"{name}.down_proj"]
        assert up == down and all(e == s + 1 for s, e in up), "one expert per read"
        assert 0 < len(up) == len(set(up)) <= num_experts  # each chosen expert once per pass


def test_calibration_passes_keep_no_states(make_checkpoint):
    """``keep_states=False`` (calibration, AWQ): the same logits, and no layer's states outlive the call."""
    model = load_model(make_checkpoint("tiny-nemotron-h"), "fp32", lazy=True)
    ids, mask = left_padded_batch([9, 5], model.config.vocab_size, seed=4)
    with torch.no_grad():
        kept, dropped = model(ids, mask, logits="last"), model(ids, mask, logits="last", keep_states=False)
    assert torch.equal(kept.logits, dropped.logits)
    assert kept.cache.named_states() and not dropped.cache.named_states()
