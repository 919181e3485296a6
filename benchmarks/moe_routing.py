"""Routing flips in half precision: how often the artefact, the same-dtype reference and the fp32
truth choose different experts, and how much of the error each tensor carries comes from them.

For each architecture (scaled copies of the published Nemotron-3 configs with their real expert
counts, HF ``save_pretrained`` checkpoints in bf16) and dtype it exports the checkpoint, then on one
left-padded batch of random prompts runs the fp32 reference (the truth), the same-dtype reference
(the yardstick) and the artefact on ONNX Runtime:

- **free**: every run chooses its own experts; per MoE layer the fraction of (token, k) choices that
  differ between artefact and truth, yardstick and truth, artefact and yardstick (these cascade:
  a flip upstream changes every later layer's input);
- **held**: the yardstick and the artefact are held to the truth's routing
  (`hybridtrt.models.moe.RoutingHold`, `hybridtrt.graphs.held_routing`); per layer the choices each
  would have made on its own (the layer's own flips);
- the logits' and the worst state's rel L2 against the truth, free and held, and the gate
  (2× the yardstick's rel L2 on that tensor, or the floor).

    python benchmarks/moe_routing.py [--arch NAME ...] [--dtype bf16 ...] [--width 16] [--layers 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.judge.metrics import compare
from hybridtrt.judge.routing import flips
from hybridtrt.judge.tolerances import gate
from hybridtrt.models import load_model
from hybridtrt.models.architectures import scaled_config, write_hf_checkpoint
from hybridtrt.models.loading import parse_dtype
from hybridtrt.models.moe import RoutingHold, held_routing
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.validation.runner import random_prompts, real_positions

ARCHS = ["nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b"]


def _torch_call(model, ids, mask, hold: RoutingHold, state_dtype):
    with torch.no_grad(), held_routing(model, hold):
        out = model(ids, mask, model.new_cache(ids.shape[0], state_dtype), logits="last")
    return out.logits.float(), {k: v for k, v in out.cache.named_states().items()}


def _ort_call(ort: OrtModel, ids, mask, hold: RoutingHold):
    ort.routing = hold
    try:
        logits, state = ort.step(ids, mask, ort.zero_state(ids.shape[0]), False)
    finally:
        ort.routing = None
    return logits, ort.named_states(state)


def _worst_state(got: dict, truth: dict, mask) -> tuple[str, float]:
    worst = ("", 0.0)
    for name, want in truth.items():
        r = compare(real_positions(name, got[name], mask), real_positions(name, want, mask)).rel_l2
        if r > worst[1]:
            worst = (name, r)
    return worst


def run(arch: str, dtype: str, width: int, layers: int, batch: int, length: int, root: Path) -> None:
    cfg = scaled_config(arch, width=width, layers=layers, vocab=512)
    cfg["chunk_size"] = 16
    ckpt = write_hf_checkpoint(cfg, root / arch, dtype="bfloat16")
    out = root / f"{arch}-{dtype}"
    export(ckpt, out, ExportOptions(dtype=dtype, verify=False))
    truth = load_model(ckpt, "fp32")
    yard = load_model(ckpt, dtype)
    ort = OrtModel(out, bf16="emulate")  # the artefact as a bf16 executor computes it
    ort.use_routing_graphs()
    ids, mask = random_prompts(batch, truth.config.vocab_size, seed=0, max_len=length)
    real = mask.bool()
    state_dtype = parse_dtype(ort.manifest.state_dtype)

    t_hold = RoutingHold()
    t_logits, t_states = _torch_call(truth, ids, mask, t_hold, torch.float32)
    truth_ids = t_hold.all_ids()
    free_y, free_a = RoutingHold(), RoutingHold()
    y_logits, y_states = _torch_call(yard, ids, mask, free_y, state_dtype)
    a_logits, a_states = _ort_call(ort, ids, mask, free_a)
    held_y, held_a = RoutingHold(truth_ids), RoutingHold(truth_ids)
    hy_logits, hy_states = _torch_call(yard, ids, mask, held_y, state_dtype)
    ha_logits, ha_states = _ort_call(ort, ids, mask, held_a)

    print(f"\n{arch} (width /{width}, {layers} layers, {truth.config.moe.num_experts} experts top-{truth.config.moe.top_k}) {dtype}: "
          f"batch {batch}, longest prompt {length}, {int(real.sum())} real tokens")
    print(f"{'MoE layer':>9} | {'free a~t':>8} {'y~t':>6} {'a~y':>6} | {'held a~t':>8} {'y~t':>6}")
    for layer in sorted(truth_ids):
        t = truth_ids[layer]

        def pct(hold, ref=t):
            f, n = flips(hold.ids(layer), ref, real)
            return f"{f / n:6.1%}"

        print(f"{layer:>9} | {pct(free_a):>8} {pct(free_y)} {pct(free_a, free_y.ids(layer))} | {pct(held_a):>8} {pct(held_y)}")
    g_call, g_state = gate(dtype, "call"), gate(dtype, "state")
    for label, (a_l, a_s, y_l, y_s) in {"free": (a_logits, a_states, y_logits, y_states), "held": (ha_logits, ha_states, hy_logits, hy_states)}.items():
        a = compare(a_l, t_logits).rel_l2
        y = compare(y_l, t_logits)
        sname, s = _worst_state(a_s, t_states, mask)
        ys = compare(real_positions(sname, y_s[sname], mask), real_positions(sname, t_states[sname], mask))
        print(f"  {label}: logits rel L2 artefact {a:.2e} yardstick {y.rel_l2:.2e} allowed {g_call.bound(y):.2e} ({'pass' if a <= g_call.bound(y) else 'FAIL'}); "
              f"worst state {sname} {s:.2e} yardstick {ys.rel_l2:.2e} allowed {g_state.bound(ys):.2e} ({'pass' if s <= g_state.bound(ys) else 'FAIL'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", choices=ARCHS)
    p.add_argument("--dtype", action="append", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--length", type=int, default=37)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHS:
            for dtype in args.dtype or ["bf16", "fp16"]:
                run(arch, dtype, args.width, args.layers, args.batch, args.length, Path(tmp))


if __name__ == "__main__":
    main()
