"""``hybridtrt build EXPORT_DIR -o model.engine``: a TensorRT 11 engine + its sidecar.

``--check-tensorrt VERSION`` runs the version gates and the emulated parser dispatch for that TensorRT
release without TensorRT (exit 0 when the graph would build as asked, 2 otherwise).

On a tensor-parallel export (``export --tp N``: ``rank0/ …`` and ``hybridtrt-tp.json``) it builds every
rank's engine, ``rank{r}/OUTPUT`` (``-o`` is then the engine's file name, default ``model.engine``), each
sidecar recording its rank and world; ``generate OUT/rank0/model.engine`` runs them on N GPUs.
"""

from __future__ import annotations

import argparse

from hybridtrt.cli.common import add_integrity_argument, check_integrity, console, human_bytes, step, table

HELP = "build a TensorRT engine (two profiles: prefill, decode) from an export directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hybridtrt.engine.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN

    p.add_argument("export_dir", help="directory written by `hybridtrt export`")
    add_integrity_argument(p)
    p.add_argument("-o", "--output", default=None, help="engine file to write (the sidecar goes to OUTPUT.json); required unless --check-tensorrt")
    g = p.add_argument_group("profiles")
    g.add_argument("--max-batch", type=int, default=None, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    g.add_argument("--max-input-len", type=int, default=None, help=f"longest prompt in one prefill (default {DEFAULT_MAX_INPUT_LEN})")
    g.add_argument("--max-cache-len", type=int, default=None, help=f"most KV positions, prompt + new tokens (default {DEFAULT_MAX_CACHE_LEN})")
    g.add_argument(
        "--graph",
        choices=["unified", "decode", "mtp"],
        default=None,
        help="graph to build: unified (default; prefill + decode profiles), decode (decode.onnx), or mtp (mtp.onnx of a --speculative export: --check-tensorrt only for now)",
    )
    b = p.add_argument_group("build")
    b.add_argument("--plugins", default=None, help="plugin library (default: the built libhybridtrt_trt.so if any, else the ONNX function bodies)")
    b.add_argument(
        "--allow-function-bodies",
        action="store_true",
        help="accept custom nodes built from their ONNX function bodies although a plugin library is given "
        "(default: a typed error, e.g. on TensorRT <= 10.6 or when the plugins did not register)",
    )
    b.add_argument(
        "--attention",
        choices=["decomposable", "fused"],
        default="decomposable",
        help="IAttention layers: decomposable (default; TensorRT may use several kernels where no fused kernel fits, "
        "e.g. fp32 or head_dim 16) or fused (fused kernels only; the build fails where none fits)",
    )
    b.add_argument("--timing-cache", default=None, help="timing cache file, loaded if present and saved back")
    b.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level (default: TensorRT's)")
    b.add_argument(
        "--check-tensorrt",
        metavar="VERSION",
        default=None,
        help="only check the graph against TensorRT VERSION's ONNX parser (emulated; no TensorRT needed): "
        "opset range, plugin vs function body for every custom node, native layers, and the parser's checker, "
        "type and constant-input rules on every node and function body",
    )


def _dispatch_table(report, plugins: bool):  # noqa: ANN001, ANN202 - rich table of a DispatchReport
    title = f"TensorRT {report.tensorrt} ONNX parser ({report.release.dispatch}; opset {report.opset} of ≤ {report.release.max_opset}), plugins {'registered' if plugins else 'not loaded'}"
    return table(title, ["op", "imported as", "nodes", "detail"], report.rows() or [["(no custom or native-layer nodes)", "", "", ""]], numeric=False)


def run(args: argparse.Namespace) -> int:
    from hybridtrt.engine.build import build_engine, check_dispatch, import_tensorrt
    from hybridtrt.errors import InputError

    from hybridtrt.exporter.manifest import is_tp_export

    if is_tp_export(args.export_dir):
        return _run_tp(args)
    if args.output is None and args.check_tensorrt is None:
        raise InputError("hybridtrt build needs -o/--output (or --check-tensorrt VERSION to only check)", fix="pass -o model.engine")
    if args.graph == "mtp" and args.check_tensorrt is None:
        raise InputError("--graph mtp: no TensorRT runtime drafts with an MTP engine yet (DESIGN.md §11); the graph can be checked", fix="add --check-tensorrt VERSION, or draft on ONNX Runtime (generate EXPORT --speculative mtp)")
    check_integrity(args, args.export_dir)
    plan = _plan(args, args.export_dir, args.output or f"{args.export_dir}/model.engine")
    _print_plan(plan)
    if args.check_tensorrt is not None:
        _print_dispatch(check_dispatch(plan, args.check_tensorrt), plan)  # check_dispatch raises EngineError (exit 2) listing every problem
        console.print(f"TensorRT {args.check_tensorrt} would build {plan.onnx_path.name} as asked")
        return 0
    trt = import_tensorrt()  # fails here, after the table and before anything is written
    _print_dispatch(check_dispatch(plan, str(trt.__version__)), plan)
    with step("building TensorRT engine"):
        result = build_engine(args.export_dir, args.output, plan=plan)
    rows = [
        ["engine", f"{result.engine} ({human_bytes(result.engine_bytes)})"],
        ["sidecar", str(result.sidecar)],
        ["TensorRT", result.tensorrt_version],
        ["network", result.network.summary()],
        ["attention", result.attention.summary()],
        ["plugin library", str(result.plugin_library) if result.plugin_library else "not needed at run time"],
        ["build time", f"{result.seconds:.1f} s"],
    ]
    if plan.timing_cache is not None:
        rows.append(["timing cache", str(plan.timing_cache)])
    console.print(table("build summary", ["", ""], rows))
    return 0


def _plan(args: argparse.Namespace, export_dir, output):  # noqa: ANN001, ANN202 - a BuildPlan
    from hybridtrt.engine.build import plan_build
    from hybridtrt.engine.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN

    return plan_build(
        export_dir,
        output,
        max_batch=args.max_batch if args.max_batch is not None else DEFAULT_MAX_BATCH,
        max_input_len=args.max_input_len if args.max_input_len is not None else DEFAULT_MAX_INPUT_LEN,
        max_cache_len=args.max_cache_len if args.max_cache_len is not None else DEFAULT_MAX_CACHE_LEN,
        plugins=args.plugins,
        timing_cache=args.timing_cache,
        graph=args.graph or "unified",
        builder_optimization_level=args.opt_level,
        allow_function_bodies=args.allow_function_bodies,
        attention=args.attention,
    )


def _print_plan(plan) -> None:  # noqa: ANN001 - a BuildPlan
    from hybridtrt.engine.profiles import profile_rows

    by_profile: dict[str, list[list[str]]] = {}
    for profile, *row in profile_rows(plan.profiles):  # one table per profile: fits 80 columns
        by_profile.setdefault(profile, []).append(row)
    for profile, rows in by_profile.items():
        console.print(table(f"{plan.onnx_path.name}: optimization profile {profile}", ["input", "min", "opt", "max"], rows))
    if plan.plugin_library is not None:
        console.print(f"plugins: {plan.plugin_library}", markup=False)
    else:
        console.print("plugins: none built — the custom ops build from their ONNX function bodies (slower; `hybridtrt plugins build` for the plugins)")


def _print_dispatch(report, plan) -> None:  # noqa: ANN001 - a DispatchReport and its BuildPlan
    console.print(_dispatch_table(report, plan.plugin_library is not None))
    for note in report.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _run_tp(args: argparse.Namespace) -> int:
    """Every rank's engine of a tensor-parallel export (or, with --check-tensorrt, every rank's graph checked)."""
    from pathlib import Path

    from hybridtrt.engine.build import build_engine, check_dispatch, import_tensorrt
    from hybridtrt.errors import InputError
    from hybridtrt.exporter.tensor_parallel import rank_dir, read_tp_manifest

    name = args.output or "model.engine"
    if Path(name).name != name or name in (".", ".."):
        raise InputError(
            f"-o {name}: for a tensor-parallel export -o names the engine file each rank's directory gets (rank0/{Path(name).name or 'model.engine'}, …)",
            fix="pass a file name, e.g. -o model.engine",
        )
    if args.graph == "mtp":
        raise InputError("--graph mtp: a tensor-parallel export has no MTP graph", fix="drop --graph mtp")
    check_integrity(args, args.export_dir)
    top, _ = read_tp_manifest(args.export_dir)
    world = int(top["tensor_parallel"]["world"])
    root = Path(args.export_dir)
    plans = [_plan(args, root / rank_dir(r), root / rank_dir(r) / name) for r in range(world)]
    _print_plan(plans[0])  # every rank has the same inputs and profiles (one architecture at its widths)
    version = args.check_tensorrt
    if version is None:
        version = str(import_tensorrt().__version__)  # fails here, before anything is written
    reports = [check_dispatch(plan, version) for plan in plans]  # raises EngineError (exit 2) naming the problems
    _print_dispatch(reports[0], plans[0])
    if args.check_tensorrt is not None:
        rows = [[rank_dir(r), str(plan.onnx_path.name), "would build"] for r, plan in enumerate(plans)]
        console.print(table(f"TensorRT {version}: {world} ranks", ["rank", "graph", "parser"], rows, numeric=False))
        console.print(f"TensorRT {version} would build every rank's {plans[0].onnx_path.name} as asked")
        return 0
    rows = []
    for r, plan in enumerate(plans):
        with step(f"building rank {r}'s engine ({r + 1}/{world})"):
            result = build_engine(root / rank_dir(r), root / rank_dir(r) / name, plan=plan)
        rows.append([rank_dir(r), f"{human_bytes(result.engine_bytes)}", f"{result.seconds:.1f} s"])
    console.print(table(f"{world} rank engines ({name} in each rank directory)", ["rank", "engine", "build time"], rows))
    console.print(f"run them on {world} GPUs: hybridtrt generate {root / rank_dir(0) / name} --prompt …", markup=False, soft_wrap=True)
    return 0
