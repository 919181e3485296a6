"""Long-context validation (``hybridtrt validate --context N``): the drift curve.

Reference and backend prefill the same ``N``-token prompt chunk by chunk (the backend's state
algebra, DESIGN.md §4), and after every chunk the last-position logits and every SSM state are
compared. The result is a curve — rel L2 against position — not one number: fp32 must stay within
today's gates at every position; half-precision SSM states show how far their rounding drifts over
tens of thousands of tokens (measured, in the README).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridtrt.errors import InputError, MissingDependencyError
from hybridtrt.runtime.generation import DEFAULT_PREFILL_CHUNK, chunk_bounds
from hybridtrt.judge.metrics import Comparison, compare
from hybridtrt.validation.subjects import Subject
from hybridtrt.judge.tolerances import gate

SSM_STATE = "present_ssm_state."


@dataclass
class DriftPoint:
    """Comparisons after the chunk that ends at ``position``."""

    position: int
    logits: Comparison
    states: dict[str, Comparison]
    failures: list[str] = field(default_factory=list)


@dataclass
class DriftReport:
    """A long-context comparison; `passed` is the verdict."""

    backend: str
    reference: str
    precision: str
    state_dtype: str
    context: int
    prefill_chunk: int
    points: list[DriftPoint] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(not p.failures for p in self.points)

    def worst_state(self, point: DriftPoint) -> tuple[str, Comparison]:
        return max(point.states.items(), key=lambda kv: kv[1].rel_l2 if kv[1].finite else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def drift(backend: Subject, reference: Subject, input_ids: torch.Tensor, *, precision: str, state_dtype: str, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> DriftReport:
    """Prefill ``input_ids [B, N]`` on both subjects in chunks and compare after every chunk.

    Logits use the precision's ``call`` gate and SSM states its ``state`` gate, at every position.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be [batch, N ≥ 1], got {tuple(input_ids.shape)}")
    batch, n = input_ids.shape
    report = DriftReport(backend.name, reference.name, precision, state_dtype, int(n), prefill_chunk)
    mask = torch.ones_like(input_ids)
    states = {reference.name: reference.stepper.zero_state(batch), backend.name: backend.stepper.zero_state(batch)}
    timings = report.timings
    logits_gate, state_gate = gate(precision, "call"), gate(precision, "state")
    for a, b in chunk_bounds(n, prefill_chunk):
        out = {}
        for subject, key in ((reference, "reference_s"), (backend, "backend_s")):
            start = time.perf_counter()
            logits, states[subject.name] = subject.stepper.step(input_ids[:, a:b], mask[:, :b], states[subject.name], False)
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
            out[subject.name] = (logits, subject.named_states(states[subject.name]))
        (ref_logits, ref_named), (got_logits, got_named) = out[reference.name], out[backend.name]
        point = DriftPoint(b, compare(got_logits, ref_logits, top1=True), {k: compare(got_named[k], v) for k, v in ref_named.items() if k.startswith(SSM_STATE)})
        point.failures = [f"logits: {f}" for f in logits_gate.failures(point.logits)]
        point.failures += [f"{k}: {f}" for k, c in point.states.items() for f in state_gate.failures(c)]
        report.points.append(point)
    return report


def plot_drift(report: DriftReport, path: str | Path | io.BytesIO) -> Path | io.BytesIO:
    """Rel L2 of the logits and of each SSM state against position (log scale), gates dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib is needed for --report pictures", fix="pip install 'hybridtrt[report]'") from None
    floor = 1e-16
    x = [p.position for p in report.points]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(x, [max(p.logits.rel_l2, floor) for p in report.points], "o-", color="black", label="logits (last position)", zorder=3)
    for name in sorted(report.points[0].states, key=lambda s: int(s.rsplit(".", 1)[1])):
        ax.plot(x, [max(p.states[name].rel_l2, floor) for p in report.points], ".-", alpha=0.7, label=f"SSM state {name.rsplit('.', 1)[1]}")
    for kind, style in (("call", "--"), ("state", ":")):
        g = gate(report.precision, kind)
        if g.max_rel_l2:
            ax.axhline(g.max_rel_l2, color="gray", linestyle=style, label=f"{'logits' if kind == 'call' else 'state'} gate {g.max_rel_l2:g}")
    bad = [p for p in report.points if p.failures]
    if bad:
        ax.scatter([p.position for p in bad], [max(p.logits.rel_l2, floor) for p in bad], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
    ax.set_yscale("log")
    ax.set_xlabel(f"position (prefilled in chunks of {report.prefill_chunk})")
    ax.set_ylabel("rel L2  ‖a−b‖/‖b‖")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    verdict = "PASS" if report.passed else "FAIL"
    ax.set_title(f"{report.backend} vs {report.reference}, {report.context} tokens, model {report.precision}, SSM state {report.state_dtype}: {verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path if isinstance(path, io.BytesIO) else Path(path)


def write_drift_report(report: DriftReport, out_dir: str | Path) -> dict[str, Path]:
    """``long_context.json`` and ``drift.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from hybridtrt.validation.report import publish

    paths = {"json": out / "long_context.json", "png": out / "drift.png"}
    png = io.BytesIO()
    plot_drift(report, png)
    publish({paths["json"]: (json.dumps(report.to_dict(), indent=2, default=float) + "\n").encode(), paths["png"]: png.getvalue()})  # all or nothing
    return paths


def validate_context(
    export_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    context: int,
    prefill_chunk: int | None = None,
    backend: str = "ort",
    engine: str | Path | None = None,
    seed: int = 0,
) -> DriftReport:
    """An export (ONNX Runtime) or engine against the fp32 PyTorch reference on one random
    ``context``-token prompt. Precision: fp32 when model and states are fp32, else the half one."""
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.models.loading import load_model
    from hybridtrt.validation.subjects import engine_subject, ort_subject, torch_subject

    if context < 1:
        raise InputError(f"--context must be ≥ 1, got {context}")
    manifest = read_manifest(export_dir)
    model = load_model(checkpoint or manifest.source["checkpoint"], "fp32")
    if backend == "ort":
        from hybridtrt.runtime.onnxruntime import OrtModel

        subject = ort_subject(OrtModel(export_dir, bf16="emulate"))  # judged as a bf16 executor computes it
    else:
        from hybridtrt.runtime import load

        subject = engine_subject(load(engine or Path(export_dir) / "model.engine"))
    half = [d for d in (manifest.dtype, manifest.state_dtype) if d != "fp32"]
    precision = half[0] if half else "fp32"
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    return drift(subject, torch_subject(model), ids, precision=precision, state_dtype=manifest.state_dtype, prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK)


def run_cli(args: Any) -> int:
    """``hybridtrt validate EXPORT --context N``: table, optional report, exit 1 on a failed gate."""
    from hybridtrt.cli.common import console, step, styled, table

    if args.export_dir is None:
        raise InputError("--context needs an export directory")
    with step(f"prefill {args.context} tokens on reference and backend, compare after every chunk"):
        report = validate_context(
            args.export_dir, args.checkpoint, context=args.context, prefill_chunk=args.prefill_chunk, backend=args.backend or "ort", engine=args.engine, seed=args.seed
        )
    rows = []
    for p in report.points:
        name, worst = report.worst_state(p) if p.states else ("—", None)
        rows.append([str(p.position), f"{p.logits.rel_l2:.2e}", f"{p.logits.cosine:.6f}", f"{worst.rel_l2:.2e} ({name.rsplit('.', 1)[-1]})" if worst else "—", styled("ok", "green") if not p.failures else styled(p.failures[0], "red")])
    title = f"{report.backend} vs {report.reference}: {report.context} tokens in chunks of {report.prefill_chunk} (model {report.precision}, SSM state {report.state_dtype})"
    console.print(table(title, ["position", "logits rel L2", "logits cosine", "worst SSM state rel L2 (layer)", "gate"], rows))
    t = report.timings
    console.print(f"time: reference {t.get('reference_s', 0):.1f} s · {report.backend} {t.get('backend_s', 0):.1f} s")
    console.print("[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]")
    if args.json:
        from hybridtrt.validation.report import publish

        publish({Path(args.json): (json.dumps(report.to_dict(), indent=2, default=float) + "\n").encode()})
    if args.report:
        paths = write_drift_report(report, args.report)
        console.print(f"report: {paths['png']}")
    return 0 if report.passed else 1
