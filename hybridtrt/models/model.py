"""The reference hybrid language model (oracle #1): embeddings → blocks → norm_f → lm_head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from hybridtrt.errors import InputError
from hybridtrt.models.cache import HybridCache
from hybridtrt.models.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from hybridtrt.models.layers import MLP as MLPMixer
from hybridtrt.models.layers import Attention, Mamba2Mixer, RMSNorm
from hybridtrt.models.moe import MoE

ScanMode = Literal["auto", "scan", "update"]

#: Block letter -> mixer class (registry, not if/elif).
MIXERS: dict[str, type[nn.Module]] = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP: MLPMixer, MOE: MoE}


class Block(nn.Module):
    """``h = h + mixer(RMSNorm(h))`` (optionally with an fp32 residual)."""

    def __init__(self, config: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, config.norm_weight_in_fp32)
        self.mixer = MIXERS[kind](config)

    def normed(self, h: Tensor) -> tuple[Tensor, Tensor]:
        residual = h.float() if self.residual_in_fp32 else h
        return self.norm(h.to(self.norm.weight.dtype)), residual


@dataclass
class CausalLMOutput:
    """Result of `HybridLM.forward`.

    Attributes:
        logits: ``[B, L, V]`` (``logits="all"``) or ``[B, V]`` (``"last"``), fp32.
        cache: The states after this call (a new object).
        hidden_states: Per-layer outputs ``[B, L, hidden]`` when requested, else empty.
    """

    logits: Tensor
    cache: HybridCache
    hidden_states: list[Tensor] = field(default_factory=list)


class HybridLM(nn.Module):
    """Nemotron-H / Mamba-2 causal LM whose Mamba layers call the ``hybridtrt::`` custom ops."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, kind) for kind in config.layer_types])
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, config.norm_weight_in_fp32)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    def new_cache(self, batch: int, state_dtype: torch.dtype = torch.float32) -> HybridCache:
        """Zero states for ``batch`` rows on the model's device and dtype."""
        return HybridCache.empty(
            self.config, batch, dtype=self.dtype, state_dtype=state_dtype, device=self.embeddings.weight.device
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: HybridCache | None = None,
        *,
        logits: Literal["all", "last"] = "all",
        scan_mode: ScanMode = "auto",
        output_hidden_states: bool = False,
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
        return self._forward(input_ids, attention_mask, cache, logits, use_update, output_hidden_states)

    def _forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        cache: HybridCache,
        logits_mode: str,
        use_update: bool,
        output_hidden_states: bool,
    ) -> CausalLMOutput:
        b, l = input_ids.shape
        dtype = self.dtype
        mask = attention_mask[:, -l:].to(dtype)  # [B, L]
        bias = causal_bias(attention_mask, l, torch.float32)  # added to fp32 scores: never overflows
        is_decode = decode_flag(attention_mask, l)
        # Left-padding rows are held at exactly zero through every block (DESIGN.md §4): otherwise a
        # padded query attends uniformly to keys it must not see, its garbage grows layer by layer
        # (it differs between fp16/fp32/backends, and can overflow to inf, and a NaN V row poisons
        # real rows through 0·NaN in probs @ V). A select, not a multiply, so that not even a NaN
        # survives on a padding row; real rows are passed through unchanged.
        row = attention_mask[:, -l:, None] != 0  # [B, L, 1]
        h = torch.where(row, self.embeddings(input_ids), 0.0)
        new = HybridCache()
        hidden: list[Tensor] = []
        for i, block in enumerate(self.layers):
            x, residual = block.normed(h)
            if block.kind == MAMBA:
                out, new.conv[i], new.ssm[i] = block.mixer(
                    x, mask, cache.conv[i], cache.ssm[i], use_update, is_decode
                )
            elif block.kind == ATTENTION:
                out, new.key[i], new.value[i] = block.mixer(x, bias, cache.key[i], cache.value[i])
            else:
                out = block.mixer(x)
            h = torch.where(row, residual + out, 0.0)
            if output_hidden_states:
                hidden.append(h)
        h = self.norm_f(h)
        if logits_mode == "last":
            h = h[:, -1]
        head = self.embeddings.weight if self.lm_head is None else self.lm_head.weight
        # With residual_in_fp32 (every real Mamba-2) h is fp32 here; HF casts it to the head's dtype.
        return CausalLMOutput(torch.matmul(h.to(head.dtype), head.t()).float(), new, hidden)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """Prefill, then one-token decode steps. See `hybridtrt.runtime.generation.generate`."""
        from hybridtrt.runtime.generation import TorchStepper, generate

        return generate(TorchStepper(self), input_ids, attention_mask, **kwargs)


def decode_flag(attention_mask: Tensor, length: int) -> Tensor:
    """``[]`` bool: one new token (``L == 1``) on top of at least one past position.

    Built from shapes with tensor ops only, so a graph traced with dynamic ``L`` and ``past`` keeps
    the decision at run time instead of baking it in.
    """
    new = torch.ones(length, device=attention_mask.device).sum()
    total = torch.ones(attention_mask.shape[1], device=attention_mask.device).sum()
    return (new == 1) & (total > 1)


def causal_bias(attention_mask: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Additive attention mask for ``length`` new queries over ``past + length`` keys.

    Args:
        attention_mask: ``[B, past + L]`` of 0/1.
        length: ``L``.
        dtype: dtype of the scores it is added to (masked entries get ``finfo(dtype).min``, never
            -inf, so fully padded rows stay finite). The model adds it to fp32 scores: in fp16,
            ``score + finfo(fp16).min`` overflows to -inf and a fully masked row becomes NaN.

    Returns:
        ``[B, 1, L, past + L]``.
    """
    total = attention_mask.shape[1]
    q_pos = torch.arange(length, device=attention_mask.device)[:, None] + (total - length)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] != 0)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)
