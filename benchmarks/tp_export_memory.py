"""Per-rank peak memory and disk of ``hybridtrt export --tp N`` against the one-device export, on one
random checkpoint (issue 27: "per-rank export peak memory measured at a ~5B size and shown to scale as
1/N").

The checkpoint is written shard by shard (`benchmarks/export_memory.write_checkpoint`); each export runs
in a child process that reports its own peak RSS (VmHWM), beside a child that imports the same modules
(the baseline). ``--tp N`` writes its N ranks one after another in one process, so its peak is the
largest rank's. Exports run with ``--no-verify`` by default; ``--verify`` measures verification too, by
layer windows (``--verify-mode layers``, one window of every rank at a time) or whole graphs (``full``:
every rank's weights at once, the model's size).
Prints one table, and the ratios of each ``--tp N`` to the one-device export side by side:

    .venv/bin/python benchmarks/tp_export_memory.py                 # 5b (5.0 B, bf16 → fp16), N = 1, 2, 4
    .venv/bin/python benchmarks/tp_export_memory.py --size 1b --worlds 2 4 8
    .venv/bin/python benchmarks/tp_export_memory.py --size 1b --worlds 2 4 --verify --verify-mode layers
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_memory import SIZES, print_markdown, write_checkpoint  # noqa: E402

_CHILD = r"""
import contextlib, io, json, sys, time
sys.path.insert(0, {root!r})
import onnx, onnxruntime, onnxscript, torch, torch.export, torch.onnx._internal.exporter._core
import hybridtrt.cli.main, hybridtrt.exporter.export, hybridtrt.exporter.tensor_parallel
argv = json.loads(sys.argv[1])
t = time.perf_counter()
if argv:
    with contextlib.redirect_stdout(io.StringIO()):
        code = hybridtrt.cli.main.main(argv)
    if code:
        sys.exit(code)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"wall_s": time.perf_counter() - t, "maxrss_kib": hwm}}))
"""


def child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT)), json.dumps(argv)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="5b", choices=list(SIZES))
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--dtype", default=None, help="export dtype (default: the size's first)")
    parser.add_argument("--verify", action="store_true", help="verify (one device and --tp: --verify-mode)")
    parser.add_argument("--verify-mode", default="layers", choices=["full", "layers"], help="with --verify: whole graphs, or by layer windows (default)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    config, ckpt_dtype, exports = SIZES[args.size]
    dtype = args.dtype or exports[0][0]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hybridtrt-tp-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "ckpt"
        n_params, seconds = write_checkpoint(config, ckpt_dtype, ckpt)
        param_bytes = n_params * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
        print(f"{args.size}: {n_params / 1e9:.2f} B parameters ({ckpt_dtype} checkpoint written in {seconds:.0f} s), export {dtype}", flush=True)
        base = child([])["maxrss_kib"] * 1024
        rows, one = [], None
        for world in [1, *args.worlds]:
            out = work / f"out-{world}"
            argv = ["export", str(ckpt), "-o", str(out), "--dtype", dtype, *(["--verify", args.verify_mode] if args.verify else ["--no-verify"]), *(["--tp", str(world)] if world > 1 else [])]
            r = child(argv)
            peak = r["maxrss_kib"] * 1024
            disk = _bytes(out) if world == 1 else max(_bytes(out / f"rank{k}") for k in range(world))
            above = peak - base
            if one is None:
                one = (above, disk, r["wall_s"])
            rows.append([
                "1 device" if world == 1 else f"--tp {world}",
                f"{peak / 2**30:.2f} GiB", f"{above / 2**30:.2f} GiB", f"{above / one[0]:.3f}", f"{1 / world:.3f}",
                f"{disk / 2**30:.2f} GiB", f"{disk / one[1]:.3f}", f"{r['wall_s']:.0f} s",
            ])  # fmt: skip
            print("  " + " | ".join(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    header = ["export", "peak RSS", "peak − baseline", "÷ 1 device", "1/N", "largest rank on disk", "÷ 1 device", "wall"]
    print(f"\ntp_export_memory — {args.size} ({n_params / 1e9:.2f} B, {param_bytes / 2**30:.2f} GiB in {dtype}); baseline (imports) {base / 2**30:.2f} GiB;"
          f" verification {f'--verify {args.verify_mode}' if args.verify else 'off (--no-verify)'}")  # fmt: skip
    print_markdown(header, rows)


if __name__ == "__main__":
    main()
