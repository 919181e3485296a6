"""Long context on ONNX Runtime CPU (issue 12): chunked prefill memory and time up to 65k tokens,
decode-step time against the cache length for the dynamic and static KV caches, and the hot spots
of the decode step, each measured side by side in one run (1 intra-op thread everywhere).

Tables:

1. Prefill of N tokens in chunks (2k … 65k): peak RSS of a fresh process and wall time, per graph.
2. Decode-step time at past 0 … 32k, per graph, and the ratio decode(past=max)/decode(past=0).
3. Hot spots: GQA as one ``Attention`` op vs K/V ``Expand`` per head; depthwise conv as
   ``Conv(group=C)`` vs K shifted multiply-adds (decode and prefill); the eager SSD scan with
   ``min(chunk, L)`` and per-group B/C vs padding to ``chunk_size`` and per-head B/C; the unified
   graph vs ``decode.onnx`` per token (and their node counts with function bodies inlined).

    .venv/bin/python benchmarks/long_context.py [--preset small-nemotron-h] \
        [--contexts 2048,8192,32768,65536] [--pasts 0,2048,8192,32768] [--prefill-chunk 2048]

Run it on a quiet machine, alone: the 65k-token prefills hold several GiB (ONNX Runtime's CPU
``Attention`` kernel materializes ``heads × chunk × positions`` fp32 scores per call).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import interleaved_median_times  # benchmarks/timing.py (the script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from hybridtrt.runtime.generation import prefill
from hybridtrt.runtime.onnxruntime import OrtModel
export_dir, context, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = OrtModel(export_dir, threads=1)
ids = torch.randint(3, model.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
logits, _ = prefill(model, ids, torch.ones_like(ids), model.zero_state(1), chunk)
wall = time.perf_counter() - t
print(json.dumps({{"wall_s": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kib": base, "finite": bool(torch.isfinite(logits).all())}}))
"""


def prefill_child(export_dir: Path, context: int, chunk: int) -> dict:
    code = _CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(export_dir), str(context), str(chunk)], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_state(ort, past: int):
    """States of the right shapes with random values (a decode step's cost does not depend on them)."""
    import numpy as np

    from hybridtrt.runtime.states import StaticState

    rng = np.random.default_rng(0)
    arrays = {}
    for b in ort.plan.buffers:
        shape = b.concrete_shape(1, past)
        arrays[b.past_name] = (rng.standard_normal(shape) * 0.1).astype(b.dtype)
    return StaticState(arrays, past) if ort.flavour.static else arrays


def decode_step(ort, past: int, session=None):
    """A callable running one decode step on ``past`` cached positions (random states)."""
    import torch

    state = random_state(ort, past)
    tok = torch.tensor([[5]])
    mask = torch.ones(1, past + 1, dtype=torch.long)
    return lambda: ort.run(tok, mask, state, session=session)


def micro_attention(past: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> tuple[float, float]:
    """One decode-step attention over ``past + 1`` keys: the opset-22 SDPA export (K/V ``Expand``ed
    per head) vs one opset-24 ``Attention`` node (GQA native)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hybridtrt.runtime.onnxruntime import OrtSession

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    q = torch.randn(1, heads, 1, head_dim)
    k = torch.randn(1, kv_heads, past + 1, head_dim)
    m = torch.ones(1, 1, 1, past + 1, dtype=torch.bool)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": k.numpy(), "m": m.numpy()}
    from torch.export import Dim

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for opset in (22, 24):
            dims = ({2: Dim.AUTO}, {2: Dim.AUTO}, {2: Dim.AUTO}, {2: Dim.AUTO, 3: Dim.AUTO})
            prog = torch.onnx.export(Sdpa().eval(), (q, k, k, m), dynamo=True, opset_version=opset, input_names=list(feeds), dynamic_shapes=dims, verbose=False)
            path = Path(tmp) / f"attn{opset}.onnx"
            prog.save(str(path))
            sessions[opset] = OrtSession(path, threads=1)
            assert np.isfinite(sessions[opset].run(feeds)[sessions[opset].output_names[0]]).all()
    t = interleaved_median_times({opset: (lambda s=s: s.run(feeds)) for opset, s in sessions.items()}, repeats)
    return t[22], t[24]


def micro_conv(conv_dim: int, kernel: int, length: int, repeats: int) -> tuple[float, float, float]:
    """The mixer's depthwise conv on ONNX Runtime: ``Conv(group=C)`` vs shifted multiply-adds.
    Returns (conv s, shifted s, max |difference|)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hybridtrt.models.layers import depthwise_causal_conv
    from hybridtrt.runtime.onnxruntime import OrtSession

    w = torch.randn(conv_dim, 1, kernel)
    b = torch.randn(conv_dim)

    class Grouped(torch.nn.Module):
        def forward(self, window):
            return F.conv1d(window[:, :, 1:], w, b, groups=conv_dim)

    class Shifted(torch.nn.Module):
        def forward(self, window):
            return depthwise_causal_conv(window, w, b)

    window = torch.randn(1, conv_dim, kernel + length)
    feeds = {"window": window.numpy()}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in (("conv", Grouped()), ("shifted", Shifted())):
            prog = torch.onnx.export(module.eval(), (window,), dynamo=True, opset_version=24, input_names=["window"], verbose=False)
            path = Path(tmp) / f"{name}.onnx"
            prog.save(str(path))
            sessions[name] = OrtSession(path, threads=1)
    t = interleaved_median_times({name: (lambda s=s: s.run(feeds)) for name, s in sessions.items()}, repeats)
    outs = [s.run(feeds)[s.output_names[0]] for s in sessions.values()]
    return t["conv"], t["shifted"], float(np.abs(outs[0] - outs[1]).max())


def micro_ssd(config, length: int, repeats: int) -> tuple[float, float]:
    """Eager chunk scan: the previous form (L padded to chunk_size with dt = 0, B/C repeated per
    head — same math, as the scan used to compute it) vs min(chunk, L) with per-group B/C."""
    import torch
    import torch.nn.functional as F

    from hybridtrt.ops.ssd import mamba2_chunk_scan_eager

    c = config
    g = torch.Generator().manual_seed(0)
    h, p, n, groups = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups
    x, dt = torch.randn(1, length, h, p, generator=g), torch.rand(1, length, h, generator=g) * 0.1
    A, D = -torch.rand(h, generator=g) - 1, torch.randn(h, generator=g)
    B, C = torch.randn(1, length, groups, n, generator=g), torch.randn(1, length, groups, n, generator=g)
    s0 = torch.randn(1, h, p, n, generator=g)
    pad = (-length) % c.chunk_size
    old = (F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)), A, F.pad(B.repeat_interleave(h // groups, 2), (0, 0, 0, 0, 0, pad)), F.pad(C.repeat_interleave(h // groups, 2), (0, 0, 0, 0, 0, pad)), D, s0)
    t = interleaved_median_times(
        {"old": lambda: mamba2_chunk_scan_eager(*old, c.chunk_size), "new": lambda: mamba2_chunk_scan_eager(x, dt, A, B, C, D, s0, c.chunk_size)}, repeats
    )
    return t["old"], t["new"]


def inlined_nodes(path: Path) -> int:
    import onnx
    import onnx.inliner

    return len(onnx.inliner.inline_local_functions(onnx.load(str(path), load_external_data=False)).graph.node)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def _quiet() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    _quiet()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-nemotron-h")
    parser.add_argument("--contexts", default="2048,8192,32768,65536", help="prefill lengths (comma-separated)")
    parser.add_argument("--pasts", default="0,2048,8192,32768", help="decode-step cache lengths (comma-separated)")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="chunk length of the dynamic graph's prefill")
    parser.add_argument("--static-chunk", type=int, default=None, help="chunk length of the static graph's prefill (default: --prefill-chunk)")
    parser.add_argument("--new-tokens", type=int, default=1024, help="static capacity = longest context + this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: prefill,decode,hotspots")
    parser.add_argument("--work", default=None, help="keep checkpoint and exports here (reused when present)")
    parser.add_argument("--baseline", default=None, metavar="DIR", help="also time the decode steps of this dynamic export (e.g. one made before issue 12 from the same checkpoint)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    contexts = [int(x) for x in args.contexts.split(",")]
    pasts = [int(x) for x in args.pasts.split(",")]

    import torch

    torch.set_num_threads(1)
    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models import create_checkpoint, load_model
    from hybridtrt.runtime.onnxruntime import OrtModel

    work = Path(args.work or tempfile.mkdtemp(prefix="hybridtrt-long-"))
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        create_checkpoint(args.preset, ckpt)
    capacity = max(contexts + [max(pasts) + 1]) + args.new_tokens
    exports = {"dynamic": (work / "dynamic", ExportOptions(split=True, verify=False)), "static": (work / f"static{capacity}", ExportOptions(split=True, verify=False, kv_cache="static", max_cache_len=capacity))}
    for name, (out, opts) in exports.items():
        if not (out / "hybridtrt.json").exists():
            t = time.perf_counter()
            export(ckpt, out, opts)
            print(f"exported {name} graph in {time.perf_counter() - t:.0f} s → {out}")
    model = load_model(ckpt)
    c = model.config
    print(f"long_context benchmark — preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{len(c.layers_of('*'))} attention layers of {c.num_attention_heads}/{c.num_key_value_heads} heads), ORT and torch on 1 thread, static capacity {capacity}")

    if "prefill" not in skip:
        rows = []
        for name, (out, _) in exports.items():
            chunk = args.static_chunk or args.prefill_chunk if name == "static" else args.prefill_chunk
            for n in contexts:
                r = prefill_child(out, n, chunk)
                if "error" in r:
                    rows.append([name, f"{n:,}", str(chunk), "—", "—", "—", r["error"][:60]])
                    continue
                rows.append([name, f"{n:,}", str(chunk), f"{r['maxrss_kib'] / 2**20:.2f} GiB", f"{(r['maxrss_kib'] - r['base_kib']) / 2**20:.2f} GiB", f"{r['wall_s']:.1f} s", f"{n / r['wall_s']:.0f} tok/s"])
        table("1. chunked prefill on ONNX Runtime (fresh process per row)", ["graph", "tokens", "chunk", "peak RSS", "above session load", "time", "rate"], rows)

    if "decode" not in skip:
        graphs = {**({"baseline": (Path(args.baseline), None)} if args.baseline else {}), **exports}
        steps = {}
        for name, (out, _) in graphs.items():
            ort = OrtModel(out, threads=1)
            for label, session in (("unified", ort.unified), ("decode.onnx", ort.decode)):
                steps.update({(f"{name}, {label}", p): decode_step(ort, p, session) for p in pasts})
        times = interleaved_median_times(steps, args.repeats * 4)
        rows = []
        for row in dict.fromkeys(k for k, _ in steps):
            lo, hi = times[(row, pasts[0])], times[(row, pasts[-1])]
            rows.append([row, *[f"{times[(row, p)] * 1e3:.2f}" for p in pasts], f"{hi / lo:.2f}×"])
        table("2. decode step, ms, by cache length (static: capacity fixed; timed interleaved)", ["graph", *[f"past {p:,}" for p in pasts], f"past {pasts[-1]:,} / past {pasts[0]}"], rows)

    if "hotspots" not in skip:
        rows = []
        for past in (0, 8192):
            expand, attention = micro_attention(past, c.num_attention_heads, c.num_key_value_heads, c.attention_head_dim, args.repeats * 4)
            rows.append([f"GQA attention, decode, past {past:,}", f"Expand per head {expand * 1e3:.3f} ms", f"Attention op {attention * 1e3:.3f} ms", f"{expand / attention:.2f}×"])
        for length in (1, 512):
            conv, shifted, diff = micro_conv(c.conv_dim, c.conv_kernel, length, args.repeats * 4)
            rows.append([f"depthwise conv, L={length}", f"Conv(group) {conv * 1e6:.1f} µs", f"shifted adds {shifted * 1e6:.1f} µs", f"{conv / shifted:.2f}× (|Δ| {diff:.1e})"])
        for length in (7, 2048):
            old, new = micro_ssd(c, length, args.repeats)
            rows.append([f"eager chunk scan, L={length}", f"padded, B/C per head {old * 1e3:.1f} ms", f"min(chunk, L), per group {new * 1e3:.1f} ms", f"{old / new:.2f}×"])
        out = exports["dynamic"][0]
        ort = OrtModel(out, threads=1)
        for past in (0, 8192):
            t = interleaved_median_times({"unified": decode_step(ort, past, ort.unified), "decode": decode_step(ort, past, ort.decode)}, args.repeats * 4)
            rows.append([f"decode step, dynamic, past {past:,}", f"unified {t['unified'] * 1e3:.2f} ms", f"decode.onnx {t['decode'] * 1e3:.2f} ms", f"{t['unified'] / t['decode']:.2f}×"])
        rows.append(["nodes with bodies inlined", f"unified {inlined_nodes(out / 'model.onnx')}", f"decode.onnx {inlined_nodes(out / 'decode.onnx')}", ""])
        table("3. hot spots (old form / new form, ratio = speed-up)", ["", "old / A", "new / B", "A / B"], rows)


if __name__ == "__main__":
    main()
