"""Export and ONNX Runtime CPU speed for a ~100M-parameter preset (issue: export).

Prints a table: export wall time, peak RSS of the export process as a multiple of the parameter
bytes (goal ≤ 2×), ONNX Runtime CPU prefill (L=512) and decode-step latency as ratios to the
PyTorch eager reference on the same machine (goal: ORT not slower than eager).

    .venv/bin/python benchmarks/export_cpu.py [--preset small-nemotron-h] [--prefill-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_time  # benchmarks/timing.py (the script's directory is on sys.path)

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
mode, ckpt, out = sys.argv[1:4]
t = time.perf_counter()
if mode == "load":
    from hybridtrt.models import load_model
    load_model(ckpt)
else:
    from hybridtrt.exporter.export import ExportOptions, export
    export(ckpt, out, ExportOptions(split=True, verify=False))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent's copy.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"wall_s": time.perf_counter() - t, "maxrss_kib": hwm}}))
"""


def child(mode: str, ckpt: Path, out: Path) -> dict:
    code = _CHILD.format(root=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code, mode, str(ckpt), str(out)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a preset")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from hybridtrt.models import create_checkpoint, load_model
    from hybridtrt.runtime.onnxruntime import OrtModel

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-bench-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else create_checkpoint(args.preset, work / "ckpt")
    out = work / "export"

    base = child("load", ckpt, out)
    exp = child("export", ckpt, out)
    model = load_model(ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    ort = OrtModel(out)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len))
    mask = torch.ones_like(ids)
    zero_ref, zero_ort = model.new_cache(1), ort.plan.zeros(1)

    with torch.no_grad():
        t_eager_prefill = median_time(lambda: model(ids, mask, zero_ref, logits="last"), args.repeats)
        t_ort_prefill = median_time(lambda: ort.run(ids, mask, zero_ort), args.repeats)
        cache = model(ids, mask, zero_ref, logits="last").cache
        state = ort.plan.feed_back(ort.run(ids, mask, zero_ort))
        tok = ids[:, -1:]
        mask2 = torch.ones(1, args.prefill_len + 1, dtype=torch.long)
        t_eager_step = median_time(lambda: model(tok, mask2, cache, logits="last"), args.repeats * 4)
        t_ort_step_unified = median_time(lambda: ort.run(tok, mask2, state), args.repeats * 4)
        t_ort_step_decode = median_time(lambda: ort.run(tok, mask2, state, session=ort.decode), args.repeats * 4)

    rows = [
        ("parameters", f"{n_params / 1e6:.1f} M ({param_bytes / 2**20:.0f} MiB fp32)"),
        ("export wall time (unified + decode graph)", f"{exp['wall_s']:.1f} s"),
        ("export peak RSS", f"{exp['maxrss_kib'] / 2**10:.0f} MiB = {exp['maxrss_kib'] * 1024 / param_bytes:.2f}× parameter bytes"),
        ("  of which above load-only baseline", f"{(exp['maxrss_kib'] - base['maxrss_kib']) / 2**10:.0f} MiB = {(exp['maxrss_kib'] - base['maxrss_kib']) * 1024 / param_bytes:.2f}× (baseline {base['maxrss_kib'] / 2**10:.0f} MiB: Python + torch + weights)"),
        (f"prefill L={args.prefill_len}: eager / ORT", f"{t_eager_prefill * 1e3:.1f} ms / {t_ort_prefill * 1e3:.1f} ms → ORT is {t_eager_prefill / t_ort_prefill:.2f}× eager speed"),
        ("decode step: eager (state update op)", f"{t_eager_step * 1e3:.2f} ms"),
        ("decode step: ORT unified graph", f"{t_ort_step_unified * 1e3:.2f} ms → {t_eager_step / t_ort_step_unified:.2f}× eager speed"),
        ("decode step: ORT decode.onnx", f"{t_ort_step_decode * 1e3:.2f} ms → {t_eager_step / t_ort_step_decode:.2f}× eager speed"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"export_cpu benchmark — preset {args.preset}, torch threads {torch.get_num_threads()}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
