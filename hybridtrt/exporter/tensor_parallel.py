"""One ONNX graph per tensor-parallel rank (DESIGN.md §12): each rank's `RankLM`, traced with its
collectives as ``trt::DistCollective`` nodes (`hybridtrt.ops.collectives`), through the same graph
passes as a one-device export.

`rank_graphs` is the in-memory form (the weights inline, sliced from a loaded model), what the rank
emulator's tests run. `export_tp` (``hybridtrt export --tp N``) writes ``rank{r}/`` export directories,
each streamed from the checkpoint as the rank's slices (`hybridtrt.models.tensor_parallel.RankCheckpoint`)
by the one-device exporter, and verifies the ranks together in the rank emulator before publishing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hybridtrt import CONTRACT_VERSION
from hybridtrt.errors import ConfigError, ExportError
from hybridtrt.exporter import io, trace_cache
from hybridtrt.exporter.export import GraphSpec, export_program, optimize_program, run_passes
from hybridtrt.exporter.integrity import SAMPLED
from hybridtrt.exporter.manifest import TP_MANIFEST  # beside rank0/ … rank{N-1}/, each a normal export directory
from hybridtrt.exporter.streaming import PARAM_PREFIX, DeferredTable, FrozenTrace, defer_large_initializers, trace_and_optimize, trace_inputs
from hybridtrt.exporter.wrapper import example_inputs
from hybridtrt.models.config import MOE, HybridConfig
from hybridtrt.models.loading import Checkpoint, open_checkpoint
from hybridtrt.models.model import HybridLM, meta_modules
from hybridtrt.models.tensor_parallel import (
    VOCAB_START,
    WORLDS,
    RankCheckpoint,
    RankLM,
    TensorParallelPlan,
    TracingCommunicator,
    Vocab,
    _runs,
    blocked_misalignment,
    rank_checkpoint,
    rank_model,
    wire_rank,
)
from hybridtrt.ops.collectives import DIST_COLLECTIVE, TRT_DOMAIN, dist_collective_function, register_schema


def rank_inputs(model: HybridLM, plan: TensorParallelPlan, rank: int, inputs: tuple[torch.Tensor, ...], flavour=io.DYNAMIC_CACHE) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s slice of the unsharded graph's inputs (ids and mask whole, every past state sliced)."""
    names = io.input_names(model.config, flavour)
    return tuple(plan.state_slice(n, t, rank) if n.startswith("past") else t for n, t in zip(names, inputs, strict=True))


def rank_graph(model: HybridLM, plan: TensorParallelPlan, rank: int, spec: GraphSpec = GraphSpec()) -> onnx.ModelProto:
    """Rank ``rank``'s graph of ``spec``: traced with example inputs sliced from the unsharded model's
    (a real prefill of past tokens), the graph passes run, the ``DistCollective`` body attached."""
    inputs = rank_inputs(model, plan, rank, example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour), spec.flavour)
    ranked = rank_model(model, plan, rank, TracingCommunicator(plan, rank))
    proto = export_program(ranked, inputs, spec, optimize=True).model_proto
    run_passes(proto, ranked.config, spec)
    return attach_dist_collective(proto, spec.opset)


def rank_graphs(model: HybridLM, plan: TensorParallelPlan, spec: GraphSpec = GraphSpec()) -> list[onnx.ModelProto]:
    """Every rank's `rank_graph`, tracing once per distinct rank config (with even splits: once).

    A rank's unoptimized trace does not depend on its weights (a trace of fake weights is the trace of
    the loaded model: tests/exporter/test_trace_cache.py) nor on its rank but for the ``groups`` of the
    collectives that join only some ranks (a shared Mamba group's norm). So each rank thaws the trace
    of its config (`FrozenTrace`), gets its own groups and its own weights, and is optimized: the bytes
    of tracing it alone (tests/validation/test_tensor_parallel.py).
    """
    traces: dict[HybridConfig, FrozenTrace] = {}
    graphs = []
    unsharded = example_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour)
    for rank in range(plan.world):
        ranked = rank_model(model, plan, rank, TracingCommunicator(plan, rank))
        if ranked.config not in traces:
            inputs = rank_inputs(model, plan, rank, unsharded, spec.flavour)
            traces[ranked.config] = FrozenTrace(export_program(ranked, inputs, spec, optimize=False))
        program = _with_groups(traces[ranked.config], plan.norm_group(rank)).thaw()
        state = {**ranked.state_dict(), **dict(ranked.named_buffers())}
        program.apply_weights({name: state[name.removeprefix(PARAM_PREFIX)] for name in program.model.graph.initializers})
        optimize_program(program)
        proto = program.model_proto
        run_passes(proto, ranked.config, spec)
        graphs.append(attach_dist_collective(proto, spec.opset))
    return graphs


def attach_dist_collective(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Give a graph with ``trt::DistCollective`` nodes the op's single-rank body and its domain import
    (in place; idempotent), and register the op's schema in this process: onnx's checker infers its
    output shape from the schema (an all-gather's first dim × N), not from the single-rank body (a
    process that replayed a cached trace has traced nothing that registered it)."""
    if not any(n.op_type == DIST_COLLECTIVE and n.domain == TRT_DOMAIN for n in proto.graph.node):
        return proto
    register_schema()
    kept = [f for f in proto.functions if not (f.domain == TRT_DOMAIN and f.name == DIST_COLLECTIVE)]
    del proto.functions[:]
    proto.functions.extend([*kept, dist_collective_function(opset)])
    if not any(e.domain == TRT_DOMAIN for e in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    return proto


# -------------------------------------------------------------------------------------------------
# export --tp N: rank directories streamed from the checkpoint

#: One-token steps the rank emulator verifies after the prompt (the prompt is a one-device export's
#: verification inputs: `hybridtrt.exporter.verify.VERIFY_BATCH` rows of VERIFY_PAST + VERIFY_SEQ tokens).
VERIFY_STEPS = 2


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


@dataclass
class RankExport:
    """What `hybridtrt.exporter.export.export` needs to write rank ``rank``'s directory: the plan, the
    traces the ranks share (one per distinct rank config and graph), the manifest's ``source`` (the
    checkpoint is hashed once, not once per rank), and for calibrated FP8 the unsharded weights' amax
    (`unsharded_weight_amax`, read once for every rank)."""

    plan: TensorParallelPlan
    rank: int
    source: dict
    traces: dict = field(default_factory=dict)
    weight_amax: dict | None = None

    def view(self, checkpoint: Checkpoint) -> RankCheckpoint:
        return rank_checkpoint(checkpoint, self.plan, self.rank)

    def fp8(self, quantize):  # noqa: ANN001, ANN201 - QuantizeOptions -> QuantizeOptions
        """The rank's copy of the export's calibrated FP8 options: the unsharded model's activation amax
        (every rank quantizes its part of an activation with the whole activation's scale) and, for each
        weight the rank holds a part of, the unsharded weight's amax restricted to the rank's output
        channels (`hybridtrt.graphs.fp8_qdq.WeightAmax`): its scales are the whole tensor's, so the
        rank's FP8 weights are the slices of the one-device export's (DESIGN.md §12)."""
        if self.weight_amax is None or quantize.act_amax is None:
            raise RuntimeError("calibrate the unsharded model and read its weights' amax first (export_tp)")
        per_channel = quantize.weight_scale == "channel"
        amax: dict = {}
        for name, (node, a) in self.weight_amax.items():
            value = self._restricted(name, a, per_channel)
            if name.endswith(_EXPERT_STACKS):  # {"up": …, "down": …} of one MoeExperts node
                amax.setdefault(node, {})[name.rsplit(".", 1)[1].removesuffix("_proj")] = value
            else:
                amax[node] = value
        return dataclasses.replace(quantize, weight_amax=amax)

    def nvfp4(self, weight_only, view: RankCheckpoint):  # noqa: ANN001, ANN201 - WeightOnlyOptions -> WeightOnlyOptions
        """The rank's copy of an NVFP4 checkpoint's recipe (`hybridtrt.exporter.quantize.nvfp4_from_checkpoint`,
        read once from the unsharded checkpoint): the same layers, global and input scales, each weight's
        codes and block scales read as the rank's part of them (`RankCheckpoint.read_blocked_part`), so its
        4-bit weights are the slices of the one-device export's."""
        from hybridtrt.graphs.weight_only import NVFP4ExpertScales, NVFP4Scales

        read = lambda tensor: view.read_blocked_part(tensor).view(torch.uint8).numpy()  # noqa: E731 - bytes as stored, as nvfp4_from_checkpoint's
        ranked = lambda s: dataclasses.replace(s, read=read)  # noqa: E731
        fixed = {
            node: ranked(s) if isinstance(s, NVFP4Scales) else NVFP4ExpertScales(up=tuple(map(ranked, s.up)), down=tuple(map(ranked, s.down)))
            for node, s in weight_only.fixed.items()
        }
        return dataclasses.replace(weight_only, fixed=fixed)

    def int4(self, weight_only, view: RankCheckpoint):  # noqa: ANN001, ANN201 - WeightOnlyOptions -> WeightOnlyOptions
        """The rank's copy of the export's INT4 options: the unsharded layers' blocks (`int4_blocks`, in
        ``weight_only.blocks`` already), and the rank's input indices of every layer whose inputs it holds a
        part of, for its slice of an AWQ pre-scale, so its 4-bit weights and scales are the slices of the
        one-device export's (of those blocks)."""
        parts = {}
        for name, node in _linears(view).items():
            where = self.plan.part(name, self.rank)
            if where is not None and where[0] == 1:
                parts[node] = list(where[1])
        return dataclasses.replace(weight_only, input_parts=parts)

    def _restricted(self, name: str, amax, per_channel: bool):  # noqa: ANN001, ANN202 - np.ndarray -> WeightAmax
        """``amax`` of the unsharded parameter ``name`` as the rank's part needs it: per tensor as it is,
        per channel the rank's output channels (a linear's rows ``[out, in]``, an expert stack's dim 1
        ``[E, out, in]``) when its part is a slice of them, else all of them (its part is a slice of
        the inputs: every output channel is the whole row's)."""
        dim, idx = self.plan.part(name, self.rank)
        experts = name.endswith(_EXPERT_STACKS)
        if per_channel and dim == (1 if experts else 0):
            amax = amax[:, list(idx)] if experts else amax[list(idx)]
        return tuple(map(tuple, amax.tolist())) if amax.ndim == 2 else tuple(amax.tolist()) if amax.ndim == 1 else float(amax)

    def describe(self) -> dict:
        """The rank's ``tensor_parallel`` entry of its manifest."""
        plan = self.plan
        return {
            "rank": self.rank,
            "world": plan.world,
            "vocab": plan.vocab,
            "holds": plan.holds(self.rank),
            "norm_group": list(plan.norm_group(self.rank) or []),
            "model": plan.config.to_dict(),
            "manifest": f"../{TP_MANIFEST}",
        }

    def trace(self, view: RankCheckpoint, table: DeferredTable, spec: GraphSpec) -> onnx.ModelProto:
        """The rank's graph of ``spec`` with its large initializers as placeholders (`trace_streamed` for a
        rank): the unoptimized trace of its config (traced once, on fake weights, for every rank of that
        config), its groups patched in, its own weights attached, optimized, the passes run."""
        key = (view.config, spec)
        if key not in self.traces:
            self.traces[key] = self._unoptimized(view, spec)
        frozen = _with_groups(self.traces[key], self.plan.norm_group(self.rank))
        program, stand_ins, large = trace_and_optimize(frozen, view, optimize_program)
        defer_large_initializers(program, table, stand_ins, large)
        proto = program.model_proto
        del program, stand_ins
        run_passes(proto, view.config, spec)
        return attach_dist_collective(proto, spec.opset)


    def _unoptimized(self, view: RankCheckpoint, spec: GraphSpec) -> FrozenTrace:
        """The rank's unoptimized trace: as a one-device export's (`hybridtrt.exporter.export`), of a
        prototype with one layer per kind, copied out to every layer (`hybridtrt.exporter.stitch`; the
        prototype is the rank of the plan of the unsharded prototype), or of the whole rank model when
        the prototype cannot be copied."""
        from hybridtrt.exporter import export as export_mod
        from hybridtrt.exporter import stitch

        proto = stitch.prototype(view.config) if export_mod.STITCH else None
        if proto is not None:
            try:
                shallow = stitch.prototype_structure(view, proto)
                plan = TensorParallelPlan(stitch.prototype(self.plan.config).config, self.plan.world, self.plan.vocab)
                assert plan.rank_config(self.rank) == proto.config
                traced = _Shallow(plan, self.rank, shallow.dtype, shallow.parameters)
                return trace_cache.traced(shallow, spec, partial(_trace_rank, traced, spec)).stitched(proto, view.config, spec)
            except stitch.CannotStitch as e:
                logging.getLogger(__name__).warning("tracing every layer of rank %d: %s", self.rank, e)
        return trace_cache.traced(view, spec, partial(_trace_rank, view, spec))


@dataclass(frozen=True)
class _Shallow:
    """What `fake_rank_model` reads of a rank's view: the plan, the rank, the dtype, the parameters' shapes."""

    plan: TensorParallelPlan
    rank: int
    dtype: torch.dtype
    parameters: dict


def fake_rank_model(view: RankCheckpoint) -> RankLM:
    """Rank ``view.rank``'s `RankLM` with fake parameters (shapes and dtypes, no storage), wired for tracing."""
    plan, rank = view.plan, view.rank
    comm = TracingCommunicator(plan, rank)
    with meta_modules():
        model = RankLM(plan, rank, comm).to(view.dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = {name: torch.empty(p.shape, dtype=p.dtype) for name, p in view.parameters.items() if name != VOCAB_START}
    model.load_state_dict(fake, strict=True, assign=True)
    return wire_rank(model, plan, rank, comm).requires_grad_(False).eval()


def _trace_rank(view: RankCheckpoint, spec: GraphSpec) -> FrozenTrace:
    model = fake_rank_model(view)
    inputs = trace_inputs(model, seq=spec.seq, state_dtype=spec.state_dtype, flavour=spec.flavour)
    return FrozenTrace(export_program(model, inputs, spec, optimize=False))


def _with_groups(frozen: FrozenTrace, group: tuple[int, ...] | None) -> FrozenTrace:
    """``frozen`` with its partial collectives (a shared group's norm) over ``group``."""
    if group is None:
        return frozen
    program = frozen.thaw()
    for node in program.model.graph:
        if node.op_type == DIST_COLLECTIVE and list(node.attributes["groups"].as_ints()):
            node.attributes["groups"] = ir.AttrInt64s("groups", list(group))
    return FrozenTrace(program)


@dataclass
class TensorParallelResult:
    """What `export_tp` wrote and found."""

    out_dir: Path
    plan: TensorParallelPlan
    ranks: list  # `hybridtrt.exporter.export.ExportResult` per rank
    verification: dict
    parameters: int  # the unsharded model's
    removed_partials: list[str] = field(default_factory=list)


def export_tp(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    world: int,
    options=None,
    *,
    vocab: Vocab = "parallel",
    step=None,
    progress=None,
    quantize=None,
    weight_only=None,
) -> TensorParallelResult:
    """``hybridtrt export --tp N``: one export directory per rank (``rank{r}/``, each streamed from the
    checkpoint as the rank's slices: `RankCheckpoint`), verified together by the rank emulator against the
    unsharded fp32 reference before anything is published, and a top-level manifest (`TP_MANIFEST`).

    Args:
        checkpoint_dir: HF checkpoint.
        out_dir: Output directory (created; holds ``rank0/`` … and ``hybridtrt-tp.json``).
        world: N, the ranks (GPUs).
        options: `hybridtrt.exporter.export.ExportOptions` (float dtypes, dynamic KV cache).
        vocab: ``"parallel"`` or ``"replicated"`` embedding and LM head (`TensorParallelPlan`).
        step, progress: As `hybridtrt.exporter.export.export`'s.
        quantize: ``--quantize fp8`` (`hybridtrt.exporter.quantize.QuantizeOptions`): the unsharded model
            is calibrated once and its weights' amax read once; every rank's scales are the unsharded
            tensors' (`RankExport.fp8`). A ModelOpt FP8 or NVFP4 checkpoint's own scales need no flag.
        weight_only: ``--quantize int4`` (`hybridtrt.exporter.quantize.WeightOnlyOptions`): blocks that
            every rank's parts fit (`int4_blocks`), the AWQ search once on the unsharded model.

    Raises:
        ConfigError: A model the plan cannot split over ``world`` (the field, the worlds that fit).
        ExportError: Options not built for tensor parallelism yet; a verification failure (naming the
            rank and layer; nothing published).
    """
    from hybridtrt.exporter.export import DECODE_FILE, MODEL_FILE, ExportOptions, _checkpoint_quantization, _no_progress, _no_step, check_options, export
    from hybridtrt.exporter.manifest import checkpoint_hash, tool_versions
    from hybridtrt.exporter.verify import FULL_GRAPH_MAX_BYTES
    from hybridtrt.models.loading import dtype_name
    from hybridtrt.exporter.target import OutputDir

    opts = options or ExportOptions()
    step, progress = step or _no_step, progress or _no_progress
    _refuse_options(opts)
    check_options(opts, quantize)
    with step("read checkpoint (config.json, safetensors headers)"):
        checkpoint = open_checkpoint(checkpoint_dir, opts.dtype)
    plan = TensorParallelPlan(checkpoint.config, world, vocab)
    rank_checkpoint(checkpoint, plan, 0)  # refuses what the rank view cannot split, before anything is written
    quantize, four_bit = _tp_quantization(checkpoint, plan, quantize, weight_only, opts, _checkpoint_quantization)
    if opts.verify and (opts.verify_mode == "full" or (opts.verify_mode == "auto" and checkpoint.parameter_bytes <= FULL_GRAPH_MAX_BYTES)):
        _check_verification_memory(checkpoint.parameter_bytes, dtype_name(checkpoint.dtype))  # before anything is written
    weight_amax = None
    if quantize is not None and quantize.fixed is None:  # calibrated FP8: the unsharded model's scales, once for every rank
        weight_amax = _calibrate_unsharded(checkpoint, plan, quantize, progress)
    if four_bit is not None and four_bit.calibrated and four_bit.awq is None:  # INT4 with AWQ: searched once, on the unsharded model
        _awq_unsharded(checkpoint, four_bit, progress)
    names = [rank_dir(r) for r in range(world)]
    with OutputDir(Path(out_dir), set(names), TP_MANIFEST, checkpoint.root, force=opts.force) as target:
        with step("hash the checkpoint (config, weights, tokenizer)"):
            source = {"checkpoint": str(checkpoint.root.resolve()), "sha256": checkpoint_hash(checkpoint.root), "family": checkpoint.config.family}
            if opts.dequantize:
                source["dequantized"] = checkpoint.quantization.describe()
        shared: dict = {}
        results = []
        for r in range(world):
            rank = RankExport(plan, r, source, shared, weight_amax)
            results.append(export(
                checkpoint_dir, target.partial / rank_dir(r), dataclasses.replace(opts, verify=False, force=False),
                step=lambda what, r=r: step(f"rank {r}/{world}: {what}"), progress=progress, rank=rank, quantize=quantize, weight_only=four_bit,
            ))  # fmt: skip
        manifests = [res.manifest for res in results]
        recipe = one_recipe(manifests, ExportError)
        verification: dict = {"method": "skipped", "reason": "--no-verify"}
        if opts.verify:
            against = "the FP8 reference (fp32)" if recipe else "the 4-bit weights' reference (fp32)" if four_bit else "the fp32 reference"
            with step(f"verify: {world} ranks' graphs in ONNX Runtime, collectives emulated, against {against}"):
                verification = _verify(checkpoint, plan, target.partial, MODEL_FILE, DECODE_FILE, manifests, opts.verify_mode)
        manifest = {
            "contract_version": CONTRACT_VERSION,
            "tensor_parallel": {"world": world, "vocab": vocab, "ranks": names},
            "source": source,
            "model": checkpoint.config.to_dict(),
            "dtype": results[0].manifest.dtype,
            "quantization": None if recipe is None else {k: recipe.get(k) for k in ("scheme", "format", "weight_scale", "source")},
            "weight_only": None if results[0].manifest.weight_only is None else {k: results[0].manifest.weight_only.get(k) for k in ("scheme", "format", "block_size", "source")},
            "rank_manifests": {name: _sha256(target.partial / name / "hybridtrt.json") for name in names},
            "verification": verification,
            "tools": tool_versions(),
        }
        (target.partial / TP_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        target.publish([*names, TP_MANIFEST])
    return TensorParallelResult(Path(out_dir), plan, results, verification, checkpoint.num_parameters, target.removed_partials)


def _refuse_options(opts) -> None:
    """What ``--tp`` does not build yet, refused before anything is read."""
    from hybridtrt.errors import ExportError

    refused = {
        "--speculative": opts.speculative,
        "--kv-cache static": opts.kv_cache == "static",
    }
    for flag, given in refused.items():
        if given:
            raise ExportError(f"{flag} with --tp is not built yet (issue 27)", fix=f"drop {flag}, or export on one device without --tp")


def _tp_quantization(checkpoint: Checkpoint, plan: TensorParallelPlan, quantize, weight_only, opts, resolve):  # noqa: ANN001, ANN202
    """The recipes of a ``--tp`` export, ``(fp8, 4-bit)``, resolved once for every rank before anything is
    read: ``--quantize fp8`` as given, ``--quantize int4`` with the blocks every rank's parts fit
    (`int4_blocks`), a ModelOpt FP8 checkpoint's own scales (the unsharded tensors' per-tensor scales, which
    every rank's slices keep), a ModelOpt NVFP4 checkpoint's (each rank its part of the codes and block
    scales: `RankExport.nvfp4`), or none with ``--dequantize``. ``resolve`` is the
    one-device rule (`hybridtrt.exporter.export._checkpoint_quantization`), so the refusals are its own. A
    split that would cut a 4-bit block of inputs is refused with the worlds that do not."""
    quantize, four_bit = resolve(checkpoint, quantize, weight_only, opts.dequantize, opts.fp4_activations, opts.dequantize_experts)
    if four_bit is not None and four_bit.fixed is None:  # --quantize int4: our own blocks, fitted to the ranks' parts
        four_bit.blocks = int4_blocks(checkpoint, plan, four_bit.block_size)
        return quantize, four_bit
    problem = blocked_misalignment(checkpoint, plan) if four_bit is not None else None
    if problem is not None:
        fits = [str(n) for n in WORLDS if n != plan.world and _fits(checkpoint, plan, n)]
        raise ExportError(
            f"--tp {plan.world} of a ModelOpt {checkpoint.quantization.algo} checkpoint's 4-bit weights: {problem} "
            "(a rank holds its weights' codes and block scales as stored, whole blocks)",
            fix=(f"use --tp {' or '.join(fits)}, " if fits else "") + "add --dequantize (its weights dequantized to --dtype, split over the ranks), or export on one device",
        )
    return quantize, four_bit


def _fits(checkpoint: Checkpoint, plan: TensorParallelPlan, world: int) -> bool:
    """Whether ``world`` ranks split ``checkpoint`` with whole 4-bit blocks."""
    try:
        return blocked_misalignment(checkpoint, TensorParallelPlan(plan.config, world, plan.vocab)) is None
    except ConfigError:
        return False


def _linears(checkpoint: Checkpoint) -> dict[str, str]:
    """``{parameter: MatMul node}`` of the quantizable linear projections (`hybridtrt.graphs.fp8_qdq`'s, the
    4-bit passes') among ``checkpoint``'s parameters (a rank's view has the same names)."""
    from hybridtrt.exporter.calibration import matmul_node_name
    from hybridtrt.graphs.fp8_qdq import _QUANTIZABLE

    nodes = {name: matmul_node_name(name.removesuffix(".weight")) for name in checkpoint.parameters if name.endswith(".weight")}
    return {name: node for name, node in nodes.items() if _QUANTIZABLE.match(node)}


def int4_blocks(checkpoint: Checkpoint, plan: TensorParallelPlan, block_size: int) -> dict[str, int | None]:
    """``{MatMul node: block}`` of every quantizable linear of a ``--quantize int4 --tp N`` export: the
    one-device rule (`hybridtrt.graphs.weight_only.layer_block`: the requested block, else the largest power
    of two below it, at least `MIN_BLOCK`) applied to the unsharded layer's inputs **and** every rank's part
    of them, so that each rank's inputs are whole blocks and its INT4 weights and scales are the slices of
    the one-device export's with those blocks. None: no such block (the layer stays in the model dtype on
    every rank). A layer whose inputs no rank splits gets the one-device block."""
    from hybridtrt.graphs.weight_only import MIN_BLOCK

    out: dict[str, int | None] = {}
    for name, node in _linears(checkpoint).items():
        cuts = [checkpoint.parameters[name].shape[1]]
        for rank in range(plan.world):
            where = plan.part(name, rank)
            if where is not None and where[0] == 1:
                cuts += [x for r in _runs(where[1]) for x in (r.start, len(r))]
        block = block_size
        while block >= MIN_BLOCK and any(c % block for c in cuts):
            block //= 2
        out[node] = block if block >= MIN_BLOCK else None
    return out


#: The parameters of a routed-experts stack (``layers.{i}.mixer.experts.up_proj``: ``[E, out, in]``).
_EXPERT_STACKS = (".experts.up_proj", ".experts.down_proj")


def fp8_sharded_weights(checkpoint: Checkpoint, plan: TensorParallelPlan) -> dict[str, str]:
    """``{parameter: node}`` of the weights FP8 may quantize (`hybridtrt.graphs.fp8_qdq`'s projections, the
    routed experts) that the ranks hold parts of; a weight every rank holds whole gets its own amax."""
    from hybridtrt.exporter.calibration import moe_node_name

    nodes = {**_linears(checkpoint), **{name: moe_node_name(name.rsplit(".", 1)[0]) for name in checkpoint.parameters if name.endswith(_EXPERT_STACKS)}}
    return {name: node for name, node in nodes.items() if plan.part(name, 0) is not None}


def unsharded_weight_amax(checkpoint: Checkpoint, names: dict[str, str], per_channel: bool, advance=lambda n: None) -> dict:  # noqa: ANN001
    """``{parameter: (node, amax)}`` of the unsharded weights ``names`` (`fp8_sharded_weights`), in the
    model dtype as the one-device quantizer sees them: a scalar per tensor, ``[out]`` per output channel;
    a stack of experts ``[E]`` or ``[E, out]``. Read in blocks of rows (one expert at a time), so memory
    holds a block, never a whole tensor."""
    from hybridtrt.models.tensor_parallel import rows_per_block

    out = {}
    for name, node in names.items():
        source = checkpoint.parameters[name]
        rows = source.shape[0]
        experts = name.endswith(_EXPERT_STACKS)
        step = 1 if experts else rows_per_block(source)
        parts = []
        for start in range(0, rows, step):
            block = checkpoint.read_rows(name, start, min(start + step, rows)).float().abs()
            if experts:
                parts.append(block.amax(dim=2) if per_channel else block.amax(dim=(1, 2)))
            else:
                parts.append(block.amax(dim=1) if per_channel else block.amax().reshape(1))
            del block
        amax = torch.cat(parts)
        out[name] = (node, (amax if per_channel or experts else amax.max()).numpy())
        advance(1)
    return out


def _awq_unsharded(checkpoint: Checkpoint, weight_only, progress) -> None:  # noqa: ANN001
    """The AWQ search of ``--quantize int4 --calib`` once, on the unsharded model (one layer resident at a
    time), with the blocks of the ranks (``weight_only.blocks``): every rank slices the same pre-scales."""
    from hybridtrt.exporter.export import _counter
    from hybridtrt.exporter.quantize import run_awq
    from hybridtrt.models.lazy import lazy_model

    reference = lazy_model(checkpoint)
    with progress("AWQ search on the unsharded model (each layer read once)", len(reference.weights.groups), "layers") as advance:
        weight_only.progress = _counter(advance)
        run_awq(reference, checkpoint.root, weight_only)
    weight_only.progress = None


def _calibrate_unsharded(checkpoint: Checkpoint, plan: TensorParallelPlan, quantize, progress) -> dict:  # noqa: ANN001
    """Calibrate the unsharded model once (``quantize.act_amax``: every rank's activation scales) and read
    the unsharded weights' amax (`unsharded_weight_amax`: every rank's weight scales)."""
    from hybridtrt.exporter.export import _counter
    from hybridtrt.exporter.quantize import run_calibration
    from hybridtrt.models.lazy import lazy_model

    reference = lazy_model(checkpoint)
    with progress("FP8 calibration of the unsharded model (each layer read once)", len(reference.weights.groups), "layers") as advance:
        quantize.progress = _counter(advance)
        run_calibration(reference, checkpoint.root, quantize)
    quantize.progress = None
    del reference
    names = fp8_sharded_weights(checkpoint, plan)
    with progress("FP8: the unsharded weights' amax (each rank's weight scales)", len(names), "weights") as advance:
        return unsharded_weight_amax(checkpoint, names, quantize.weight_scale == "channel", advance)


def one_recipe(manifests, error) -> dict | None:  # noqa: ANN001
    """The one quantization recipe of N ranks: every rank's ``quantization`` (FP8) and ``weight_only``
    (4-bit) must be rank 0's, scale for scale (the same layers, the unsharded tensors' scales). Raises
    ``error`` naming the rank and the first entry that differs. Returns rank 0's FP8 recipe (or None)."""
    for r, m in enumerate(manifests[1:], 1):
        for field_ in ("quantization", "weight_only"):
            mine, first = getattr(m, field_), getattr(manifests[0], field_)
            if mine != first:
                raise error(
                    f"rank {r}'s quantization recipe is not rank 0's ({field_}: {_first_difference(first, mine)}): the ranks "
                    "would compute different quantized functions",
                    fix="re-export every rank together: hybridtrt export CHECKPOINT -o DIR --tp N",
                )
    return manifests[0].quantization


def _first_difference(a, b, path: str = "") -> str:  # noqa: ANN001
    """Where two JSON values first differ: ``weight_scales['/model/…/MatMul']: 0.01 vs 0.02``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}[{key!r}]" if path else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    show = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "…"  # noqa: E731
    return f"{path or 'recipe'}: {show(a)} vs {show(b)}"


#: Peak memory of whole-graph rank emulation per parameter byte (`benchmarks/tp_export_memory.py --size small
#: --verify --verify-mode full`, 2026-12-08, N = 2: 1.00 GiB above the imports for 0.34 GiB of fp32 parameters,
#: 1.67 GiB for 0.17 GiB of bf16 ones, the references' fixed part included): ONNX Runtime holds the unified and
#: the decode graph's weights, and widens bf16 weights to fp32 copies (`hybridtrt.graphs.bf16_emulation`).
WHOLE_GRAPH_BYTES_PER_PARAMETER_BYTE = {"bf16": 8, "fp16": 3, "fp32": 3}


def _check_verification_memory(parameter_bytes: int, dtype: str) -> None:
    """Refuse up front when whole rank graphs cannot fit (`WHOLE_GRAPH_BYTES_PER_PARAMETER_BYTE`)."""
    from hybridtrt.files import human_bytes
    from hybridtrt.memory import available_memory

    needed = parameter_bytes * WHOLE_GRAPH_BYTES_PER_PARAMETER_BYTE.get(dtype, 3)
    room = available_memory()
    if room.nbytes is not None and needed > room.nbytes:
        raise ExportError(
            f"verifying a --tp export by whole graphs runs every rank's graph at once (about {human_bytes(needed)} for this model), "
            f"and {human_bytes(room.nbytes)} is available: {room.source}",
            fix="verify by layer windows (--verify layers: one window of every rank at a time), or export with --no-verify",
        )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(checkpoint: Checkpoint, plan: TensorParallelPlan, root: Path, model_file: str, decode_file: str, manifests: list, mode: str) -> dict:
    """The written ranks' graphs (`judge_ranks`), read back from ``root``: whole (``full``), or by layer
    windows (``layers``, `WindowedRanks`); ``auto`` as one device chooses (`hybridtrt.exporter.verify`)."""
    return judge_ranks(checkpoint, plan, *rank_runners(root, plan, checkpoint.parameter_bytes, manifests[0], (model_file, decode_file), mode), manifests)


def rank_runners(root: Path, plan: TensorParallelPlan, parameter_bytes: int, manifest, files: tuple[str, ...], mode: str = "auto") -> list:
    """Every rank's graphs of each of ``files`` (None where absent) ready for `run_held`: whole in a
    `RankEmulator` (``full``; ``auto`` up to `hybridtrt.exporter.verify.FULL_GRAPH_MAX_BYTES` of
    parameters), or by layer windows of about `~hybridtrt.exporter.verify.WINDOW_FRACTION` of the model's
    bytes each (``layers``; ``auto`` above). Whole graphs are refused up front when they cannot fit."""
    from hybridtrt.exporter.verify import _ONNX_TYPES, FULL_GRAPH_MAX_BYTES, VERIFY_MODES, WINDOW_FRACTION
    from hybridtrt.models.loading import parse_dtype

    if mode not in VERIFY_MODES:
        raise ExportError(f"verification mode {mode!r} is unknown", fix=f"use one of {', '.join(VERIFY_MODES)}")
    chosen = mode if mode != "auto" else ("full" if parameter_bytes <= FULL_GRAPH_MAX_BYTES else "layers")
    moe = bool(plan.config.layers_of(MOE))
    out = []
    for name in files:
        paths = [root / rank_dir(r) / name for r in range(plan.world)]
        if not paths[0].is_file():
            out.append(None)
        elif chosen == "full":  # weights read by ONNX Runtime from the rank's files, not loaded here first
            _check_verification_memory(parameter_bytes, manifest.dtype)
            out.append(held_ranks([onnx.load(str(p), load_external_data=False) for p in paths], moe, [str(p.parent) for p in paths]))
        else:
            hidden = _ONNX_TYPES[parse_dtype(manifest.dtype)]
            out.append(WindowedRanks(paths, plan.config.num_layers, hidden, int(parameter_bytes * WINDOW_FRACTION), moe))
    return out


def rank_references(checkpoint: Checkpoint, manifest, yardstick: bool = True) -> tuple[HybridLM, HybridLM | None]:
    """The unsharded truth and yardstick the ranks of ``manifest``'s export (rank 0's; `one_recipe`) are
    judged against, as a one-device export's are (`hybridtrt.exporter.verify`): the fp32 reference, or the
    FP8 reference computing the recipe (`hybridtrt.exporter.fp8_reference.as_exported`); the yardstick is
    the same model in the graphs' dtype, or for an fp32 FP8 export the truth's run dithered before each
    quantizer. Lazy: one layer resident at a time."""
    from hybridtrt.exporter.fp8_reference import FP32_DITHER, as_exported
    from hybridtrt.exporter.verify import _Judge
    from hybridtrt.models.lazy import lazy_model

    judge = _Judge(manifest)
    truth = as_exported(lazy_model(checkpoint.as_dtype(torch.float32)), manifest)
    if not (yardstick and judge.yardstick):
        return truth, None
    dither = FP32_DITHER if manifest.dtype == "fp32" else None  # only a quantized fp32 export has a yardstick: the dithered run
    return truth, as_exported(lazy_model(checkpoint.as_dtype(manifest.dtype)), manifest, dither=dither)


class WindowedRanks:
    """Every rank's graph file run window by window of decoder layers (`hybridtrt.graphs.layer_window`), the
    windows of all ranks together in a `RankEmulator`: one window's weights of every rank resident at a time
    (about ``budget`` bytes of the model's), so ranks of a model beyond memory are judged as a one-device
    export's layer windows are. Each window is fed the reference's hidden state at its start (``run``'s
    ``hidden``: the graphs' dtype reference's) and every rank's slice of the call's past states; its outputs
    are the window's present states, its routers' choices, the hidden state after its last layer (as
    ``layer_output.{last}``), and the logits for the last window.

    Args:
        paths: Rank 0 … N − 1's graph files (their weights beside them, loaded one window at a time).
        num_layers: Decoder layers.
        hidden_type: ONNX element type of the residual stream (the graphs' dtype).
        budget: Bytes of weights (all ranks' together) a window may hold (at least one layer).
        held: Give every window the held-routing pass (`hybridtrt.graphs.held_routing`; MoE).
    """

    #: `run_held` feeds a window the reference's hidden state at its start.
    needs_hidden = True

    def __init__(self, paths: list[Path], num_layers: int, hidden_type: int, budget: int, held: bool) -> None:
        from hybridtrt.exporter.verify import _layer_bytes, window_plan
        from hybridtrt.graphs import layer_window

        self.paths, self.num_layers, self.hidden_type, self.held = paths, num_layers, hidden_type, held
        self.graphs = [onnx.load(str(p), load_external_data=False) for p in paths]
        try:
            self.streams = [layer_window.residual_stream(g, num_layers) for g in self.graphs]
        except layer_window.WindowError as e:
            raise ExportError(f"{paths[0].name}: cannot verify the ranks by layer windows ({e.message})", fix="verify whole graphs with --verify full, or skip with --no-verify") from None
        member = [b * len(paths) for b in _layer_bytes(self.graphs[0], num_layers)]
        self.windows = window_plan(member, max(budget, 1))
        self.input_types = {i.name: i.type.tensor_type.elem_type for i in self.graphs[0].graph.input} | {layer_window.HIDDEN_IN: hidden_type}
        self.presents: dict[int, list[str]] = {}  # layer -> its present states
        for o in self.graphs[0].graph.output:
            if o.name.startswith(("present_conv_state.", "present_ssm_state.", "present.")):
                self.presents.setdefault(int(o.name.split(".")[1]), []).append(o.name)

    @property
    def world(self) -> int:
        return len(self.paths)

    def feed(self, name: str, value: np.ndarray) -> np.ndarray:
        """As `RankEmulator.feed`."""
        from hybridtrt.runtime.rank_emulator import as_fed

        return as_fed(self.input_types[name], value)

    def _window(self, rank: int, first: int, last: int) -> onnx.ModelProto:
        """Rank ``rank``'s window, its weights not loaded: ONNX Runtime reads this window's from the rank's files."""
        from hybridtrt.graphs import layer_window
        from hybridtrt.graphs.fp8_qdq import _opset
        from hybridtrt.graphs.held_routing import hold_routing

        states = [n for layer in range(first, min(last, self.num_layers - 1) + 1) for n in self.presents.get(layer, [])]
        sub = layer_window.window(self.graphs[rank], self.streams[rank], first, last, states, self.hidden_type)
        return attach_dist_collective(hold_routing(sub).model if self.held else sub, _opset(sub))  # the functions' opset is the graph's

    def run(self, feeds: list[dict[str, np.ndarray]], hidden: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Every rank's outputs of one call, window by window (``hidden[k]``: the reference's output of
        layer ``k``, fed to the window that starts after it)."""
        from hybridtrt.graphs import layer_window
        from hybridtrt.runtime.rank_emulator import RankEmulator

        out: list[dict[str, np.ndarray]] = [{} for _ in self.paths]
        for first, last in self.windows:
            ranks = RankEmulator([self._window(r, first, last) for r in range(self.world)], folders=[str(p.parent) for p in self.paths])
            window_feeds = [dict(f) for f in feeds]
            if first > 0:
                for f in window_feeds:
                    f[layer_window.HIDDEN_IN] = ranks.feed(layer_window.HIDDEN_IN, hidden[first - 1].float().numpy())
            for mine, got in zip(out, ranks.run(window_feeds), strict=True):
                if layer_window.HIDDEN_OUT in got:
                    got[f"layer_output.{last}"] = got.pop(layer_window.HIDDEN_OUT)
                # Copies: ONNX Runtime's output arrays keep their session's memory arena alive (measured: a
                # 1 B model's windows kept 20-40 MB each, 0.9 GiB at the end, until the outputs were copied).
                mine.update({name: value.copy() for name, value in got.items()})
            del ranks
        return out


def cast_cache(cache, dtype: torch.dtype):
    """The fp32 truth's states as a model in ``dtype`` holds them (SSM states keep their own dtype)."""
    from hybridtrt.models.cache import HybridCache

    to = lambda states: {i: t.to(dtype) for i, t in states.items()}  # noqa: E731
    return HybridCache(to(cache.conv), dict(cache.ssm), to(cache.key), to(cache.value))


def held_ranks(graphs, moe: bool, folders: list[str] | None = None):  # noqa: ANN001, ANN201 - rank graphs (or their RankEmulator) -> RankEmulator | None
    """Rank 0 … N − 1's graphs in a `RankEmulator` (one given passes through; None stays None); an MoE model's
    graphs get the held-routing pass (`hybridtrt.graphs.held_routing`), so that they can be held to the truth's
    expert choices (`run_held`). ``folders``: each rank's weights, when the graphs were loaded without them."""
    from hybridtrt.graphs.held_routing import hold_routing
    from hybridtrt.runtime.rank_emulator import RankEmulator

    if graphs is None or isinstance(graphs, (RankEmulator, WindowedRanks)):
        return graphs
    return RankEmulator([hold_routing(g).model if moe else g for g in graphs], folders=folders)


def run_held(truth: HybridLM, yardstick: HybridLM | None, plan: TensorParallelPlan, ranks, ids: torch.Tensor, mask: torch.Tensor, cache, *,
             held: bool, hidden: bool = False):  # noqa: ANN001, ANN201 - fmt: skip
    """One call of the unsharded fp32 ``truth``, which chooses the experts; the ``yardstick`` (the one-device
    model in the graphs' dtype, on the truth's states cast to it) and every rank's graph (its slice of the
    same inputs) held to those choices when ``held``. The one step `judge_ranks` and
    `hybridtrt.validation.tensor_parallel.validate_ranks` share.

    Returns:
        ``(truth's output, yardstick's or None, every rank's outputs, the truth's RoutingHold, the yardstick's)``.
    """
    from hybridtrt.exporter.verify import _release
    from hybridtrt.exporter.wrapper import flat_from_cache
    from hybridtrt.graphs.held_routing import held_feeds
    from hybridtrt.models.moe import RoutingHold, held_routing

    windows = getattr(ranks, "needs_hidden", False)  # WindowedRanks: each window fed the reference's hidden state
    truth_hold = RoutingHold()
    with torch.no_grad(), held_routing(truth, truth_hold):
        ref = truth(ids, mask, cache, logits="last", output_hidden_states=hidden or windows)
    yard_hold = RoutingHold(truth_hold.all_ids()) if held else RoutingHold()
    yard = None
    if yardstick is not None:
        with torch.no_grad(), held_routing(yardstick, yard_hold):
            yard = yardstick(ids, mask, cast_cache(cache, yardstick.dtype), logits="last", output_hidden_states=hidden or windows)
    names = io.input_names(truth.config, io.DYNAMIC_CACHE)
    full = (ids, mask, *flat_from_cache(io.state_specs(truth.config), cache))
    hold = held_feeds(truth_hold.all_ids().keys(), truth.config.moe.top_k, truth_hold.all_ids()) if held else {}
    feeds = [{**{n: ranks.feed(n, t.numpy()) for n, t in zip(names, rank_inputs(truth, plan, r, full), strict=True)}, **hold} for r in range(plan.world)]
    for reference in (truth, yardstick):  # a lazy reference's last group (the LM head) is not kept while the ranks run
        if reference is not None:
            _release(reference)
    if not windows:
        return ref, yard, ranks.run(feeds), truth_hold, yard_hold
    feeder = yard if yard is not None and yardstick.dtype != torch.float32 else ref  # the graphs' dtype reference (one device's rule)
    return ref, yard, ranks.run(feeds, feeder.hidden_states), truth_hold, yard_hold


def judge_ranks(checkpoint: Checkpoint, plan: TensorParallelPlan, unified: list, decode: list | None, manifests: list) -> dict:
    """Export-time verification of N ranks (the exporter's own judge, as `hybridtrt.exporter.verify` is
    for one device; ``hybridtrt validate`` judges with `hybridtrt.validation.tensor_parallel`).

    ``unified`` (then ``decode``, when given: every rank's graph) run in a `RankEmulator` on the one-device verification's inputs
    (``example_inputs``: past states from a real prefill, no padding), then `VERIFY_STEPS` one-token
    calls on the reference's greedy tokens and states; every output of every rank (logits, and the
    rank's slice of each present state) is judged against the unsharded fp32 reference (an FP8 export's:
    the FP8 reference of the ranks' one recipe, `one_recipe`) with the gates of the ``manifests``'
    precision, scaled by the one-device model in that dtype run on the same inputs (fp16/bf16; an fp32
    FP8 export's: the dithered run), in layer order (`rank_references`). MoE routing is held to the truth's expert choices in every rank's
    graph and in the yardstick (`hybridtrt.graphs.held_routing`), and the ranks' own choices are judged
    by the routing gate, as a one-device export's are: a near-tie that routes otherwise is not a fault.

    Raises:
        ExportError: The first failing tensor in layer order, named with its rank and layer.
    """
    from hybridtrt.errors import ExportError
    from hybridtrt.exporter.verify import VERIFY_BATCH, VERIFY_PAST, VERIFY_SEQ, _Judge
    from hybridtrt.exporter.wrapper import cache_from_flat
    from hybridtrt.graphs.held_routing import routed_ids
    from hybridtrt.judge.metrics import compare

    moe = bool(plan.config.layers_of(MOE))
    unified_ranks, decode_ranks = held_ranks(unified, moe), held_ranks(decode, moe)
    one_recipe(manifests, ExportError)
    manifest = manifests[0]
    judge = _Judge(manifest)
    truth, yardstick = rank_references(checkpoint, manifest)
    inputs = example_inputs(truth, seq=VERIFY_SEQ, batch=VERIFY_BATCH, past=VERIFY_PAST, seed=1)
    ids, mask, cache = inputs[0], inputs[1], cache_from_flat(io.state_specs(truth.config), inputs[2:])

    worst: dict = {}
    checked = 0

    def layer(name: str) -> int:
        return int(name.split(".")[1]) if name != "logits" else len(truth.config.layer_types)

    routing: dict = {}

    def call(phase: str, ids: torch.Tensor, mask: torch.Tensor, cache, ranks) -> object:
        nonlocal worst, checked
        ref, yard, got, truth_hold, yard_hold = run_held(truth, yardstick, plan, ranks, ids, mask, cache, held=moe)  # the truth chooses the experts
        if moe:
            for r in range(plan.world):  # the ranks' own choices (every rank routes the same all-reduced hidden state)
                own = {layer: torch.from_numpy(v) for layer, v in routed_ids(got[r], *ids.shape).items()}
                routing[f"{phase}, rank {r}"] = judge.check_routing(f"rank {r}'s graph ({phase})", own, truth_hold.all_ids(), yard_hold)
        outs = {f"layer_output.{k}": k for k in range(len(ref.hidden_states)) if f"layer_output.{k}" in got[0]}  # by windows: each window's last layer
        want = {"logits": ref.logits, **ref.cache.named_states(), **{n: ref.hidden_states[k] for n, k in outs.items()}}
        ours = {"logits": None if yard is None else yard.logits, **({} if yard is None else {**yard.cache.named_states(), **{n: yard.hidden_states[k] for n, k in outs.items()}})}
        whole = lambda name: name == "logits" or name in outs  # noqa: E731 - every rank holds all of it
        for name in sorted(want, key=layer):
            for r in range(plan.world):
                w = want[name] if whole(name) else plan.state_slice(name, want[name], r)
                y = ours.get(name)
                y = None if y is None else compare(y if whole(name) else plan.state_slice(name, y, r), w)
                c = compare(torch.from_numpy(got[r][name]).float(), w)
                g = judge.gate_of(name)
                why = g.failures(c, y)
                checked += 1
                if why:
                    where = f"rank {r}, layer {layer(name)} ({name})" if name != "logits" else f"rank {r}, the logits"
                    raise ExportError(
                        f"the rank graphs disagree with the fp32 reference at {where}, {phase}: {'; '.join(why)}",
                        fix="nothing was published; report this with the checkpoint's config.json and the --tp value",
                    )
                bound = g.bound(y)
                if bound and (not worst or c.rel_l2 / bound > worst["rel_l2"] / worst["bound"]):
                    worst = {"output": f"{phase} {name} (rank {r})", "rel_l2": c.rel_l2, "bound": bound, "yardstick_rel_l2": None if y is None else y.rel_l2}
        return ref

    ref = call("prompt", ids, mask, cache, unified_ranks)
    for step in range(1, VERIFY_STEPS + 1):
        token = ref.logits.argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        ref = call(f"step {step}", token, mask, ref.cache, decode_ranks or unified_ranks)
    windows = getattr(unified_ranks, "windows", None)
    return {
        "method": "rank-emulator",
        "graphs": "layer windows" if windows else "whole",
        **({"windows": [list(w) for w in windows]} if windows else {}),
        "executor": f"onnxruntime × {plan.world} ranks, collectives in NumPy",
        "truth": f"{judge.truth}, one device",
        "yardstick": judge.yardstick if yardstick is not None else None,
        "precision": judge.precision,
        "inputs": {"batch": VERIFY_BATCH, "past": VERIFY_PAST, "seq": VERIFY_SEQ, "steps": VERIFY_STEPS},
        "checks": checked,
        "worst": worst,
        **({"routing": routing} if moe else {}),
    }


def read_tp_manifest(export_dir: str | Path, *, integrity: str | None = SAMPLED) -> tuple[dict, list]:
    """A tensor-parallel export's top-level manifest and its ranks' manifests, checked to be one export:
    every ``rank{r}/hybridtrt.json`` has the sha256 the top-level manifest recorded, and says it is rank
    ``r`` of that world (a rank directory moved or swapped is refused).

    Args:
        export_dir: The directory ``export --tp`` wrote (holding `TP_MANIFEST`).
        integrity: The ranks' file check (`hybridtrt.exporter.manifest.read_manifest`: sampled, full, or None).

    Raises:
        ArtefactError: What is missing or not what the manifest recorded, with a fix.
    """
    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
    from hybridtrt.reading import expect_object, read_json

    root = Path(export_dir)
    fix = f"re-export it: hybridtrt export CHECKPOINT -o {root} --tp N"
    top = expect_object(read_json(root / TP_MANIFEST, what="the tensor-parallel manifest", error=ArtefactError, fix=fix, limit=1 << 20),
                        source=str(root / TP_MANIFEST), error=ArtefactError, fix=fix)  # fmt: skip
    if top.get("contract_version") != CONTRACT_VERSION:
        raise ArtefactError(f"{root / TP_MANIFEST} has contract_version {top.get('contract_version')!r}, this hybridtrt reads {CONTRACT_VERSION}", fix=fix)
    try:
        world, names, recorded = int(top["tensor_parallel"]["world"]), list(top["tensor_parallel"]["ranks"]), dict(top["rank_manifests"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtefactError(f"{root / TP_MANIFEST} is missing or has malformed fields ({e})", fix=fix) from None
    if names != [rank_dir(r) for r in range(world)]:
        raise ArtefactError(f"{root / TP_MANIFEST} lists ranks {names}, not rank0 … rank{world - 1}", fix=fix)
    manifests = []
    for r, name in enumerate(names):
        path = root / name / MANIFEST_FILE
        if not path.is_file():
            raise ArtefactError(f"{root / name} has no {MANIFEST_FILE}: rank {r} of the {world}-rank export is missing", fix=fix)
        if _sha256(path) != recorded.get(name):
            raise ArtefactError(f"{path} is not the manifest the tensor-parallel export recorded for rank {r} (sha256 differs)", fix=fix)
        m = read_manifest(root / name, integrity=integrity)
        tp = m.tensor_parallel or {}
        if tp.get("rank") != r or tp.get("world") != world:
            raise ArtefactError(f"{root / name} holds rank {tp.get('rank')} of {tp.get('world')}, not rank {r} of {world}", fix=fix)
        manifests.append(m)
    return top, manifests
