"""Half precision against one truth: fp16/bf16 artefacts and same-dtype references vs fp32, per
real architecture (scaled copies, HF ``save_pretrained`` checkpoints in bf16, random weights).

For each architecture and dtype it exports the checkpoint, runs the artefact on ONNX Runtime
(bf16 through `hybridtrt.graphs.bf16_emulation`), the same-dtype PyTorch reference, the fp32
reference (the truth) and an fp64 run (what fp32 itself can promise), on a left-padded batch of
short prompts and on one of prompts longer than two chunks; then plants a 10 % weight fault in one
Mamba layer of the artefact. It prints rel L2 of the logits (and the worst state) against the fp32
truth, and the ratio artefact / same-dtype reference that the half-precision gate uses.

    python benchmarks/half_precision.py [--arch NAME ...] [--width 8] [--layers 16]

(run from the repository root: the planted fault uses tests/validation/faults.py)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.models import load_model
from hybridtrt.models.architectures import ARCHITECTURES, scaled_config, write_hf_checkpoint
from hybridtrt.runtime.generation import left_pad
from hybridtrt.judge.metrics import compare
from hybridtrt.validation.runner import real_positions


def _prompts(vocab: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths])


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(ids, mask, logits="last")
    return out.logits.double(), {k: v.double() for k, v in out.cache.named_states().items()}


def _artefact(export_dir: Path, ids, mask):
    from hybridtrt.runtime.onnxruntime import OrtModel

    model = OrtModel(export_dir, bf16="emulate")  # the artefact as a bf16 executor computes it
    logits, state = model.step(ids, mask, model.zero_state(ids.shape[0]), False)
    return logits.double(), {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in model.named_states(state).items()}


def _gate_ratio(got, ref, truth, mask, dtype: str) -> tuple[float, str]:
    """How far ``got`` is past its gate, worst tensor first: max over logits and every state of
    rel L2 / allowed, where allowed = the precision's gate given the same-dtype reference ``ref``
    as yardstick (what `hybridtrt validate` applies to a prefill). > 1 means the tensor fails."""
    from hybridtrt.judge.tolerances import gate

    def ratio(kind, a, r, t):
        return compare(a, t).rel_l2 / gate(dtype, kind).bound(compare(r, t))

    out = {"logits": ratio("call", got[0], ref[0], truth[0])}
    for k in truth[1]:
        out[k] = ratio("state", *(real_positions(k, x[1][k], mask) for x in (got, ref, truth)))
    worst = max(out, key=out.get)
    return out[worst], worst


def _errors(got, truth, mask) -> tuple[float, float, str]:
    """(logits rel L2, worst state rel L2, its name) of ``got`` against ``truth``."""
    logits = compare(got[0], truth[0]).rel_l2
    states = {k: compare(real_positions(k, got[1][k], mask), real_positions(k, truth[1][k], mask)).rel_l2 for k in truth[1]}
    worst = max(states, key=states.get)
    return logits, states[worst], worst


def _planted(out: Path, ckpt: Path) -> Path:
    """A copy of the export with the last Mamba layer's in_proj scaled by 1.1 (a 10 % weight fault)."""
    import shutil

    from hybridtrt.models.config import MAMBA, load_config
    from tests.validation.faults import perturb_weight

    bad = out.with_name(out.name + "-fault")
    if not bad.exists():
        shutil.copytree(out, bad)
        layer = max(i for i, k in enumerate(load_config(ckpt).layer_types) if k == MAMBA)
        perturb_weight(bad, f"model.layers.{layer}.mixer.in_proj.weight_t", 1.1)
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", default=None, choices=sorted(ARCHITECTURES))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dtype", action="append", default=None, choices=["fp16", "bf16"])
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="hybridtrt-half-"))
    rows = []
    for name in args.arch or sorted(ARCHITECTURES):
        cfg = scaled_config(name, width=args.width, layers=args.layers)
        ckpt = write_hf_checkpoint(cfg, work / name, dtype="bfloat16")
        m32, m64 = load_model(ckpt, "fp32"), load_model(ckpt, "fp32").double()
        chunk = m32.config.chunk_size
        for label, lengths in (("short", [24, 11, 17]), (f"{2 * chunk + 5}", [2 * chunk + 5, chunk, 13])):
            ids, mask = _prompts(m32.config.vocab_size, lengths, seed=1)
            truth = _reference(m32, ids, mask)
            e64 = _errors(truth, _reference(m64, ids, mask), mask)
            for dtype in args.dtype or ["fp16", "bf16"]:
                out = work / f"{name}-{dtype}"
                if not out.exists():
                    export(ckpt, out, ExportOptions(dtype=dtype, verify=False))
                start = time.perf_counter()
                art = _errors(_artefact(out, ids, mask), truth, mask)
                seconds = time.perf_counter() - start
                ref_run = _reference(load_model(ckpt, dtype), ids, mask)
                ref = _errors(ref_run, truth, mask)
                clean_gate, _ = _gate_ratio(_artefact(out, ids, mask), ref_run, truth, mask, dtype)
                fault_gate, fault_where = _gate_ratio(_artefact(_planted(out, ckpt), ids, mask), ref_run, truth, mask, dtype)
                fault = (fault_gate, fault_where, clean_gate)
                rows.append((name, dtype, label, e64[0], ref[0], art[0], art[0] / ref[0], fault, ref[1], art[1], seconds))
                print(
                    f"{name:22s} {dtype} L={label:>5s}  fp32-vs-fp64 {e64[0]:.1e}  | logits: ref {ref[0]:.2e} art {art[0]:.2e} "
                    f"ratio {art[0] / ref[0]:.2f} | vs gate: clean {fault[2]:.2f}, fault {fault[0]:.1f} ({fault[1]}) | worst state: ref {ref[1]:.2e} art {art[1]:.2e} ({art[2]})  [{seconds:.1f} s]",
                    flush=True,
                )
    print("\n| architecture | dtype | prompt | fp32 vs fp64 | same-dtype ref vs fp32 | artefact vs fp32 | artefact / ref | clean: worst tensor / gate | 10 % fault: worst tensor / gate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dtype, label, e64, ref, art, ratio, fault, sref, sart, _ in rows:
        print(f"| {name} | {dtype} | {label} | {e64:.1e} | {ref:.2e} | {art:.2e} | {ratio:.2f} | {fault[2]:.2f} | **{fault[0]:.1f}** ({fault[1]}) |")


if __name__ == "__main__":
    main()
