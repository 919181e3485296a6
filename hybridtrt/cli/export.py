"""``hybridtrt export CHECKPOINT_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
from collections import Counter

from hybridtrt.cli.common import add_dtype_args, console, human_bytes, step, table

HELP = "export a checkpoint to ONNX (custom Mamba-2 ops with function bodies) + hybridtrt.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    add_dtype_args(p)
    p.add_argument("--logits", choices=["last", "all"], default=None, help="logits of the last position (default) or all")
    p.add_argument("--split", action="store_true", help="also write decode.onnx (one token, Mamba2StateUpdate)")
    p.add_argument("--opset", type=int, default=None, help="default-domain ONNX opset (default 22; bf16 needs ≥ 22)")
    p.add_argument("--per-layer", action="store_true", help="expose every decoder layer's output (for validate --per-layer)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the written graph")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.exporter.export import ExportOptions, export

    opts = ExportOptions(
        dtype=args.dtype or "fp32",
        state_dtype=args.state_dtype,
        logits=args.logits or "last",
        split=args.split,
        opset=args.opset,
        per_layer=args.per_layer,
        verify=not args.no_verify,
    )
    result = export(args.checkpoint, args.output, opts, step=step)
    m = result.manifest
    kinds = Counter(layer["kind"] for layer in m.layers)
    ops = Counter()
    for g in m.graphs.values():
        ops.update(g.custom_ops)
    rows = [
        ["layers", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))],
        ["custom ops", ", ".join(f"{n}× {k}" for k, n in sorted(ops.items())) or "none"],
        ["parameters", f"{result.parameters:,} ({human_bytes(result.parameter_bytes)} in {m.dtype})"],
        ["state dtype", m.state_dtype],
        ["quantization", m.quantization["scheme"] if m.quantization else "none"],
    ]
    if result.verification:
        rows.append(["ORT vs reference", ", ".join(f"{k}: rel L2 {v:.1e}" for k, v in result.verification.items())])
    console.print(table("export summary", ["", ""], rows, numeric=False))
    console.print(table("files written", ["file", "size"], [[f"{result.out_dir / n}", human_bytes(s)] for n, s in result.files.items()]))
    return 0
