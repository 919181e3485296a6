"""Peak memory of ``hybridtrt export`` over checkpoint sizes up to Nemotron-Nano-9B-v2 and
Nemotron-3-Nano-30B-sized MoE layers (issue 15).

For each size a random checkpoint is written shard by shard (one shard in memory, never the whole
model), then exported in a child process that reports its own peak RSS and the modules it
imported. Beside it, a child that only imports those modules gives the baseline (what the export's
code costs before any tensor: 0.30 GiB for the top-level imports, about 0.07 GiB more for the
modules that tracing and verification import on their way), and for sizes up to
``--eager-up-to`` the weight-loaded path (`hybridtrt.exporter.eager`, the exporter before weights
were streamed) runs on the same checkpoint, side by side. Prints one table: parameters, checkpoint
and export dtype, verification, peak RSS, baseline, the ratio of (peak − baseline) to the parameter
bytes in the export dtype (goal ≤ 0.25 where the largest tensor is at most 10 % of the
parameters, shown as "largest tensor") and to the largest tensor (goal ≤ 3), wall time, and bytes
written per second.

    .venv/bin/python benchmarks/export_memory.py                       # the five default sizes
    .venv/bin/python benchmarks/export_memory.py --sizes nano-9b-v2 --export-dtype bf16
    .venv/bin/python benchmarks/export_memory.py --sizes 1b --eager-up-to 8e9 --keep
    .venv/bin/python benchmarks/export_memory.py --sizes nano-9b-v2 --eager-up-to 0 --export-args "--quantize int4 --calib-random 8"

Needs about 2× the largest checkpoint of free disk under ``--workdir`` (default: a temp dir,
removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _nemotron(**overrides) -> dict:
    """An HF config.json with Nemotron-Nano-9B-v2's ratios (Mamba head_dim 80, d_state 128,
    8 groups, chunk 128): the built-in ``small-nemotron-h`` preset with ``overrides``."""
    from hybridtrt.models.presets import preset_config

    return preset_config("small-nemotron-h", **overrides)


#: Nano-9B-v2's attention: 8 KV heads of 128.
_NANO_ATTENTION = {"num_key_value_heads": 8, "head_dim": 128}


def _nano_9b_v2() -> dict:
    """NVIDIA-Nemotron-Nano-9B-v2's public config (hidden 4480, 56 layers: 27 Mamba-2, 25 MLP,
    4 attention; 128 Mamba heads of 80, d_state 128, 8 groups; vocab 131072): 8.89 B parameters."""
    from hybridtrt.models.architectures import ARCHITECTURES

    return dict(ARCHITECTURES["nemotron-nano-9b-v2"])


_NANO_9B_PATTERN = _nano_9b_v2()["hybrid_override_pattern"]


def _moe_30b_layers() -> dict:
    """Seven decoder layers (3 MoE, 3 Mamba-2, 1 attention) of Nemotron-3-Nano-30B-A3B's size:
    hidden 2688, 128 routed experts of 1856 (top-6) and a shared expert of 3712, 64 Mamba heads of
    64 with d_state 128 and 8 groups, 32 attention heads (2 KV heads of 128), vocab 131072; the
    ``tiny-nemotron3-moe`` preset's routing fields. 4.74 B parameters; each layer's stacked expert
    tensor (1.28 GB in bf16) is 13 % of them."""
    from hybridtrt.models.presets import preset_config

    return preset_config(
        "tiny-nemotron3-moe",
        layers_block_type=["mamba", "moe", "mamba", "attention", "moe", "mamba", "moe"],
        hidden_size=2688, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128,
        n_groups=8, num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=131072,
    )


#: name -> (HF config.json, checkpoint dtype, [(export dtype, verify), ...]).
SIZES: dict[str, tuple[dict, str, list[tuple[str, bool]]]] = {
    "small": (_nemotron(), "fp32", [("fp32", True)]),  # the small-nemotron-h preset
    "1b": (
        _nemotron(**_NANO_ATTENTION, hidden_size=2048, hybrid_override_pattern="M-M-M*-M-M-M*-M-M-M*-M-M-M-", mamba_num_heads=64, num_attention_heads=16, intermediate_size=7168),
        "fp32", [("fp32", True)],
    ),
    "5b": (
        _nemotron(**_NANO_ATTENTION, vocab_size=131072, hidden_size=3584, hybrid_override_pattern=_NANO_9B_PATTERN[:44], mamba_num_heads=112, num_attention_heads=32, intermediate_size=12544),
        "bf16", [("fp16", True), ("fp32", True)],
    ),
    # bf16 is verified on ONNX Runtime CPU through the bf16 emulation, by layer windows.
    "nano-9b-v2": (_nano_9b_v2(), "bf16", [("bf16", True)]),
    # Experts written one tensor per expert, as HF's save_pretrained and the hub have them.
    "moe-30b-layers": (_moe_30b_layers(), "bf16", [("bf16", True)]),
}
#: The sizes run by default.
DEFAULT_SIZES = ["small", "1b", "5b", "nano-9b-v2", "moe-30b-layers"]
_EXPERTS = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

_CHILD = r"""
import contextlib, importlib, io, json, sys, time
sys.path.insert(0, {root!r})
mode, ckpt, out, dtype, verify, modules, extra = sys.argv[1:8]
# What an export imports before it touches a tensor.
import onnx, onnxruntime, onnxscript, torch, torch.export, torch.onnx._internal.exporter._core
import hybridtrt.cli.main, hybridtrt.exporter.export
imported = set(sys.modules)
t = time.perf_counter()
if mode == "stream":  # exactly what a user runs
    args = ["export", ckpt, "-o", out, "--dtype", dtype] + ([] if verify == "1" else ["--no-verify"]) + json.loads(extra)
    with contextlib.redirect_stdout(io.StringIO()):
        code = hybridtrt.cli.main.main(args)
    if code:
        sys.exit(code)
elif mode == "eager":
    from hybridtrt.exporter.eager import write_graphs
    write_graphs(ckpt, out, hybridtrt.exporter.export.ExportOptions(dtype=dtype))
elif mode == "baseline" and modules != "-":  # also every module an export imported on its way
    for name in json.load(open(modules)):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
if mode != "baseline" and modules != "-":
    json.dump(sorted(set(sys.modules) - imported), open(modules, "w"))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent's copy.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"wall_s": time.perf_counter() - t, "maxrss_kib": hwm}}))
"""


def _model_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The reference's parameter shapes (routed experts stacked ``[E, out, in]``)."""
    from hybridtrt.models.config import config_from_dict
    from hybridtrt.models.loading import expected_parameters

    return dict(expected_parameters(config_from_dict(config)))


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a Nemotron-H config (from the reference's own modules,
    built on the meta device one block per kind); routed experts one tensor per expert."""
    from hybridtrt.models.loading import to_checkpoint_name

    shapes = {}
    for name, shape in _model_shapes(config).items():
        name = to_checkpoint_name(name, "backbone.")
        m = _EXPERTS.match(name)
        if m:  # one tensor per expert: experts.{e}.up_proj.weight [I, D]
            shapes.update({f"{m.group(1)}.{e}.{m.group(2)}.weight": tuple(shape[1:]) for e in range(shape[0])})
        else:
            shapes[name] = tuple(shape)
    return shapes


def write_checkpoint(config: dict, dtype: str, out: Path, *, shard_bytes: int = 2 << 30, seed: int = 0) -> tuple[int, float]:
    """Random weights written shard by shard (at most one shard in memory). Returns (parameters, s)."""
    import torch
    from safetensors.torch import save_file

    from hybridtrt.models.loading import DTYPES

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = parameter_shapes(config)
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * _BYTES[dtype]
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch_dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                t.uniform_(0.0, 2.7, generator=gen)  # A = -exp(A_log) in [-15, -1]
            elif leaf in ("D", "dt_bias") or "norm" in name:
                t.normal_(1.0 if leaf != "dt_bias" else -2.0, 0.1, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            shard[name] = t
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del shard
    total = sum(math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total * _BYTES[dtype]}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total, time.perf_counter() - start


def child(mode: str, ckpt: Path, out: Path, dtype: str, verify: bool, modules: Path | None = None, extra: list[str] | None = None) -> dict:
    """Run ``mode`` (``stream``, ``eager`` or ``baseline``) in a fresh interpreter; returns its wall
    time and peak RSS. ``modules``: where an export writes the modules it imported beyond the
    top-level ones, and from where a baseline imports them."""
    code = _CHILD.format(root=str(ROOT))
    argv = [mode, str(ckpt), str(out), dtype, "1" if verify else "0", str(modules) if modules else "-", json.dumps(extra or [])]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} export of {ckpt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES))
    parser.add_argument("--export-dtype", choices=["fp32", "fp16", "bf16"], default=None, help="override every size's export dtype")
    parser.add_argument("--no-verify", action="store_true", help="skip verification for every size")
    parser.add_argument("--eager-up-to", type=float, default=2e9, help="also run the weight-loaded path up to this many parameter bytes")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    parser.add_argument("--export-args", default="", help="more `hybridtrt export` flags for the streamed path, e.g. '--quantize int4 --calib-random 8'")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hybridtrt-export-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    top = child("baseline", work, work / "none", "fp32", False)
    rows = []
    try:
        for name in args.sizes:
            config, ckpt_dtype, exports = SIZES[name]
            ckpt, out = work / f"{name}-ckpt", work / f"{name}-export"
            n_params, t_write = write_checkpoint(config, ckpt_dtype, ckpt)
            largest = max(math.prod(s) for s in _model_shapes(config).values()) / n_params  # experts stacked, as exported
            print(f"{name}: {n_params / 1e9:.2f} B parameters, checkpoint ({ckpt_dtype}) written in {t_write:.0f} s", flush=True)
            if args.export_dtype:
                exports = [(args.export_dtype, True)]  # bf16 is verified too (ORT bf16 emulation)
            runs = []
            for export_dtype, verify in exports:
                param_bytes = n_params * _BYTES[export_dtype]
                runs += [("stream", export_dtype, verify and not args.no_verify, param_bytes)]
                runs += [("eager", export_dtype, False, param_bytes)] if param_bytes <= args.eager_up_to else []
            for mode, export_dtype, verify, param_bytes in runs:
                modules = work / "modules.json"
                r = child(mode, ckpt, out, export_dtype, verify, modules, shlex.split(args.export_args) if mode == "stream" else None)
                base = child("baseline", work, work / "none", "fp32", False, modules)["maxrss_kib"] * 1024
                written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
                verification = "-"
                if mode == "stream":
                    manifest = json.loads((out / "hybridtrt.json").read_text())
                    v = manifest["verification"]
                    verification = v["method"] + (f" ({sum(len(g.get('windows', [])) for g in v['graphs'].values())} windows)" if v["method"] == "layer-windows" else "")
                peak = r["maxrss_kib"] * 1024
                rows.append(
                    [
                        name,
                        f"{n_params / 1e9:.2f} B",
                        f"{largest:.1%}",
                        f"{ckpt_dtype} → {export_dtype}",
                        ("streamed" + (f" {args.export_args}" if args.export_args else "")) if mode == "stream" else "weight-loaded",
                        verification,
                        f"{peak / 2**30:.2f} GiB",
                        f"{base / 2**30:.2f} GiB",
                        f"{(peak - base) / param_bytes:.3f}",
                        f"{(peak - base) / (largest * param_bytes):.2f}×",
                        f"{r['wall_s']:.0f} s",
                        f"{written / r['wall_s'] / 2**20:.0f} MiB/s",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    header = ["size", "parameters", "largest tensor", "dtype (ckpt → export)", "path", "verification", "peak RSS", "baseline", "(peak − baseline) / param bytes", "(peak − baseline) / largest tensor", "wall", "written/s"]
    print(
        "\nexport_memory — `hybridtrt export` in a child process; baseline = a child that imports every module that export imported"
        f" (the top-level imports alone: {top['maxrss_kib'] / 2**20:.2f} GiB)"
    )
    print_markdown(header, rows)


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, columns padded to their widest cell (pasted into the README as it is)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
