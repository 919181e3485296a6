"""Backend-independent generation: prefill (in chunks), then one-token decode steps feeding
states back.

A backend only implements `Stepper` (zero states + one forward call); batching with left padding,
the attention mask bookkeeping, chunked prefill, snapshots, input checks, sampling, stopping and
timing live here once, for the PyTorch reference, ONNX Runtime and TensorRT alike.

Chunked prefill relies on the state algebra of DESIGN.md §4 (prefill(a) + prefill(b) ==
prefill(a + b)): a prompt longer than ``prefill_chunk`` runs as consecutive calls on the same graph,
each carrying the states forward, so the activations of one call scale with the chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hybridtrt.engine.limits import DEFAULT_PREFILL_CHUNK
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
    """`Stepper` over the PyTorch reference model (with snapshots), with the runtimes' generation
    API: ``TorchStepper(model).generate(ids, mask, max_new_tokens=32)`` as ``OrtModel(...).generate``.
    The reference model itself knows nothing of generation (DESIGN.md §1: the data walks one way)."""

    def __init__(self, model: Any, state_dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.state_dtype = state_dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def zero_state(self, batch: int) -> Any:
        return self.model.new_cache(batch, self.state_dtype)

    @torch.no_grad()
    def step(self, input_ids: Tensor, attention_mask: Tensor, state: Any, decode: bool) -> tuple[Tensor, Any]:
        device = self.model.device
        out = self.model(input_ids.to(device), attention_mask.to(device), state, logits="last")
        return out.logits.cpu(), out.cache

    @torch.no_grad()
    def verify(self, input_ids: Tensor, attention_mask: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """Every position's logits ``[B, L, V]`` and final hidden states ``[B, L, hidden]``, and
        the new state (`hybridtrt.runtime.speculative.Verifier`)."""
        device = self.model.device
        out = self.model(input_ids.to(device), attention_mask.to(device), state, logits="all")
        return out.logits.cpu(), out.last_hidden, out.cache

    def select_rows(self, state: Any, rows: list[int]) -> Any:
        return state.select(rows)

    def state_arrays(self, state: Any) -> dict[str, Tensor]:
        return state.named_states()

    def snapshot(self, state: Any, attention_mask: Tensor) -> Any:
        from hybridtrt.runtime.snapshot import Snapshot

        return Snapshot({k: v.detach().cpu().clone() for k, v in state.named_states().items()}, attention_mask.long().cpu().clone())

    def restore(self, snapshot: Any) -> Any:
        from hybridtrt.exporter.io import state_specs
        from hybridtrt.exporter.wrapper import cache_from_flat

        device = self.model.device
        specs = state_specs(self.model.config)
        return cache_from_flat(specs, [snapshot.states[s.present_name].to(device).clone() for s in specs])

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> GenerationResult:
        """Prefill, then one-token decode steps (`generate`)."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Iterator[Tensor]:
        """Yield ``[B]`` tokens step by step (`iter_generate`)."""
        return iter_generate(self, input_ids, attention_mask, **kwargs)


def _shown(x: object) -> str:
    """A flag value as a user typed it (``-1``, ``nan``, ``1.5``)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass
class SamplingConfig:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # NaN passes every comparison's negation: test for the accepted range, not the refused one.
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise InputError(f"--temperature {_shown(self.temperature)} (temperature) must be a finite number ≥ 0", fix="0 is greedy; sampling temperatures are usually 0.2 – 1.5")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"--top-p {_shown(self.top_p)} (top_p) must be in (0, 1]", fix="1 keeps every token; e.g. --top-p 0.9")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"--top-k {self.top_k} (top_k) must be an integer ≥ 0", fix="0 keeps every token; e.g. --top-k 50")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InputError(f"--seed {self.seed} (seed) must be an integer in [0, 2^63)", fix="e.g. --seed 0")


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


def check_prompt(stepper: Stepper, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate a left-padded prompt batch before anything runs; returns ``(ids, mask)`` on the CPU.

    Raises:
        InputError: Not ``[batch, seq ≥ 1]``, a mask of another shape or with right padding, or
            token ids outside ``[0, vocab)`` (they would silently wrap around in the embedding).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, seq] with seq ≥ 1, got {tuple(input_ids.shape)}")
    input_ids = input_ids.long().cpu()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long().cpu()
    if mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise InputError("attention_mask has padding on the right; hybridtrt batches use left padding")
    vocab = getattr(stepper, "vocab_size", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if vocab is not None and (low < 0 or high >= vocab):  # padding ids too: every id is looked up
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside the model's vocabulary [0, {vocab})", fix="check the tokenizer, the pad id, or the --ids you passed")
    return input_ids, mask


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``length`` tokens into the fewest calls of at most ``chunk`` tokens, balanced.

    Balanced sizes (for ``chunk ≥ 3``) never leave a one-token tail: a one-token call on existing
    states is a decode step for the graph (HF's dt-clamp rule, DESIGN.md §3), which would make the
    chunked prefill differ from the whole one where that clamp is active.
    """
    if chunk < 1:
        raise InputError(f"--prefill-chunk {chunk} must be ≥ 1", fix="give the longest prefill call in tokens, e.g. --prefill-chunk 2048")
    n = -(-length // chunk)
    sizes = [length // n + (1 if i < length % n else 0) for i in range(n)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def prefill(
    stepper: Stepper,
    input_ids: Tensor,
    attention_mask: Tensor,
    state: Any,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    call: Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]] | None = None,
) -> tuple[Tensor, Any]:
    """Run ``input_ids [B, L]`` on ``state`` in calls of at most ``prefill_chunk`` tokens.

    Args:
        input_ids: The new tokens: the last ``L`` columns of ``attention_mask``.
        attention_mask: ``[B, past + L]``.
        state: States after ``past`` positions.
        call: One call ``(ids, mask, state) -> (last logits, state)``; the stepper's prefill
            `Stepper.step` by default (speculation passes its verify call, to keep the hidden states).

    Returns:
        Last-position logits ``[B, V]`` and the state after all ``L`` tokens.
    """
    call = call or (lambda ids, mask, state: stepper.step(ids, mask, state, decode=False))
    past = attention_mask.shape[1] - input_ids.shape[1]
    limit = getattr(stepper, "max_prefill_tokens", None)
    logits, done, length = None, 0, input_ids.shape[1]
    while done < length:
        # The backend may cap a call by memory (ONNX Runtime: attention scores grow with the cache).
        cap = prefill_chunk if limit is None else max(3, min(prefill_chunk, limit(input_ids.shape[0], past + done)))
        a, b = chunk_bounds(length - done, cap)[0]
        logits, state = call(input_ids[:, done + a : done + b], attention_mask[:, : past + done + b], state)
        done += b
    return logits, state


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
    prefill_chunk: int | None = None,
    snapshot: Any = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row (``[B]``), one step at a time.

    Args:
        stepper: The backend.
        input_ids: ``[B, L]`` prompt ids, left-padded (with ``snapshot``: the tokens after it).
        attention_mask: ``[B, L]``; None = no padding.
        max_new_tokens: Upper bound on steps.
        sampling: Greedy by default.
        eos_token_id: Rows that emit it are finished (later tokens are ``pad_token_id``); None
            disables stopping.
        on_step: Called with ``(tokens [B], logits [B, V])`` after every step.
        prefill_chunk: Longest prefill call (default `DEFAULT_PREFILL_CHUNK`); longer prompts are
            prefilled chunk by chunk.
        snapshot: Continue after this `hybridtrt.runtime.snapshot.Snapshot` (a shared prefix
            prefilled once) instead of from zero states; ``input_ids`` must then be unpadded.

    Raises:
        InputError: Bad ids or mask, a continuation with padding, or more positions than the
            backend can hold (checked before anything runs).
    """
    sampling = sampling or SamplingConfig()
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk  # 0 is refused, not the default
    chunk_bounds(1, chunk)
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens {max_new_tokens} must be ≥ 0", fix="e.g. --max-new-tokens 32")
    input_ids, mask = check_prompt(stepper, input_ids, attention_mask)
    batch = input_ids.shape[0]
    if snapshot is not None:
        from hybridtrt.runtime.snapshot import supports_snapshots

        if not supports_snapshots(stepper):
            raise InputError(f"{type(stepper).__name__} cannot restore state snapshots", fix="use the reference, ONNX Runtime or TensorRT backend")
        if bool((mask == 0).any()):
            raise InputError("the tokens after a snapshot cannot be padded (padding must come first in a row)", fix="continue every row with the same number of tokens")
        snapshot = snapshot.rows(batch)
        mask = torch.cat([snapshot.attention_mask, mask], dim=1)
    check = getattr(stepper, "check_request", None)
    if check is not None:
        check(batch, mask.shape[1] + max(max_new_tokens - 1, 0), chunk)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    state = stepper.zero_state(batch) if snapshot is None else stepper.restore(snapshot)
    finished = torch.zeros(batch, dtype=torch.bool)
    ids = input_ids
    for k in range(max_new_tokens):
        if k == 0:
            logits, state = prefill(stepper, ids, mask, state, chunk)
        else:
            logits, state = stepper.step(ids, mask, state, decode=True)
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
    prefill_chunk: int | None = None,
    snapshot: Any = None,
) -> GenerationResult:
    """Generate ``max_new_tokens`` for a left-padded batch. See `iter_generate`."""

    def stream(on_step: Callable[[Tensor, Tensor], None]) -> Iterator[Tensor]:
        return iter_generate(
            stepper,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            on_step=on_step,
            prefill_chunk=prefill_chunk,
            snapshot=snapshot,
        )

    return collect(stream, input_ids.shape[0], keep_logits)


def collect(stream: Callable[[Callable[[Tensor, Tensor], None]], Iterator[Tensor]], batch: int, keep_logits: bool = False) -> GenerationResult:
    """Run a token stream to its end (`iter_generate`, or `hybridtrt.runtime.speculative.iter_speculative`,
    given the ``on_step`` callback here): ``[B, n]`` tokens, the ``[B, V]`` logits that chose each
    column when ``keep_logits``, and the wall time to the first token (prefill) and after it (decode)."""
    logits: list[Tensor] = []
    times: list[float] = []

    def record(tokens: Tensor, step_logits: Tensor) -> None:
        times.append(time.perf_counter())
        if keep_logits:
            logits.append(step_logits)

    start = time.perf_counter()
    tokens = list(stream(record))
    out = torch.stack(tokens, dim=1) if tokens else torch.zeros(batch, 0, dtype=torch.long)
    prefill = times[0] - start if times else 0.0
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return GenerationResult(out, logits, prefill, decode)
