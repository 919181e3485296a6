"""Tensor parallelism that follows the architecture: what each of N ranks holds (DESIGN.md §12).

`TensorParallelPlan` says, for one config and world size N, which rows and columns of every weight a
rank holds (`TensorParallelPlan.shard`), the rank's own config (`rank_config`: the same architecture at
its local widths, so the ordinary modules, exporter and states serve it), and which slice of every
state it keeps (`state_slice`). `RankLM` is the reference model of one rank: the ordinary `HybridLM` at
the rank's config, with the collectives where the ranks meet (a `Communicator`,
`hybridtrt.models.collectives`). Run every rank's `RankLM` (`emulate_ranks`) and the logits are the
unsharded model's, up to the order of the sums.

The rules, per block (reasons in DESIGN.md §12):

* Mamba-2, by heads. ``in_proj``'s rows are ``z | x | B | C | dt`` and each segment is sliced on its
  own: z, x and dt by the rank's heads, B and C by its groups; the conv's channels (``x | B | C``)
  follow; ``A_log``, ``D``, ``dt_bias`` and the gated norm's weight by heads. A rank holds whole groups
  when ``N ≤ n_groups`` (``n_groups % N == 0``), and then the gated RMSNorm (per group of
  ``d_inner / n_groups`` channels) is local. When ``N > n_groups`` (``N % n_groups == 0``) each group is
  replicated on the ``N / n_groups`` ranks that hold its heads, and the norm's sum of squares is summed
  over those ranks (an all-reduce in that group of ranks). ``out_proj`` by columns, then an all-reduce.
* Attention: query heads split; KV heads split when ``n_kv % N == 0``, each replicated on the
  ``N / n_kv`` ranks whose query heads read it when ``N % n_kv == 0``; ``o_proj`` by columns + all-reduce.
* MLP: ``up_proj`` by rows, ``down_proj`` by columns, all-reduce (any N: uneven splits allowed, in blocks
  of 16 rows where the width allows: `KERNEL_ROWS`).
* MoE, tensor parallel inside each expert: every rank routes (the router is replicated and sees the
  same all-reduced hidden state, so every rank makes the same choices), holds every expert's rows
  ``I_r`` of ``up_proj [E, I, D]`` and the same columns of ``down_proj [E, D, I]``; the shared expert is
  an MLP split the same way; the latent projections are replicated (``fc2`` is linear, so it runs on
  the partial sums); one all-reduce per MoE layer, after everything.
* Biases of a row-parallel linear are added once, after the all-reduce.
* Embedding and LM head by vocabulary rows (``vocab="parallel"``: a rank looks up the ids in its rows,
  zeros elsewhere, all-reduce; the head's logits all-gathered), or both replicated (``vocab="replicated"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hybridtrt.errors import ConfigError
from hybridtrt.models.collectives import Communicator
from hybridtrt.models.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from hybridtrt.models.layers import GatedRMSNorm, wide
from hybridtrt.models.loading import Checkpoint, ParameterSource
from hybridtrt.models.model import HybridLM, meta_modules
from hybridtrt.models.moe import MoE
from hybridtrt.ops import collectives  # noqa: F401  (registers torch.ops.hybridtrt.all_reduce / all_gather)

Vocab = Literal["parallel", "replicated"]

#: World sizes the plan is written for (one process per GPU on one node).
WORLDS = (2, 4, 8)


def split_range(n: int, world: int, rank: int, unit: int = 1) -> range:
    """Rank ``rank``'s contiguous block of ``n`` items over ``world`` ranks in whole ``unit``s (``n`` a
    multiple of ``unit``), the first ranks one unit longer (``numpy.array_split``'s rule on the units)."""
    base, extra = divmod(n // unit, world)
    start = (rank * base + min(rank, extra)) * unit
    return range(start, start + (base + (rank < extra)) * unit)


def split_or_shared(count: int, world: int, rank: int) -> range:
    """Rank ``rank``'s block of ``count`` items that other items read in order (Mamba groups read by heads,
    KV heads by query heads): its share when ``count % world == 0``, else (``world % count == 0``) the one
    item its block of readers reads, held by the ``world / count`` ranks that share it."""
    if count % world == 0:
        return split_range(count, world, rank)
    first = rank // (world // count)
    return range(first, first + 1)


#: Intermediate widths split in blocks of 16 rows where they can (`_unit`): the MoE kernels' granularity
#: (plugins/kernels/include/hybridtrt/moeKernels.h: D and I "positive multiples of 16"), so that every rank's
#: experts are shapes the kernels take (Nemotron-3-Nano-30B's 1,856 over 8 ranks: 240 or 224 rows, not 232);
#: and the 4-bit formats' blocks along a row-parallel projection's inputs (NVFP4's 16, INT4's smallest), so
#: that a rank's part of an MLP's or shared expert's ``down_proj`` is whole blocks (Nemotron-Nano-9B-v2's
#: 15,680 over 8 ranks: 1,968 or 1,952 rows, not 1,960, which no 4-bit block of 16 divides).
KERNEL_ROWS = 16


def _unit(width: int, world: int) -> int:
    """`KERNEL_ROWS` when ``width`` splits into whole blocks of it, one per rank at least; else 1 (a width
    too small for that, e.g. a test model's, splits row by row)."""
    return KERNEL_ROWS if width % KERNEL_ROWS == 0 and width // KERNEL_ROWS >= world else 1


def _divides_or_multiple(count: int, world: int) -> bool:
    return count % world == 0 or world % count == 0


def _problem(c: HybridConfig, n: int) -> str | None:
    """Why the rules cannot split ``c`` over ``n`` ranks, or None."""
    if c.layers_of(MAMBA):
        if c.mamba_num_heads % n:
            return f"a rank holds whole Mamba heads, and {n} does not divide mamba_num_heads={c.mamba_num_heads}"
        if not _divides_or_multiple(c.n_groups, n):
            return (f"a rank holds whole Mamba groups (n_groups % tp == 0) or one group shared with tp / n_groups "
                    f"ranks (tp % n_groups == 0); n_groups={c.n_groups} is neither")
    if c.layers_of(ATTENTION):
        if c.num_attention_heads % n:
            return f"a rank holds whole query heads, and {n} does not divide num_attention_heads={c.num_attention_heads}"
        if not _divides_or_multiple(c.num_key_value_heads, n):
            return (f"KV heads are split (n_kv % tp == 0) or replicated (tp % n_kv == 0); "
                    f"num_key_value_heads={c.num_key_value_heads} is neither")
    widths = {"vocab_size": c.vocab_size}
    if c.layers_of(MLP):
        widths["intermediate_size"] = c.intermediate_size
    if c.moe is not None:
        widths["moe_intermediate_size"] = c.moe.intermediate_size
        if c.moe.shared_intermediate_size:
            widths["moe_shared_expert_intermediate_size"] = c.moe.shared_intermediate_size
    for name, width in widths.items():
        if width < n:
            return f"every rank needs a share of {name}={width}"
    return None


@dataclass(frozen=True)
class TensorParallelPlan:
    """How one config is split over ``world`` ranks.

    Args:
        config: The unsharded model's config.
        world: Number of ranks (GPUs), ≥ 2.
        vocab: ``"parallel"``: the embedding and the LM head by vocabulary rows (a rank looks up the
            ids in its rows, zeros elsewhere, then an all-reduce; the head's logits are all-gathered),
            or ``"replicated"`` on every rank.

    Raises:
        ConfigError: an architecture the rules cannot split over ``world`` (the field, its value, a fix).
    """

    config: HybridConfig
    world: int
    vocab: Vocab = "parallel"

    def __post_init__(self) -> None:
        if self.world < 2:
            raise ConfigError(f"tensor parallel needs at least 2 ranks, got --tp {self.world}", fix="--tp 2, 4 or 8 (or no --tp: one device)")
        problem = _problem(self.config, self.world)
        if problem is None and self.vocab == "parallel" and self.config.vocab_size % self.world:
            # NCCL's all-gather takes the same count from every rank (ncclAllGather's sendcount).
            raise ConfigError(
                f"--tp {self.world}: the LM head's logits are all-gathered in equal parts, and {self.world} does not "
                f"divide vocab_size={self.config.vocab_size}",
                fix="keep the embedding and the LM head whole on every rank (vocab=\"replicated\")",
            )
        if problem is not None:
            fits = [str(n) for n in WORLDS if _problem(self.config, n) is None]
            raise ConfigError(
                f"--tp {self.world}: {problem}",
                fix=f"use --tp {' or '.join(fits)}" if fits else f"this model cannot be split over {', '.join(map(str, WORLDS))} ranks",
            )

    # ---------------------------------------------------------------------------------------------
    # What a rank holds

    def mamba_heads(self, rank: int) -> range:
        return split_range(self.config.mamba_num_heads, self.world, rank)

    def mamba_groups(self, rank: int) -> range:
        """The groups rank ``rank`` holds: its share of them, or the one its heads read (replicated)."""
        return split_or_shared(self.config.n_groups, self.world, rank)

    def norm_group(self, rank: int) -> tuple[int, ...] | None:
        """The ranks that share rank ``rank``'s Mamba group (its gated norm sums over them); None
        when every rank holds whole groups."""
        g, n = self.config.n_groups, self.world
        if g % n == 0:
            return None
        per = n // g
        first = rank // per * per
        return tuple(range(first, first + per))

    def q_heads(self, rank: int) -> range:
        return split_range(self.config.num_attention_heads, self.world, rank)

    def kv_heads(self, rank: int) -> range:
        """The KV heads rank ``rank`` holds: its share of them, or the one its query heads read (replicated)."""
        return split_or_shared(self.config.num_key_value_heads, self.world, rank)

    def mlp_rows(self, rank: int) -> range:
        """Rank ``rank``'s rows of the MLP's intermediate width (blocks of `KERNEL_ROWS` where they divide it)."""
        width = self.config.intermediate_size
        return split_range(width, self.world, rank, _unit(width, self.world))

    def expert_rows(self, rank: int) -> range:
        """Rank ``rank``'s rows of every expert's intermediate width (blocks of `KERNEL_ROWS` where they divide it)."""
        width = self.config.moe.intermediate_size
        return split_range(width, self.world, rank, _unit(width, self.world))

    def shared_rows(self, rank: int) -> range:
        """The shared expert's rows (a plain MLP: blocks of `KERNEL_ROWS` as the MLP's)."""
        width = self.config.moe.shared_intermediate_size
        return split_range(width, self.world, rank, _unit(width, self.world))

    def vocab_rows(self, rank: int) -> range:
        if self.vocab == "replicated":
            return range(self.config.vocab_size)
        return split_range(self.config.vocab_size, self.world, rank)

    def rank_config(self, rank: int) -> HybridConfig:
        """The architecture at rank ``rank``'s widths (its modules, states and graphs are these)."""
        c = self.config
        fields: dict = {
            "mamba_num_heads": len(self.mamba_heads(rank)),
            "n_groups": len(self.mamba_groups(rank)),
        }
        if c.layers_of(ATTENTION):
            fields |= {"num_attention_heads": len(self.q_heads(rank)), "num_key_value_heads": len(self.kv_heads(rank))}
        if c.layers_of(MLP):
            fields["intermediate_size"] = len(self.mlp_rows(rank))
        if c.moe is not None:
            shared = len(self.shared_rows(rank)) if c.moe.shared_intermediate_size else 0
            fields["moe"] = dataclasses.replace(c.moe, intermediate_size=len(self.expert_rows(rank)), shared_intermediate_size=shared)
        return dataclasses.replace(c, **fields)

    # ---------------------------------------------------------------------------------------------
    # Slicing

    def _xbc_channels(self, rank: int) -> list[int]:
        """Rank ``rank``'s channels of the conv's ``x | B | C`` (and of in_proj's xBC segment)."""
        c = self.config
        p, s, d_inner, gn = c.mamba_head_dim, c.ssm_state_size, c.d_inner, c.n_groups * c.ssm_state_size
        heads, groups = self.mamba_heads(rank), self.mamba_groups(rank)
        x = range(heads.start * p, heads.stop * p)
        b = range(d_inner + groups.start * s, d_inner + groups.stop * s)
        return [*x, *b, *(i + gn for i in b)]

    def _in_proj_rows(self, rank: int) -> list[int]:
        """``z | x | B | C | dt``, each segment sliced on its own."""
        c = self.config
        heads, p = self.mamba_heads(rank), c.mamba_head_dim
        z = range(heads.start * p, heads.stop * p)
        xbc = [c.d_inner + i for i in self._xbc_channels(rank)]
        dt = range(c.d_inner + c.conv_dim + heads.start, c.d_inner + c.conv_dim + heads.stop)
        return [*z, *xbc, *dt]

    def _rows(self, name: str, rank: int) -> tuple[int, list[int] | range] | None:
        """``(dim, indices)`` of rank ``rank``'s part of the parameter ``name`` (our module names), or
        None for a replicated one."""
        c = self.config
        parts = name.split(".")
        if parts[0] in ("lm_head", "embeddings"):
            return (0, self.vocab_rows(rank)) if self.vocab == "parallel" else None
        if parts[0] != "layers" or parts[2] != "mixer":
            return None  # norms, norm_f
        kind, rest = c.layer_types[int(parts[1])], ".".join(parts[3:])
        if kind == MAMBA:
            heads, p = self.mamba_heads(rank), c.mamba_head_dim
            inner = range(heads.start * p, heads.stop * p)
            return {
                "in_proj.weight": (0, self._in_proj_rows(rank)),
                "in_proj.bias": (0, self._in_proj_rows(rank)),
                "conv1d.weight": (0, self._xbc_channels(rank)),
                "conv1d.bias": (0, self._xbc_channels(rank)),
                "dt_bias": (0, heads),
                "A_log": (0, heads),
                "D": (0, heads),
                "norm.weight": (0, inner),
                "out_proj.weight": (1, inner),
            }.get(rest)
        if kind == ATTENTION:
            hd = c.attention_head_dim
            q, kv = self.q_heads(rank), self.kv_heads(rank)
            return {
                "q_proj.weight": (0, range(q.start * hd, q.stop * hd)),
                "k_proj.weight": (0, range(kv.start * hd, kv.stop * hd)),
                "v_proj.weight": (0, range(kv.start * hd, kv.stop * hd)),
                "o_proj.weight": (1, range(q.start * hd, q.stop * hd)),
            }.get(rest)
        if kind == MLP:
            rows = self.mlp_rows(rank)
            return {"up_proj.weight": (0, rows), "up_proj.bias": (0, rows), "down_proj.weight": (1, rows)}.get(rest)
        if kind == MOE:
            rows = self.expert_rows(rank)
            shared = self.shared_rows(rank) if c.moe.shared_intermediate_size else range(0)
            return {
                "experts.up_proj": (1, rows),
                "experts.down_proj": (2, rows),
                "shared_experts.up_proj.weight": (0, shared),
                "shared_experts.up_proj.bias": (0, shared),
                "shared_experts.down_proj.weight": (1, shared),
            }.get(rest)
        return None

    def part(self, name: str, rank: int) -> tuple[int, list[int] | range] | None:
        """``(dim, indices)`` of rank ``rank``'s part of the parameter ``name`` along ``dim``, or None when
        every rank holds it whole."""
        return self._rows(name, rank)

    def shard_shape(self, name: str, shape: Sequence[int], rank: int) -> tuple[int, ...]:
        """The shape of rank ``rank``'s part of a parameter of shape ``shape``."""
        where = self._rows(name, rank)
        if where is None:
            return tuple(shape)
        dim, idx = where
        return (*shape[:dim], len(idx), *shape[dim + 1 :])

    def holds(self, rank: int) -> dict[str, list[int]]:
        """What rank ``rank`` holds, as ``[start, stop)`` of each split (recorded in its export's manifest)."""
        c = self.config
        out: dict[str, list[int]] = {}
        spans = {"vocab_rows": self.vocab_rows(rank)}
        if c.layers_of(MAMBA):
            spans |= {"mamba_heads": self.mamba_heads(rank), "mamba_groups": self.mamba_groups(rank)}
        if c.layers_of(ATTENTION):
            spans |= {"q_heads": self.q_heads(rank), "kv_heads": self.kv_heads(rank)}
        if c.layers_of(MLP):
            spans["mlp_rows"] = self.mlp_rows(rank)
        if c.moe is not None:
            spans["expert_rows"] = self.expert_rows(rank)
            if c.moe.shared_intermediate_size:
                spans["shared_expert_rows"] = self.shared_rows(rank)
        for name, r in spans.items():
            out[name] = [r.start, r.stop]
        return out

    def shard(self, name: str, tensor: Tensor, rank: int) -> Tensor:
        """Rank ``rank``'s part of the parameter ``name`` (a view when contiguous, else a copy)."""
        where = self._rows(name, rank)
        if where is None:
            return tensor
        dim, idx = where
        if isinstance(idx, range):
            return tensor.narrow(dim, idx.start, len(idx))
        return tensor.index_select(dim, torch.tensor(idx, dtype=torch.int64))

    def state_slice(self, name: str, tensor: Tensor, rank: int) -> Tensor:
        """Rank ``rank``'s part of the unsharded state ``name`` (``present_conv_state.i`` /
        ``past_conv_state.i`` channels, ``…_ssm_state.i`` heads, ``present.i.key|value`` /
        ``past_key_values.i.key|value`` KV heads; batch first)."""
        if name.startswith(("present_conv_state.", "past_conv_state.")):
            return tensor.index_select(1, torch.tensor(self._xbc_channels(rank), dtype=torch.int64))
        if name.startswith(("present_ssm_state.", "past_ssm_state.")):
            heads = self.mamba_heads(rank)
        elif name.startswith(("present.", "past_key_values.")):
            heads = self.kv_heads(rank)
        else:
            raise ValueError(f"not a state: {name}")
        return tensor.narrow(1, heads.start, len(heads))


class TracingCommunicator:
    """The `Communicator` of a rank's model being traced: each collective is a ``hybridtrt::`` op
    (`hybridtrt.ops.collectives`), exported as one ``trt::DistCollective`` node. All-gather is along
    axis 0 there (TensorRT's), so another axis is moved to the front and back."""

    def __init__(self, plan: TensorParallelPlan, rank: int) -> None:
        self.rank, self.world = rank, plan.world

    def all_reduce(self, t: Tensor, group: Sequence[int] | None = None) -> Tensor:
        return torch.ops.hybridtrt.all_reduce(t, [] if group is None else list(group), self.world)

    def all_gather(self, t: Tensor, dim: int) -> Tensor:
        front = t.movedim(dim, 0).contiguous()
        return torch.ops.hybridtrt.all_gather(front, self.world).movedim(0, dim)


# -------------------------------------------------------------------------------------------------
# A rank's model


class RowParallelLinear(nn.Module):
    """``all_reduce(x @ W_rᵀ) + b``: a linear whose input features are split over the ranks."""

    def __init__(self, weight: Tensor, bias: Tensor | None, comm: Communicator) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.comm = comm

    def forward(self, x: Tensor) -> Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class RowParallelMoE(MoE):
    """An MoE layer whose experts (and shared expert) hold a share of their intermediate width: its
    output is a sum of per-rank parts, all-reduced once; the biases taken out of ``fc2_latent_proj``
    and the shared ``down_proj`` are added after it. `rank_model` sets ``comm``."""

    comm: Communicator | None = None

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.out_biases: list[Tensor] = []

    def forward(self, h: Tensor) -> Tensor:
        y = self.comm.all_reduce(super().forward(h))
        for b in self.out_biases:
            y = y + b
        return y


class GroupShardedGatedRMSNorm(GatedRMSNorm):
    """`GatedRMSNorm` when a group's channels span several ranks (``N > n_groups``): the sum of
    squares of the rank's channels is all-reduced over the ranks of the group, divided by the
    whole group's width."""

    def __init__(self, norm: GatedRMSNorm, group_width: int, ranks: tuple[int, ...], comm: Communicator) -> None:
        super().__init__(norm.weight.shape[0], norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group_width = group_width
        self.ranks = ranks
        self.comm = comm

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        h = wide(y) * F.silu(wide(z))
        squares = self.comm.all_reduce(h.pow(2).sum(-1, keepdim=True), group=self.ranks)
        h = h * torch.rsqrt(squares / self.group_width + self.eps)
        return self.weight * h.to(dtype)


#: `RankLM`'s buffer holding the rank's first vocabulary row (an initializer of its graph).
VOCAB_START = "vocab_start"


class RankLM(HybridLM):
    """One rank's reference model: `HybridLM` at `TensorParallelPlan.rank_config`, meeting the other
    ranks at the row-parallel linears, the MoE layers' outputs, the gated norms of shared groups and
    the vocabulary-parallel head. ``forward`` / ``new_cache`` are `HybridLM`'s: its states are the
    rank's slices (`TensorParallelPlan.state_slice`)."""

    mixers = {**HybridLM.mixers, MOE: RowParallelMoE}

    def __init__(self, plan: TensorParallelPlan, rank: int, comm: Communicator) -> None:
        super().__init__(plan.rank_config(rank))
        self.plan, self.rank, self.comm = plan, rank, comm
        if plan.vocab == "parallel":
            rows = len(plan.vocab_rows(rank))
            self.embeddings = nn.Embedding(rows, self.config.hidden_size)
            if self.lm_head is not None:
                self.lm_head = nn.Linear(self.config.hidden_size, rows, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        if self.plan.vocab == "replicated":
            return super().embed(input_ids)
        rows = len(self.plan.vocab_rows(self.rank))  # the same on every rank (an even split)
        local = input_ids - self.vocab_start  # a buffer, not a constant: every rank's graph is one trace
        inside = (local >= 0) & (local < rows)
        found = self.embeddings(local.clamp(0, rows - 1)) * inside[..., None].to(self.dtype)
        return self.comm.all_reduce(found)  # one rank's row and zeros: exact

    def head_logits(self, h: Tensor) -> Tensor:
        logits = super().head_logits(h)  # the rank's rows of the head (or of the tied embedding)
        return logits if self.plan.vocab == "replicated" else self.comm.all_gather(logits, dim=-1)


def rank_model(model: HybridLM, plan: TensorParallelPlan, rank: int, comm: Communicator) -> RankLM:
    """Rank ``rank``'s `RankLM`, its parameters sliced from ``model``'s (`TensorParallelPlan.shard`).

    Args:
        model: The unsharded reference (eager weights).
        plan: The split; ``plan.config`` is ``model.config``.
        rank: 0 … world − 1.
        comm: This rank's `Communicator`.
    """
    with meta_modules():
        ranked = RankLM(plan, rank, comm)
    state = {name: plan.shard(name, t.detach(), rank) for name, t in model.state_dict().items()}
    ranked.load_state_dict(state, assign=True, strict=True)
    return wire_rank(ranked, plan, rank, comm)


def wire_rank(ranked: RankLM, plan: TensorParallelPlan, rank: int, comm: Communicator) -> RankLM:
    """Give a `RankLM` whose parameters are loaded (real or fake) its collectives: the row-parallel
    linears, the shared groups' norms, the MoE layers' all-reduce, and its vocabulary offset."""
    #: The rank's first vocabulary row (its embedding's ids are ``input_ids - vocab_start``).
    ranked.register_buffer(VOCAB_START, torch.tensor(plan.vocab_rows(rank).start, dtype=torch.int64), persistent=False)
    c = plan.config
    for i, block in enumerate(ranked.layers):
        mixer = block.mixer
        if c.layer_types[i] == MAMBA:
            mixer.out_proj = RowParallelLinear(mixer.out_proj.weight, mixer.out_proj.bias, comm)
            group = plan.norm_group(rank)
            if group is not None:
                mixer.norm = GroupShardedGatedRMSNorm(mixer.norm, c.d_inner // c.n_groups, group, comm)
        elif c.layer_types[i] == ATTENTION:
            mixer.o_proj = RowParallelLinear(mixer.o_proj.weight, mixer.o_proj.bias, comm)
        elif c.layer_types[i] == MLP:
            mixer.down_proj = RowParallelLinear(mixer.down_proj.weight, mixer.down_proj.bias, comm)
        elif c.layer_types[i] == MOE:
            mixer.comm = comm
            shared = mixer.shared_experts
            for linear in (mixer.fc2_latent_proj, None if shared is None else shared.down_proj):
                if linear is not None and linear.bias is not None:
                    mixer.out_biases.append(linear.bias.detach())
                    linear.bias = None
    return ranked.eval()


# -------------------------------------------------------------------------------------------------
# A rank's view of a checkpoint

#: Stored bytes read at a time when a rank's part of a parameter is a slice along a later dim
#: (its columns): the block's rows are read, sliced, and dropped.
BLOCK_BYTES = 16 << 20


def rows_per_block(source: ParameterSource) -> int:
    """Rows of parameter ``source`` in `BLOCK_BYTES` (at least one): what is read at a time when a whole
    parameter is read only to be cut or reduced."""
    return max(1, BLOCK_BYTES // max(1, source.nbytes // source.shape[0]))


def _runs(idx: list[int] | range) -> list[range]:
    """``idx`` as contiguous runs (``[0, 1, 2, 7, 8]`` → ``range(0, 3), range(7, 9)``)."""
    if isinstance(idx, range):
        return [idx] if len(idx) else []
    out: list[range] = []
    for i in idx:
        if out and out[-1].stop == i:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


@dataclass
class RankCheckpoint(Checkpoint):
    """Rank ``rank``'s view of an opened checkpoint (`hybridtrt.models.loading.Checkpoint`): its config is
    the rank's (`TensorParallelPlan.rank_config`), its parameters the rank's parts, read from the
    checkpoint's files in blocks (the rows of a row slice, one block of rows at a time for a column slice,
    one expert at a time for a stack of experts), so a rank's export streams ~1/N of the weights and never
    holds a whole sharded tensor. The streaming exporter reads it as any checkpoint.

    ``vocab_start`` (`VOCAB_START`) is one more parameter: `RankLM`'s vocabulary offset, an initializer
    of the rank's graph.
    """

    full: Checkpoint | None = None
    plan: TensorParallelPlan | None = None
    rank: int = 0
    #: ``{stored tensor: (parameter, per-expert)}`` of the block-quantized weights (`read_blocked_part`), made on first use.
    blocked: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel for name, p in self.parameters.items() if name != VOCAB_START)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.nbytes for name, p in self.parameters.items() if name != VOCAB_START)

    @property
    def trace_tag(self) -> str:
        """What the traced `RankLM` depends on beyond the config and parameter shapes: its collectives'
        world (`hybridtrt.exporter.trace_cache`; the shared groups are patched per rank after the trace)."""
        return f"tensor parallel: world {self.plan.world}, vocab {self.plan.vocab}"

    def as_dtype(self, dtype) -> RankCheckpoint:
        return rank_checkpoint(self.full.as_dtype(dtype), self.plan, self.rank)

    def read(self, name: str) -> Tensor:
        """Rank ``rank``'s part of parameter ``name`` in the model dtype, checked for NaN/Inf."""
        if name == VOCAB_START:
            return torch.tensor(self.plan.vocab_rows(self.rank).start, dtype=torch.int64)
        where = self.plan.part(name, self.rank)
        if where is None:
            return self.full.read(name)
        dim, idx = where
        source = self.full.parameters[name]
        out = torch.empty(self.parameters[name].shape, dtype=source.dtype)
        if dim == 0:  # each run of rows read and converted into place
            at = 0
            for r in _runs(idx):
                out[at : at + len(r)] = self.full.read_rows(name, r.start, r.stop)
                at += len(r)
            return out
        rows = source.shape[0]
        step = rows_per_block(source)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            out[start:stop] = self._cut(self.full.read_rows(name, start, stop), dim, idx)
        return out

    def read_stored(self, name: str) -> Tensor:
        """The rank's part as stored (the checkpoint's dtype) when it is rows of a plain tensor: the
        streaming exporter converts and checks it a chunk at a time, as it does a whole tensor, so the
        rank's slice is held once, not again converted (an embedding's rows: half a GB at 5 B, N = 2).
        Anything else in the model dtype (`read`)."""
        where = self.plan.part(name, self.rank) if name != VOCAB_START else None
        source = self.full.parameters.get(name)
        if where is None or where[0] != 0 or source is None or source.parts or source.quantized is not None:
            return self.read(name)
        runs = _runs(where[1])
        parts = [self.full.index.read_rows(source.tensor, r.start, r.stop) for r in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def narrows(self, name: str) -> bool:
        return False  # `read` converts block by block already

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the rank's part (experts ``start:stop`` of a stack of experts)."""
        where = self.plan.part(name, self.rank)
        if where is None:
            return self.full.read_rows(name, start, stop)
        dim, idx = where
        if dim == 0:
            return torch.cat([self.full.read_rows(name, r.start, r.stop) for r in _runs(list(idx)[start:stop])])
        return self._cut(self.full.read_rows(name, start, stop), dim, idx)

    def read_tensor(self, tensor: str, dtype: torch.dtype) -> Tensor:
        raise RuntimeError(f"{tensor}: a rank's view reads parameters (read, read_rows), not checkpoint tensors")

    def read_blocked_part(self, tensor: str) -> Tensor:
        """The rank's part of a stored tensor of a ModelOpt block-quantized (NVFP4) weight, as stored: its
        packed codes ``[out, in/2]`` or its block scales ``[out, in/16]`` sliced as the weight ``[out, in]``
        is, by rows or by columns in whole blocks (`blocked_misalignment` refuses a split that cuts one); a
        per-expert tensor of a stack of experts as that expert's part. Any other tensor whole."""
        index = self.full.index
        if self.blocked is None:
            self.blocked = _blocked_tensors(self.full)
        owner = self.blocked.get(tensor)
        where = None if owner is None else self.plan.part(owner[0], self.rank)
        if where is None:
            return index.read(tensor)
        param, expert_of_stack = owner
        dim, idx = where
        dim -= expert_of_stack  # a per-expert tensor is one row of the stack
        if dim == 0:
            return torch.cat([index.read_rows(tensor, r.start, r.stop) for r in _runs(idx)])
        stored = index.read(tensor)
        per = self.full.parameters[param].shape[-1] // stored.shape[-1]  # inputs per stored column: 2 (codes), 16 (block scales)
        return torch.cat([stored[:, r.start // per : r.stop // per] for r in _runs(idx)], dim=1).contiguous()

    @staticmethod
    def _cut(block: Tensor, dim: int, idx: list[int] | range) -> Tensor:
        if isinstance(idx, range):
            return block.narrow(dim, idx.start, len(idx))
        return block.index_select(dim, torch.tensor(idx, dtype=torch.int64))


def _blocked_tensors(checkpoint: Checkpoint) -> dict[str, tuple[str, int]]:
    """``{stored tensor: (parameter, 1 if a per-expert tensor of a stack else 0)}`` of the codes and block
    scales of every block-quantized (NVFP4) weight of ``checkpoint``."""
    quantization = checkpoint.quantization
    out: dict[str, tuple[str, int]] = {}
    if quantization is None:
        return out
    for name, source in checkpoint.parameters.items():
        weights = [(source.quantized, 0)] if source.quantized is not None else []
        weights += [(quantization.weights.get(p.removesuffix(".weight")), 1) for p in source.parts]
        for q, expert in weights:
            if q is not None and q.group_size:
                out[q.weight] = out[q.weight_scale] = (name, expert)
    return out


def blocked_misalignment(checkpoint: Checkpoint, plan: TensorParallelPlan) -> str | None:
    """Why the ranks' parts of a block-quantized (NVFP4) checkpoint would cut a block of inputs (a
    row-parallel part whose columns do not start and end on a block of ``group_size``), or None: a
    rank's part of the block scales is then whole blocks, the codes and scales as stored."""
    blocks = {q.weight: q.group_size for q in (checkpoint.quantization.weights.values() if checkpoint.quantization else ())}
    for tensor, (name, expert) in _blocked_tensors(checkpoint).items():
        group = blocks.get(tensor)
        input_dim = len(checkpoint.parameters[name].shape) - 1
        for rank in range(plan.world):
            where = plan.part(name, rank)
            if group and where is not None and where[0] == input_dim:
                for r in _runs(where[1]):
                    if r.start % group or len(r) % group:
                        return f"rank {rank} holds inputs {r.start}–{r.stop - 1} of {name}, which cuts its {group}-input blocks"
    return None


def rank_checkpoint(checkpoint: Checkpoint, plan: TensorParallelPlan, rank: int) -> RankCheckpoint:
    """Rank ``rank``'s `RankCheckpoint` of ``checkpoint`` (nothing is read).

    A ModelOpt-quantized weight is read dequantized, its part's rows at a time (`Checkpoint.read_rows`);
    the quantization stays the checkpoint's (its per-tensor scales are the unsharded tensors').

    Raises:
        ConfigError: What the rank exporter does not split yet: biases on an MoE layer's outputs.
    """
    if plan.config.moe is not None and plan.config.mlp_bias:
        raise ConfigError("--tp of an MoE model with mlp_bias is not built yet (the biases are added after the all-reduce)", fix="export it on one device")
    parameters = {
        name: ParameterSource(name, source.tensor, plan.shard_shape(name, source.shape, rank), source.dtype, quantized=source.quantized)
        for name, source in checkpoint.parameters.items()
    }
    parameters[VOCAB_START] = ParameterSource(VOCAB_START, f"(rank {rank}'s first vocabulary row)", (), torch.int64)
    return RankCheckpoint(
        checkpoint.root, plan.rank_config(rank), checkpoint.index, checkpoint.dtype, parameters, checkpoint.quantization, full=checkpoint, plan=plan, rank=rank
    )
