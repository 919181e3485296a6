"""Speculative decoding whose output is the greedy output (DESIGN.md §11).

Each iteration drafts up to ``K`` tokens per row (an n-gram lookup in the row's own text, the
checkpoint's MTP head, or a scripted drafter that proves the mechanism), verifies them in **one**
main-model call over ``K + 1`` positions (the pending token and the drafts), accepts the longest
prefix of drafts that equals the main model's greedy choice, and emits the accepted drafts plus the
main model's own next token. At temperature 0 the emitted tokens are therefore the main model's
greedy tokens, whatever the drafter proposes: a drafter changes the speed, never the text.

**Rolling a row back.** A Mamba state cannot drop a token: after the verify call it has absorbed all
``K + 1`` positions. Rows that accept every draft keep the verify call's states. Each other row
goes back to its states before the call and **replays** its ``a + 1`` accepted positions in one call
(rows with the same ``a`` together), whose conv/SSM states — and KV of those positions — replace
the verify call's. Why replay and not per-position states or a state snapshot per position:

* Every state the loop keeps is then computed by the same graphs as a run without speculation
  that made the same calls: nothing new to export, and "restore then replay" is bitwise the
  direct run (`tests/runtime/test_speculative.py`). It costs one more main-model call per
  iteration in which some row rejects (≈ one decode step when weight reads dominate).
* Per-position SSM states from the verify call save that call but write ``K + 1`` SSM states per
  Mamba layer and row (Nemotron-Nano-9B-v2: 27 layers × 4 MiB fp32 = 108 MiB per position and
  row), which outgrows the weight reads from a batch of a few dozen rows; it needs a scan that emits
  intermediate states, a TensorRT plugin change (DESIGN.md §11, on paper).

**Partial drafts and padding.** Rows draft different numbers of tokens (an n-gram miss drafts none);
the verify call pads short drafts with a filler token, and a filler position is never accepted, so
it is rolled back like any rejected draft: no padding ever reaches a kept state (vLLM #55178 is the
failure of the other choice). Positions a row rejected stay in the KV cache as holes: the attention
mask marks them 0, so no later query reads them (Nemotron-H's attention has no position encoding,
so a hole changes nothing else), and they cost memory only — at most ``K`` per iteration.

**Numerics.** The verify call computes a position in a ``K + 1``-token call where plain greedy
decoding computes it in a one-token step; the logits agree to rounding (≈ 1e-6 relative in fp32),
so the tokens are identical except where two logits tie to within rounding. The tests check the
margins along their trajectories to show none is that close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from hybridtrt.errors import InputError
from hybridtrt.runtime.generation import DEFAULT_PREFILL_CHUNK, GenerationResult, check_prompt, chunk_bounds, collect, prefill

#: ``generate --speculative`` choices.
DRAFTERS = ("ngram", "mtp")
#: Default draft length: NVIDIA's Nemotron-3 Super serving recipes draft 3 tokens with the MTP head.
DEFAULT_DRAFT_LEN = 3
#: The most draft tokens a verify call takes.
MAX_DRAFT_LEN = 16


class Verifier(Protocol):
    """What a backend adds to `hybridtrt.runtime.generation.Stepper` for speculation."""

    def verify(self, input_ids: Tensor, attention_mask: Tensor, state: Any) -> tuple[Tensor, Tensor | None, Any]:
        """Run ``input_ids [B, L]`` on ``state`` (``attention_mask [B, past + L]``) and return the
        logits of every position ``[B, L, V]`` (fp32), the final hidden states after ``norm_f``
        ``[B, L, hidden]`` (None when the backend cannot give them) and the new state; ``state``
        itself is left as it was."""

    def select_rows(self, state: Any, rows: list[int]) -> Any:
        """The state of ``rows`` (a new state)."""

    def state_arrays(self, state: Any) -> dict[str, Any]:
        """``{name: tensor or array}`` of ``state``'s buffers, writable in place; KV names end in
        ``.key`` / ``.value`` and have the positions on axis 2."""


@dataclass
class SpeculationStats:
    """What a speculative generation did.

    Attributes:
        verify_calls: Main-model calls over drafts (one per iteration).
        replay_calls: Main-model calls that rolled rows back.
        draft_calls: Draft-model calls (0 for n-gram): the drafter's ``model_calls``.
        drafted: Draft tokens proposed (rows × tokens, fillers excluded).
        accepted: Draft tokens accepted.
        rows: Batch rows.
    """

    verify_calls: int = 0
    replay_calls: int = 0
    draft_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rows: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def produced(self) -> int:
        """Tokens the verify calls produced, all rows (each call: the accepted drafts and one token
        of the main model per row)."""
        return self.accepted + self.verify_calls * self.rows

    @property
    def tokens_per_verify(self) -> float:
        """Tokens per row and verify call (1 = no gain; at most K + 1)."""
        return self.produced / (self.verify_calls * self.rows) if self.verify_calls else float("nan")

    @property
    def tokens_per_main_call(self) -> float:
        """Tokens per row and main-model call, replays included (plain decoding: 1)."""
        calls = self.verify_calls + self.replay_calls
        return self.produced / (calls * self.rows) if calls else float("nan")


class Drafter(Protocol):
    """Proposes draft tokens. The loop tells it every position the main model commits."""

    #: Does `observe` need the main model's final hidden states?
    needs_hidden: bool

    def observe(self, hidden: Tensor | None, next_ids: Tensor, attention_mask: Tensor) -> None:
        """Positions the main model just committed: ``next_ids [B, L]`` the token after each
        position, ``hidden [B, L, hidden]`` its final hidden state, ``attention_mask [B, past + L]``
        (0 for padding and rejected positions)."""

    def draft(self, history: list[list[int]], k: int) -> list[list[int]]:
        """At most ``k`` tokens per row to follow ``history`` (each row's real tokens so far)."""


class NgramDrafter:
    """Prompt-lookup drafting (vLLM's ``ngram`` method): find the row's last ``n`` tokens earlier
    in the row, longest ``n`` first from ``max_n`` down to ``min_n``, and propose the ``k`` tokens
    that followed their most recent earlier occurrence. No model, no state. ``min_n`` 2 by default:
    a one-token match is weak evidence, and every wrong draft costs a rollback call."""

    needs_hidden = False

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise InputError(f"n-gram sizes {min_n}..{max_n} must satisfy 1 ≤ min ≤ max", fix="e.g. min 1, max 4")
        self.min_n, self.max_n = min_n, max_n

    def observe(self, hidden: Tensor | None, next_ids: Tensor, attention_mask: Tensor) -> None:
        pass

    def draft(self, history: list[list[int]], k: int) -> list[list[int]]:
        return [self._one(row, k) for row in history]

    def _one(self, row: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(row) - 1), self.min_n - 1, -1):
            suffix = row[-n:]
            for start in range(len(row) - n - 1, -1, -1):  # most recent earlier occurrence first
                if row[start : start + n] == suffix:
                    return row[start + n : start + n + k]
        return []


class ScriptedDrafter:
    """Drafts from the known greedy continuation, right or wrong on purpose, to prove the mechanism
    under chosen acceptance patterns (the tests and ``benchmarks/speculative.py``).

    Args:
        greedy: ``[B, n]`` the plain greedy tokens of the same prompt.
        pattern: ``"accept"`` (every draft right), ``"reject"`` (the first draft wrong),
            ``"alternate"`` (iterations alternate the two), ``"random"`` (right for a random number
            of tokens, then wrong, per row), ``"partial"`` (right, but a random number of tokens
            per row, zero included: partial drafts).
        prompt_lengths: Real tokens of each row's prompt (where ``greedy`` starts in ``history``).
        seed: For ``random`` / ``partial``.
        vocab: Vocabulary size (a wrong token is the right one + 1 mod ``vocab``).
    """

    needs_hidden = False
    PATTERNS = ("accept", "reject", "alternate", "random", "partial")

    def __init__(self, greedy: Tensor, pattern: str, prompt_lengths: Sequence[int], vocab: int, seed: int = 0) -> None:
        if pattern not in self.PATTERNS:
            raise InputError(f"draft pattern {pattern!r} is not one of {self.PATTERNS}")
        self.greedy = greedy.tolist()
        self.pattern, self.prompt_lengths, self.vocab = pattern, list(prompt_lengths), vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.iterations = 0

    def observe(self, hidden: Tensor | None, next_ids: Tensor, attention_mask: Tensor) -> None:
        pass

    def draft(self, history: list[list[int]], k: int) -> list[list[int]]:
        self.iterations += 1
        out = []
        for b, row in enumerate(history):
            done = len(row) - self.prompt_lengths[b]
            truth = self.greedy[b][done : done + k]
            right = len(truth)
            pattern = self.pattern if self.pattern != "alternate" else ("accept" if self.iterations % 2 else "reject")
            if pattern == "reject":
                right = 0
            elif pattern in ("random", "partial"):
                right = int(torch.randint(0, len(truth) + 1, (), generator=self.gen))
            drafted = truth[:right]
            if pattern != "partial" and right < len(truth):
                drafted.append((truth[right] + 1) % self.vocab)
            out.append(drafted)
        return out


class MtpHead(Protocol):
    """The MTP head on some runtime: zero states and one call (`hybridtrt.models.mtp.MTPHead.forward`)."""

    def zero_state(self, batch: int) -> Any:
        """The head's KV states before any position."""

    def __call__(self, hidden: Tensor, next_ids: Tensor, attention_mask: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """``(logits [B, L, V] fp32, out [B, L, hidden], new state)``; ``state`` is left as it was."""


class TorchMtpHead:
    """`MtpHead` on the PyTorch reference: ``head`` (`hybridtrt.models.mtp.MTPHead`) borrowing
    ``main``'s embedding table and LM head."""

    def __init__(self, main: Any, head: Any) -> None:
        self.main, self.head = main, head

    def zero_state(self, batch: int) -> Any:
        return self.head.new_cache(batch, self.main.dtype, self.main.device)

    @torch.no_grad()
    def __call__(self, hidden: Tensor, next_ids: Tensor, attention_mask: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        device = self.main.device
        return self.head(self.main, hidden.to(device), next_ids.to(device), attention_mask.to(device), state)


class MtpDrafter:
    """Drafts with the checkpoint's MTP head (`hybridtrt.models.mtp`), on the reference
    (`TorchMtpHead`) or ONNX Runtime (``mtp.onnx``: `hybridtrt.runtime.onnxruntime.OrtMtpHead`).

    The head keeps a KV cache over the main model's positions (head position ``t`` pairs the main
    model's ``h_t`` with token ``t + 1``, the same mask, holes included). `observe` runs the head on
    the committed positions; `draft` chains it ``k - 1`` more steps from the last real position of
    each row, on a copy of its cache that is then dropped (those positions are speculative; the next
    `observe` writes them from the verified hidden states).

    Args:
        head: An `MtpHead`; or, for the reference, the main model followed by its `MTPHead`.
    """

    needs_hidden = True

    def __init__(self, head: Any, mtp: Any = None) -> None:
        self.head: MtpHead = TorchMtpHead(head, mtp) if mtp is not None else head
        self.cache = None
        self.mask: Tensor | None = None
        self.out: Tensor | None = None  # [B, hidden]: the head's output at each row's last real position
        self.logits: Tensor | None = None  # [B, V]: its draft logits there
        self.model_calls = 0

    @torch.no_grad()
    def observe(self, hidden: Tensor | None, next_ids: Tensor, attention_mask: Tensor) -> None:
        if hidden is None:
            raise InputError(
                "the MTP drafter needs the main model's hidden states, which this backend does not return",
                fix="export with `hybridtrt export CHECKPOINT --speculative`, or use --speculative ngram",
            )
        b = next_ids.shape[0]
        if self.cache is None:
            self.cache = self.head.zero_state(b)
        logits, out, self.cache = self.head(hidden, next_ids, attention_mask, self.cache)
        self.model_calls += 1
        self.mask = attention_mask.long().cpu()
        new = attention_mask[:, -next_ids.shape[1] :].long().cpu()
        last = (new * torch.arange(new.shape[1])).argmax(1)  # each row's last real new position
        rows = torch.arange(b)
        self.out, self.logits = out[rows, last], logits[rows, last]

    @torch.no_grad()
    def draft(self, history: list[list[int]], k: int) -> list[list[int]]:
        if k == 0 or self.logits is None:
            return [[] for _ in history]
        tokens = [self.logits.argmax(-1).cpu()]
        cache, mask, out = self.cache, self.mask, self.out
        for _ in range(k - 1):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            logits, hidden, cache = self.head(out[:, None], tokens[-1][:, None], mask, cache)
            self.model_calls += 1
            out = hidden[:, 0]
            tokens.append(logits[:, 0].argmax(-1).cpu())
        return torch.stack(tokens, 1).tolist()


def _is_kv(name: str) -> bool:
    return name.endswith(".key") or name.endswith(".value")


def merge_rows(backend: Verifier, target: Any, rows: list[int], replayed: Any, past: int, count: int) -> None:
    """Rows ``rows`` of state ``target`` (a verify call's) from ``replayed`` (their replay): every
    conv/SSM state, and the KV of the ``count`` replayed positions after ``past``. A backend whose
    layout differs (a static cache) has a ``merge_rows`` method of its own."""
    arrays = backend.state_arrays(target)
    for name, value in backend.state_arrays(replayed).items():
        if _is_kv(name):
            arrays[name][rows, :, past : past + count] = value[:, :, past : past + count]
        else:
            arrays[name][rows] = value


def growing_cache_positions(prompt: int, new_tokens: int, draft_len: int) -> int:
    """Cache positions a speculative generation may reach on a growing KV cache: rejected drafts
    stay as holes, up to ``draft_len + 1`` positions per emitted token."""
    return prompt + max(new_tokens - 1, 0) * (draft_len + 1)


def rollback(backend: Verifier, before: Any, after: Any, ids: Tensor, mask: Tensor, accepted: Tensor, hidden: Tensor | None, stats: SpeculationStats) -> Any:
    """``after`` (the verify call's state) with every row that rejected a draft set to its state
    before the call plus its accepted positions replayed (see the module docstring).

    Args:
        before: The state before the verify call (``past`` positions).
        after: The verify call's state; written in place and returned.
        ids: ``[B, K + 1]`` the verify call's tokens.
        mask: ``[B, past]`` the mask before the call.
        accepted: ``[B]`` drafts accepted per row (``a``); rows with ``a < K`` are replayed.
        hidden: The verify call's hidden states ``[B, K + 1, D]`` (the replay's replace them), or None.
    """
    k = ids.shape[1] - 1
    past = mask.shape[1]
    merge = getattr(backend, "merge_rows", None) or partial(merge_rows, backend)
    counts = accepted.tolist()
    for a in sorted({x for x in counts if x < k}):
        rows = [b for b, x in enumerate(counts) if x == a]
        sub_mask = torch.cat([mask[rows], torch.ones(len(rows), a + 1, dtype=mask.dtype)], dim=1)
        _, replay_hidden, replayed = backend.verify(ids[rows, : a + 1], sub_mask, backend.select_rows(before, rows))
        stats.replay_calls += 1
        merge(after, rows, replayed, past, a + 1)
        if hidden is not None and replay_hidden is not None:
            hidden[rows, : a + 1] = replay_hidden.to(hidden.dtype)
    return after


def _prefill_verify(backend: Any, ids: Tensor, mask: Tensor, state: Any, chunk: int) -> tuple[Tensor, Tensor | None, Any]:
    """The prompt prefilled as `hybridtrt.runtime.generation.prefill` does (its chunks and the
    backend's memory cap), through `Verifier.verify` so that every position's hidden state is kept
    for an MTP drafter: last-position logits ``[B, V]``, hidden ``[B, L, D]`` (or None), state."""
    hiddens = []

    def call(chunk_ids: Tensor, chunk_mask: Tensor, chunk_state: Any) -> tuple[Tensor, Any]:
        all_logits, hidden, new = backend.verify(chunk_ids, chunk_mask, chunk_state)
        hiddens.append(hidden)
        return all_logits[:, -1], new

    logits, state = prefill(backend, ids, mask, state, chunk, call)
    hidden = torch.cat(hiddens, dim=1) if all(h is not None for h in hiddens) else None
    return logits, hidden, state


def iter_speculative(
    backend: Any,
    drafter: Drafter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    draft_len: int = DEFAULT_DRAFT_LEN,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    prefill_chunk: int | None = None,
    stats: SpeculationStats | None = None,
    on_step: Callable[[Tensor, Tensor], None] | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row (``[B]``), as `hybridtrt.runtime.generation.iter_generate`
    does with greedy sampling, computed speculatively (module docstring). ``on_step`` is called with
    each column and the ``[B, V]`` logits that chose it.

    Raises:
        InputError: A draft length outside ``0..MAX_DRAFT_LEN``, a backend without `Verifier`, or
            what `iter_generate` refuses.
    """
    if not (isinstance(draft_len, int) and 0 <= draft_len <= MAX_DRAFT_LEN):
        raise InputError(f"--draft-len {draft_len} must be an integer in 0..{MAX_DRAFT_LEN}", fix=f"NVIDIA's Nemotron-3 recipes draft {DEFAULT_DRAFT_LEN}")
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens {max_new_tokens} must be ≥ 0", fix="e.g. --max-new-tokens 32")
    why = getattr(backend, "cannot_verify", lambda: None)()
    if why is not None or not hasattr(backend, "verify"):
        raise InputError(
            f"{type(backend).__name__} cannot run speculative decoding: {why or 'it has no verify call'}",
            fix="use the reference (a checkpoint directory) or ONNX Runtime on an export made with `hybridtrt export CHECKPOINT --speculative`",
        )
    stats = stats if stats is not None else SpeculationStats()
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    chunk_bounds(1, chunk)
    ids, mask = check_prompt(backend, input_ids, attention_mask)
    batch = ids.shape[0]
    check = getattr(backend, "check_request", None)
    if check is not None:
        positions = getattr(backend, "speculation_positions", None)
        # Rejected drafts leave holes in a growing cache: at most K + 1 positions per emitted token.
        need = (positions or growing_cache_positions)(mask.shape[1], max_new_tokens, draft_len)
        check(batch, need, chunk)
    if max_new_tokens == 0:
        return
    stats.rows = batch
    state = backend.zero_state(batch)
    if drafter.needs_hidden:
        logits, hidden, state = _prefill_verify(backend, ids, mask, state, chunk)
    else:
        (logits, state), hidden = prefill(backend, ids, mask, state, chunk), None
    pending = logits.argmax(-1)  # [B]: emitted, not yet fed to the main model
    drafter.observe(hidden, torch.cat([ids[:, 1:], pending[:, None]], dim=1), mask)
    # Each row's real tokens: its prompt, then from ``starts[b]`` on, what it emitted.
    history = [[int(t) for t, m in zip(row, row_mask) if m] + [int(p)] for row, row_mask, p in zip(ids.tolist(), mask.tolist(), pending.tolist())]
    starts = [len(row) - 1 for row in history]
    chose = [[row] for row in logits] if on_step is not None else None  # the logits behind each emitted token
    finished = torch.zeros(batch, dtype=torch.bool)
    yielded = 0
    while True:
        # Yield every column every row has produced; rows past their EOS give pad_token_id.
        while yielded < max_new_tokens and all(len(row) > start + yielded for row, start in zip(history, starts)):
            column = torch.tensor([row[start + yielded] for row, start in zip(history, starts)])
            column = torch.where(finished, torch.full_like(column, pad_token_id), column)
            if on_step is not None:
                on_step(column, torch.stack([row[yielded] for row in chose]))
            if eos_token_id is not None:
                finished |= column == eos_token_id
            yielded += 1
            yield column
            if eos_token_id is not None and bool(finished.all()):
                return
        if yielded >= max_new_tokens:
            return
        need = max_new_tokens - min(len(row) - start for row, start in zip(history, starts))
        k = min(draft_len, need - 1) if need > 1 else 0
        drafts = drafter.draft(history, k) if k else [[] for _ in range(batch)]
        drafts = [d[:k] for d in drafts]
        lengths = torch.tensor([len(d) for d in drafts])
        k = int(lengths.max()) if batch else 0
        filler = pad_token_id
        draft_ids = torch.tensor([d + [filler] * (k - len(d)) for d in drafts], dtype=torch.long).reshape(batch, k)
        verify_ids = torch.cat([pending[:, None], draft_ids], dim=1)  # [B, k + 1]
        verify_mask = torch.cat([mask, torch.ones(batch, k + 1, dtype=mask.dtype)], dim=1)
        if k == 0 and not drafter.needs_hidden:  # nothing drafted: a plain decode step
            step_logits, new_state = backend.step(verify_ids, verify_mask, state, decode=True)
            all_logits, hidden = step_logits[:, None], None
        else:
            all_logits, hidden, new_state = backend.verify(verify_ids, verify_mask, state)
        stats.verify_calls += 1
        greedy = all_logits.argmax(-1)  # [B, k + 1]
        right = (draft_ids == greedy[:, :k]) & (torch.arange(k)[None] < lengths[:, None])
        accepted = right.long().cumprod(dim=1).sum(dim=1)  # [B]
        if bool((accepted < k).any()):
            new_state = rollback(backend, state, new_state, verify_ids, mask, accepted, hidden, stats)
        state = new_state
        kept = torch.arange(k + 1)[None] <= accepted[:, None]  # [B, k + 1]
        mask = torch.cat([mask, kept.to(mask.dtype)], dim=1)
        rows = torch.arange(batch)
        pending = greedy[rows, accepted]
        drafter.observe(hidden, greedy, mask)
        stats.draft_calls = getattr(drafter, "model_calls", 0)
        stats.drafted += int(lengths.sum())
        stats.accepted += int(accepted.sum())
        for b in range(batch):
            new = greedy[b, : int(accepted[b]) + 1].tolist()
            history[b].extend(new)
            if chose is not None:
                chose[b].extend(all_logits[b, : len(new)])


def generate_speculative(
    backend: Any,
    drafter: Drafter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    stats: SpeculationStats | None = None,
    keep_logits: bool = False,
    **kwargs: Any,
) -> GenerationResult:
    """`iter_speculative` collected like `hybridtrt.runtime.generation.generate` (greedy only;
    ``keep_logits``: the logits that chose each token, as `generate` keeps them)."""
    stats = stats if stats is not None else SpeculationStats()

    def stream(on_step: Callable[[Tensor, Tensor], None]) -> Iterator[Tensor]:
        return iter_speculative(backend, drafter, input_ids, attention_mask, max_new_tokens=max_new_tokens, stats=stats, on_step=on_step, **kwargs)

    return collect(stream, input_ids.shape[0], keep_logits)
