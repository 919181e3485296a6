"""``hybridtrt build EXPORT_DIR -o model.engine``: a TensorRT 11 engine + its sidecar."""

from __future__ import annotations

import argparse

from hybridtrt.cli.common import console, human_bytes, step, table

HELP = "build a TensorRT engine (two profiles: prefill, decode) from an export directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hybridtrt.engine.profiles import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN

    p.add_argument("export_dir", help="directory written by `hybridtrt export`")
    p.add_argument("-o", "--output", required=True, help="engine file to write (the sidecar goes to OUTPUT.json)")
    g = p.add_argument_group("profiles")
    g.add_argument("--max-batch", type=int, default=None, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    g.add_argument("--max-input-len", type=int, default=None, help=f"longest prompt in one prefill (default {DEFAULT_MAX_INPUT_LEN})")
    g.add_argument("--max-cache-len", type=int, default=None, help=f"most KV positions, prompt + new tokens (default {DEFAULT_MAX_CACHE_LEN})")
    g.add_argument("--graph", choices=["unified", "decode"], default=None, help="graph to build: unified (default; prefill + decode profiles) or decode (decode.onnx)")
    b = p.add_argument_group("build")
    b.add_argument("--plugins", default=None, help="plugin library (default: the built libhybridtrt_trt.so if any, else the ONNX function bodies)")
    b.add_argument("--timing-cache", default=None, help="timing cache file, loaded if present and saved back")
    b.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level (default: TensorRT's)")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.engine.build import build_engine, import_tensorrt, plan_build
    from hybridtrt.engine.profiles import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN, profile_rows

    plan = plan_build(
        args.export_dir,
        args.output,
        max_batch=args.max_batch if args.max_batch is not None else DEFAULT_MAX_BATCH,
        max_input_len=args.max_input_len if args.max_input_len is not None else DEFAULT_MAX_INPUT_LEN,
        max_cache_len=args.max_cache_len if args.max_cache_len is not None else DEFAULT_MAX_CACHE_LEN,
        plugins=args.plugins,
        timing_cache=args.timing_cache,
        graph=args.graph or "unified",
        builder_optimization_level=args.opt_level,
    )
    console.print(table(f"optimization profiles of {plan.onnx_path.name}", ["profile", "input", "min", "opt", "max"], profile_rows(plan.profiles)))
    if plan.plugin_library is not None:
        console.print(f"plugins: {plan.plugin_library}", markup=False)
    else:
        console.print("plugins: none built — the custom ops build from their ONNX function bodies (slower; `hybridtrt plugins build` for the plugins)")
    import_tensorrt()  # fails here, after the table and before anything is written
    with step("building TensorRT engine"):
        result = build_engine(args.export_dir, args.output, plan=plan)
    rows = [
        ["engine", f"{result.engine} ({human_bytes(result.engine_bytes)})"],
        ["sidecar", str(result.sidecar)],
        ["TensorRT", result.tensorrt_version],
        ["build time", f"{result.seconds:.1f} s"],
    ]
    if plan.timing_cache is not None:
        rows.append(["timing cache", str(plan.timing_cache)])
    console.print(table("build summary", ["", ""], rows))
    return 0
