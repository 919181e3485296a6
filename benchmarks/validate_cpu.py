"""How long `hybridtrt validate` makes a user wait, and what the fp64 yardstick costs (issue 29).

On one ~100 M-parameter preset, fp32 export, in one run:
1. the in-process validation (prompts × decode steps, per layer), run 1 + ``--warm`` times in one
   process: the last run's wall time split between the PyTorch reference, ONNX Runtime and the fp64
   yardstick, and the yardstick / reference ratio (the first run's beside it: it pays one-time costs);
2. the depthwise conv1d at validate's shapes (prefill L = 48, decode L = 1) in fp64, torch's
   grouped ``conv1d`` beside the shifted multiply-adds the fp64 model runs;
3. the CLI a user types, ``hybridtrt validate OUT --per-layer --report DIR``, start to exit, in a
   fresh process (imports and the HTML report included).

    .venv/bin/python benchmarks/validate_cpu.py [--preset small-nemotron-h] [--prompts 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import interleaved_median_times  # benchmarks/timing.py (the script's directory is on sys.path)
from workdir import exported_preset  # benchmarks/workdir.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--prompts", type=int, default=4, help="random prompts (validate's default 4)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps (validate's default 8)")
    parser.add_argument("--warm", type=int, default=2, help="in-process runs after the first; the last is reported (the first beside it)")
    args = parser.parse_args()

    from hybridtrt.models.layers import depthwise_causal_conv
    from hybridtrt.models.loading import load_model
    from hybridtrt.validation.artefact import validate_artefact

    work, ckpt, _ = exported_preset(args.preset)

    runs = []  # the first in this process pays one-time costs (the reference's first call most)
    for _ in range(1 + args.warm):
        start = time.perf_counter()
        report = validate_artefact(work / "export", ckpt, random_n=args.prompts, steps=args.steps, per_layer=True)
        runs.append((time.perf_counter() - start, report))
    wall, report = runs[-1]
    t = report.timings
    ref, back, yard = t["reference_s"], t["backend_s"], t.get("yardstick_s", 0.0)
    cold_wall, cold = runs[0]

    mixer = next(m for m in load_model(ckpt).modules() if hasattr(m, "conv1d"))
    weight, bias = mixer.conv1d.weight.double(), mixer.conv1d.bias.double()
    k, channels = weight.shape[-1], weight.shape[0]
    rows = []
    for length in (48, 1):
        window = torch.randn(args.prompts, channels, k + length, dtype=torch.float64)
        ms = interleaved_median_times(
            {"grouped": lambda: F.conv1d(window[:, :, 1:], weight, bias, groups=channels), "shifted": lambda: depthwise_causal_conv(window, weight, bias)},
            repeats=20,
        )
        rows.append((length, ms["grouped"] * 1e3, ms["shifted"] * 1e3))

    cli = [sys.executable, "-m", "hybridtrt.cli.main", "validate", str(work / "export"), "--per-layer", "--report", str(work / "report")]
    start = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, text=True)
    cli_wall = time.perf_counter() - start

    print(f"validate_cpu benchmark — preset {args.preset}, fp32 export, {args.prompts} prompts × {args.steps} steps, per layer")
    ct = cold.timings
    print(f"  first in-process run  {cold_wall:5.1f} s   reference {ct['reference_s']:.2f} s, yardstick {ct.get('yardstick_s', 0.0):.2f} s ({ct.get('yardstick_s', 0.0) / ct['reference_s']:.2f}x)")
    print(f"  in-process validate   {wall:5.1f} s   verdict {'PASS' if report.passed else 'FAIL'} (run {len(runs)} in this process)")
    print(f"    PyTorch reference   {ref:5.1f} s")
    print(f"    fp64 yardstick      {yard:5.1f} s   {yard / ref:.2f}x the reference")
    print(f"    ONNX Runtime        {back:5.1f} s")
    print(f"    other (load, setup) {wall - ref - back - yard:5.1f} s")
    print(f"  fp64 depthwise conv1d, conv_dim {channels}, batch {args.prompts}:")
    for length, grouped, shifted in rows:
        print(f"    L = {length:<3d} grouped conv1d {grouped:6.2f} ms   shifted (used) {shifted:5.2f} ms   {grouped / shifted:5.1f}x")
    print(f"  CLI `hybridtrt validate --per-layer --report`: {cli_wall:.1f} s, exit {proc.returncode}")


if __name__ == "__main__":
    main()
