"""``hybridtrt demo``: the whole main job on a tiny built-in model, on CPU, in under a minute.

Creates a random Nemotron-H checkpoint (Mamba-2, attention and MLP layers), exports it to ONNX,
validates it layer by layer against the PyTorch reference with ONNX Runtime, runs the polygraphy
comparison, and prints one summary table and where the files are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hybridtrt.cli.common import console, human_bytes, print_command, step, styled, table

HELP = "end to end on a tiny built-in model: checkpoint → export → validate (ORT) → polygraphy"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hybridtrt.cli.preset import PRESET_NAMES

    p.add_argument("-o", "--output", default=None, help="new or empty directory to write into (default: a new temporary directory, kept)")
    p.add_argument("--workdir", dest="output", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--preset", choices=PRESET_NAMES, default=None, help="built-in preset (default tiny-nemotron-h)")


def run(args: argparse.Namespace) -> int:
    import torch

    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models.presets import create_checkpoint
    from hybridtrt.validation.artefact import validate_artefact
    from hybridtrt.validation.polygraphy_bridge import compare_with_polygraphy, write_polygraphy_data
    from hybridtrt.validation.report import provenance, write_report

    torch.set_num_threads(1)  # a tiny model: threads only add OpenMP overhead
    start = time.perf_counter()
    work = Path(args.output or tempfile.mkdtemp(prefix="hybridtrt-demo-"))
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        from hybridtrt.errors import InputError

        raise InputError(f"demo output {work} exists and is not an empty directory", fix="choose a new directory with -o/--output")
    preset = args.preset or "tiny-nemotron-h"
    ckpt, out = work / "checkpoint", work / "export"

    with step(f"create checkpoint ({preset}, random weights)"):
        create_checkpoint(preset, ckpt)
    result = export(ckpt, out, ExportOptions(per_layer=True, verify=False), step=step)
    with step("validate: ONNX Runtime vs PyTorch reference, per layer"):
        report = validate_artefact(out, ckpt, random_n=4, steps=8, per_layer=True)
        paths = write_report(report, work / "report", provenance=provenance(out, ckpt))
    with step("polygraphy: Comparator with the ONNX Runtime runner"):
        files = write_polygraphy_data(out, ckpt, work / "polygraphy")
        polygraphy = compare_with_polygraphy(files)["onnxrt"]
    polygraphy_ok = polygraphy.passed

    from hybridtrt.validation.report import routing_line as report_routing_line

    prefill = next(c for c in report.checks if c.phase == "prefill" and c.name == "logits").comparison
    states = [c.comparison for c in report.checks if c.phase == "prefill" and c.name != "logits"]
    layers = [c for c in report.checks if c.phase == "layer"]
    ok = report.passed and polygraphy_ok
    m = result.manifest
    rows = [
        ["model", f"{preset}: pattern {m.model['layer_types']}, {result.parameters:,} parameters"],
        ["export", f"{', '.join(f'{n} {op}' for op, n in m.graphs['unified'].custom_ops.items())} nodes with function bodies, {human_bytes(sum(result.files.values()))}"],
        ["prefill logits", f"rel L2 {prefill.rel_l2:.1e}, cosine {prefill.cosine:.6f}"],
        ["states (worst of %d)" % len(states), f"rel L2 {max(s.rel_l2 for s in states):.1e}"],
        ["per layer", f"{len(layers)} tensors, {sum(not c.passed for c in layers)} over tolerance"],
        ["decode", f"{report.steps} steps, greedy token agreement {report.token_agreement:.3f}"],
        *([["MoE routing", report_routing_line(report)]] if report.routing else []),
        ["polygraphy", f"{'PASS' if polygraphy_ok else f'FAIL ({len(polygraphy.failures)} comparisons, below)'}: {files.describe_tolerance()}"],
        ["verdict", styled("PASS", "bold green") if ok else styled("FAIL", "bold red")],
        ["wall time", f"{time.perf_counter() - start:.1f} s"],
    ]
    console.print(table("hybridtrt demo", ["", ""], rows, numeric=False))
    console.print(
        table(
            "files",
            ["what", "where"],
            [
                ["checkpoint", str(ckpt)],
                ["ONNX export", str(out)],
                ["validation report", str(paths["html"])],
                ["per-layer picture", str(paths["png"])],
                ["polygraphy data", str(files.inputs.parent)],
            ],
            numeric=False,
        )
    )
    for failure in polygraphy.failures:
        console.print(styled(f"polygraphy FAIL {failure}", "red"), soft_wrap=True)
    console.print("reproduce the polygraphy check:")
    if shutil.which("polygraphy") is None:  # `make demo` runs .venv/bin/hybridtrt without activating the venv
        bin_dir = Path(sys.executable).parent
        print_command(f". {bin_dir / 'activate'}", "first put hybridtrt and polygraphy on your PATH (or call them as " + str(bin_dir) + "/…)")
    print_command(files.commands["onnxrt"])
    return 0 if ok else 1
