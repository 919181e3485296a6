"""ONNX Runtime (`OrtModel`, the default: one shared mapping of the weights) against HF transformers
eager on the same checkpoint: prefill at several lengths and decode per token after a prompt of that
length, with 1 and 2 threads (issue 29, goal 5: prefill ≥ HF eager, decode ≥ 1.3× HF).

One process per thread count runs both subjects, timed in interleaved rounds (one call of each per
round), so a load change on a shared machine hits both alike; the ratio is HF's time over ours (> 1:
ours faster). Decode is ``steps`` greedy tokens after the prefill, per token (HF: the model's own
cached one-token forward, as ``generate`` calls it; ours: `OrtModel.step`).

    .venv/bin/python benchmarks/runtime_speed.py [--preset small-nemotron-h] [--lengths 512 2048 8192] [--threads 1 2] [--rounds 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from workdir import exported_preset  # benchmarks/workdir.py (the script's directory is on sys.path)

CHILD = r"""
import json, sys, time, torch
export_dir, ckpt, threads, lengths, steps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.validation.hf import load_hf
ort, hf = OrtModel(export_dir, threads=threads), load_hf(ckpt, torch.float32)

def ours(ids, mask):
    start = time.perf_counter()
    logits, state = ort.step(ids, mask, ort.zero_state(1), False)
    prefill = time.perf_counter() - start
    token = logits.argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        logits, state = ort.step(token, mask, state, True)
        token = logits.argmax(-1)[:, None]
    return prefill, (time.perf_counter() - start) / steps

@torch.no_grad()
def theirs(ids, mask):
    start = time.perf_counter()
    out = hf(ids, attention_mask=mask, use_cache=True)
    prefill = time.perf_counter() - start
    cache, token, length = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None], ids.shape[1]
    start = time.perf_counter()
    for k in range(steps):  # the model's own cached step, as generate calls it (without its logits processors)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        out = hf(token, attention_mask=mask, past_key_values=cache, use_cache=True, cache_position=torch.tensor([length + k]))
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
    return prefill, (time.perf_counter() - start) / steps

torch.manual_seed(0)
warm = torch.randint(3, 250, (1, 16))
ours(warm, torch.ones_like(warm)); theirs(warm, torch.ones_like(warm))
out = {}
for length in lengths:
    ids = torch.randint(3, 250, (1, length)); mask = torch.ones_like(ids)
    runs = {"onnxruntime": [], "hf": []}
    for _ in range(rounds):
        runs["onnxruntime"].append(ours(ids, mask))
        runs["hf"].append(theirs(ids, mask))
    out[length] = {k: [min(r[0] for r in v), min(r[1] for r in v)] for k, v in runs.items()}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    work, ckpt, _ = exported_preset(args.preset, "fp32")
    rows = []
    for threads in args.threads:
        cmd = [sys.executable, "-c", CHILD, str(work / "export"), str(ckpt), str(threads), json.dumps(args.lengths), str(args.steps), str(args.rounds)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        for length, r in json.loads(done.stdout.strip().splitlines()[-1]).items():
            (op, od), (hp, hd) = r["onnxruntime"], r["hf"]
            rows.append((threads, int(length), op, hp, od, hd))
    print(f"runtime_speed benchmark — preset {args.preset}, fp32 export, batch 1, {args.steps} decode steps, best of {args.rounds} interleaved rounds")
    print("ratio: HF eager's time / ONNX Runtime's (> 1: ONNX Runtime faster)")
    print(f"{'threads':>7} {'L':>6} {'prefill ORT':>12} {'HF':>9} {'ratio':>6} {'decode ORT':>11} {'HF':>9} {'ratio':>6}")
    for threads, length, op, hp, od, hd in rows:
        print(f"{threads:>7} {length:>6} {op * 1e3:>9.0f} ms {hp * 1e3:>6.0f} ms {hp / op:>5.2f}x {od * 1e3:>8.1f} ms {hd * 1e3:>6.1f} ms {hd / od:>5.2f}x")


if __name__ == "__main__":
    main()
