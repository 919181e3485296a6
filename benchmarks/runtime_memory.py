"""Memory and speed of the ONNX Runtime backend: one shared copy of the weights vs ONNX Runtime's
own pre-packed copies, and HF transformers on the same checkpoint (issue 29, goal 3).

Each subject runs in a fresh process (RSS is per process), the rounds interleaved: load, then a
prefill of L tokens and N decode steps. Printed per subject: RSS growth after load and the peak
(VmHWM) over the baseline of a process that imported the same libraries, both as a ratio of the
export's weight-file bytes; prefill and decode times; ratios against the shared default.

    .venv/bin/python benchmarks/runtime_memory.py [--preset small-nemotron-h] [--length 512] [--steps 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from workdir import exported_preset  # benchmarks/workdir.py (the script's directory is on sys.path)

#: One subject in a fresh process (also run by benchmarks/bf16_cpu.py): ``mode`` is ``hf`` or
#: ``ort``; ``ort_kwargs`` (JSON) go to `OrtModel`; the prefill's logits are saved to ``logits``
#: (a ``.npy`` path) unless it is empty. Prints one JSON line: loaded, peak, prefill, decode.
CHILD = r"""
import json, sys, time, numpy as np, torch
mode, export_dir, ckpt, length, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ort_kwargs, logits_path = json.loads(sys.argv[6]), sys.argv[7]
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
torch.manual_seed(0)
ids = torch.randint(3, 250, (1, length)); mask = torch.ones_like(ids)
if mode == "hf":
    from hybridtrt.validation.hf import load_hf
    import transformers  # imported before the baseline, as the runtime's libraries below
    base = status('VmRSS')
    model = load_hf(ckpt, torch.float32)
    loaded = status('VmRSS') - base
    with torch.no_grad():
        model(ids[:, :8], attention_mask=mask[:, :8])  # warm-up
        start = time.perf_counter(); model(ids, attention_mask=mask); prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
        decode = (time.perf_counter() - start - prefill) / steps
else:
    from hybridtrt.runtime.onnxruntime import OrtModel
    import onnx, onnxruntime  # imported before the baseline
    base = status('VmRSS')
    model = OrtModel(export_dir, **ort_kwargs)
    loaded = status('VmRSS') - base
    model.step(ids[:, :8], mask[:, :8], model.zero_state(1), False)  # warm-up
    start = time.perf_counter(); logits, state = model.step(ids, mask, model.zero_state(1), False); prefill = time.perf_counter() - start
    if logits_path:
        np.save(logits_path, logits.numpy())
    token = logits.argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        logits, state = model.step(token, mask, state, True)
        token = logits.argmax(-1)[:, None]
    decode = (time.perf_counter() - start) / steps
print(json.dumps({"loaded": loaded, "peak": status('VmHWM') - base, "prefill": prefill, "decode": decode}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    work, ckpt, _ = exported_preset(args.preset, "fp32")
    weights = sum(p.stat().st_size for p in (work / "export").glob("*.data"))

    modes = ["ort-shared", "ort-prepacked", "hf"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            kind, kwargs = ("hf", {}) if mode == "hf" else ("ort", {"prepack": mode == "ort-prepacked"})
            cmd = [sys.executable, "-c", CHILD, kind, str(work / "export"), str(ckpt), str(args.length), str(args.steps), json.dumps(kwargs), ""]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))

    best = {m: {k: min(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    ref = best["ort-shared"]
    print(f"runtime_memory benchmark — preset {args.preset}, fp32 export, weights {weights / 2**20:.0f} MiB, prefill L={args.length}, {args.steps} decode steps, best of {args.rounds}")
    print(f"{'subject':<15}{'after load':>15}{'peak':>15}{'prefill':>16}{'decode/token':>17}")
    for mode, b in best.items():
        load = f"{b['loaded'] / 2**20:.0f} MiB {b['loaded'] / weights:.2f}x"
        peak = f"{b['peak'] / 2**20:.0f} MiB {b['peak'] / weights:.2f}x"
        prefill = f"{b['prefill'] * 1e3:.0f} ms {b['prefill'] / ref['prefill']:.2f}x"
        decode = f"{b['decode'] * 1e3:.1f} ms {b['decode'] / ref['decode']:.2f}x"
        print(f"{mode:<15}{load:>15}{peak:>15}{prefill:>16}{decode:>17}")
    print("(x after memory: of the weight file's bytes; x after times: of ort-shared's, the default)")


if __name__ == "__main__":
    main()
