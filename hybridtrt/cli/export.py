"""``hybridtrt export CHECKPOINT_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Iterator

from hybridtrt.cli.common import add_dtype_args, console, human_bytes, step, table

HELP = "export a checkpoint to ONNX (custom Mamba-2 ops with function bodies) + hybridtrt.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    add_dtype_args(p)
    p.add_argument("--logits", choices=["last", "all"], default=None, help="logits of the last position (default) or all")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=None, help="write decode.onnx (one token, Mamba2StateUpdate; the runtimes' decode steps); default: yes when the model has a Mamba layer")
    p.add_argument("--opset", type=int, default=None, help="default-domain ONNX opset (default 24: Attention needs ≥ 23, --kv-cache static ≥ 24)")
    p.add_argument("--kv-cache", choices=["dynamic", "static"], default=None, help="KV cache: dynamic (grows; default) or static (fixed capacity, written in place; README: Long context)")
    p.add_argument("--max-cache-len", type=int, default=None, metavar="N", help="KV capacity of --kv-cache static (prompt + padding + new tokens)")
    p.add_argument("--per-layer", action="store_true", help="expose every decoder layer's output (for validate --per-layer)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the written graph")
    q = p.add_argument_group("FP8 (README: FP8)")
    q.add_argument("--quantize", choices=["fp8"], default=None, help="FP8 Q/DQ on the linear layers")
    q.add_argument("--calib", default=None, metavar="FILE", help="calibration prompts, one per line (checkpoint tokenizer)")
    q.add_argument("--calib-random", type=int, default=None, metavar="N", help="N random calibration sequences")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="keep matching nodes (regex on node name) unquantized; repeatable")
    q.add_argument("--weight-scale", choices=["tensor", "channel"], default=None, help="FP8 weight scales per tensor (default) or per output channel")


def _quant_summary(recipe: dict | None) -> str:
    if not recipe:
        return "none"
    return (
        f"{recipe.get('scheme', 'fp8')} ({recipe.get('format', '')}): {len(recipe.get('quantized', []))} linear layers, "
        f"weights per-{recipe.get('weight_scale', 'tensor')}, {len(recipe.get('excluded', []))} excluded"
    )


@contextlib.contextmanager
def calibration_progress(quant) -> Iterator[None]:
    """A rich progress bar fed by the calibration callback."""
    if quant is None:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[bold]calibration", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("calibrate", total=None)
        quant.progress = lambda done, total: bar.update(task, completed=done, total=total)
        yield


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
        kv_cache=args.kv_cache or "dynamic",
        max_cache_len=args.max_cache_len,
    )
    quant = None
    if args.quantize:
        from hybridtrt.exporter.quantize import QuantizeOptions

        quant = QuantizeOptions(
            calib_file=args.calib,
            calib_random=args.calib_random,
            exclude=list(args.exclude),
            weight_scale=args.weight_scale or "tensor",
        )
    elif args.calib or args.calib_random or args.exclude or args.weight_scale:
        from hybridtrt.errors import InputError

        raise InputError(
            "--calib/--calib-random/--exclude/--weight-scale only apply to FP8 exports",
            fix="add --quantize fp8, or drop those flags",
        )
    with calibration_progress(quant):
        result = export(args.checkpoint, args.output, opts, step=step, quantize=quant)
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
        ["quantization", _quant_summary(m.quantization)],
    ]
    if result.verification:
        rows.append(["ORT vs reference", ", ".join(f"{k}: rel L2 {v:.1e}" for k, v in result.verification.items())])
    console.print(table("export summary", ["", ""], rows, numeric=False))
    console.print(table("files written", ["file", "size"], [[f"{result.out_dir / n}", human_bytes(s)] for n, s in result.files.items()]))
    return 0
