"""The reference hybrid language model (oracle #1): embeddings → blocks → norm_f → lm_head."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hybridtrt.errors import InputError
from hybridtrt.models.cache import HybridCache
from hybridtrt.models.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from hybridtrt.models.layers import MLP as MLPMixer
from hybridtrt.models.layers import Attention, Mamba2Mixer, RMSNorm, wide
from hybridtrt.models.moe import MoE

ScanMode = Literal["auto", "scan", "update"]

#: Block letter -> mixer class (registry, not if/elif).
MIXERS: dict[str, type[nn.Module]] = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP: MLPMixer, MOE: MoE}


#: The initializers torch's modules call in ``reset_parameters``.
_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")


#: `meta_modules` swaps process-wide functions: one thread at a time (tensor-parallel ranks are built
#: in threads, `hybridtrt.models.collectives.emulate_ranks`; interleaved, one thread would save another's
#: stand-ins as the originals and leave ``nn.init`` a no-op for the rest of the process).
_META_LOCK = threading.RLock()


@contextlib.contextmanager
def meta_modules() -> Iterator[None]:
    """Build modules on the meta device without running their initializers (as transformers'
    ``no_init_weights``): their values are replaced before use, and torch's meta ``normal_`` (the
    embedding's) imports ``torch._dynamo`` on first use, 1.9 s, a tenth of a small ``validate``.
    One thread at a time (`_META_LOCK`)."""
    with _META_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INITS}
        try:
            for name in _INITS:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)


class Block(nn.Module):
    """``h = h + mixer(RMSNorm(h))`` (optionally with an fp32 residual)."""

    def __init__(self, config: HybridConfig, kind: str, mixers: dict[str, type[nn.Module]] = MIXERS) -> None:
        super().__init__()
        self.kind = kind
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, config.norm_weight_in_fp32)
        self.mixer = mixers[kind](config)

    def normed(self, h: Tensor) -> tuple[Tensor, Tensor]:
        residual = wide(h) if self.residual_in_fp32 else h
        return self.norm(h.to(self.norm.weight.dtype)), residual


@dataclass
class CausalLMOutput:
    """Result of `HybridLM.forward`.

    Attributes:
        logits: ``[B, L, V]`` (``logits="all"``) or ``[B, V]`` (``"last"``), fp32.
        cache: The states after this call (a new object).
        hidden_states: Per-layer outputs ``[B, L, hidden]`` when requested, else empty.
        last_hidden: The final hidden states after ``norm_f``, every position ``[B, L, hidden]``:
            what the LM head reads, and the main model's input to an MTP draft head
            (`hybridtrt.models.mtp`).
    """

    logits: Tensor
    cache: HybridCache
    hidden_states: list[Tensor] = field(default_factory=list)
    last_hidden: Tensor | None = None


def head_projection(h: Tensor, weight: Tensor) -> Tensor:
    """``[..., hidden]`` (after ``norm_f``) times the LM head's ``weight [vocab, hidden]`` (or a block
    of its rows) -> logits (`wide`)."""
    # With residual_in_fp32 (every real Mamba-2) h is fp32 here; HF casts it to the head's dtype.
    return wide(torch.matmul(h.to(weight.dtype), weight.t()))


class TokenEnds(nn.Module):
    """The two ends of an LM, ``embeddings`` (``nn.Embedding``) and ``lm_head`` (``nn.Linear``, or
    None when tied): what `HybridLM` and the MTP head's graph (`hybridtrt.exporter.mtp_graph`) share."""

    embeddings: nn.Embedding
    lm_head: nn.Linear | None

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, L]`` token ids -> ``[B, L, hidden]`` embeddings."""
        return self.embeddings(input_ids)

    def head_logits(self, h: Tensor) -> Tensor:
        """The LM head: ``[..., hidden]`` (after ``norm_f``) -> ``[..., vocab]`` logits (`wide`)."""
        return head_projection(h, self.embeddings.weight if self.lm_head is None else self.lm_head.weight)


class HybridLM(TokenEnds):
    """Nemotron-H / Mamba-2 causal LM whose Mamba layers call the ``hybridtrt::`` custom ops."""

    #: Block letter -> mixer class (a tensor-parallel rank's model swaps some: `hybridtrt.models.tensor_parallel`).
    mixers: ClassVar[dict[str, type[nn.Module]]] = MIXERS

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, kind, self.mixers) for kind in config.layer_types])
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, config.norm_weight_in_fp32)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def new_cache(self, batch: int, state_dtype: torch.dtype = torch.float32) -> HybridCache:
        """Zero states for ``batch`` rows on the model's device and dtype."""
        return HybridCache.empty(self.config, batch, dtype=self.dtype, state_dtype=state_dtype, device=self.device)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: HybridCache | None = None,
        *,
        logits: Literal["all", "last"] = "all",
        scan_mode: ScanMode = "auto",
        output_hidden_states: bool = False,
        keep_states: bool = True,
    ) -> CausalLMOutput:
        """Run ``L`` new tokens on top of ``cache``.

        Args:
            input_ids: ``[B, L]`` int64.
            attention_mask: ``[B, past + L]``, 1 = real token, 0 = left padding. None = all ones.
            cache: States after ``past`` tokens; None = zero states (past = 0).
            logits: ``"all"`` positions or only the ``"last"``.
            scan_mode: ``"auto"`` uses the one-token state update when ``L == 1`` and the chunked
                scan otherwise; ``"scan"``/``"update"`` force one (``"update"`` needs ``L == 1``).
            output_hidden_states: Also return each decoder layer's output.
            keep_states: False: return an empty cache, each layer's new states dropped as soon as it
                is done (calibration reads activations only: a model's states held to the end of
                the call are one layer's states times the layer count).

        Returns:
            `CausalLMOutput` with fp32 logits and the new cache.
        """
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        if cache is None:
            cache = self.new_cache(b)
        past = cache.past_length
        if attention_mask is None:
            attention_mask = torch.ones(b, past + l, dtype=torch.int64, device=input_ids.device)
        use_update = scan_mode == "update" or (scan_mode == "auto" and l == 1)
        if use_update and l != 1:
            raise InputError(f"scan_mode='update' needs exactly one new token, got L={l}")
        return self._forward(input_ids, attention_mask, cache, logits, use_update, output_hidden_states, keep_states)

    def _forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        cache: HybridCache,
        logits_mode: str,
        use_update: bool,
        output_hidden_states: bool,
        keep_states: bool = True,
    ) -> CausalLMOutput:
        """Growing-cache pass: ``attention_mask [B, past + L]`` (DESIGN.md §6, unified graph)."""
        positions = growing_positions(attention_mask, input_ids.shape[1], self.dtype)
        return self._run(input_ids, positions, cache, logits_mode, use_update, output_hidden_states, keep_states)

    def forward_static(
        self,
        input_ids: Tensor,
        cache_position: Tensor,
        padding_length: Tensor,
        cache: HybridCache,
        *,
        logits: Literal["all", "last"] = "last",
        use_update: bool = False,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """Static-cache pass (DESIGN.md §6, static flavour): KV buffers of fixed capacity ``N``.

        Args:
            input_ids: ``[B, L]``.
            cache_position: ``[B]`` int64, cache positions already written (padding included); the
                new tokens go to ``cache_position .. cache_position + L - 1``.
            padding_length: ``[B]`` int64, left-padding positions of each row (never attended; their
                tokens are exact no-ops for every state).
            cache: conv/SSM states and KV buffers ``[B, H_kv, N, D]``; returned KV are the buffers
                with the new positions written.
            logits, use_update, output_hidden_states: As in `forward`.
        """
        capacity = next(iter(cache.key.values())).shape[2] if cache.key else 0
        positions = static_positions(cache_position, padding_length, input_ids.shape[1], capacity, self.dtype)
        return self._run(input_ids, positions, cache, logits, use_update, output_hidden_states)

    def _run(
        self,
        input_ids: Tensor,
        positions: Positions,
        cache: HybridCache,
        logits_mode: str,
        use_update: bool,
        output_hidden_states: bool,
        keep_states: bool = True,
    ) -> CausalLMOutput:
        # Left-padding rows are held at exactly zero through every block (DESIGN.md §4): otherwise a
        # padded query's garbage grows layer by layer (it differs between fp16/fp32/backends, and can
        # overflow to inf, and a NaN V row poisons real rows through 0·NaN in probs @ V). A select,
        # not a multiply, so that not even a NaN survives on a padding row; real rows pass unchanged.
        row = positions.mask[:, :, None] != 0  # [B, L, 1]
        h = torch.where(row, self.embed(input_ids), 0.0)
        h, new, hidden = run_blocks(self.layers, h, positions, cache, use_update, output_hidden_states, keep_states)
        h = self.norm_f(h)
        last_hidden = h
        if logits_mode == "last":
            h = h[:, -1]
        return CausalLMOutput(self.head_logits(h), new, hidden, last_hidden)


def run_blocks(
    blocks: nn.ModuleList,
    h: Tensor,
    positions: Positions,
    cache: HybridCache,
    use_update: bool = False,
    output_hidden_states: bool = False,
    keep_states: bool = True,
) -> tuple[Tensor, HybridCache, list[Tensor]]:
    """``h [B, L, hidden]`` through decoder ``blocks`` (a `Block` per layer, states keyed by the
    block's index in ``blocks``); padding rows (``positions.mask`` 0) held at exactly zero.

    Returns:
        The last block's output, the new states, and each block's output when asked for.
    """
    row = positions.mask[:, :, None] != 0  # [B, L, 1]
    new = HybridCache()
    hidden: list[Tensor] = []
    for i, block in enumerate(blocks):
        x, residual = block.normed(h)
        if block.kind == MAMBA:
            out, new.conv[i], new.ssm[i] = block.mixer(x, positions.mask, cache.conv[i], cache.ssm[i], use_update)
        elif block.kind == ATTENTION:
            out, new.key[i], new.value[i] = block.mixer(x, positions.allowed, cache.key[i], cache.value[i], positions.write_index)
        else:
            out = block.mixer(x)
        h = torch.where(row, residual + out, 0.0)
        if not keep_states:
            new = HybridCache()
        if output_hidden_states:
            hidden.append(h)
    return h, new, hidden


@dataclass
class Positions:
    """Where ``L`` new tokens sit, in the form every mixer needs it.

    Attributes:
        mask: ``[B, L]`` model dtype, 1 for real tokens, 0 for left padding.
        allowed: ``[B, 1, L, T]`` bool attention mask over the ``T`` cache positions.
        write_index: ``[B]`` int64 cache position of the first new token (static cache), or None
            when the KV cache grows by concatenation.
    """

    mask: Tensor
    allowed: Tensor
    write_index: Tensor | None = None


def growing_positions(attention_mask: Tensor, length: int, dtype: torch.dtype) -> Positions:
    """Positions of ``length`` new tokens on a growing cache with ``attention_mask [B, past + L]``."""
    return Positions(
        mask=attention_mask[:, -length:].to(dtype),
        allowed=causal_mask(attention_mask, length),
    )


def static_positions(cache_position: Tensor, padding_length: Tensor, length: int, capacity: int, dtype: torch.dtype) -> Positions:
    """Positions of ``length`` new tokens written at ``cache_position [B]`` into a cache of
    ``capacity`` positions whose first ``padding_length [B]`` positions are left padding.

    Token ``l`` of row ``b`` sits at ``p = cache_position[b] + l``; it is real iff
    ``p >= padding_length[b]``, and attends to positions ``padding_length[b] .. p`` (and always to
    itself, see `causal_mask`). Built with tensor ops only, so one traced graph serves every call.
    """
    device = cache_position.device
    new = torch.arange(length, device=device)
    q_pos = cache_position[:, None] + new[None, :]  # [B, L]
    real = q_pos >= padding_length[:, None]
    k_pos = torch.arange(capacity, device=device)[None, None, :]  # [1, 1, N]
    q = q_pos[:, :, None]
    allowed = ((k_pos <= q) & (k_pos >= padding_length[:, None, None])) | (k_pos == q)
    return Positions(mask=real.to(dtype), allowed=allowed[:, None], write_index=cache_position)


def causal_mask(attention_mask: Tensor, length: int) -> Tensor:
    """Boolean attention mask of ``length`` new queries over ``past + length`` keys.

    A query attends to the real (mask 1) keys at or before its position, and always to itself: a
    left-padding query thus attends only to itself, so no row is fully masked (no NaN, no
    dtype-min trick) and padding positions compute the same values in the growing and the static
    cache flavours. Real positions never read padding positions, so the rule only fixes what
    padding positions hold.

    Args:
        attention_mask: ``[B, past + L]`` of 0/1.
        length: ``L``.

    Returns:
        ``[B, 1, L, past + L]`` bool, True = attend.
    """
    total = attention_mask.shape[1]
    q_pos = torch.arange(length, device=attention_mask.device)[:, None] + (total - length)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = ((k_pos <= q_pos)[None] & (attention_mask[:, None, :] != 0)) | (k_pos == q_pos)[None]
    return allowed[:, None]
