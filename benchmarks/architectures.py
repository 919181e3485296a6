"""Every published architecture × dtype through the default path: export (with its verification),
then validate against the fp32 truth — what a user with that checkpoint gets.

Scaled copies of `hybridtrt.models.architectures.ARCHITECTURES` (their expert counts and top-k kept),
written by HF's ``save_pretrained`` in bf16. bf16 and fp16 checkpoints use initializer_range 0.3
(the Mamba branch matters); FP8 uses 0.05 (trained-like scale, as every FP8 accuracy test here)
and the checkpoint's bf16 around the Q/DQ, as ``hybridtrt export --quantize fp8`` picks.
Prints per row: export verdict, validate verdict, the worst gated tensor as rel L2 / allowed (FP8:
against the FP8 reference), for MoE the most flipped layer's own choices / allowed, and for FP8 the
recipe's cost: the FP8 reference's logits against the unquantized truth, rel L2 / allowed (2× the
ideal-scale yardstick's) and cosine.

    python benchmarks/architectures.py [--arch NAME ...] [--dtype bf16 ...] [--width 32] [--layers 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hybridtrt.errors import HybridTrtError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.models.architectures import ARCHITECTURES, scaled_config, write_hf_checkpoint
from hybridtrt.validation.artefact import validate_artefact

#: Mamba-2 (HF Mamba2) copies need a width whose heads split into their groups.
WIDTH = {"mamba-codestral-7b": 8, "mamba2-2.7b": 8}


def row(name: str, dtype: str, width: int, layers: int, root: Path) -> list[str]:
    cfg = scaled_config(name, width=WIDTH.get(name, width), layers=layers, vocab=512)
    cfg["chunk_size"] = 16
    init = 0.05 if dtype == "fp8" else 0.3
    ckpt = root / f"{name}-{init}"
    if not ckpt.exists():
        write_hf_checkpoint(cfg, ckpt, dtype="bfloat16", initializer_range=init)
    out = root / f"{name}-{dtype}"
    start = time.perf_counter()
    try:
        if dtype == "fp8":
            export(ckpt, out, ExportOptions(dtype="bf16"), quantize=QuantizeOptions(calib_random=8))
        else:
            export(ckpt, out, ExportOptions(dtype=dtype))
    except HybridTrtError as e:
        return [name, dtype, "REFUSED", "—", e.message[:60], "—", "—", f"{time.perf_counter() - start:.0f}"]
    report = validate_artefact(out, random_n=3, prompt_length=37, steps=2)
    gated = [c for c in report.checks if c.allowed]
    worst = max(gated, key=lambda c: c.comparison.rel_l2 / c.allowed, default=None)
    cos = min((c for c in report.checks if c.phase != "layer"), key=lambda c: c.comparison.cosine)
    figure = (
        f"{worst.name} {worst.comparison.rel_l2:.1e} / {worst.allowed:.1e}" if worst is not None
        else f"{cos.name} cosine {cos.comparison.cosine:.4f}"
    )
    routing = "—"
    if report.routing:
        layer, r = max(report.routing.items(), key=lambda kv: kv[1]["flipped"] / max(kv[1]["allowed"], 1))
        routing = f"layer {layer}: {r['flipped']}/{r['choices']} ≤ {r['allowed']}"
    recipe = "—"
    if report.quality is not None:
        q = report.quality
        logits = max((c for c in q.checks if c.name == "logits"), key=lambda c: c.comparison.rel_l2 / c.allowed)
        cosine = min(c.comparison.cosine for c in q.checks if c.name == "logits")
        recipe = f"{'ok' if q.passed else 'FAIL'} {logits.comparison.rel_l2:.1e} / {logits.allowed:.1e}, cosine {cosine:.4f}"
    return [name, dtype, "ok", "PASS" if report.passed else "FAIL", figure, routing, recipe, f"{time.perf_counter() - start:.0f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", choices=sorted(ARCHITECTURES))
    p.add_argument("--dtype", action="append", choices=["bf16", "fp16", "fp32", "fp8"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    header = ["architecture", "dtype", "export", "validate", "worst gated (rel L2 / allowed)", "routing (worst layer)", "FP8 recipe (logits vs truth)", "s"]
    print(" | ".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arch or list(ARCHITECTURES):
            for dtype in args.dtype or ["bf16", "fp16", "fp8"]:
                print(" | ".join(row(name, dtype, args.width, args.layers, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
