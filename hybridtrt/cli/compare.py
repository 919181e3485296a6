"""``hybridtrt compare OUT_DIR``: the polygraphy bridge."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from hybridtrt.cli.common import add_integrity_argument, check_integrity, console, print_command, step, styled, table

HELP = "write polygraphy inputs + PyTorch reference RunResults, compare with polygraphy, print the `polygraphy run` commands"

#: Printed command lines, in this order, with what each is for.
COMMAND_TITLES = {
    "onnxrt": "ONNX Runtime vs the reference (runs here)",
    "trt": "TensorRT vs the reference (GPU machine; builds its own engine from model.onnx)",
    "onnxrt-save": "record ONNX Runtime's outputs (any machine) for `hybridtrt validate --load-outputs`",
    "trt-save": "GPU machine without PyTorch: record TensorRT's outputs …",
    "validate": "… and check them here with the usual gates",
    "engine-prefill": "an engine from `hybridtrt build` (two profiles): record profile 0 (prefill) …",
    "engine-decode": "… and profile 1 (decode) …",
    "validate-engine": "… and check both here",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", help="directory written by `hybridtrt export`")
    add_integrity_argument(p)
    p.add_argument("--checkpoint", default=None, help="source checkpoint (default: the one in hybridtrt.json; its sha256 is checked)")
    p.add_argument("--force", action="store_true", help="use a checkpoint other than the export's source (same graph I/O)")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="where to write inputs.json / reference.json, outside the export (default: OUT_DIR.polygraphy beside it)")
    p.add_argument("--out", dest="output", default=None, help=argparse.SUPPRESS)  # old spelling, kept working
    p.add_argument("--plugins", default=None, metavar="LIB", help="TensorRT plugin library for the --trt comparison and the printed commands")
    p.add_argument("--per-layer", action="store_true", help="printed save-outputs commands also record every layer output (--onnx-outputs)")
    p.add_argument("--batch", type=int, default=None, help="rows of random prompts (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.validation.preflight import check_output_dir

    check_integrity(args, args.export_dir)

    out = Path(args.output) if args.output else default_output(args.export_dir)
    refuse_inside_export(out, args.export_dir)
    check_output_dir(out, "-o/--output")
    from hybridtrt.validation.polygraphy_bridge import compare_with_polygraphy, onnxrt_cannot_run, write_polygraphy_data

    with step("write polygraphy inputs and reference RunResults"):
        files = write_polygraphy_data(
            args.export_dir, args.checkpoint, out, batch=2 if args.batch is None else args.batch, seed=args.seed,
            plugins=args.plugins, per_layer=args.per_layer, force=args.force,
        )  # fmt: skip
    have_trt = importlib.util.find_spec("tensorrt") is not None
    with step("polygraphy Comparator"):
        results = compare_with_polygraphy(files, trt=have_trt, plugins=args.plugins)
    tolerance = files.describe_tolerance()
    rows = [[name, tolerance, styled("PASS", "green") if v.passed else styled(f"FAIL ({len(v.failures)} comparisons, below)", "red")] for name, v in results.items()]
    why = onnxrt_cannot_run(files.model)
    if why:  # the graph as it is; `hybridtrt validate` runs it emulated
        rows.insert(0, ["onnxrt", "", styled(f"skipped: {why}; `hybridtrt validate` runs it emulated", "yellow")])
    if not have_trt:
        rows.append(["trt", "", styled("skipped: TensorRT not installed", "yellow")])
    console.print(table("polygraphy: runners vs pytorch-reference", ["runner", "tolerance", "result"], rows, numeric=False))
    for name, verdict in results.items():
        for failure in verdict.failures:
            console.print(styled(f"{name} FAIL {failure}", "red"), soft_wrap=True)
    console.print(f"files: {out}", markup=False, soft_wrap=True)
    console.print("reproduce with:")
    for name, cmd in files.commands.items():
        title = COMMAND_TITLES.get(name, name)
        if name in ("onnxrt-save", "trt-save") and files.routers:
            title += f" (with the MoE routers' expert ids {', '.join(files.routers)}: validate holds the reference to them)"
        elif name == "engine-prefill" and files.routers:
            title += " (an engine has no router outputs: judged with free MoE routing)"
        print_command(cmd, title)
    return 0 if all(v.passed for v in results.values()) else 1


def default_output(export_dir: str | Path) -> Path:
    """``OUT_DIR.polygraphy`` beside the export: an export directory holds only the export's files
    (a re-export into it refuses anything else)."""
    export = Path(export_dir).resolve()
    return export.parent / f"{export.name}.polygraphy"


def refuse_inside_export(out: Path, export_dir: str | Path) -> None:
    """``-o`` inside the export directory would make the next export into it refuse the directory."""
    from hybridtrt.errors import InputError

    export, target = Path(export_dir).resolve(), out.resolve()
    if target == export or export in target.parents:
        raise InputError(
            f"-o/--output {out} is inside the export directory {export_dir}",
            fix=f"write the polygraphy files beside it (the default, {default_output(export_dir)}) or anywhere outside it",
        )
