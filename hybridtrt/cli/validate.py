"""``hybridtrt validate OUT_DIR``: an export (ONNX Runtime or TensorRT), or outputs recorded on
another machine, against the PyTorch reference; per layer, and FP8 / INT4 sensitivity per layer."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from hybridtrt.cli.common import add_integrity_argument, check_integrity, console, step, styled, table

HELP = "compare an export (ONNX Runtime, TensorRT, or recorded polygraphy outputs) with the PyTorch reference; exit 1 when a gate fails"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", nargs="?", default=None, help="directory written by `hybridtrt export`")
    add_integrity_argument(p)
    p.add_argument("--checkpoint", default=None, help="source checkpoint (default: the one in hybridtrt.json; its sha256 is checked)")
    p.add_argument("--force", action="store_true", help="compare with a checkpoint other than the export's source (same graph I/O)")
    p.add_argument("--backend", choices=["ort", "trt"], default=None, help="artefact runtime (default ort)")
    p.add_argument("--engine", default=None, help="engine for --backend trt (default OUT_DIR/model.engine)")
    p.add_argument("--reference", choices=["pytorch", "hf"], default=None, help="hf: compare our reference with HF transformers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (checkpoint tokenizer)")
    src.add_argument("--random", type=int, default=None, metavar="N", help="N random prompts (default 4)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 8)")
    p.add_argument("--prompt-length", type=int, default=None, metavar="L", help="longest random prompt in tokens (default 48); e.g. 2 x chunk_size + 5 to cross chunk boundaries")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--per-layer", action="store_true", help="compare every decoder layer's states and output; name the first that diverges (any export)")
    p.add_argument(
        "--no-yardstick",
        action="store_true",
        help="skip the yardstick run (fp64 for fp32 exports, the same-dtype reference for fp16/bf16) whose error the gates scale with; the fixed floors then apply",
    )
    rec = p.add_argument_group("outputs recorded elsewhere (README: Validating a TensorRT engine on another machine)")
    rec.add_argument("--load-outputs", nargs="+", default=None, metavar="PATH", help="polygraphy RunResults JSON file(s) or directories (polygraphy run … --save-outputs)")
    rec.add_argument("--load-inputs", nargs="+", default=None, metavar="PATH", help="the inputs they were recorded from (default: inputs.json beside them, else OUT_DIR/polygraphy)")
    rec.add_argument("--runner", default=None, help="runner name in the results (default: the only one that is not the reference)")
    sens = p.add_argument_group("quantization sensitivity")
    sens.add_argument("--sensitivity", action="store_true", help="FP8 and INT4 exports: logits error with only each linear layer quantized, ranked, and the --exclude flags that reach --target-cosine")
    sens.add_argument("--target-cosine", type=float, default=None, metavar="C", help="logits cosine the --exclude flags aim for (default: the FP8 gate)")
    sens.add_argument(
        "--recipe", default=None, metavar="NAME|FILE", help="with --sensitivity: measure this recipe's layer table (e.g. nemotron-3-nano-nvfp4-layout) beside the search's"
    )
    p.add_argument("--context", type=int, default=None, metavar="N", help="long-context drift: one N-token prompt, prefilled in chunks, compared after every chunk")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N", help="chunk length of --context (default 2048)")
    out = p.add_argument_group("output")
    out.add_argument("--report", default=None, metavar="DIR", help="write report.json, errors.png (+ sensitivity.png) and report.html")
    out.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here")


def legend(report) -> str:
    """Printed under the summary table: what its columns mean."""
    ref = report.reference
    yard = f"yardstick: {report.yardstick}'s rel L2 on that tensor" if report.yardstick else "yardstick: none ran, the floors are the gates"
    return f"rel L2: ‖{report.backend} − {ref}‖ / ‖{ref}‖ of the worst tensor · {yard} · allowed: max(floor, ratio × yardstick), hybridtrt/judge/tolerances.json"

#: How a phase is named in the summary table (default: its own name).
PHASE_LABELS = {"layer": "per-layer"}


def _fmt(c) -> list[str]:
    cmp, yard = c.comparison, c.yardstick
    return [
        f"{cmp.rel_l2:.2e}" if cmp.finite else "non-finite",
        "—" if yard is None else f"{yard.rel_l2:.2e}" if yard.finite else "non-finite",
        "—" if c.allowed is None else f"{c.allowed:.2e}",
        f"{cmp.cosine:.6f}" if cmp.finite else "—",
        styled("ok", "green") if c.passed else styled(" ".join(["FAIL", *(f for f in c.failures if not f.startswith("rel L2"))]), "red"),
    ]  # a rel L2 failure is the row's own numbers: rel L2 > allowed


def worst(checks):
    """Failing before passing, then the largest rel L2 (non-finite counts as infinite)."""
    return max(checks, key=lambda c: (not c.passed, c.comparison.rel_l2 if c.comparison.finite else float("inf")))


def summary_rows(report) -> list[list[str]]:
    """One row per phase and kind of tensor (logits, states, layer outputs), the worst of each.
    Phases appear in the order they ran, so a new phase shows up without changes here."""
    phases = list(dict.fromkeys(c.phase for c in report.checks))
    rows = []
    for phase in phases:
        checks = [c for c in report.checks if c.phase == phase]
        groups = {
            "logits": [c for c in checks if c.name == "logits"],
            "states": [c for c in checks if c.name.startswith("present")],
            "layer outputs": [c for c in checks if c.name.startswith("layer_output.")],
        }
        groups["other"] = [c for c in checks if not any(c in g for g in groups.values())]
        for kind, group in groups.items():
            if not group:
                continue
            w = worst(group)
            name = PHASE_LABELS.get(phase, phase)
            label = f"{name} {kind}"
            if len(group) > 1:  # second line of the cell: which tensor is the worst
                label += f"\nworst of {len(group)}: {w.name}{'' if w.step is None else f' @{w.step}'}"
            rows.append([label, *_fmt(w)])
    return rows


#: What each recipe-cost yardstick is, and what fails against it.
_QUALITY_YARDSTICK = {
    "fp8-recipe": ("FP8 recipe", "the same layers at ideal per-call scales (nothing calibrated)", "a calibrated scale that clips fails here"),
    "int4-recipe": ("INT4 recipe", "the same layers rounded to nearest (no AWQ scales)", "AWQ scales that cost more than plain rounding fail here"),
}


def print_quality(q) -> None:
    """A recipe's cost (``report.quality``): the quantized reference against the unquantized truth."""
    what, yardstick, fails = _QUALITY_YARDSTICK.get(q.precision, _QUALITY_YARDSTICK["fp8-recipe"])
    title = f"{what}: {q.backend} vs the unquantized {q.reference} ({q.precision}, the same prompts)"
    console.print(table(title, ["", "rel L2", "yardstick", "allowed", "cosine", "gate"], summary_rows(q)))
    yard = f"{q.yardstick}: {yardstick}" if q.yardstick else "no yardstick: the floors are the gates"
    console.print(styled(f"yardstick: {yard} · {fails}; the cosine is the quality figure", "dim"))
    if q.token_agreement is not None:
        console.print(f"{what}: greedy token agreement {q.token_agreement:.3f} against the unquantized truth", markup=False)
    if q.teacher_forced_top1 is not None:
        console.print(f"{what}: teacher-forced top-1 {q.teacher_forced_top1:.3f} against the unquantized truth", markup=False)
    for why in q.routing_failures:
        console.print(styled(f"{what} routing gate: {why}", "bold red"), soft_wrap=True)
    verdict = "[green]within[/]" if q.passed else "[bold red]beyond[/]"
    console.print(f"{what}: {verdict} its gates")


def print_report(report) -> None:
    title = f"{report.backend} vs {report.reference} ({report.precision}, batch {report.batch}, {report.steps} steps)"
    console.print(table(title, ["", "rel L2", "yardstick", "allowed", "cosine", "gate"], summary_rows(report)))
    console.print(styled(legend(report), "dim"))
    if report.token_agreement is not None:
        line = f"greedy token agreement {report.token_agreement:.3f} · teacher-forced top-1 {report.teacher_forced_top1:.3f}"
        if report.yardstick_top1 is not None:
            line += f" · {report.yardstick} top-1 {report.yardstick_top1:.3f}"
            if report.token_gate_waived:
                line += " (near-ties: tokens reported, not gated)"
        console.print(line, markup=False)
    elif report.teacher_forced_top1 is not None:
        console.print(f"teacher-forced top-1 {report.teacher_forced_top1:.3f}")
    if report.routing:
        from hybridtrt.validation.report import routing_line

        console.print(routing_line(report), markup=False, soft_wrap=True)
    for why in report.routing_failures:
        console.print(styled(f"routing gate: {why}", "bold red"), soft_wrap=True)
    for note in report.notes:
        console.print(styled(f"note {note}", "yellow"), soft_wrap=True)
    if report.first_divergence:
        d = report.first_divergence
        at = "" if d.get("step") in (None, 0) else f" (iteration {d['step']})"
        console.print(styled(f"first divergence: layer {d['layer']} — {d['tensor']}{at} ({'; '.join(d['why'])})", "bold red"))
    if report.quality is not None:
        print_quality(report.quality)
    t = report.timings
    if t:
        line = f"time: reference {t.get('reference_s', 0):.2f} s · {report.backend} {t.get('backend_s', 0):.2f} s"
        if "yardstick_s" in t:
            line += f" · yardstick {t['yardstick_s']:.2f} s"
        console.print(line, markup=False)
    console.print("[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]")


def print_sensitivity(s, *, shown: int = 20) -> None:
    rows = [
        [str(i + 1), x.label, x.kind, f"{x.error:.2e}", f"{x.comparison.rel_l2:.2e}" if x.comparison.finite else "non-finite", f"{x.comparison.top1:.2f}" if x.comparison.top1 is not None else "—", "excluded" if x.node in s.exclude else ""]
        for i, x in enumerate(s.layers[:shown])
    ]
    more = f" ({len(s.layers) - shown} more in the report)" if len(s.layers) > shown else ""
    console.print(table(f"{s.scheme.upper()} sensitivity: logits with only this layer quantized, vs the fp32 reference{more}", ["#", "layer", "kind", "1 − cosine", "rel L2", "top-1", ""], rows))
    kinds = [[r["kind"], r["projection"], str(r["count"]), f"{r['worst']:.2e}", f"{r['median']:.2e}"] for r in s.by_kind()]
    console.print(table("by kind", ["kind", "projection", "layers", "worst 1 − cos", "median 1 − cos"], kinds))
    console.print(
        f"nothing quantized: cosine {s.none.cosine:.6f} · all {len(s.layers)} quantized: cosine {s.full.cosine:.6f}"
        f" (rebuilt vs the export file: max |Δ| {s.export_max_abs:.1e})"
    )
    if s.reached is None:
        console.print(styled(f"target cosine {s.target_cosine:g} is out of reach: even with no layer quantized the cosine is {s.none.cosine:.6f}", "red"))
    elif not s.exclude:
        console.print(styled(f"the export reaches the target cosine {s.target_cosine:g} with every layer quantized", "green"))
    else:
        console.print(f"excluding the {len(s.exclude)} most sensitive layer(s) reaches cosine {s.reached.cosine:.6f} ≥ {s.target_cosine:g}; re-export with:")
        console.print(f"  {s.command}", soft_wrap=True, markup=False, highlight=False)
    if s.recipe is not None:
        r = s.recipe
        share = r.kept_weights / r.quantized_weights if r.quantized_weights else 0.0
        ours = sum(x.node in s.exclude for x in s.layers)
        console.print(
            f"recipe {r.name}: keeps {len(r.kept)} of these {len(s.layers)} layers ({share:.1%} of their weights) → cosine {r.reached.cosine:.6f}"
            f" ({'≥' if r.reached.cosine >= s.target_cosine else '<'} {s.target_cosine:g}); the search's {ours} exclusion(s) for the target:"
            f" {len(r.overlap)} of them in the recipe's table",
            markup=False, soft_wrap=True,
        )  # fmt: skip
        console.print(styled(f"recipe source: {r.source}", "dim"), soft_wrap=True)


#: Largest --prompts file read (validation prompts are lines of text; a corpus belongs elsewhere).
MAX_PROMPTS_BYTES = 16 * 2**20


def check_inputs(args: argparse.Namespace) -> None:
    """The flags and files of `run` that `check_arguments` does not cover, refused before anything loads:
    ``--seed``, ``--context``, ``--prefill-chunk``, and the ``--prompts`` file (a regular UTF-8 file of at
    most `MAX_PROMPTS_BYTES` with a non-blank line; read again by the validation, now known to be safe).

    Raises:
        InputError: naming the flag and its value.
    """
    from hybridtrt.errors import InputError
    from hybridtrt.reading import read_text

    if args.recipe is not None:
        if not args.sensitivity:
            raise InputError(f"--recipe {args.recipe} is measured by the sensitivity search", fix="add --sensitivity")
        from hybridtrt.exporter.recipes import load_recipe

        load_recipe(args.recipe)  # an unknown name or a bad file is refused before anything loads
    if not 0 <= args.seed < 2**63:
        raise InputError(f"--seed {args.seed} must be in [0, 2^63)", fix="e.g. --seed 0")
    if args.context is not None and args.context < 1:
        raise InputError(f"--context {args.context} must be ≥ 1", fix="give the prompt length in tokens, e.g. --context 4096")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InputError(f"--prefill-chunk {args.prefill_chunk} must be ≥ 1", fix="give the longest prefill call in tokens, e.g. --prefill-chunk 2048")
    if args.prompts is not None:
        fix = "give a UTF-8 text file with one prompt per line"
        text = read_text(args.prompts, what="prompts file", error=InputError, fix=fix, limit=MAX_PROMPTS_BYTES)
        if not text.strip():
            raise InputError(f"prompts file {args.prompts} has no prompts", fix="write one prompt per line")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.validation.preflight import check_arguments, check_output_dir, check_output_file

    from hybridtrt.exporter.manifest import is_tp_export

    tensor_parallel = args.export_dir is not None and is_tp_export(args.export_dir)
    if tensor_parallel:
        _refuse_for_tp(args)
    elif args.export_dir is not None:
        check_integrity(args, args.export_dir)

    # Refuse bad values and unwritable outputs before importing torch or loading anything.
    check_arguments(
        backend=args.backend or "ort",
        reference=args.reference or "pytorch",
        steps=8 if args.steps is None else args.steps,
        random_n=args.random,
        load_outputs=args.load_outputs,
        target_cosine=args.target_cosine,
        prompt_length=args.prompt_length,
    )
    if args.json:
        check_output_file(args.json, "--json")
    if args.report:
        check_output_dir(args.report, "--report")
    check_inputs(args)

    if args.context is not None:
        from hybridtrt.validation.long_context import run_cli

        return run_cli(args)

    if tensor_parallel:
        with step("validate: every rank's graphs (collectives emulated) and the reference"):
            report = _validate_tp(args)
    elif args.sensitivity:  # one live display at a time: the bar replaces the spinner
        with _progress_bar("validate, then sensitivity per quantized layer") as progress:
            report = _validate(args, progress)
    else:
        with step("validate: reference and backend"):
            report = _validate(args, None)
    print_report(report)
    if "sensitivity" in report.extras:
        print_sensitivity(report.extras["sensitivity"])
    if args.json or args.report:  # written whole or not at all; a full disk leaves the previous files
        from hybridtrt.validation.report import provenance, publish, write_report

        origin = provenance(args.export_dir, args.checkpoint)
        if args.json:
            publish({Path(args.json): (json.dumps({**report.to_dict(), "provenance": origin}, indent=2, default=float) + "\n").encode()})
        if args.report:
            paths = write_report(report, args.report, provenance=origin)
            console.print(f"report: {paths['html']}", markup=False, soft_wrap=True)
    return 0 if report.passed else 1


def _refuse_for_tp(args: argparse.Namespace) -> None:
    """The flags a tensor-parallel export's validation (the rank emulator on ONNX Runtime) does not take."""
    from hybridtrt.errors import InputError

    flags = {
        "--backend trt": args.backend == "trt", "--engine": args.engine is not None, "--reference hf": args.reference == "hf",
        "--prompts": args.prompts is not None, "--load-outputs": args.load_outputs is not None, "--sensitivity": args.sensitivity,
        "--context": args.context is not None, "--report": args.report is not None,
    }  # fmt: skip
    for flag, given in flags.items():
        if given:
            raise InputError(
                f"{flag} is not built for a tensor-parallel export yet ({args.export_dir} holds rank0/ … and hybridtrt-tp.json)",
                fix=f"drop {flag}: `hybridtrt validate {args.export_dir}` runs every rank's graphs in the rank emulator",
            )


def _validate_tp(args: argparse.Namespace):
    from hybridtrt.exporter.integrity import FULL, SAMPLED
    from hybridtrt.validation.tensor_parallel import validate_export

    return validate_export(
        args.export_dir,
        args.checkpoint,
        random_n=4 if args.random is None else args.random,
        prompt_length=48 if args.prompt_length is None else args.prompt_length,
        steps=8 if args.steps is None else args.steps,
        seed=args.seed,
        yardstick=not args.no_yardstick,
        force=args.force,
        integrity=FULL if args.check_integrity else SAMPLED,
    )


def _validate(args: argparse.Namespace, progress):
    from hybridtrt.validation.artefact import validate_artefact

    return validate_artefact(
        args.export_dir,
        args.checkpoint,
        backend=args.backend or "ort",
        engine=args.engine,
        reference=args.reference or "pytorch",
        prompts=args.prompts,
        random_n=args.random,
        prompt_length=args.prompt_length,
        steps=8 if args.steps is None else args.steps,
        per_layer=args.per_layer,
        seed=args.seed,
        force=args.force,
        load_outputs=args.load_outputs,
        load_inputs=args.load_inputs,
        runner=args.runner,
        sensitivity=args.sensitivity,
        target_cosine=args.target_cosine,
        recipe=args.recipe,
        progress=progress,
        yardstick=not args.no_yardstick,
    )


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar with ETA; yields the ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress(f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as p:
        task = p.add_task(label, total=None)
        yield lambda done, total: p.update(task, completed=done, total=total)
