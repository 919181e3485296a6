"""NVIDIA ModelOpt's FP8 and NVFP4 checkpoints of scaled real architectures, through hybridtrt.

For each architecture, a bf16 checkpoint is written by HF transformers (`write_hf_checkpoint`; random weights
with a trained-like ``initializer_range``). NVIDIA ModelOpt quantizes it and writes it in its own venv, on the
CPU (``mtq.FP8_DEFAULT_CFG`` / ``mtq.NVFP4_DEFAULT_CFG``, max calibration on random sequences,
``export_hf_checkpoint``). hybridtrt then exports:

- the BF16 checkpoint;
- the FP8 checkpoint as it is (its layers, scales and FP8 bytes);
- the NVFP4 checkpoint as it is (4-bit weights, W4A16), with ``--fp4-activations`` (W4A4: its activations
  quantized per call with its input scales, as TensorRT would on Blackwell) and with ``--dequantize`` (bf16
  weights, exactly ModelOpt's dequantization);
- the BF16 checkpoint with our own 4-bit weights: ``--quantize int4`` round to nearest (blocks of 128) and
  AWQ (``--calib-random 8``, blocks of 128 and 32).

Every export runs on ONNX Runtime CPU (bf16 emulated, as a bf16 executor computes it; int4 without the
MatMulNBits fusion, float4e2m1 emulated). The table compares each with the fp32 truth of the BF16
checkpoint: the last-token logits of the same random prompts (rel L2) and their top-1 agreement, and
the decoder layer whose quantization costs the most on its own (`worst_layer`: the truth with only that
layer quantized, in PyTorch). It also gives the checkpoint's and the export's weight bytes.

Setup (ModelOpt is not a dependency of hybridtrt)::

    python3 -m venv /tmp/modelopt-venv
    /tmp/modelopt-venv/bin/pip install torch==2.13.0 transformers==5.25.0 nvidia-modelopt==0.47.0 requests
    .venv/bin/python benchmarks/modelopt_formats.py --modelopt-python /tmp/modelopt-venv/bin/python
"""

from __future__ import annotations

import argparse
from collections import Counter
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.fp8_reference import as_exported
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.exporter.quantize import WeightOnlyOptions
from hybridtrt.judge.metrics import compare
from hybridtrt.models.architectures import scaled_config, write_hf_checkpoint
from hybridtrt.models.loading import load_model
from hybridtrt.models.tokenizer import write_byte_tokenizer
from hybridtrt.runtime.onnxruntime import OrtModel

#: Scaled copies (README "Architectures") and the formats ModelOpt quantizes each to. The widths keep what
#: block sizes see: Nano-9B-v2 / 5 has the real model's divisibility (hidden 896 = 7 × 128, MLP 3136 = 49 × 64
#: like 15,680 = 245 × 64, Mamba 1920, attention 640: INT4 blocks of 128 everywhere but down_proj's 64, as at
#: full size); Nemotron-3-Nano / 4 is the largest copy whose every width NVFP4's blocks of 16 divide (hidden
#: 672, experts 464, shared expert 928; ModelOpt's export asserts otherwise), so its INT4 blocks fall back to
#: 32/16 where the real model's are 128/64.
ARCHS = {
    "nemotron-nano-9b-v2": (dict(width=5, layers=8), ("FP8", "NVFP4")),
    "nemotron-3-nano-30b-a3b": (dict(width=4, layers=6), ("FP8", "NVFP4")),
}
RECIPES = {"FP8": "FP8_DEFAULT_CFG", "NVFP4": "NVFP4_DEFAULT_CFG"}
#: Our own 4-bit weights of the BF16 checkpoint: row label -> (block, calibrated).
INT4 = {"INT4 round to nearest, b128": (128, False), "INT4 AWQ, b128": (128, True), "INT4 AWQ, b32": (32, True)}

#: Runs in ModelOpt's venv: quantize the checkpoint at argv[1] with argv[3] and write it to argv[2].
QUANTIZE = textwrap.dedent(
    """
    import sys, warnings, torch
    warnings.filterwarnings("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM
    src, out, recipe, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    def forward_loop(m):
        with torch.no_grad():
            for row in ids.split(2):
                m(input_ids=row)
    model = mtq.quantize(model, getattr(mtq, recipe), forward_loop)
    export_hf_checkpoint(model, export_dir=out)
    """
)


def _bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def worst_layer(reference: torch.nn.Module, truth: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, want: torch.Tensor) -> str:
    """The decoder layer whose quantization costs the most on its own: the fp32 truth with only layer
    ``i`` taken from ``reference`` (the export's quantized reference: FP8 emulated, 4-bit weights
    dequantized), last-token logits rel L2 against the truth; ``"i (kind): rel L2"``."""
    errors = []
    with torch.no_grad():
        for i in range(len(truth.layers)):
            original = truth.layers[i]
            truth.layers[i] = reference.layers[i]
            try:
                errors.append(compare(truth(ids, mask, logits="last").logits, want).rel_l2)
            finally:
                truth.layers[i] = original
    worst = max(range(len(errors)), key=errors.__getitem__)
    return f"{worst} ({truth.config.pattern[worst]}): {errors[worst]:.2e}"


def run(args: argparse.Namespace, work: Path, drift: dict[tuple[str, str], dict[int, float]]) -> list[list[str]]:
    rows = []
    for name, (size, formats) in ARCHS.items():
        cfg = scaled_config(name, vocab=args.vocab, **size)
        bf16 = write_hf_checkpoint(cfg, work / name / "bf16", dtype="bfloat16", initializer_range=args.init_range)
        truth = load_model(bf16, "fp32")
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(3, args.vocab, (args.prompts, args.seq_len), generator=gen)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = truth(ids, mask, logits="last").logits
        long_prompts = {}
        for length in args.long:
            long_ids = torch.randint(3, args.vocab, (2, length), generator=gen)
            with torch.no_grad():
                long_prompts[length] = (long_ids, truth(long_ids, torch.ones_like(long_ids), logits="last").logits)
        checkpoints: dict[str, tuple[Path, dict, WeightOnlyOptions | None]] = {"BF16": (bf16, {}, None)}
        for fmt in formats:
            if args.formats and not any(f in fmt or fmt in f for f in args.formats):
                continue
            recipe, out = RECIPES[fmt], work / name / fmt
            done = subprocess.run([args.modelopt_python, "-c", QUANTIZE, str(bf16), str(out), recipe, str(args.vocab)], capture_output=True, text=True)
            if done.returncode:
                rows.append([name, fmt, "-", "-", "ModelOpt failed: " + done.stderr.strip().splitlines()[-1][:60], "-", "-"])
                continue
            write_byte_tokenizer(out, args.vocab)
            checkpoints[f"{fmt} as it is"] = (out, {}, None)
            if fmt == "NVFP4":
                checkpoints["NVFP4 `--dequantize`"] = (out, {"dequantize": True}, None)
                checkpoints["NVFP4 W4A4 `--fp4-activations`"] = (out, {"fp4_activations": True}, None)
        for label, (block, calibrated) in INT4.items():
            checkpoints[label] = (bf16, {}, WeightOnlyOptions("int4", block_size=block, calib_random=8 if calibrated else None))
        for fmt, (ckpt, extra, weights) in checkpoints.items():
            if args.formats and not any(f in fmt for f in args.formats):
                continue
            out = work / name / f"export-{len(rows)}"
            try:
                export(ckpt, out, ExportOptions(dtype="bf16", split=False, verify=False, **extra), weight_only=weights)
            except Exception as e:  # a format hybridtrt refuses: say so in the table
                rows.append([name, fmt, f"{_bytes(ckpt, '*.safetensors') / 2**20:.1f}", "-", f"refused: {str(e)[:60]}", "-", "-"])
                continue
            ort = OrtModel(out, bf16="emulate")
            c = compare(torch.from_numpy(ort.run(ids, mask, ort.zero_state(ids.shape[0]))["logits"]), want, top1=True)
            for length, (long_ids, long_want) in long_prompts.items():  # the same format at long context
                got = torch.from_numpy(ort.run(long_ids, torch.ones_like(long_ids), ort.zero_state(long_ids.shape[0]))["logits"])
                drift.setdefault((name, fmt), {})[length] = compare(got, long_want).rel_l2
            if weights is not None:  # the blocks the layers took (a width no block divides falls back)
                recipe = read_manifest(out).weight_only
                used = Counter(recipe["blocks"].get(n, recipe["block_size"]) for n in recipe["quantized"])
                fmt = f"{fmt} (blocks {', '.join(f'{b}: {n}' for b, n in sorted(used.items(), reverse=True))} linears)"
            rows.append([
                name, fmt, f"{_bytes(ckpt, '*.safetensors') / 2**20:.1f}", f"{_bytes(out, '*.data') / 2**20:.1f}", f"{c.rel_l2:.2e}", f"{c.top1:.2f}",
                "-" if fmt == "BF16" else worst_layer(as_exported(load_model(ckpt, "fp32"), read_manifest(out)), truth, ids, mask, want),
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modelopt-python", required=True, help="python of a venv with nvidia-modelopt (see the module docstring)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--init-range", type=float, default=0.02, help="weights' initializer_range (0.02: trained-like)")
    p.add_argument("--long", type=lambda v: [int(n) for n in v.split(",") if n], default=[64, 512, 2048], help="prompt lengths of the drift table ('' for none)")
    p.add_argument("--formats", nargs="*", default=[], help="only the rows whose format contains one of these (e.g. AWQ); all by default")
    args = p.parse_args()
    drift: dict[tuple[str, str], dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp), drift)
    head = ["architecture", "format", "checkpoint MiB", "export weights MiB", "logits rel L2 vs fp32 truth", "top-1 vs truth", "worst layer alone: logits rel L2"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if drift:
        head = ["architecture", "format", *(f"{n} tokens" for n in args.long)]
        print("\nLast-token logits rel L2 vs the fp32 truth at long prompts (2 random prompts each):")
        print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for (name, fmt), by_length in drift.items():
            print("| " + " | ".join([name, fmt, *(f"{by_length[n]:.2e}" for n in args.long)]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
