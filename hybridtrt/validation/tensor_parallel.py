"""Judge N tensor-parallel ranks' graphs against the unsharded reference (DESIGN.md §12).

Every rank's graph runs in ONNX Runtime (`hybridtrt.runtime.rank_emulator`) on its slice of the same
inputs; the reference is the one-device PyTorch model. Checked with the one-device gates of the
precision (`hybridtrt.judge.tolerances`, floors: no yardstick runs): the prefill's logits; per layer,
in layer order, every rank's states against the rank's slice of the reference's (a state is one rank's
alone) and the layer's output (the same all-reduced stream on every rank, each rank's checked); then
``steps`` teacher-forced one-token calls, the logits of each. The first failing tensor names its layer
and rank (`Report.first_divergence`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch

from hybridtrt.exporter import io
from hybridtrt.exporter.tensor_parallel import rank_inputs
from hybridtrt.exporter.wrapper import flat_from_cache
from hybridtrt.models.model import HybridLM
from hybridtrt.models.tensor_parallel import TensorParallelPlan
from hybridtrt.runtime.rank_emulator import RankEmulator
from hybridtrt.validation.runner import Report, check, is_state, layer_of, real_positions


def validate_ranks(
    model: HybridLM,
    plan: TensorParallelPlan,
    protos: Sequence[onnx.ModelProto] | RankEmulator,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    steps: int = 2,
    precision: str = "fp32",
) -> Report:
    """Run every rank's unified graph (dynamic cache; per layer by the states, and by the layer outputs
    when the graphs have them) and judge it.

    Args:
        model: The unsharded reference.
        plan: How the ranks split it.
        protos: Rank 0 … N − 1's graphs (or their emulator).
        input_ids, attention_mask: ``[B, L]`` left-padded prompts.
        steps: Teacher-forced one-token calls after the prefill.
        precision: The gates' key (the graphs' dtype).
    """
    emulator = protos if isinstance(protos, RankEmulator) else RankEmulator(protos)
    names = io.input_names(model.config, io.DYNAMIC_CACHE)
    report = Report(
        backend=f"onnxruntime × {plan.world} ranks (emulated collectives)",
        reference="pytorch (one device)",
        precision=precision,
        batch=int(input_ids.shape[0]),
        prompt_lengths=[int(x) for x in attention_mask.sum(1)],
        steps=steps,
    )

    def call(ids: torch.Tensor, mask: torch.Tensor, cache) -> tuple[object, list[dict[str, np.ndarray]]]:
        with torch.no_grad():
            ref = model(ids, mask, cache, logits="last", output_hidden_states=True)
        full = (ids, mask, *flat_from_cache(io.state_specs(model.config), cache))
        feeds = [{n: t.numpy() for n, t in zip(names, rank_inputs(model, plan, r, full), strict=True)} for r in range(plan.world)]
        return ref, emulator.run(feeds)

    ref, got = call(input_ids, attention_mask, model.new_cache(report.batch))
    check(report, "prefill", "logits", torch.from_numpy(got[0]["logits"]), ref.logits, "call")
    _layers(report, plan, ref, got, attention_mask)
    token, mask, cache = ref.logits.argmax(-1), attention_mask, ref.cache
    for step in range(1, steps + 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        ref, got = call(token[:, None], mask, cache)
        for r, out in enumerate(got):
            check(report, "decode", f"logits (rank {r})", torch.from_numpy(out["logits"]), ref.logits, "steps", step=step)
        token, cache = ref.logits.argmax(-1), ref.cache
    return report


def _layers(report: Report, plan: TensorParallelPlan, ref, got: list[dict[str, np.ndarray]], mask: torch.Tensor) -> None:
    """Layer by layer: every rank's states, then its copy of the layer's output; the first failure
    becomes ``report.first_divergence`` with its rank."""
    states = ref.cache.named_states()
    tensors = [(name, r, plan.state_slice(name, t, r)) for name, t in states.items() for r in range(plan.world)]
    if "layer_output.0" in got[0]:  # graphs exported with per-layer outputs (GraphSpec(per_layer=True))
        tensors += [(f"layer_output.{i}", r, h) for i, h in enumerate(ref.hidden_states) for r in range(plan.world)]
    else:
        report.notes.append("per-layer: the ranks' graphs have no layer outputs, so layers are compared by their states only")
    for name, rank, want in sorted(tensors, key=lambda t: (layer_of(t[0]), not is_state(t[0]), t[1])):
        mine = torch.from_numpy(got[rank][name])
        if mask is not None:  # KV at real positions only (the runner's rule, applied before the rank joins the name)
            mine, want = real_positions(name, mine, mask), real_positions(name, want, mask)
        result = check(report, "layer", f"{name} (rank {rank})", mine, want, "layer", layer=layer_of(name))
        if not result.passed and report.first_divergence is None:
            report.first_divergence = {"layer": layer_of(name), "rank": rank, "tensor": name, "why": result.failures, "step": None}
