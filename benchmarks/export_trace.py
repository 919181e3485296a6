"""The fixed cost of tracing, cold and replayed (issue 29, goal 1).

Exports two checkpoints of one architecture that differ in every value (seeds 0 and 1), each in a
fresh process, with an empty trace cache and then with the cache the first export filled
(`HYBRIDTRT_TRACE_CACHE`): the second export misses the finished graphs (other bytes) and replays
the unoptimized traces, which hold no value (`hybridtrt.exporter.streaming.FrozenTrace`). Rounds
alternate cold and replayed (each round with a new cache), and the table prints the median of each
stage and the replayed/cold ratio, measured side by side in one run. Verification is off: it is
not part of tracing.

    .venv/bin/python benchmarks/export_trace.py [--preset small-nemotron-h] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import contextlib, json, sys, time
sys.path.insert(0, {root!r})
from hybridtrt.exporter.export import ExportOptions, export
ckpt, out = sys.argv[1:3]
stages = {{}}

@contextlib.contextmanager
def step(name):
    t = time.perf_counter()
    yield
    stages[name.split(" (")[0]] = time.perf_counter() - t

t = time.perf_counter()
export(ckpt, out, ExportOptions(split=True, verify=False), step=step)
stages["export (total)"] = time.perf_counter() - t
print(json.dumps(stages))
"""


def child(ckpt: Path, out: Path, cache: Path) -> dict[str, float]:
    code = _CHILD.format(root=str(Path(__file__).resolve().parents[1]))
    env = {**os.environ, "HYBRIDTRT_TRACE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from hybridtrt.models import create_checkpoint

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-bench-"))
    first = create_checkpoint(args.preset, work / "seed0", seed=0)
    other = create_checkpoint(args.preset, work / "seed1", seed=1)
    cold: list[dict[str, float]] = []
    replayed: list[dict[str, float]] = []
    for r in range(args.rounds):
        cache = work / f"cache{r}"
        cold.append(child(first, work / f"cold{r}", cache))
        replayed.append(child(other, work / f"replayed{r}", cache))

    stages = [s for s in cold[0] if s.startswith("trace")] + ["export (total)"]
    width = max(len(s) for s in stages)
    print(f"export_trace benchmark — preset {args.preset}, median of {args.rounds} interleaved rounds (s)")
    print(f"  {'stage':<{width}}  {'cold':>7}  {'replayed':>8}  {'ratio':>6}")
    for s in stages:
        a = statistics.median(c[s] for c in cold)
        b = statistics.median(c[s] for c in replayed)
        print(f"  {s:<{width}}  {a:7.1f}  {b:8.1f}  {b / a:6.2f}")


if __name__ == "__main__":
    main()
