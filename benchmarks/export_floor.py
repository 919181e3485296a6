"""Export time against the I/O floor: stitched tracing, and the decode graph traced beside (issue 29, goal 1).

Writes a random bf16 checkpoint of about 1 B parameters (``export_memory.py``'s ``1b`` size: 27
layers, Nano-9B-v2's ratios; ``--checkpoint`` for your own), then, in one run on the same disk:

- the floor: reading every checkpoint file once and writing as many bytes as the export writes,
  fsynced (the export fsyncs its files before publishing);
- ``hybridtrt export`` as users run it (the checkpoint's dtype, verification on, each export in a
  fresh process), in three modes, in alternating rounds: the default (layers traced from a
  prototype of one layer per kind, `hybridtrt.exporter.stitch`, and the decode graph traced in a
  second process beside the unified one, `TracedBeside`); every layer traced (``export.STITCH =
  False``), beside; and every layer in one process (``HYBRIDTRT_TRACE_BESIDE=0``: the exporter
  before both).

Prints each stage's median seconds, and per mode: export / floor, the ratio to the last mode,
tracing's fixed cost (the two "trace" stages; the decode graph's is the wait for the second
process), the streaming rate against the disk's, and the peak RSS of the exporting process and of
the tracing process.

    .venv/bin/python benchmarks/export_floor.py [--rounds 2] [--checkpoint DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import contextlib, json, sys, time
sys.path.insert(0, {root!r})
import hybridtrt.exporter.export as export_mod
ckpt, out, stitched = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
export_mod.STITCH = stitched
stages = {{}}

@contextlib.contextmanager
def step(name):
    t = time.perf_counter()
    yield
    stages[name.split(" (")[0]] = stages.get(name.split(" (")[0], 0.0) + time.perf_counter() - t

@contextlib.contextmanager
def progress(label, total, unit="B"):
    t = time.perf_counter()
    yield lambda n: None
    key = label.split(" (")[0]
    stages[key] = stages.get(key, 0.0) + time.perf_counter() - t

t = time.perf_counter()
from hybridtrt.models.config import load_config
dtype = load_config(ckpt).checkpoint_dtype or "fp32"  # the CLI's default: the dtype the checkpoint declares
export_mod.export(ckpt, out, export_mod.ExportOptions(dtype=dtype), step=step, progress=progress)
stages["export (total)"] = time.perf_counter() - t
import resource
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
peaks = {{"export process": hwm / 2**20, "tracing process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}}
print(json.dumps({{"stages": stages, "peak_gib": peaks}}))
"""


#: The exporter's modes, side by side: (name, stitched, decode graph traced beside). "default":
#: stitched and beside; "every layer": beside; "one process": every layer, in one process.
MODES = [("default", True, True), ("every layer", False, True), ("one process", False, False)]


def child(ckpt: Path, out: Path, stitched: bool, beside: bool) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    code = _CHILD.format(root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDTRT_TRACE_CACHE"} | {"HYBRIDTRT_TRACE_BESIDE": "1" if beside else "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out), "1" if stitched else "0"], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    PEAKS.append(result["peak_gib"])
    return result["stages"]


#: Peak RSS (GiB) of each export: the exporting process and the tracing process (`TracedBeside`).
PEAKS: list[dict[str, float]] = []


def floor(ckpt: Path, out_bytes: int, scratch: Path) -> tuple[float, float]:
    """Seconds to read every checkpoint file once, and to write ``out_bytes`` (fsynced)."""
    chunk = 16 << 20
    t = time.perf_counter()
    for path in sorted(ckpt.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(chunk):
                    pass
    read_s = time.perf_counter() - t
    block = os.urandom(chunk)
    t = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            f.write(block[: min(chunk, left)])
            left -= chunk
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t
    scratch.unlink()
    return read_s, write_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="export this checkpoint instead of the random 1 B one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import export_memory

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-floor-", dir=args.workdir))
    try:
        ckpt = args.checkpoint
        if ckpt is None:
            config, _, _ = export_memory.SIZES["1b"]
            ckpt = work / "ckpt"
            export_memory.write_checkpoint({**config, "dtype": "bfloat16"}, "bf16", ckpt)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in MODES}
        floors: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            for name, stitched, beside in MODES:
                runs[name].append(child(ckpt, work / "out", stitched, beside))
            out_bytes = sum(p.stat().st_size for p in (work / "out").iterdir() if p.is_file())
            floors.append(floor(ckpt, out_bytes, work / "floor.bin"))
        report(ckpt, runs, floors, out_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(ckpt: Path, runs: dict[str, list[dict[str, float]]], floors: list[tuple[float, float]], out_bytes: int) -> None:
    med = {m: {k: statistics.median(r.get(k, 0.0) for r in runs[m]) for k in runs[m][0]} for m in runs}
    read_s = statistics.median(f[0] for f in floors)
    write_s = statistics.median(f[1] for f in floors)
    floor_s = read_s + write_s
    in_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    modes = list(runs)
    stages = list(dict.fromkeys(s for m in modes for s in med[m]))
    print(f"export_floor — {ckpt.name}: {in_bytes / 2**30:.2f} GiB read, {out_bytes / 2**30:.2f} GiB written")
    print(f"median of {len(floors)} rounds (s)")
    print(f"  {'stage':<34}" + "".join(f"  {m[:12]:>12}" for m in modes))
    for s in stages:
        print(f"  {s[:34]:<34}" + "".join(f"  {med[m].get(s, 0.0):12.1f}" for m in modes))
    print(f"  floor: read {read_s:.1f} s + write {write_s:.1f} s (fsynced) = {floor_s:.1f} s")
    print(f"  the disk writes {out_bytes / write_s / 2**20:.0f} MiB/s")
    base = modes[-1]
    for m in modes:
        trace = sum(v for s, v in med[m].items() if s.startswith("trace"))
        stream = sum(v for s, v in med[m].items() if s.startswith("stream"))
        total = med[m]["export (total)"]
        print(f"  {m}: export {total:.1f} s = {total / floor_s:.1f}x the floor, {total / med[base]['export (total)']:.2f}x {base}")
        print(f"    tracing (fixed cost) {trace:.1f} s; streaming {out_bytes / stream / 2**20:.0f} MiB/s = {write_s / stream:.2f}x the disk's rate")
    print(f"  peak RSS: exporting process {max(p['export process'] for p in PEAKS):.2f} GiB,")
    print(f"    tracing process {max(p['tracing process'] for p in PEAKS):.2f} GiB")


if __name__ == "__main__":
    main()
