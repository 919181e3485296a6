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

from hybridtrt.exporter.tensor_parallel import WindowedRanks, held_ranks, run_held
from hybridtrt.exporter.integrity import SAMPLED
from hybridtrt.graphs.held_routing import HOLD_ROUTING, routed_ids
from hybridtrt.judge.routing import RoutingTally, flips
from hybridtrt.models.config import MOE
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
    decode: Sequence[onnx.ModelProto] | RankEmulator | None = None,
    yardstick: HybridLM | None = None,
) -> Report:
    """Run every rank's unified graph (dynamic cache; per layer by the states, and by the layer outputs
    when the graphs have them) and judge it.

    Args:
        model: The unsharded reference.
        plan: How the ranks split it.
        protos: Rank 0 … N − 1's graphs (or their emulator). An MoE model's graphs get the held-routing
            pass (`hybridtrt.graphs.held_routing`): the reference chooses the experts, the graphs and the
            yardstick are held to its choice, and the graphs' own choices are judged by the routing gate,
            as a one-device validation does.
        input_ids, attention_mask: ``[B, L]`` left-padded prompts.
        steps: Teacher-forced one-token calls after the prefill.
        precision: The gates' key (the graphs' dtype).
        decode: The ranks' decode graphs (one token), which then run the steps; else the unified ones do.
        yardstick: The one-device model in the graphs' half dtype, run on the same inputs (the truth's
            states cast to its dtype): each gate scales with its distance from the truth, as a one-device
            export's verification does (`hybridtrt.exporter.verify`). None for fp32 graphs.
    """
    moe = bool(model.config.layers_of(MOE))
    emulator = held_ranks(protos, moe)  # MoE: routing held to the reference's choices
    stepper = held_ranks(decode, moe) or emulator
    held = moe and (emulator.held if isinstance(emulator, WindowedRanks) else any(HOLD_ROUTING in r.input_types for r in emulator.ranks))
    tallies: dict[int, RoutingTally] = {}
    report = Report(
        backend=f"onnxruntime × {plan.world} ranks (emulated collectives)",
        reference="pytorch (one device)",
        precision=precision,
        batch=int(input_ids.shape[0]),
        prompt_lengths=[int(x) for x in attention_mask.sum(1)],
        steps=steps,
    )

    if yardstick is not None:
        report.yardstick = f"pytorch-{precision}"

    def call(ids: torch.Tensor, mask: torch.Tensor, cache, ranks: RankEmulator) -> tuple[object, object, list[dict[str, np.ndarray]]]:
        ref, yard, got, truth_hold, yard_hold = run_held(model, yardstick, plan, ranks, ids, mask, cache, held=held, hidden=True)
        if held:  # every rank's own choices (the same all-reduced hidden state on every rank) against the reference's
            real = mask[:, -ids.shape[1] :].bool()
            for r in range(plan.world):
                for layer, own in routed_ids(got[r], *ids.shape).items():
                    tally = tallies.setdefault(layer, RoutingTally())
                    tally.add(flips(torch.from_numpy(own), truth_hold.ids(layer), real))
                    if yardstick is not None:
                        tally.add_yardstick(flips(yard_hold.ids(layer), truth_hold.ids(layer), real))
        return ref, yard, got

    ref, yard, got = call(input_ids, attention_mask, model.new_cache(report.batch), emulator)
    check(report, "prefill", "logits", torch.from_numpy(got[0]["logits"]), ref.logits, "call", yard=None if yard is None else yard.logits)
    _layers(report, plan, ref, got, attention_mask, yard)
    token, mask, cache = ref.logits.argmax(-1), attention_mask, ref.cache
    for step in range(1, steps + 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        ref, yard, got = call(token[:, None], mask, cache, stepper)
        for r, out in enumerate(got):
            check(report, "decode", f"logits (rank {r})", torch.from_numpy(out["logits"]), ref.logits, "steps", yard=None if yard is None else yard.logits, step=step)
        token, cache = ref.logits.argmax(-1), ref.cache
    if held:
        report.judge_routing(tallies)
    return report


def _layers(report: Report, plan: TensorParallelPlan, ref, got: list[dict[str, np.ndarray]], mask: torch.Tensor, yard=None) -> None:
    """Layer by layer: every rank's states, then its copy of the layer's output; the first failure
    becomes ``report.first_divergence`` with its rank."""
    states = ref.cache.named_states()
    yard_states = {} if yard is None else yard.cache.named_states()
    tensors = [(name, r, plan.state_slice(name, t, r), _slice(plan, name, yard_states.get(name), r)) for name, t in states.items() for r in range(plan.world)]
    outputs = [i for i in range(len(ref.hidden_states)) if f"layer_output.{i}" in got[0]]  # per-layer graphs: every layer; by windows: each window's last
    if outputs:
        tensors += [(f"layer_output.{i}", r, ref.hidden_states[i], None if yard is None else yard.hidden_states[i]) for i in outputs for r in range(plan.world)]
    else:
        report.notes.append("per-layer: the ranks' graphs have no layer outputs, so layers are compared by their states only")
    for name, rank, want, y in sorted(tensors, key=lambda t: (layer_of(t[0]), not is_state(t[0]), t[1])):
        mine = torch.from_numpy(got[rank][name]).float()
        if mask is not None:  # KV at real positions only (the runner's rule, applied before the rank joins the name)
            mine, want = real_positions(name, mine, mask), real_positions(name, want, mask)
            y = None if y is None else real_positions(name, y.float(), mask)
        result = check(report, "layer", f"{name} (rank {rank})", mine, want, "layer", yard=y, layer=layer_of(name))
        if not result.passed and report.first_divergence is None:
            report.first_divergence = {"layer": layer_of(name), "rank": rank, "tensor": name, "why": result.failures, "step": None}


def _slice(plan: TensorParallelPlan, name: str, t: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    return None if t is None else plan.state_slice(name, t, rank)


def validate_export(
    export_dir,
    checkpoint=None,
    *,
    random_n: int = 4,
    prompt_length: int = 48,
    steps: int = 8,
    seed: int = 0,
    yardstick: bool = True,
    force: bool = False,
    integrity: str | None = SAMPLED,
    mode: str = "auto",
) -> Report:
    """``hybridtrt validate DIR`` of a tensor-parallel export (``export --tp N``): every rank's graphs run
    by the rank emulator (unified for the prompt, decode for the steps) against the unsharded reference
    of the source checkpoint (an FP8 export: the FP8 reference of the ranks' one recipe), with the
    one-device gates; a fault is named with its rank and layer. ``mode``: whole graphs (``full``), or by
    layer windows, one window of every rank resident at a time (``layers``); ``auto`` chooses by the
    model's size, as export verification does (`hybridtrt.exporter.tensor_parallel.rank_runners`).

    Raises:
        ArtefactError: The ranks are not one export (`read_tp_manifest`), or the checkpoint is not the
            source (its sha256; ``force`` skips that check).
    """
    from pathlib import Path

    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.export import DECODE_FILE, MODEL_FILE
    from hybridtrt.exporter.manifest import checkpoint_hash
    from hybridtrt.exporter.tensor_parallel import one_recipe, rank_dir, rank_references, rank_runners, read_tp_manifest
    from hybridtrt.judge.tolerances import precision_of
    from hybridtrt.models.loading import open_checkpoint
    from hybridtrt.validation.runner import random_prompts

    root = Path(export_dir)
    top, manifests = read_tp_manifest(root, integrity=integrity)
    source = top.get("source", {})
    ckpt = Path(checkpoint or source.get("checkpoint", ""))
    if not force and checkpoint_hash(ckpt) != source.get("sha256"):
        raise ArtefactError(
            f"checkpoint {ckpt} is not the one {root} was exported from (sha256 differs)",
            fix="pass --checkpoint with the export's source, or --force to compare anyway",
        )
    world, vocab, dtype = int(top["tensor_parallel"]["world"]), top["tensor_parallel"]["vocab"], top["dtype"]
    one_recipe(manifests, ArtefactError)
    opened = open_checkpoint(ckpt, dtype)
    plan = TensorParallelPlan(opened.config, world, vocab)
    for r, m in enumerate(manifests):
        if m.tensor_parallel.get("holds") != plan.holds(r):
            raise ArtefactError(f"{root / rank_dir(r)} holds {m.tensor_parallel.get('holds')}, not what this version splits: {plan.holds(r)}", fix="re-export with this hybridtrt")

    unified, decode = rank_runners(root, plan, opened.parameter_bytes, manifests[0], (MODEL_FILE, DECODE_FILE), mode)  # whole, or by layer windows
    ids, mask = random_prompts(random_n, plan.config.vocab_size, seed=seed, max_len=prompt_length)
    truth, yard = rank_references(opened, manifests[0], yardstick)  # an FP8 export: the FP8 reference of its one recipe
    return validate_ranks(truth, plan, unified, ids, mask, steps=steps, precision=precision_of(manifests[0]), decode=decode, yardstick=yard)
