"""``hybridtrt validate OUT_DIR --checkpoint CKPT``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridtrt.cli.common import console, step, table

HELP = "compare an export (ONNX Runtime or TensorRT) with the PyTorch reference; non-zero exit when a gate fails"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", nargs="?", default=None, help="directory written by `hybridtrt export`")
    p.add_argument("--checkpoint", default=None, help="source checkpoint (default: the one in hybridtrt.json)")
    p.add_argument("--backend", choices=["ort", "trt"], default=None, help="artefact runtime (default ort)")
    p.add_argument("--engine", default=None, help="engine for --backend trt (default OUT_DIR/model.engine)")
    p.add_argument("--reference", choices=["pytorch", "hf"], default=None, help="hf: compare our reference with HF transformers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (checkpoint tokenizer)")
    src.add_argument("--random", type=int, default=None, metavar="N", help="N random prompts (default 4)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 8)")
    p.add_argument("--per-layer", action="store_true", help="name the first layer and state that diverges")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.json, errors.png and report.html")
    p.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=None, metavar="N", help="long-context drift: one N-token prompt, prefilled in chunks, compared after every chunk")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N", help="chunk length of --context (default 2048)")


def print_report(report) -> None:
    def fmt(c):
        cmp = c.comparison
        return [f"{cmp.rel_l2:.2e}" if cmp.finite else "non-finite", f"{cmp.cosine:.6f}" if cmp.finite else "—", "[green]ok[/]" if c.passed else f"[red]{'; '.join(c.failures)}[/]"]

    def worst(checks):
        """Failing before passing, then the largest rel L2 (non-finite counts as infinite)."""
        return max(checks, key=lambda c: (not c.passed, c.comparison.rel_l2 if c.comparison.finite else float("inf")))

    rows = []
    for phase in ("prefill", "decode"):
        checks = [c for c in report.checks if c.phase == phase]
        logits = [c for c in checks if c.name == "logits"]
        states = [c for c in checks if c.name != "logits"]
        if logits:
            label = "prefill logits" if phase == "prefill" else f"decode logits (worst of {len(logits)} steps)"
            rows.append([label, *fmt(worst(logits))])
        if states:
            w = worst(states)
            rows.append([f"{phase} states (worst of {len(states)}: {w.name})", *fmt(w)])
    layer = [c for c in report.checks if c.phase == "layer"]
    if layer:
        bad = [c for c in layer if not c.passed]
        rows.append([f"per-layer ({len(layer)} tensors)", "", "", f"[red]{len(bad)} failing[/]" if bad else "[green]ok[/]"])
    console.print(table(f"{report.backend} vs {report.reference} ({report.precision}, batch {report.batch}, {report.steps} steps)", ["", "rel L2", "cosine", "gate"], rows))
    if report.token_agreement is not None:
        console.print(f"greedy token agreement {report.token_agreement:.3f} · teacher-forced top-1 {report.teacher_forced_top1:.3f}")
    if report.first_divergence:
        d = report.first_divergence
        console.print(f"[bold red]first divergence: layer {d['layer']} — {d['tensor']}[/] ({'; '.join(d['why'])})")
    t = report.timings
    console.print(f"time: reference {t.get('reference_s', 0):.2f} s · {report.backend} {t.get('backend_s', 0):.2f} s")
    console.print("[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.validation.artefact import validate_artefact

    if args.context is not None:
        from hybridtrt.validation.long_context import run_cli

        return run_cli(args)

    with step("run reference and backend"):
        report = validate_artefact(
            args.export_dir,
            args.checkpoint,
            backend=args.backend or "ort",
            engine=args.engine,
            reference=args.reference or "pytorch",
            prompts=args.prompts,
            random_n=args.random,
            steps=8 if args.steps is None else args.steps,
            per_layer=args.per_layer,
            seed=args.seed,
        )
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=float) + "\n")
    if args.report:
        from hybridtrt.validation.report import write_report

        paths = write_report(report, args.report)
        console.print(f"report: {paths['html']}")
    return 0 if report.passed else 1
