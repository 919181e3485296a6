"""Backend-independent generation: prefill, then one-token decode steps feeding states back.

A backend only implements `Stepper` (zero states + one forward call); batching with left padding,
the attention mask bookkeeping, sampling, stopping and timing live here once, for the PyTorch
reference, ONNX Runtime and TensorRT alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hybridtrt.errors import InputError


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token lists -> a left-padded batch ``(ids [B, L], mask [B, L])`` (an empty row is all padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


class Stepper(Protocol):
    """What a backend provides to the generation loop."""

    def zero_state(self, batch: int) -> Any:
        """States of ``batch`` rows before any token."""

    def step(self, input_ids: Tensor, attention_mask: Tensor, state: Any, decode: bool) -> tuple[Tensor, Any]:
        """Run ``input_ids [B, L]`` with ``attention_mask [B, past + L]`` on ``state``.

        Args:
            decode: True for the one-token steps after the prefill (a backend may use a
                decode-only graph or profile).

        Returns:
            Last-position logits ``[B, V]`` (fp32 torch tensor) and the new state.
        """


class TorchStepper:
    """`Stepper` over the PyTorch reference model."""

    def __init__(self, model: Any, state_dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.state_dtype = state_dtype

    def zero_state(self, batch: int) -> Any:
        return self.model.new_cache(batch, self.state_dtype)

    @torch.no_grad()
    def step(self, input_ids: Tensor, attention_mask: Tensor, state: Any, decode: bool) -> tuple[Tensor, Any]:
        device = self.model.embeddings.weight.device
        out = self.model(input_ids.to(device), attention_mask.to(device), state, logits="last")
        return out.logits.cpu(), out.cache


@dataclass
class SamplingConfig:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be ≥ 0, got {self.top_k}")


def next_tokens(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """``logits [B, V] -> tokens [B]`` (int64)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_scores, -1) > sampling.top_p  # keep the token crossing p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    """Output of `generate`.

    Attributes:
        tokens: ``[B, n]`` new tokens (``pad_token_id`` after a row's EOS).
        logits: Per step ``[B, V]`` fp32 logits that chose each token (when kept).
        prefill_s: Wall time of the prefill.
        decode_s: Wall time of all decode steps.
    """

    tokens: Tensor
    logits: list[Tensor] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.tokens.shape[1] - 1, 0) * self.tokens.shape[0]
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def iter_generate(
    stepper: Stepper,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    on_step: Callable[[Tensor, Tensor], None] | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row (``[B]``), one step at a time.

    Args:
        stepper: The backend.
        input_ids: ``[B, L]`` prompt ids, left-padded.
        attention_mask: ``[B, L]``; None = no padding.
        max_new_tokens: Upper bound on steps.
        sampling: Greedy by default.
        eos_token_id: Rows that emit it are finished (later tokens are ``pad_token_id``); None
            disables stopping.
        on_step: Called with ``(tokens [B], logits [B, V])`` after every step.
    """
    sampling = sampling or SamplingConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, seq] with seq ≥ 1, got {tuple(input_ids.shape)}")
    input_ids = input_ids.long().cpu()
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long().cpu()
    if mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise InputError("attention_mask has padding on the right; hybridtrt batches use left padding")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    state = stepper.zero_state(batch)
    finished = torch.zeros(batch, dtype=torch.bool)
    ids = input_ids
    for k in range(max_new_tokens):
        logits, state = stepper.step(ids, mask, state, decode=k > 0)
        tokens = next_tokens(logits, sampling, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        if on_step is not None:
            on_step(tokens, logits)
        yield tokens
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
            if bool(finished.all()):
                return
        ids = tokens[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)


def generate(
    stepper: Stepper,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    keep_logits: bool = False,
) -> GenerationResult:
    """Generate ``max_new_tokens`` for a left-padded batch. See `iter_generate`."""
    logits: list[Tensor] = []
    times: list[float] = []

    def record(tokens: Tensor, step_logits: Tensor) -> None:
        times.append(time.perf_counter())
        if keep_logits:
            logits.append(step_logits)

    start = time.perf_counter()
    tokens = list(
        iter_generate(
            stepper,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            on_step=record,
        )
    )
    out = torch.stack(tokens, dim=1) if tokens else torch.zeros(input_ids.shape[0], 0, dtype=torch.long)
    prefill = times[0] - start if times else 0.0
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return GenerationResult(out, logits, prefill, decode)
