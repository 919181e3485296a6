"""FP8 sensitivity per kind of linear layer, per preset (the README's "FP8 sensitivity" table).

For each (preset, initializer_range): create a random checkpoint, export it with ``--quantize fp8``
(``--calib-random 32``, per-tensor scales), and run ``hybridtrt validate --sensitivity``'s analysis
(`hybridtrt.validation.sensitivity`) on ``--prompts`` random prompts: per quantized linear, the
last-token logits' 1 − cosine against the fp32 reference with only that layer quantized. Prints,
per kind and projection, the worst and median 1 − cosine, and per run the all-quantized cosine and
how many of the most sensitive layers ``--exclude`` must keep unquantized to reach cosine 0.99 and
0.999 (measured, not estimated), with wall times.

Random weights: the figures are a lower bound for trained checkpoints and say which kinds of
layers are fragile *in this architecture at this weight scale*, not for a real model.

Usage::

    python benchmarks/fp8_sensitivity.py                 # DEFAULT_RUNS (~6 min on 2 busy cores)
    python benchmarks/fp8_sensitivity.py --runs tiny-mamba2:0.05 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.models.presets import create_checkpoint
from hybridtrt.validation.artefact import validate_artefact

#: ``preset:initializer_range`` runs when no ``--runs`` is given.
DEFAULT_RUNS = ["tiny-nemotron-h:0.3", "tiny-nemotron-h:0.05", "tiny-mamba2:0.05", "small-nemotron-h:0.02"]
TARGETS = (0.99, 0.999)


def measure(preset: str, init_range: float, prompts: int, work: Path) -> dict:
    ckpt = create_checkpoint(preset, work / "ckpt", initializer_range=init_range)
    start = time.perf_counter()
    export(ckpt, work / "fp8", ExportOptions(verify=False), quantize=QuantizeOptions(calib_random=32))
    export_s = time.perf_counter() - start
    runs = {}
    for target in TARGETS:
        start = time.perf_counter()
        report = validate_artefact(work / "fp8", random_n=prompts, steps=0, sensitivity=True, target_cosine=target)
        runs[target] = (report.extras["sensitivity"], time.perf_counter() - start)
    sens, seconds = runs[TARGETS[0]]
    return {
        "preset": preset,
        "init_range": init_range,
        "linears": len(sens.layers),
        "all_quantized_cosine": sens.full.cosine,
        "rebuild_max_abs": sens.export_max_abs,
        "exclusions": {str(t): (len(s.exclude) if s.reached is not None else None) for t, (s, _) in runs.items()},
        "most_sensitive": [s.label for s in sens.layers[:3]],
        "by_kind": sens.by_kind(),
        "export_s": export_s,
        "sensitivity_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="PRESET:RANGE", help="preset:initializer_range pairs")
    p.add_argument("--prompts", type=int, default=16, help="random prompts per measurement (default 16)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        preset, init = run.split(":")
        with tempfile.TemporaryDirectory(prefix="fp8-sensitivity-") as tmp:
            rows.append(measure(preset, float(init), args.prompts, Path(tmp)))
        r = rows[-1]
        print(f"\n## {preset}, initializer_range {init}: {r['linears']} quantized linears, all quantized cosine {r['all_quantized_cosine']:.4f}", flush=True)
        print(f"exclusions to reach cosine {' / '.join(map(str, TARGETS))}: " + " / ".join(str(v) if v is not None else "unreachable" for v in r["exclusions"].values()))
        print(f"most sensitive: {', '.join(r['most_sensitive'])}; rebuild vs export max |Δ| {r['rebuild_max_abs']:.1e}")
        print(f"time: export {r['export_s']:.1f} s, sensitivity {r['sensitivity_s']:.1f} s")
        print("| kind | projection | layers | worst 1 − cos | median 1 − cos |\n|---|---|---|---|---|")
        for k in r["by_kind"]:
            print(f"| {k['kind']} | {k['projection']} | {k['count']} | {k['worst']:.1e} | {k['median']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
