"""Compare a backend with a reference on the same inputs (DESIGN.md §8).

`validate` runs the phases in `PHASES`, in order, on one shared `Run`: the prefill (last-token
logits and every present state), per layer (``per_layer``: each decoder layer's states and output,
naming the first that diverges in layer order), N decode steps teacher-forced with the reference's
greedy tokens (logits per step, final states), and a free-running greedy generation of the backend
(token agreement). A new kind of check is a new phase appended to `PHASES` (or passed to
`validate`), not a branch in here.

An optional *yardstick* subject (`hybridtrt.judge.tolerances`: an fp64 run for fp32 artefacts,
the same-dtype reference for fp16/bf16) runs beside the backend on the same inputs; each check
records how far the yardstick is from the reference on that tensor, and the gate allows a multiple
of it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hybridtrt.errors import InputError
from hybridtrt.runtime.generation import left_pad
from hybridtrt.judge.metrics import Comparison, compare
from hybridtrt.judge.routing import RoutingTally, flips, judge_tallies, routing_gate
from hybridtrt.models.moe import RoutingHold
from hybridtrt.validation.preflight import check_counts
from hybridtrt.validation.subjects import Subject
from hybridtrt.judge.tolerances import gate

_LAYER_OF = re.compile(r"(?:layer_output|present_conv_state|present_ssm_state)\.(\d+)$|^present\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer index of an output name, or None (``logits``)."""
    m = _LAYER_OF.search(name)
    if not m:
        return None
    return int(m.group(1) or m.group(2))


def is_state(name: str) -> bool:
    """``present_*`` outputs are states (conv, SSM, KV); they use the precision's ``state`` gate."""
    return name.startswith("present")


@dataclass
class Check:
    """One compared tensor."""

    phase: str  # "prefill" | "layer" | "decode" | any phase's own name
    name: str
    comparison: Comparison
    failures: list[str]
    step: int | None = None
    layer: int | None = None
    #: The yardstick's comparison with the reference on this tensor (when a yardstick ran).
    yardstick: Comparison | None = None
    #: The rel L2 the gate allowed (None: not gated by rel L2).
    allowed: float | None = None

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
    #: MoE layer -> fraction of the backend's own (token, k) expert choices that are the reference's,
    #: with its routing held to the reference's (`hybridtrt.judge.routing`).
    routing_agreement: dict[int, float] = field(default_factory=dict)
    #: MoE layer -> ``{"flipped", "choices", "yardstick_flipped", "yardstick_choices", "allowed"}``.
    routing: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Why an MoE layer's choices fail the routing gate, one line each.
    routing_failures: list[str] = field(default_factory=list)
    #: Whose expert choices the other runs were held to: ``"reference"``, or ``"backend"`` for
    #: outputs recorded elsewhere (the reference is held to the recording's).
    routing_held_to: str = "reference"
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pattern: str = ""  # layer kinds (M * -), for labels
    #: Extra analyses attached by name (e.g. ``"sensitivity"``: `hybridtrt.validation.sensitivity`).
    extras: dict[str, Any] = field(default_factory=dict)
    #: Name of the yardstick run (``"pytorch-fp64"``, ``"pytorch-fp16"``...), None without one.
    yardstick: str | None = None
    #: The yardstick's teacher-forced top-1 agreement with the reference's greedy tokens.
    yardstick_top1: float | None = None
    #: FP8 artefacts: what the recipe costs, the FP8 reference against the unquantized truth
    #: (precision ``fp8-recipe``); part of the verdict.
    quality: Report | None = None

    def judge_routing(self, tallies: dict[int, RoutingTally], held_to: str = "reference") -> None:
        """Gate the MoE layers' tallied expert choices (`hybridtrt.judge.routing`) into `routing`,
        `routing_failures` and `routing_agreement`."""
        self.routing, self.routing_failures = judge_tallies(routing_gate(self.precision), tallies)
        self.routing_agreement = {layer: 1.0 - tally.fraction for layer, tally in sorted(tallies.items())}
        self.routing_held_to = held_to

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def token_gate_waived(self) -> bool:
        """The precision gates token agreement, but the yardstick itself disagreed on a
        teacher-forced token: the prompts sit on near-ties, so agreement is reported, not gated."""
        has_gate = gate(self.precision, "steps").min_token_agreement is not None
        return has_gate and self.yardstick_top1 is not None and self.yardstick_top1 < 1.0

    @property
    def token_gate(self) -> float | None:
        """The greedy-token agreement required (None: not gated)."""
        return None if self.token_gate_waived else gate(self.precision, "steps").min_token_agreement

    @property
    def passed(self) -> bool:
        token_gate = self.token_gate
        tokens_ok = token_gate is None or self.token_agreement is None or self.token_agreement >= token_gate
        return not self.failures and tokens_ok and not self.routing_failures and (self.quality is None or self.quality.passed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["checks"] = [
            {
                **{k: v for k, v in asdict(c).items() if k not in ("comparison", "yardstick")},
                **c.comparison.to_dict(),
                "yardstick_rel_l2": None if c.yardstick is None else c.yardstick.rel_l2,
                "passed": c.passed,
            }
            for c in self.checks
        ]
        d["extras"] = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in self.extras.items()}
        d["quality"] = None if self.quality is None else self.quality.to_dict()
        return d


_KV_STATE = re.compile(r"^present\.\d+\.(key|value)$")


def real_positions(name: str, tensor: Any, attention_mask: torch.Tensor) -> Any:
    """The part of a state that the contract defines.

    KV rows of left-padding positions are never read: their content is backend-specific (ours are
    zero, HF keeps garbage there), so a KV state ``[B, H_kv, past+L, D]`` is compared at real
    positions only, flattened. Other tensors are returned as they are.
    """
    if not _KV_STATE.match(name) or tuple(tensor.shape)[2:3] != (attention_mask.shape[1],):
        return tensor
    array = tensor.detach().cpu().float().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor, dtype=np.float32)
    keep = attention_mask.bool().cpu().numpy()
    return np.concatenate([array[b][:, keep[b]].reshape(-1) for b in range(array.shape[0])])


def check(
    report: Report, phase: str, name: str, got: Any, ref: Any, kind: str, mask: Any = None, yard: Any = None, **where: Any
) -> Check:
    """Compare one tensor and record it; present states use the precision's ``state`` gate.
    With ``mask`` (the attention mask of the call), KV states are compared at real positions; with
    ``yard`` (the yardstick's value of the same tensor) the gate scales with the yardstick's error."""
    if mask is not None:
        mask = torch.as_tensor(np.asarray(mask))
        got, ref = real_positions(name, got, mask), real_positions(name, ref, mask)
        yard = None if yard is None else real_positions(name, yard, mask)
    c = compare(got, ref, top1=name == "logits")
    y = None if yard is None else compare(yard, ref)
    g = gate(report.precision, "state" if is_state(name) else kind)
    result = Check(phase, name, c, g.failures(c, y), yardstick=y, allowed=g.bound(y), **where)
    report.checks.append(result)
    return result


def compare_layers(
    report: Report,
    tensors: Iterable[tuple[str, Any, Any] | tuple[str, Any, Any, Any]],
    *,
    phase: str = "layer",
    step: int | None = None,
    mask: Any = None,
) -> None:
    """Check per-layer tensors ``(name, got, ref[, yardstick])`` in layer order and name the first divergence.

    Within a layer its states come before its output (the mixer writes the states, the residual add
    closes the layer), so a wrong state is named rather than the output it spoils. The first
    failing tensor in that order — not the worst — becomes ``report.first_divergence`` (unless an
    earlier call set it).
    """
    ordered = sorted(tensors, key=lambda t: (layer_of(t[0]), not is_state(t[0])))
    for name, got, ref, *yard in ordered:
        layer = layer_of(name)
        result = check(report, phase, name, got, ref, "layer", mask=mask, yard=yard[0] if yard else None, layer=layer, step=step)
        if not result.passed and report.first_divergence is None:
            report.first_divergence = {"layer": layer, "tensor": name, "why": result.failures, "step": step}


def _timed(timings: dict[str, float], key: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
    return result


@dataclass
class Run:
    """What the phases share: the subjects, the inputs, the report and the prefill's results."""

    backend: Subject
    reference: Subject
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    steps: int
    per_layer: bool
    report: Report
    #: A second PyTorch run whose distance from the reference scales the gates (None: floors only).
    yardstick: Subject | None = None
    #: Hold the backend's and the yardstick's MoE routing to the reference's (every subject can).
    hold_routing: bool = False
    #: The reference's expert choices of its last call, ``{MoE layer: [B, L, K]}``.
    truth_routing: dict[int, torch.Tensor] = field(default_factory=dict)
    tallies: dict[int, RoutingTally] = field(default_factory=dict)
    ref_logits: torch.Tensor | None = None
    got_logits: torch.Tensor | None = None
    yard_logits: torch.Tensor | None = None
    ref_state: Any = None
    got_state: Any = None
    yard_state: Any = None
    ref_tokens: list[torch.Tensor] = field(default_factory=list)
    #: Per-layer outputs a subject's prefill gave in the same pass (`Subject.prefill_with_layers`).
    prefill_layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    def call(self, who: str, *args: Any) -> Any:
        """One timed ``step`` of ``"reference"``, ``"backend"`` or ``"yardstick"``; with routing held,
        the reference's own choices are recorded and the others are held to them and tallied. The
        prefill of the run's prompts keeps its per-layer outputs when they will be compared and
        the subject gives them from the same pass (`layers` then runs nothing)."""
        subject = self.subject(who)
        ids, mask, state, decode = args
        fused = self.per_layer and not decode and ids is self.input_ids and ids.shape[1] > 1 and subject.prefill_with_layers is not None
        with self.held(who) as hold:
            if fused:
                *out, self.prefill_layers[who] = _timed(self.report.timings, f"{who}_s", subject.prefill_with_layers, ids, mask, state)
                out = tuple(out)
            else:
                out = _timed(self.report.timings, f"{who}_s", subject.stepper.step, *args)
        if hold is not None and who != "reference":
            real = mask[:, -ids.shape[1] :].bool()
            for layer, truth in self.truth_routing.items():
                tally = self.tallies.setdefault(layer, RoutingTally())
                counted = flips(hold.ids(layer), truth, real)
                if who == "backend":
                    tally.add(counted)
                else:
                    tally.add_yardstick(counted)
        return out

    def call_at_once(self, who: str, tokens: torch.Tensor, mask: torch.Tensor, state: Any) -> Any:
        """``who``'s teacher-forced decode steps ``tokens [B, n]`` in one timed call
        (`Subject.decode_at_once`: subjects without MoE layers, so no routing to hold)."""
        if self.hold_routing:
            raise AssertionError(f"{who}: decode steps at once need a subject without MoE layers (routing is held call by call)")
        return _timed(self.report.timings, f"{who}_s", self.subject(who).decode_at_once, tokens, mask, state)

    def subject(self, who: str) -> Subject:
        return {"reference": self.reference, "backend": self.backend, "yardstick": self.yardstick}[who]

    @contextlib.contextmanager
    def held(self, who: str) -> Iterator[RoutingHold | None]:
        """Run ``who`` with its routing recorded (the reference) or held to the reference's last
        choices (the others); nothing when routing is not held."""
        if not self.hold_routing:
            yield None
            return
        hold = RoutingHold() if who == "reference" else RoutingHold(self.truth_routing)
        with self.subject(who).hold(hold):
            yield hold
        if who == "reference":
            self.truth_routing = hold.all_ids()

    def layers(self, who: str, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """``who``'s per-layer outputs of the prompts (timed), routing held like its calls; those
        its prefill gave when it had them."""
        if who in self.prefill_layers and ids is self.input_ids:
            return self.prefill_layers.pop(who)
        with self.held(who):
            return _timed(self.report.timings, f"{who}_s", self.subject(who).layer_outputs, ids, mask)

    def yard_named(self, state: Any) -> dict[str, Any]:
        """The yardstick's states by name (empty without a yardstick)."""
        return {} if self.yardstick is None else self.yardstick.named_states(state)


#: A phase adds checks (and notes) to ``run.report``.
Phase = Callable[[Run], None]


def prefill_phase(run: Run) -> None:
    """Last-token logits and every present state after the prefill from zero states."""
    r = run.report
    run.ref_logits, run.ref_state = run.call("reference", run.input_ids, run.attention_mask, run.reference.stepper.zero_state(run.batch), False)
    run.got_logits, run.got_state = run.call("backend", run.input_ids, run.attention_mask, run.backend.stepper.zero_state(run.batch), False)
    if run.yardstick is not None:
        zero = run.yardstick.stepper.zero_state(run.batch)
        run.yard_logits, run.yard_state = run.call("yardstick", run.input_ids, run.attention_mask, zero, False)
    check(r, "prefill", "logits", run.got_logits, run.ref_logits, "call", yard=run.yard_logits)
    ref_named, got_named = run.reference.named_states(run.ref_state), run.backend.named_states(run.got_state)
    yard_named = run.yard_named(run.yard_state)
    for name in ref_named:
        check(r, "prefill", name, got_named[name], ref_named[name], "call", mask=run.attention_mask, yard=yard_named.get(name), layer=layer_of(name))


def per_layer_phase(run: Run) -> None:
    """Each decoder layer's states and output, in layer order; names the first that diverges.

    A subject that cannot expose a layer's output (a TensorRT engine, a layer another tool renamed)
    is compared by its states for that layer, and the report says which and why.
    """
    if not run.per_layer:
        return
    r = run.report
    yard = dict(run.yard_named(run.yard_state))
    tensors = {name: (got, ref) for name, got, ref in _named_pairs(run.backend.named_states(run.got_state), run.reference.named_states(run.ref_state))}
    for subject in (run.backend, run.reference):
        r.notes.extend(f"{subject.name}: {note}" for note in subject.layer_notes)
    if run.backend.layer_outputs is not None and run.reference.layer_outputs is not None:
        ref_layers = run.layers("reference", run.input_ids, run.attention_mask)
        got_layers = run.layers("backend", run.input_ids, run.attention_mask)
        if run.yardstick is not None and run.yardstick.layer_outputs is not None:
            yard.update(run.layers("yardstick", run.input_ids, run.attention_mask))
        tensors.update({name: (got, ref) for name, got, ref in _named_pairs(got_layers, ref_layers)})
    else:
        lacking = run.backend if run.backend.layer_outputs is None else run.reference
        r.notes.append(f"per-layer: {lacking.name} exposes no layer outputs, so layers are compared by their states only")
    compare_layers(r, [(name, got, ref, yard.get(name)) for name, (got, ref) in tensors.items()], mask=run.attention_mask)


def _named_pairs(got: dict[str, Any], ref: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, got, ref)`` for the names both sides have."""
    return [(name, got[name], ref[name]) for name in ref if name in got]


def decode_phase(run: Run) -> None:
    """N decode steps teacher-forced with the reference's greedy tokens; logits per step, final states."""
    r = run.report
    run.ref_tokens = [run.ref_logits.argmax(-1)]
    agree = [float((run.got_logits.argmax(-1) == run.ref_tokens[0]).float().mean())]
    yard_agree = [] if run.yard_logits is None else [float((run.yard_logits.argmax(-1) == run.ref_tokens[0]).float().mean())]
    mask = run.attention_mask
    ref_state, got_state, yard_state = run.ref_state, run.got_state, run.yard_state
    # An exact yardstick (fp64) runs the steps in one call once the reference has chosen every
    # token: the same numbers to ~1e-15, at the cost of about one step instead of `steps`.
    at_once = run.yardstick is not None and run.yardstick.decode_at_once is not None and run.steps > 0
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    for _ in range(run.steps):
        token = run.ref_tokens[-1][:, None]
        mask = torch.cat([mask, torch.ones(run.batch, 1, dtype=mask.dtype)], dim=1)
        ref_logits, ref_state = run.call("reference", token, mask, ref_state, True)
        got_logits, got_state = run.call("backend", token, mask, got_state, True)
        yard_logits = None
        if run.yardstick is not None and not at_once:
            yard_logits, yard_state = run.call("yardstick", token, mask, yard_state, True)
        steps.append((ref_logits, got_logits, yard_logits))
        run.ref_tokens.append(ref_logits.argmax(-1))
    if at_once:
        tokens = torch.stack(run.ref_tokens[: run.steps], dim=1)  # [B, steps]: the tokens the steps fed
        yard_all, yard_state = run.call_at_once("yardstick", tokens, mask, yard_state)
        steps = [(ref_logits, got_logits, yard_all[:, k]) for k, (ref_logits, got_logits, _) in enumerate(steps)]
    for k, (ref_logits, got_logits, yard_logits) in enumerate(steps):
        check(r, "decode", "logits", got_logits, ref_logits, "steps", yard=yard_logits, step=k + 1)
        agree.append(float((got_logits.argmax(-1) == run.ref_tokens[k + 1]).float().mean()))
        if yard_logits is not None:
            yard_agree.append(float((yard_logits.argmax(-1) == run.ref_tokens[k + 1]).float().mean()))
    if run.steps:
        ref_named, got_named = run.reference.named_states(ref_state), run.backend.named_states(got_state)
        yard_named = run.yard_named(yard_state)
        for name in ref_named:
            check(r, "decode", name, got_named[name], ref_named[name], "steps", mask=mask, yard=yard_named.get(name), step=run.steps, layer=layer_of(name))
    r.teacher_forced_top1 = sum(agree) / len(agree)
    if yard_agree:
        r.yardstick_top1 = sum(yard_agree) / len(yard_agree)


def free_running_phase(run: Run) -> None:
    """Free-running greedy generation of the backend vs the reference's greedy tokens."""
    from hybridtrt.runtime.generation import generate

    free = _timed(run.report.timings, "backend_s", generate, run.backend.stepper, run.input_ids, run.attention_mask, max_new_tokens=run.steps + 1)
    expected = torch.stack(run.ref_tokens, dim=1)
    run.report.token_agreement = float((free.tokens == expected).float().mean())


def routing_phase(run: Run) -> None:
    """Judge the backend's own MoE expert choices (tallied over every held call) against the
    reference's, per layer, with the yardstick's as the scale (`hybridtrt.judge.routing`)."""
    if run.tallies:
        run.report.judge_routing(run.tallies)


#: The phases of `validate`, in order.
PHASES: list[Phase] = [prefill_phase, per_layer_phase, decode_phase, free_running_phase, routing_phase]


def validate(
    backend: Subject,
    reference: Subject,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    precision: str,
    steps: int = 8,
    per_layer: bool = False,
    phases: Sequence[Phase] | None = None,
    yardstick: Subject | None = None,
) -> Report:
    """Run both subjects on the same left-padded batch and compare.

    Args:
        backend: The artefact under test.
        reference: What it must match.
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]``.
        precision: Key of the tolerance table (``fp32 | fp16 | bf16 | fp8``).
        steps: Decode steps (teacher-forced and free-running), ≥ 0.
        per_layer: Compare each decoder layer's states and output (its output where the subjects
            expose it).
        phases: The phases to run (default `PHASES`).
        yardstick: A PyTorch run in the precision's yardstick dtype (`tolerances.yardstick_of`);
            the gates allow a multiple of its distance from ``reference`` on every tensor.

    Returns:
        The `Report`.
    """
    check_counts(steps=steps)
    report = Report(
        backend=backend.name,
        reference=reference.name,
        precision=precision,
        batch=int(input_ids.shape[0]),
        prompt_lengths=[int(x) for x in attention_mask.sum(1)],
        steps=steps,
        yardstick=None if yardstick is None else yardstick.name,
    )
    subjects = [backend, reference] + ([yardstick] if yardstick is not None else [])
    moe = bool(reference.moe_layers or backend.moe_layers)
    hold = moe and all(s.hold is not None for s in subjects)
    if moe and not hold:
        lacking = ", ".join(s.name for s in subjects if s.hold is None)
        report.notes.append(
            f"MoE routing is not held ({lacking} cannot take held expert ids): each run chooses its own experts, so a "
            "choice that flips on a near-tie counts against the rel-L2 gates of every later tensor"
        )
    run = Run(backend, reference, input_ids, attention_mask, steps, per_layer, report, yardstick, hold_routing=hold)
    for phase in PHASES if phases is None else phases:
        phase(run)
    return report


def random_prompts(n: int, vocab: int, *, seed: int = 0, min_len: int = 4, max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences of varied lengths, left-padded: ``(ids [n, L], mask [n, L])``."""
    check_counts(random_n=n)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    lengths[0] = max_len
    return pad_left([torch.randint(0, vocab, (m,), generator=gen).tolist() for m in lengths])


def pad_left(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a batch: ``(ids, mask)``."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("every prompt must have at least one token")
    return left_pad(sequences, pad_id)
