"""``hybridtrt compare OUT_DIR --checkpoint CKPT``: the polygraphy bridge."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from hybridtrt.cli.common import console, step, styled, table

HELP = "write polygraphy inputs + PyTorch reference RunResults, compare with polygraphy, print the `polygraphy run` commands"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", help="directory written by `hybridtrt export`")
    p.add_argument("--checkpoint", default=None, help="source checkpoint (default: the one in hybridtrt.json)")
    p.add_argument("--out", default=None, help="where to write inputs.json / reference.json (default OUT_DIR/polygraphy)")
    p.add_argument(
        "--plugins",
        default=None,
        help="libhybridtrt_trt.so for the TensorRT comparison (polygraphy, which only dlopens, gets the autoreg shim beside it)",
    )
    p.add_argument("--batch", type=int, default=None, help="rows of random prompts (default 2)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from hybridtrt.validation.polygraphy_bridge import compare_with_polygraphy, write_polygraphy_data

    out = Path(args.out) if args.out else Path(args.export_dir) / "polygraphy"
    with step("write polygraphy inputs and reference RunResults"):
        files = write_polygraphy_data(args.export_dir, args.checkpoint, out, batch=args.batch or 2, seed=args.seed, plugins=args.plugins)
    have_trt = importlib.util.find_spec("tensorrt") is not None
    with step("polygraphy Comparator"):
        results = compare_with_polygraphy(files, trt=have_trt, plugins=args.plugins)
    rows = [[name, f"atol {files.atol:g}, rtol {files.rtol:g}", styled("PASS", "green") if ok else styled("FAIL", "red")] for name, ok in results.items()]
    if not have_trt:
        rows.append(["trt", "", styled("skipped: TensorRT not installed", "yellow")])
    console.print(table("polygraphy: runners vs pytorch-reference", ["runner", "tolerance", "result"], rows))
    console.print("reproduce with:")
    for name, cmd in files.commands.items():
        console.print(styled(f"  # {name}", "dim"))
        console.print(f"  {cmd}", soft_wrap=True, markup=False, highlight=False)
    return 0 if all(results.values()) else 1
