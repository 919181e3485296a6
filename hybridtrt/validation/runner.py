"""Compare a backend with a reference on the same inputs (DESIGN.md §8).

Phases: the prefill (last-token logits and every present state), optionally each decoder layer's
output and states (``per_layer``: names the first layer and state that diverges), N decode steps
teacher-forced with the reference's greedy tokens (logits per step, final states), and a
free-running greedy generation of the backend (token agreement).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hybridtrt.errors import InputError
from hybridtrt.runtime.generation import left_pad
from hybridtrt.validation.metrics import Comparison, compare
from hybridtrt.validation.subjects import Subject
from hybridtrt.validation.tolerances import gate

_LAYER_OF = re.compile(r"(?:layer_output|present_conv_state|present_ssm_state)\.(\d+)$|^present\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer index of an output name, or None (``logits``)."""
    m = _LAYER_OF.search(name)
    if not m:
        return None
    return int(m.group(1) or m.group(2))


@dataclass
class Check:
    """One compared tensor."""

    phase: str  # "prefill" | "layer" | "decode"
    name: str
    comparison: Comparison
    failures: list[str]
    step: int | None = None
    layer: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Report:
    """Everything a validation found; `passed` is the verdict."""

    backend: str
    reference: str
    precision: str
    batch: int
    prompt_lengths: list[int]
    steps: int
    checks: list[Check] = field(default_factory=list)
    token_agreement: float | None = None
    teacher_forced_top1: float | None = None
    first_divergence: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pattern: str = ""  # layer kinds (M * -), for labels

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        token_gate = gate(self.precision, "steps").min_token_agreement
        tokens_ok = token_gate is None or self.token_agreement is None or self.token_agreement >= token_gate
        return not self.failures and tokens_ok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["checks"] = [
            {**{k: v for k, v in asdict(c).items() if k != "comparison"}, **c.comparison.to_dict(), "passed": c.passed}
            for c in self.checks
        ]
        return d


def real_positions(named: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, Any]:
    """States with the KV rows of left-padding positions zeroed (DESIGN.md §4: never read, so
    backends may hold anything there; HF and our graphs do differ). Other states unchanged."""
    keep = attention_mask.bool()
    out = {}
    for name, t in named.items():
        if name.endswith((".key", ".value")):
            t = torch.as_tensor(t)
            t = t * keep[:, None, : t.shape[2], None].to(t.device, t.dtype)
        out[name] = t
    return out


def _timed(timings: dict[str, float], key: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
    return result


def _check(report: Report, phase: str, name: str, got: Any, ref: Any, kind: str, **where: Any) -> Check:
    """Compare one tensor; present states use the precision's ``state`` gate in every phase."""
    c = compare(got, ref, top1=name == "logits")
    if name.startswith("present"):
        kind = "state"
    check = Check(phase, name, c, gate(report.precision, kind).failures(c), **where)
    report.checks.append(check)
    return check


def validate(
    backend: Subject,
    reference: Subject,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    precision: str,
    steps: int = 8,
    per_layer: bool = False,
) -> Report:
    """Run both subjects on the same left-padded batch and compare.

    Args:
        backend: The artefact under test.
        reference: What it must match.
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]``.
        precision: Key of the tolerance table (``fp32 | fp16 | bf16 | fp8``).
        steps: Decode steps (teacher-forced and free-running).
        per_layer: Compare each decoder layer's output and states; both subjects must expose them.

    Returns:
        The `Report`.
    """
    batch = input_ids.shape[0]
    report = Report(
        backend=backend.name,
        reference=reference.name,
        precision=precision,
        batch=batch,
        prompt_lengths=[int(x) for x in attention_mask.sum(1)],
        steps=steps,
    )
    t = report.timings

    # Prefill.
    ref_logits, ref_state = _timed(t, "reference_s", reference.stepper.step, input_ids, attention_mask, reference.stepper.zero_state(batch), False)
    got_logits, got_state = _timed(t, "backend_s", backend.stepper.step, input_ids, attention_mask, backend.stepper.zero_state(batch), False)
    _check(report, "prefill", "logits", got_logits, ref_logits, "call")
    ref_named, got_named = (real_positions(n(s), attention_mask) for n, s in ((reference.named_states, ref_state), (backend.named_states, got_state)))
    for name in ref_named:
        _check(report, "prefill", name, got_named[name], ref_named[name], "call", layer=layer_of(name))

    # Per layer: outputs and states, in layer order; name the first that diverges.
    if per_layer:
        if backend.layer_outputs is None or reference.layer_outputs is None:
            missing = backend.name if backend.layer_outputs is None else reference.name
            raise InputError(
                f"--per-layer needs each layer's output from {missing}",
                fix="re-export with `hybridtrt export ... --per-layer` (adds layer_output.{i} graph outputs)",
            )
        ref_layers = _timed(t, "reference_s", reference.layer_outputs, input_ids, attention_mask)
        got_layers = _timed(t, "backend_s", backend.layer_outputs, input_ids, attention_mask)
        by_layer: dict[int, list[tuple[str, Any, Any]]] = {}
        for name in ref_layers:
            by_layer.setdefault(layer_of(name), []).append((name, got_layers[name], ref_layers[name]))
        for name in ref_named:
            by_layer.setdefault(layer_of(name), []).append((name, got_named[name], ref_named[name]))
        for layer in sorted(by_layer):
            for name, got, ref in by_layer[layer]:
                check = _check(report, "layer", name, got, ref, "layer", layer=layer)
                if not check.passed and report.first_divergence is None:
                    report.first_divergence = {"layer": layer, "tensor": name, "why": check.failures}

    # Decode, teacher-forced with the reference's greedy tokens.
    ref_tokens = [ref_logits.argmax(-1)]
    agree = [float((got_logits.argmax(-1) == ref_tokens[0]).float().mean())]
    mask = attention_mask
    for k in range(steps):
        token = ref_tokens[-1][:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        ref_logits, ref_state = _timed(t, "reference_s", reference.stepper.step, token, mask, ref_state, True)
        got_logits, got_state = _timed(t, "backend_s", backend.stepper.step, token, mask, got_state, True)
        _check(report, "decode", "logits", got_logits, ref_logits, "steps", step=k + 1)
        ref_tokens.append(ref_logits.argmax(-1))
        agree.append(float((got_logits.argmax(-1) == ref_tokens[-1]).float().mean()))
    if steps:
        ref_named, got_named = (real_positions(n(s), mask) for n, s in ((reference.named_states, ref_state), (backend.named_states, got_state)))
        for name in ref_named:
            _check(report, "decode", name, got_named[name], ref_named[name], "steps", step=steps, layer=layer_of(name))
    report.teacher_forced_top1 = sum(agree) / len(agree)

    # Free-running greedy generation of the backend vs the reference's greedy tokens.
    from hybridtrt.runtime.generation import generate

    free = _timed(t, "backend_s", generate, backend.stepper, input_ids, attention_mask, max_new_tokens=steps + 1)
    expected = torch.stack(ref_tokens, dim=1)
    report.token_agreement = float((free.tokens == expected).float().mean())
    return report


def random_prompts(n: int, vocab: int, *, seed: int = 0, min_len: int = 4, max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences of varied lengths, left-padded: ``(ids [n, L], mask [n, L])``."""
    if n < 1:
        raise InputError(f"--random needs N ≥ 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    lengths[0] = max_len
    return pad_left([torch.randint(0, vocab, (m,), generator=gen).tolist() for m in lengths])


def pad_left(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a batch: ``(ids, mask)``."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("every prompt must have at least one token")
    return left_pad(sequences, pad_id)
