"""`hybridtrt validate` wall time for a ~100M-parameter preset: 8 prompts × 32 decode steps,
split between the PyTorch reference and the ONNX Runtime backend (issue: validation).

    .venv/bin/python benchmarks/validate_cpu.py [--preset small-nemotron-h] [--prompts 8] [--steps 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()

    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models import create_checkpoint
    from hybridtrt.validation.artefact import validate_artefact

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-bench-"))
    ckpt = create_checkpoint(args.preset, work / "ckpt")
    export(ckpt, work / "export", ExportOptions(verify=False))
    start = time.perf_counter()
    report = validate_artefact(work / "export", ckpt, random_n=args.prompts, steps=args.steps)
    wall = time.perf_counter() - start
    ref, back = report.timings["reference_s"], report.timings["backend_s"]
    print(f"validate_cpu benchmark — preset {args.preset}, {args.prompts} prompts × {args.steps} steps, verdict {'PASS' if report.passed else 'FAIL'}")
    print(f"  wall time           {wall:.1f} s")
    print(f"  PyTorch reference   {ref:.1f} s ({ref / wall:.0%})")
    print(f"  ONNX Runtime        {back:.1f} s ({back / wall:.0%})")
    print(f"  other (load, setup) {wall - ref - back:.1f} s")
    print(f"  greedy token agreement {report.token_agreement:.3f}, teacher-forced top-1 {report.teacher_forced_top1:.3f}")


if __name__ == "__main__":
    main()
