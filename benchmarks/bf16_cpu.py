"""bf16 exports on ONNX Runtime CPU: emulated bf16 vs fp32 inference of the bf16 weights vs the fp32
export (issue 29, goal 4).

ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 export runs either through the bf16
emulation (every bf16 tensor rounded where it is produced: what validation judges, as TensorRT
computes it) or as fp32 inference of its bf16 weights (`OrtModel`'s default). Each subject runs in a
fresh process (RSS is per process), rounds interleaved: load, a prefill of L tokens, N decode steps.
Printed per subject: prefill and decode times as a ratio of the fp32 export's, RSS after load and
peak (VmHWM) over a baseline that imported the same libraries, as a ratio of the bf16 export's
weight-file bytes, and the prefill logits' rel L2 against PyTorch fp32 on the same (bf16-rounded)
weights, so the precision each mode buys is measured beside its cost.

    .venv/bin/python benchmarks/bf16_cpu.py [--preset small-nemotron-h] [--length 512] [--steps 16] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime_memory import CHILD  # benchmarks/runtime_memory.py (the script's directory is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.judge.metrics import compare
    from hybridtrt.models import create_checkpoint
    from hybridtrt.models.loading import load_model

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-bench-"))
    ckpt = create_checkpoint(args.preset, work / "ckpt")
    for dtype in ("fp32", "bf16"):
        export(ckpt, work / dtype, ExportOptions(dtype=dtype, verify=False))
    weights = sum(p.stat().st_size for p in (work / "bf16").glob("*.data"))

    subjects = {"fp32 export": ("fp32", "fp32"), "bf16 emulated": ("bf16", "emulate"), "bf16 as fp32": ("bf16", "fp32")}
    runs: dict[str, list[dict]] = {s: [] for s in subjects}
    for _ in range(args.rounds):
        for name, (dtype, mode) in subjects.items():
            logits = work / f"{dtype}-{mode}.npy"
            kwargs = {"threads": args.threads, "bf16": mode}
            cmd = [sys.executable, "-c", CHILD, "ort", str(work / dtype), str(ckpt), str(args.length), str(args.steps), json.dumps(kwargs), str(logits)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))

    # The truth of the bf16 export's arithmetic: PyTorch fp32 on its (bf16-rounded) weights.
    torch.manual_seed(0)
    ids = torch.randint(3, 250, (1, args.length))
    model = load_model(ckpt, "bf16").float()
    with torch.no_grad():
        truth = model(ids, torch.ones_like(ids), logits="last").logits.float().numpy()

    best = {s: {k: min(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    ref = best["fp32 export"]
    print(
        f"bf16_cpu benchmark - preset {args.preset}, bf16 weights {weights / 2**20:.0f} MiB, prefill L={args.length}, "
        f"{args.steps} decode steps, {args.threads} thread(s), best of {args.rounds}"
    )
    print(f"{'subject':<15}{'prefill':>15}{'decode/token':>16}{'after load':>15}{'peak':>15}{'rel L2':>10}")
    for name, b in best.items():
        dtype, mode = subjects[name]
        rel = compare(np.load(work / f"{dtype}-{mode}.npy"), truth).rel_l2 if dtype == "bf16" else float("nan")
        prefill = f"{b['prefill'] * 1e3:.0f} ms {b['prefill'] / ref['prefill']:.2f}x"
        decode = f"{b['decode'] * 1e3:.1f} ms {b['decode'] / ref['decode']:.2f}x"
        load = f"{b['loaded'] / 2**20:.0f} MiB {b['loaded'] / weights:.1f}x"
        peak = f"{b['peak'] / 2**20:.0f} MiB {b['peak'] / weights:.1f}x"
        print(f"{name:<15}{prefill:>15}{decode:>16}{load:>15}{peak:>15}{rel:>10.1e}")
    print("(x after times: of the fp32 export's; x after memory: of the bf16 weight file's bytes;")
    print(" rel L2: prefill logits against PyTorch fp32 on the bf16-rounded weights)")


if __name__ == "__main__":
    main()
