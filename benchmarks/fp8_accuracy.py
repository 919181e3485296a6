"""FP8 accuracy of the exported graph on ONNX Runtime (CPU), per preset, per weight-scale mode.

For each preset and ``initializer_range``: create a random checkpoint, export it (fp32), calibrate
on random sequences, insert FP8 Q/DQ (per-tensor and per-channel weight scales), then compare
against the fp32 PyTorch reference:

* last-token logits of ``--prompts`` random prompts (prefill on zero states): cosine, rel L2,
  top-1 agreement;
* greedy generation of ``--steps`` tokens (FP8 ORT vs fp32 PyTorch): fraction of identical
  tokens and mean number of steps before the first divergence;
* ``weights.data`` size and the linear layers' weight bytes, fp32 vs FP8;
* for MoE presets, the routing agreement: fraction of real tokens whose top-k expert set is the
  reference's, per MoE layer (``hybridtrt.validation.routing``), mean and minimum over the layers.

Usage::

    python benchmarks/fp8_accuracy.py            # DEFAULT_RUNS (~6 min on 2 cores)
    python benchmarks/fp8_accuracy.py --presets tiny-mamba2 --init-ranges 0.3 0.05

``initializer_range`` 0.3 is the presets' default (a deliberately chaotic random model); 0.05 and
0.02 give weights of a trained-like scale (≈ 0.4/√hidden and 0.5/√hidden).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from hybridtrt.runtime.generation import TorchStepper
from hybridtrt.exporter.calibration import calibrate, calibration_batches
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.graphs.fp8_qdq import insert_fp8_qdq, quantized_weight_bytes
from hybridtrt.models.loading import load_model
from hybridtrt.models.presets import create_checkpoint
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.judge.metrics import compare
from hybridtrt.validation.routing import routing_agreement

#: (preset, initializer_range) runs when no ``--presets`` is given.
DEFAULT_RUNS = [
    ("tiny-nemotron-h", 0.3),
    ("tiny-nemotron-h", 0.05),
    ("tiny-mamba2", 0.3),
    ("tiny-mamba2", 0.05),
    ("small-nemotron-h", 0.02),
    ("tiny-nemotron3-moe", 0.3),
    ("tiny-nemotron3-moe", 0.05),
]


@dataclass
class Row:
    """One table row."""

    preset: str
    init_range: float
    weight_scale: str  # "none" (fp32 baseline), "tensor" or "channel"
    cosine: float
    rel_l2: float
    top1: float
    greedy_match: float
    steps_to_divergence: float
    file_ratio: float
    linear_ratio: float
    seconds: float
    routing_mean: float | None = None  # MoE presets: top-k expert sets equal to the reference's
    routing_min: float | None = None


def _prompts(vocab: int, n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts with ragged lengths, left-padded: ``ids [n, length]``, ``mask [n, length]``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    for r in range(n):
        pad = int(torch.randint(0, length // 2, (1,), generator=gen))
        ids[r, :pad], mask[r, :pad] = 0, 0
    return ids, mask


def _greedy(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    same = tokens == reference  # [B, n]
    first_diff = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
    return float(same.float().mean()), float(first_diff.float().mean())


def run_preset(preset: str, init_range: float, args: argparse.Namespace, work: Path) -> list[Row]:
    start = time.perf_counter()
    ckpt = create_checkpoint(preset, work / f"ckpt-{preset}-{init_range}", seed=0, initializer_range=init_range)
    out = work / f"export-{preset}-{init_range}"
    export(ckpt, out, ExportOptions(verify=False, per_layer=True))
    model = load_model(ckpt, "fp32")
    vocab = model.config.vocab_size
    amax = calibrate(model, calibration_batches(None, calib_file=None, calib_random=args.calib, vocab_size=vocab, seq_len=args.seq_len, seed=1))
    ids, mask = _prompts(vocab, args.prompts, args.seq_len, seed=2)
    with torch.no_grad():
        ref = model(ids, mask, logits="last", output_hidden_states=True)
        ref_logits = ref.logits
        ref_layers = {f"layer_output.{i}": h for i, h in enumerate(ref.hidden_states)}
        ref_tokens = TorchStepper(model).generate(ids, mask, max_new_tokens=args.steps, eos_token_id=None).tokens
    fp32_bytes = (out / "weights.data").stat().st_size
    fp32_linear = quantized_weight_bytes(onnx.load(str(out / "model.onnx"), load_external_data=False))["high_precision"]
    setup_s = time.perf_counter() - start
    rows = []
    for mode in ("none", "tensor", "channel"):  # "none": the fp32 ORT graph, the baseline
        t0 = time.perf_counter()
        qdir = out
        proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
        if mode != "none":
            qdir = work / f"fp8-{preset}-{init_range}-{mode}"
            qdir.mkdir()
            proto = onnx.load(str(out / "model.onnx"))
            insert_fp8_qdq(proto, amax, weight_scale=mode)
            onnx.save_model(proto, str(qdir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.data", size_threshold=1024)
            shutil.copy(out / "hybridtrt.json", qdir / "hybridtrt.json")
        fp8 = OrtModel(qdir, bf16="emulate")  # a bf16 export as a bf16 executor computes it
        outputs = fp8.run(ids, mask, fp8.zero_state(ids.shape[0]))
        logits = torch.from_numpy(outputs["logits"])
        routing = list(routing_agreement(model, ids, mask, ref_layers, outputs).values())
        c = compare(logits, ref_logits, top1=True)
        tokens = fp8.generate(ids, mask, max_new_tokens=args.steps, eos_token_id=None).tokens
        match, first = _greedy(tokens, ref_tokens)
        rows.append(
            Row(
                preset=preset,
                init_range=init_range,
                weight_scale=mode,
                cosine=c.cosine,
                rel_l2=c.rel_l2,
                top1=c.top1 or 0.0,
                greedy_match=match,
                steps_to_divergence=first,
                file_ratio=(qdir / "weights.data").stat().st_size / fp32_bytes,
                linear_ratio=sum(quantized_weight_bytes(proto).values()) / fp32_linear,
                seconds=setup_s / 2 + time.perf_counter() - t0,
                routing_mean=sum(routing) / len(routing) if routing else None,
                routing_min=min(routing) if routing else None,
            )
        )
    return rows


def print_table(rows: list[Row], steps: int) -> None:
    head = ["preset", "init", "weights", "cosine", "rel L2", "top-1", f"greedy ({steps})", "to 1st diff", "routing mean / min", "file", "linear W", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.preset, f"{r.init_range:g}", "fp32 (ORT)" if r.weight_scale == "none" else f"FP8 per-{r.weight_scale}", f"{r.cosine:.4f}", f"{r.rel_l2:.3f}", f"{r.top1:.3f}",
            f"{r.greedy_match:.3f}", f"{r.steps_to_divergence:.1f}",
            "—" if r.routing_mean is None else f"{r.routing_mean:.3f} / {r.routing_min:.3f}",
            f"{r.file_ratio:.3f}", f"{r.linear_ratio:.3f}", f"{r.seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help="presets to run (default: DEFAULT_RUNS)")
    p.add_argument("--init-ranges", nargs="+", type=float, default=[0.3, 0.05], help="initializer_range values for --presets (0.3 = preset default)")
    p.add_argument("--prompts", type=int, default=64, help="prompts for the logits comparison and greedy decoding")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="greedy decode steps")
    p.add_argument("--calib", type=int, default=32, help="random calibration sequences")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fp8-bench-") as tmp:
        runs = DEFAULT_RUNS if args.presets is None else [(p_, ir) for p_ in args.presets for ir in args.init_ranges]
        for preset, ir in runs:
            rows += run_preset(preset, ir, args, Path(tmp))
            print(f"done {preset} init {ir:g}", file=sys.stderr)
    print_table(rows, args.steps)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
