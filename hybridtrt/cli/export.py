"""``hybridtrt export CHECKPOINT_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

from hybridtrt.cli.common import add_dtype_args, console, human_bytes, routing_summary, step, table

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
    p.add_argument(
        "--speculative",
        action="store_true",
        help="graphs for generate --speculative: every position's logits and the final hidden states, and the MTP head as mtp.onnx when the checkpoint has one (README: Speculative decoding)",
    )
    p.add_argument(
        "--verify",
        choices=["auto", "full", "layers"],
        default=None,
        help="check the written graphs with ONNX Runtime before publishing: the whole graph (full), "
        "by windows of decoder layers in bounded memory (layers), or full up to 256 MiB of weights (auto, default)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the written graphs")
    p.add_argument("--force", action="store_true", help="export into a non-empty directory that is not a hybridtrt export, or into the checkpoint directory")
    tp = p.add_argument_group("tensor parallelism (README: Tensor parallelism)")
    tp.add_argument("--tp", type=int, default=None, metavar="N", help="split over N GPUs (2, 4, 8): rank0/ … rankN-1/, one export per rank, verified together")
    tp.add_argument(
        "--tp-vocab", choices=["parallel", "replicated"], default=None, help="--tp: embedding and LM head split by vocabulary rows (parallel, default) or whole on every rank"
    )
    p.add_argument("--dequantize", action="store_true", help="a quantized (ModelOpt FP8/NVFP4) checkpoint: export its weights dequantized to --dtype, no Q/DQ")
    p.add_argument(
        "--dequantize-experts",
        action="store_true",
        help="an NVFP4 MoE checkpoint: routed experts in --dtype (TensorRT builds them without a MoE plugin; default: 4-bit MoeExpertsNvfp4)",
    )
    p.add_argument(
        "--fp4-activations",
        action="store_true",
        help="an NVFP4 checkpoint: FP4 activations too (W4A4, TRT_FP4DynamicQuantize with its input scales); Blackwell GPUs only (default: W4A16, any GPU)",
    )
    q = p.add_argument_group("quantization (README: FP8, 4-bit weights)")
    q.add_argument(
        "--quantize",
        choices=["fp8", "int4"],
        default=None,
        help="fp8: FP8 Q/DQ on the linear layers; int4: 4-bit weights (W4A16), activations in --dtype: AWQ with --calib/--calib-random, round to nearest without",
    )
    q.add_argument(
        "--block-size", type=int, choices=[32, 64, 128], default=None, help="int4: inputs per weight scale (default 128; TensorRT documents 64 and 128)"
    )
    q.add_argument(
        "--recipe", default=None, metavar="NAME|FILE", help="a quantization recipe (scheme and the layers kept in --dtype): nemotron-3-nano-nvfp4-layout, nemotron-nano-9b-v2-fp8, or a JSON file"
    )
    q.add_argument("--calib", default=None, metavar="FILE", help="calibration prompts, one per line (checkpoint tokenizer)")
    q.add_argument("--calib-random", type=int, default=None, metavar="N", help="N random calibration sequences")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="keep matching nodes (regex on node name) unquantized; repeatable")
    q.add_argument("--weight-scale", choices=["tensor", "channel"], default=None, help="FP8 weight scales per tensor (default) or per output channel")


def _quant_summary(recipe: dict | None) -> str:
    if not recipe:
        return "none"
    source = recipe.get("source", "calibration")
    if source.startswith("checkpoint: "):  # a ModelOpt checkpoint's own scales, as read
        return f"{recipe.get('scheme', 'fp8')} ({recipe.get('format', '')}), the checkpoint's own scales: {source.removeprefix('checkpoint: ')}"
    return (
        f"{recipe.get('scheme', 'fp8')} ({recipe.get('format', '')}): {len(recipe.get('quantized', []))} linear layers, "
        f"weights per-{recipe.get('weight_scale', 'tensor')}, {len(recipe.get('excluded', []))} excluded"
    )


def _weight_only_summary(recipe: dict) -> str:
    """``int4 W4A16, blocks of 128 (1 layer 64): 18 linear layers, 3 excluded``."""
    n, excluded = len(recipe.get("quantized", [])), len(recipe.get("excluded", {}))
    source = recipe.get("source", "")
    experts = sum(node.endswith("/MoeExperts") for node in recipe.get("excluded", {}))
    kept = f"; the routed experts of {experts} MoE layers stay unquantized (dequantized)" if experts else ""
    four_bit = sum(node.endswith("/MoeExpertsNvfp4") for node in recipe.get("quantized", []))
    kept += f"; the routed experts of {four_bit} MoE layers as 4-bit MoeExpertsNvfp4 (TensorRT: needs a MoE plugin)" if four_bit else ""
    if source.startswith("checkpoint: "):
        form = "W4A4 (FP4 activations: Blackwell only)" if recipe.get("activations") else "W4A16"
        return f"{recipe['scheme']} {form} ({recipe['format']}), the checkpoint's own scales: {source.removeprefix('checkpoint: ')}{kept}"
    other = recipe.get("blocks", {})
    blocks = f"blocks of {recipe['block_size']}" + (f" ({len(other)} layer(s) smaller: {', '.join(sorted({str(b) for b in other.values()}))})" if other else "")
    how = "AWQ" if recipe.get("awq") else "round to nearest"
    return f"{recipe['scheme']} W4A16 ({how}), {blocks}: {n} linear layers, {excluded} excluded"


@contextlib.contextmanager
def progress(label: str, total: int, unit: str = "B") -> Iterator[Callable[[int], None]]:
    """A rich progress bar with ETA (bytes and speed when ``unit`` is ``"B"``), then a ✓ line."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "B" else (MofNCompleteColumn(),)
    start = time.perf_counter()
    with Progress(f"[bold]{escape(label)}", BarColumn(), *counts, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
    seconds = time.perf_counter() - start
    amount = f"{human_bytes(total)}, {human_bytes(total / seconds)}/s, " if unit == "B" and seconds > 0 else ""
    console.print(f"[green]✓[/] {escape(label)} [dim]({amount}{seconds:.1f} s)[/]")


def _apply_recipe(args: argparse.Namespace) -> dict | None:
    """``--recipe``: its scheme becomes ``--quantize`` (a different explicit one is refused), its block
    size the default ``--block-size``; its kept layers are resolved in `run` (they need the config)."""
    if args.recipe is None:
        return None
    from hybridtrt.errors import InputError
    from hybridtrt.exporter.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    if args.quantize and args.quantize != recipe["scheme"]:
        raise InputError(f"--quantize {args.quantize} contradicts --recipe {recipe['name']} ({recipe['scheme']})", fix="drop --quantize (the recipe sets it)")
    args.quantize = recipe["scheme"]
    if args.block_size is None and recipe["scheme"] == "int4":
        args.block_size = recipe.get("block_size")
    return recipe


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations, refused before anything is imported or read."""
    from hybridtrt.errors import InputError, QuantizationError

    if args.speculative and args.logits == "last":
        raise InputError("--speculative exports every position's logits (a verify call reads them all); --logits last contradicts it", fix="drop --logits last")
    if args.block_size is not None and args.quantize != "int4":
        raise InputError(f"--block-size {args.block_size} only applies to --quantize int4", fix="add --quantize int4, or drop --block-size")
    if args.quantize == "int4":
        if args.weight_scale:
            raise InputError("--weight-scale is FP8's; INT4 scales each block of --block-size inputs", fix="drop --weight-scale")
        if args.calib and args.calib_random is not None:
            raise QuantizationError("--quantize int4 takes one calibration source (got both --calib and --calib-random)", fix="pass one of them")
    elif args.quantize:
        if (args.calib is None) == (args.calib_random is None):
            raise QuantizationError(
                "--quantize fp8 needs exactly one calibration source" + (" (got both --calib and --calib-random)" if args.calib else ""),
                fix="pass --calib PROMPTS.txt (one prompt per line) or --calib-random N",
            )
    elif args.calib or args.calib_random or args.exclude or args.weight_scale:
        raise InputError(
            "--calib/--calib-random/--exclude/--weight-scale only apply to quantized exports",
            fix="add --quantize fp8 (or --quantize int4 with --exclude), or drop those flags",
        )
    if args.no_verify and args.verify:
        raise InputError(f"--verify {args.verify} and --no-verify contradict each other", fix="pass one of them")
    if args.tp_vocab and args.tp is None:
        raise InputError(f"--tp-vocab {args.tp_vocab} only applies to --tp exports", fix="add --tp N, or drop --tp-vocab")
    if args.tp is not None:
        if args.tp < 2:
            raise InputError(f"--tp {args.tp}: tensor parallel needs at least 2 ranks", fix="--tp 2, 4 or 8 (or no --tp: one device)")


def _export_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """The export dtype and why: ``--dtype``, else the dtype the checkpoint declares (bf16 for real
    Nemotron-H checkpoints: TensorRT builds from it, half the bytes of fp32, and ONNX Runtime CPU runs
    it through the bf16 emulation), else fp32."""
    if args.dtype:
        return args.dtype, "--dtype"
    from pathlib import Path

    if not (Path(args.checkpoint) / "config.json").is_file():
        return "fp32", "default"  # export itself says what is wrong with the checkpoint
    from hybridtrt.models.config import load_config

    declared = load_config(args.checkpoint).checkpoint_dtype
    if declared:
        return declared, "the checkpoint's declared dtype; --dtype to choose"
    return "fp32", "the checkpoint declares no dtype; --dtype to choose"


def run(args: argparse.Namespace) -> int:
    recipe = _apply_recipe(args)
    _check_flags(args)
    from hybridtrt.exporter.export import ExportOptions, export, return_freed_memory_promptly

    return_freed_memory_promptly()
    dtype, dtype_source = _export_dtype(args)
    opts = ExportOptions(
        dtype=dtype,
        state_dtype=args.state_dtype,
        logits=args.logits or "last",
        split=args.split,
        opset=args.opset,
        per_layer=args.per_layer,
        verify=not args.no_verify,
        verify_mode=args.verify or "auto",
        force=args.force,
        kv_cache=args.kv_cache or "dynamic",
        max_cache_len=args.max_cache_len,
        dequantize=args.dequantize,
        fp4_activations=args.fp4_activations,
        dequantize_experts=args.dequantize_experts,
        speculative=args.speculative,
    )
    quant = weights = None
    recorded = None
    if recipe is not None:  # the recipe's kept layers, as --exclude patterns for this model
        from hybridtrt.exporter.recipes import describe, exclusions
        from hybridtrt.models.config import load_config

        pattern = load_config(args.checkpoint).pattern
        args.exclude = [*args.exclude, *exclusions(recipe, pattern)]
        recorded = describe(recipe, pattern)
    if args.quantize == "int4":
        from hybridtrt.exporter.quantize import WeightOnlyOptions

        weights = WeightOnlyOptions(
            "int4", block_size=args.block_size or 128, exclude=list(args.exclude), calib_file=args.calib, calib_random=args.calib_random, recipe=recorded
        )
    elif args.quantize:
        from hybridtrt.exporter.quantize import QuantizeOptions

        quant = QuantizeOptions(
            calib_file=args.calib,
            calib_random=args.calib_random,
            exclude=list(args.exclude),
            weight_scale=args.weight_scale or "tensor",
            recipe=recorded,
        )
    if args.tp is not None:
        return _run_tp(args, opts, dtype_source, quant, weights)
    result = export(args.checkpoint, args.output, opts, step=step, progress=progress, quantize=quant, weight_only=weights)
    from rich.markup import escape

    for line in result.removed_partials:
        console.print(f"removed an unfinished export left by a killed run: {escape(line)}")
    for line in result.kept_partials:
        console.print(f"[yellow]kept[/] an unfinished export that may not be this run's to remove: {escape(line)}")
    if result.publish_note.startswith("in place:"):
        console.print(f"[yellow]note:[/] replaced the previous export in place, not by one atomic swap ({escape(result.publish_note[len('in place: '):])})")
    m = result.manifest
    kinds = Counter(layer["kind"] for layer in m.layers)
    ops = Counter()
    for g in m.graphs.values():
        ops.update(g.custom_ops)
    rows = [
        ["layers", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))],
        ["custom ops", ", ".join(f"{n}× {k}" for k, n in sorted(ops.items())) or "none"],
        ["dtype", f"{m.dtype} ({dtype_source})"],
        ["parameters", f"{result.parameters:,} ({human_bytes(result.parameter_bytes)} in {m.dtype})"],
        ["state dtype", m.state_dtype],
        ["quantization", _quant_summary(m.quantization) if m.quantization or not m.weight_only else escape(_weight_only_summary(m.weight_only))],
    ]
    if m.source.get("dequantized"):
        rows.append(["weights", f"dequantized to {m.dtype} from the checkpoint's {escape(m.source['dequantized'])}"])
    if m.source.get("mtp"):
        rows.append(["MTP head", escape(m.source["mtp"])])
    v = m.verification or {}
    if v.get("method") == "skipped":
        rows.append(["verification", f"skipped: {escape(str(v.get('reason')))}"])
    elif result.verification:
        def count(g: dict) -> str:
            ranges = g.get("expert_ranges") or {}
            return (
                f"{len(g.get('windows', []))}"
                + (f", head in {g['head_slices']} vocabulary slices" if g.get("head_slices") else "")
                + (f", experts of {len(ranges)} layers by ranges ({'' if len(set(ranges.values())) == 1 else 'up to '}{max(ranges.values())} each)" if ranges else "")
            )

        windows = {f: count(g) for f, g in v.get("graphs", {}).items()}
        how = "whole graph" if v.get("method") == "full-graph" else "by decoder-layer windows (" + "; ".join(f"{f}: {n}" for f, n in windows.items()) + ")"
        against = f"vs the {v.get('truth')}" + (f", the {v['yardstick']} as yardstick" if v.get("yardstick") else "")
        rows.append(["ORT vs reference", f"{how} on {escape(str(v.get('executor')))}, {against}; worst " + ", ".join(f"{k}: rel L2 {x:.1e}" for k, x in result.verification.items())])
        routing = routing_summary(v)
        if routing:
            rows.append(["MoE routing", routing])
    console.print(table("export summary", ["", ""], rows, numeric=False))
    console.print(table("files written", ["file", "size"], [[escape(str(result.out_dir / n)), human_bytes(s)] for n, s in result.files.items()]))
    return 0



def tp_quantization(m) -> str:  # noqa: ANN001 - a rank's Manifest
    """The quantization row of a tensor-parallel export (its summary, ``inspect``): the ranks' one recipe."""
    if not (m.quantization or m.weight_only):
        return "none"
    summary = _quant_summary(m.quantization) if m.quantization else _weight_only_summary(m.weight_only)
    return summary + ", the same scales on every rank (the unsharded tensors')"


def tp_verdict(v: dict, world: int) -> str:
    """A tensor-parallel export's verification record in one line (its summary, ``inspect``)."""
    if v.get("method") == "skipped":
        return f"skipped: {v.get('reason')}"
    w = v["worst"]
    how = f"by {len(v['windows'])} layer windows" if v.get("windows") else "whole graphs"
    yard = f", the {v['yardstick']} as yardstick" if v.get("yardstick") else ""
    return (f"{world} ranks emulated (collectives in NumPy), {how}, vs the {v['truth']}{yard}; {v['checks']} tensors, "
            f"closest to its bound: {w['output']} rel L2 {w['rel_l2']:.1e} ≤ {w['bound']:.1e}")  # fmt: skip


def tp_holds(holds: dict, vocab: str) -> str:
    """What a rank holds (its manifest's ``tensor_parallel.holds``): ``mamba heads 0–3, …`` (its vocabulary
    rows only when the vocabulary is split)."""
    return ", ".join(f"{k.replace('_', ' ')} {a}" + (f"–{b - 1}" if b - a > 1 else "") for k, (a, b) in holds.items() if k != "vocab_rows" or vocab == "parallel")


def _run_tp(args: argparse.Namespace, opts, dtype_source: str, quant, weights) -> int:
    """``export --tp N``: the rank directories, then a table of what each rank holds."""
    from rich.markup import escape

    from hybridtrt.exporter.tensor_parallel import TP_MANIFEST, export_tp

    result = export_tp(args.checkpoint, args.output, args.tp, opts, vocab=args.tp_vocab or "parallel", step=step, progress=progress, quantize=quant, weight_only=weights)
    for line in result.removed_partials:
        console.print(f"removed an unfinished export left by a killed run: {escape(line)}")
    plan, first = result.plan, result.ranks[0]
    m, v = first.manifest, result.verification
    rows = [
        ["ranks", f"{plan.world} ({plan.vocab} vocabulary)"],
        ["dtype", f"{m.dtype} ({dtype_source})"],
        ["quantization", escape(tp_quantization(m))],
        ["parameters", f"{sum(r.parameters for r in result.ranks):,} over the ranks ({sum(r.parameters for r in result.ranks) / result.parameters:.3f}× the model's {result.parameters:,})"],
    ]
    if m.source.get("dequantized"):
        rows.append(["weights", f"dequantized to {m.dtype} from the checkpoint's {escape(m.source['dequantized'])}"])
    rows.append(["verification" if v.get("method") == "skipped" else "ORT vs reference", escape(tp_verdict(v, plan.world))])
    console.print(table("export summary", ["", ""], rows, numeric=False))
    holds = [[f"rank{r}/", f"{res.parameters:,}", human_bytes(sum(res.files.values())), escape(tp_holds(res.manifest.tensor_parallel["holds"], plan.vocab))]
             for r, res in enumerate(result.ranks)]  # fmt: skip
    console.print(table("ranks", ["dir", "params", "files", "holds"], holds, numeric=False))
    console.print(f"wrote {escape(str(result.out_dir / TP_MANIFEST))}", markup=True, soft_wrap=True)
    return 0
