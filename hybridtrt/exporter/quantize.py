"""Quantization steps of ``hybridtrt export`` (DESIGN.md §7): FP8 — calibrate once on the reference
model, then insert Q/DQ into each traced graph with the same scales (`QuantizeOptions`,
`quantize_graph`); 4-bit weights — INT4 (round to nearest, or AWQ searched once on the reference:
`run_awq`) or a ModelOpt NVFP4 checkpoint's own (`nvfp4_from_checkpoint`), written into each graph
by `hybridtrt.graphs.weight_only` (`WeightOnlyOptions`, `quantize_weights`).

Usage inside `hybridtrt.exporter.export.export`, for every traced graph (unified, then decode)::

    for role, fname, data, decode in roles:
        proto = trace(...)                     # weights are placeholders (exporter/streaming.py)
        if quantize is not None:
            recipe = quantize_graph(proto, reference, checkpoint_dir, quantize, quantizer=table.quantizer())
        ...                                    # write
    manifest = Manifest(..., quantization=recipe)   # identical for both graphs

The first call calibrates and caches the amax table on ``options`` (tied to that model object);
later calls with the same model reuse it, so the unified and decode graphs carry identical scales.
A different model recalibrates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import weakref

import numpy as np
import onnx
import torch

from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.calibration import calibrate, calibration_batches, calibration_hash, matmul_node_name, moe_node_name
from hybridtrt.graphs.fp8_qdq import LM_HEAD_NODE, ExpertScales, WeightQuantizer, insert_fp8_qdq
from hybridtrt.graphs.weight_only import DEFAULT_BLOCK, NVFP4_BLOCK, NVFP4ExpertScales, NVFP4Scales, insert_weight_only
from hybridtrt.models.loading import Checkpoint
from hybridtrt.models.model import HybridLM
from hybridtrt.models.tokenizer import load_tokenizer


@dataclass
class QuantizeOptions:
    """FP8 flags of ``hybridtrt export``.

    Attributes:
        calib_file: Prompt file, one prompt per line (tokenized with the checkpoint's tokenizer).
        calib_random: Number of random calibration sequences instead of a file.
        exclude: Regexes on MatMul node names to keep in high precision (``re.search``).
        weight_scale: ``"tensor"`` (default) or ``"channel"`` (per output channel).
        seq_len: Tokens per calibration sequence (prompts are truncated to their last ``seq_len``).
        batch: Sequences per calibration forward pass.
        seed: Seed of the random sequences.
        progress: Optional ``progress(done, total)`` callback during calibration.
        act_amax: Calibration result, filled by the first `quantize_graph` call and reused by the
            next ones (set it yourself to skip calibration).
        calibration: Record of the calibration set (hash, sequences, tokens), filled with ``act_amax``.
        fixed: A quantized checkpoint's own scales, ``{MatMul node: (input_scale, weight_scale)}``
            (`from_checkpoint`): no calibration, exactly these layers quantized.
        source: What the scales come from (`hybridtrt.graphs.fp8_qdq.FP8Recipe.source`).
        kept: With ``fixed``, ``{MatMul node: why}`` of layers the checkpoint quantizes and the export
            keeps in high precision (their dequantized weights).
        recipe: The ``--recipe`` the exclusions came from (`hybridtrt.exporter.recipes.describe`),
            recorded in the recipe dict.
        weight_amax: A tensor-parallel rank's (`hybridtrt.exporter.tensor_parallel.RankExport.fp8`):
            the amax of the unsharded weights its sliced weights come from, so their scales are the
            whole tensors' (`hybridtrt.graphs.fp8_qdq.insert_fp8_qdq`).
    """

    calib_file: str | None = None
    calib_random: int | None = None
    exclude: list[str] = field(default_factory=list)
    weight_scale: Literal["tensor", "channel"] = "tensor"
    seq_len: int = 64
    batch: int = 4
    seed: int = 0
    progress: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)
    act_amax: dict[str, float] | None = field(default=None, repr=False, compare=False)
    calibration: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    fixed: dict[str, tuple[float, float] | ExpertScales] | None = field(default=None, repr=False, compare=False)
    source: str = "calibration"
    kept: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    recipe: dict[str, Any] | None = None
    weight_amax: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _calibrated_for: weakref.ReferenceType | None = field(default=None, init=False, repr=False, compare=False)


def from_checkpoint(checkpoint: Checkpoint) -> QuantizeOptions:
    """The FP8 recipe of a ModelOpt FP8 checkpoint, as written: its input and weight scales, its
    quantized layers and routed experts (`hybridtrt.models.modelopt`)."""
    quantization = checkpoint.quantization
    if quantization is None or quantization.algo != "FP8":
        raise QuantizationError("the checkpoint has no FP8 scales of its own", fix="export with --quantize fp8 to calibrate")
    index = checkpoint.index

    def scales(tensor: str) -> tuple[float, float]:
        w = quantization.weights[tensor.removesuffix(".weight")]
        return float(index.read(w.input_scale).float()), float(index.read(w.weight_scale).float())

    fixed: dict[str, tuple[float, float] | ExpertScales] = {}
    kept: dict[str, str] = {}
    experts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, source in checkpoint.parameters.items():
        if source.quantized is not None and name == "lm_head.weight":
            # The LM head stays in high precision (DESIGN.md §7): the FP8 reference has no FP8 LM head.
            kept[LM_HEAD_NODE] = "lm_head: FP8 in the checkpoint, kept in the model dtype (its dequantized weights)"
        elif source.quantized is not None:  # layers.0.mixer.in_proj.weight
            fixed[matmul_node_name(name.removesuffix(".weight"))] = scales(source.tensor)
        elif source.parts and all(p.removesuffix(".weight") in quantization.weights for p in source.parts):
            module, proj = name.rsplit(".", 1)  # layers.1.mixer.experts, up_proj
            experts.setdefault(module, {})[proj.removesuffix("_proj")] = [scales(p) for p in source.parts]
    for module, by_proj in experts.items():  # (input_scale, weight_scale) per expert
        up, down = by_proj["up"], by_proj["down"]
        fixed[moe_node_name(module)] = ExpertScales(
            up_input=tuple(x for x, _ in up),
            down_input=tuple(x for x, _ in down),
            up_weight=tuple(w for _, w in up),
            down_weight=tuple(w for _, w in down),
        )
    return QuantizeOptions(fixed=fixed, source="checkpoint: " + quantization.describe(), kept=kept)


@dataclass
class WeightOnlyOptions:
    """4-bit weight flags of ``hybridtrt export`` (`hybridtrt.graphs.weight_only`).

    Attributes:
        scheme: ``"int4"`` (``--quantize int4``: our own scales) or ``"nvfp4"`` (an NVFP4 checkpoint's).
        block_size: INT4 inputs per scale (``--block-size``).
        exclude: Regexes on MatMul node names to keep in the model dtype.
        fixed: NVFP4: ``{MatMul node: NVFP4Scales}`` and ``{MoeExperts node: NVFP4ExpertScales}`` read from
            the checkpoint (`nvfp4_from_checkpoint`).
        source: What the scales come from (`hybridtrt.graphs.weight_only.WeightOnlyRecipe.source`).
        kept: ``{MatMul node: why}`` of layers the checkpoint quantizes and the export keeps in the
            model dtype (their dequantized weights).
        calib_file / calib_random / seq_len / batch / seed: INT4 calibration set (as `QuantizeOptions`):
            given, the scales are activation-aware (AWQ, `hybridtrt.exporter.awq`); absent, round to nearest.
        progress: ``progress(done, total)`` during the AWQ search.
        awq: The AWQ search's results (`run_awq`), reused by every graph of the export.
        calibration: Record of the calibration set, filled with ``awq``.
        recipe: The ``--recipe`` the exclusions came from, recorded in the recipe dict.
        fp4_activations: NVFP4: FP4 activations too (W4A4, `hybridtrt.graphs.fp4_activations`).
        input_scales: NVFP4: ``{MatMul node: the checkpoint's input_scale}`` (amax / (6 · 448)).
        blocks: INT4 of a tensor-parallel export: ``{MatMul node: block or None}`` of the unsharded layers,
            chosen so that every rank's part of a layer's inputs is whole blocks
            (`hybridtrt.exporter.tensor_parallel.int4_blocks`); the AWQ search and every rank use them.
        input_parts: INT4 of one rank (`hybridtrt.exporter.tensor_parallel.RankExport.int4`): ``{MatMul
            node: the rank's input indices}`` of the layers whose inputs it holds a part of: its slice of
            an AWQ pre-scale.
    """

    scheme: str = "int4"
    block_size: int = DEFAULT_BLOCK
    exclude: list[str] = field(default_factory=list)
    fixed: dict[str, NVFP4Scales | NVFP4ExpertScales] | None = field(default=None, repr=False, compare=False)
    source: str | None = None
    kept: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    calib_file: str | None = None
    calib_random: int | None = None
    seq_len: int = 64
    batch: int = 4
    seed: int = 0
    progress: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)
    awq: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    calibration: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    recipe: dict[str, Any] | None = None
    fp4_activations: bool = False
    input_scales: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    blocks: dict[str, int | None] | None = field(default=None, repr=False, compare=False)
    input_parts: dict[str, list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def calibrated(self) -> bool:
        """AWQ (a calibration source given) rather than plain round to nearest."""
        return self.calib_file is not None or self.calib_random is not None


def nvfp4_from_checkpoint(checkpoint: Checkpoint, *, fp4_activations: bool = False, dequantize_experts: bool = False) -> WeightOnlyOptions:
    """The W4A16 recipe of a ModelOpt NVFP4 checkpoint, as written: its layers and routed experts,
    block scales (read when each weight is written), global scales and input scales
    (`hybridtrt.models.modelopt`); with ``fp4_activations``, W4A4 (the input scales quantize the
    activations); with ``dequantize_experts``, the routed experts in the model dtype (each dequantized
    as ModelOpt does), which TensorRT builds without a MoE plugin."""
    quantization = checkpoint.quantization
    if quantization is None or quantization.algo != "NVFP4":
        raise QuantizationError("the checkpoint has no NVFP4 scales of its own", fix="export with --quantize int4")
    index = checkpoint.index

    def read_stored(tensor: str) -> np.ndarray:
        """A tensor's bytes as stored (U8 codes, F8_E4M3 scales)."""
        return index.read(tensor).view(torch.uint8).numpy()

    def scales(tensor: str) -> NVFP4Scales:
        w = quantization.weights[tensor.removesuffix(".weight")]
        return NVFP4Scales(w.weight_scale, float(index.read(w.weight_scale_2).float()), read_stored, w.weight)

    fixed: dict[str, NVFP4Scales | NVFP4ExpertScales] = {}
    input_scales: dict[str, float] = {}
    kept: dict[str, str] = {}
    experts: dict[str, dict[str, tuple[NVFP4Scales, ...]]] = {}
    for name, source in checkpoint.parameters.items():
        if source.parts and all(p.removesuffix(".weight") in quantization.weights for p in source.parts):
            module, proj = name.rsplit(".", 1)  # layers.1.mixer.experts, up_proj
            if dequantize_experts:
                kept[moe_node_name(module)] = (
                    "routed experts: NVFP4 in the checkpoint, kept in the model dtype by --dequantize-experts (each expert "
                    "dequantized as ModelOpt does): TensorRT builds them without a MoE plugin"
                )
            else:
                experts.setdefault(module, {})[proj.removesuffix("_proj")] = tuple(scales(p) for p in source.parts)
        if source.quantized is None:
            continue
        if name == "lm_head.weight":
            kept[LM_HEAD_NODE] = "lm_head: NVFP4 in the checkpoint, kept in the model dtype (its dequantized weights)"
            continue
        w = quantization.weights[source.tensor.removesuffix(".weight")]
        node = matmul_node_name(name.removesuffix(".weight"))
        fixed[node] = scales(source.tensor)
        input_scales[node] = float(index.read(w.input_scale).float())
    for module, by_proj in experts.items():  # the routed experts as they are (MoeExpertsNvfp4)
        fixed[moe_node_name(module)] = NVFP4ExpertScales(up=by_proj["up"], down=by_proj["down"])
    return WeightOnlyOptions(
        scheme="nvfp4",
        block_size=NVFP4_BLOCK,
        fixed=fixed,
        source="checkpoint: " + quantization.describe(),
        kept=kept,
        fp4_activations=fp4_activations,
        input_scales=input_scales,
    )


def eligible_blocks(model: HybridLM, options: WeightOnlyOptions) -> dict[str, int]:
    """``{MatMul node: block}`` of the linears ``--quantize int4`` gives 4-bit weights (the pass's own
    rules: `hybridtrt.graphs.weight_only`), for the AWQ search."""
    from hybridtrt.graphs.fp8_qdq import _QUANTIZABLE, _compile
    from hybridtrt.graphs.weight_only import layer_block

    patterns = _compile(options.exclude)
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        node = matmul_node_name(name)
        block = options.blocks[node] if options.blocks is not None and node in options.blocks else layer_block(module.in_features, options.block_size)
        if _QUANTIZABLE.match(node) and block is not None and not any(rx.search(node) for _, rx in patterns):
            out[node] = block
    return out


def run_awq(model: HybridLM, checkpoint_dir: str | Path | None, options: WeightOnlyOptions) -> dict[str, Any]:
    """The AWQ search (once per export; `hybridtrt.exporter.awq`), cached on ``options``."""
    from hybridtrt.exporter.awq import awq_search, describe

    if options.awq is not None:
        return options.awq
    batches, options.calibration = calibration_set(model, checkpoint_dir, options)
    options.awq = describe(awq_search(model, batches, eligible_blocks(model, options), seed=options.seed, progress=options.progress))
    return options.awq


def quantize_weights(proto: onnx.ModelProto, options: WeightOnlyOptions, quantizer: WeightQuantizer | None = None) -> dict[str, Any]:
    """4-bit weights into ``proto`` in place (`hybridtrt.graphs.weight_only.insert_weight_only`),
    with the AWQ scales of `run_awq` when calibrated. Returns the recipe dict for ``hybridtrt.json``'s
    ``"weight_only"``."""
    pre_scales = None
    source = options.source
    if options.calibrated:
        if options.awq is None:
            raise QuantizationError("the AWQ search has not run", fix="call run_awq(model, checkpoint_dir, options) first")
        from hybridtrt.exporter.awq import decode_scale

        pre_scales = {node: decode_scale(text) for node, text in options.awq["pre_quant_scales"].items()}
        for node, part in (options.input_parts or {}).items():  # a tensor-parallel rank: its inputs of the unsharded layer's p
            if node in pre_scales:
                pre_scales[node] = np.asarray(pre_scales[node])[part]
        source = "AWQ (activation-aware pre-quant scales, hybridtrt.exporter.awq), scale = block amax / 7"
    recipe = insert_weight_only(
        proto,
        options.scheme,
        block_size=options.block_size,
        exclude=options.exclude,
        quantizer=quantizer,
        fixed=options.fixed,
        source=source,
        pre_scales=pre_scales,
        blocks=options.blocks,
    )
    recipe.excluded.update(options.kept)  # the checkpoint's 4-bit layers the export keeps in the model dtype
    if options.fp4_activations:
        from hybridtrt.graphs.fp4_activations import activations_recipe, insert_fp4_activations

        scales = {node: options.input_scales[node] for node in recipe.quantized if node in options.input_scales}  # linears; routed experts stay W4A16
        insert_fp4_activations(proto, scales)
        recipe.activations = activations_recipe(scales)
    out = recipe.to_dict()
    if pre_scales is not None:
        used = set(recipe.quantized)
        out["awq"] = {k: ({n: v for n, v in val.items() if n in used} if isinstance(val, dict) else val) for k, val in options.awq.items()}
        out["calibration"] = dict(options.calibration)
    if options.recipe is not None:
        out["recipe"] = options.recipe
    return out


def calibration_set(model: HybridLM, checkpoint_dir: str | Path | None, options: QuantizeOptions | WeightOnlyOptions) -> tuple[list, dict[str, Any]]:
    """The calibration batches of ``options`` (``calib_file`` tokenized with the checkpoint's
    tokenizer, or ``calib_random`` sequences) and their record for the recipe (source, hash, counts)."""
    tokenizer = load_tokenizer(checkpoint_dir) if (options.calib_file is not None and checkpoint_dir is not None) else None
    config = model.config
    batches = calibration_batches(
        tokenizer,
        calib_file=options.calib_file,
        calib_random=options.calib_random,
        vocab_size=config.vocab_size,
        seq_len=options.seq_len,
        batch=options.batch,
        seed=options.seed,
        pad_id=config.pad_token_id if config.pad_token_id is not None else 0,
    )
    record = {
        "source": f"file:{Path(options.calib_file).name}" if options.calib_file is not None else f"random:{options.calib_random}",
        "hash": calibration_hash(batches),
        "sequences": sum(int(ids.shape[0]) for ids, _ in batches),
        "tokens": sum(int(mask.sum()) for _, mask in batches),
        "seq_len": options.seq_len,
        "model_dtype": str(model.dtype).removeprefix("torch."),
    }
    return batches, record


def run_calibration(model: HybridLM, checkpoint_dir: str | Path | None, options: QuantizeOptions) -> dict[str, float]:
    """Calibrate (once per model) and cache the result on ``options``. Returns ``{MatMul node: amax}``.

    A table set by hand (``options.act_amax`` given, never calibrated here) is used as is.
    """
    if options.act_amax is not None and (options._calibrated_for is None or options._calibrated_for() is model):
        return options.act_amax
    if options.weight_scale not in ("tensor", "channel"):
        raise QuantizationError(f"--weight-scale {options.weight_scale!r} is unknown", fix="use tensor or channel")
    batches, calibration = calibration_set(model, checkpoint_dir, options)
    options.act_amax = calibrate(model, batches, progress=options.progress)
    options._calibrated_for = weakref.ref(model)
    options.calibration = calibration
    return options.act_amax


def quantize_graph(
    proto: onnx.ModelProto,
    model: HybridLM,
    checkpoint_dir: str | Path | None,
    options: QuantizeOptions,
    quantizer: WeightQuantizer | None = None,
) -> dict[str, Any]:
    """Insert FP8 Q/DQ into ``proto`` in place (calibrating on the first call).

    Args:
        proto: A traced graph (weights in memory, or placeholders with a matching ``quantizer``).
        model: The reference model that was traced, in the export dtype (eager or lazy).
        checkpoint_dir: Checkpoint directory (for its ``tokenizer.json`` when ``calib_file`` is set).
        options: `QuantizeOptions`; the same object for every graph of one export.
        quantizer: How weights become FP8 initializers (`hybridtrt.graphs.fp8_qdq.WeightQuantizer`).

    Returns:
        The recipe dict for ``hybridtrt.json``'s ``"quantization"`` (see `FP8Recipe`), with the
        calibration record under ``"calibration"``.

    Raises:
        QuantizationError: Bad calibration options, opset < 19, bad ``--exclude`` regex, ...
    """
    if options.fixed is not None:
        recipe = insert_fp8_qdq(proto, {}, quantizer=quantizer, fixed=options.fixed, source=options.source)
        recipe.excluded.update({node: why for node, why in options.kept.items() if node in recipe.excluded})
        return recipe.to_dict()
    amax = run_calibration(model, checkpoint_dir, options)
    recipe = insert_fp8_qdq(proto, amax, exclude=options.exclude, weight_scale=options.weight_scale, quantizer=quantizer, weight_amax=options.weight_amax)
    if not recipe.quantized:
        raise QuantizationError(
            "FP8 was requested but no linear layer is left to quantize"
            + (f" (--exclude {options.exclude} matches all of them)" if options.exclude else ""),
            fix="loosen --exclude, or export without FP8",
        )
    recipe.calibration = dict(options.calibration)
    out = recipe.to_dict()
    if options.recipe is not None:
        out["recipe"] = options.recipe
    return out


__all__ = [
    "QuantizeOptions",
    "WeightOnlyOptions",
    "calibration_set",
    "eligible_blocks",
    "from_checkpoint",
    "nvfp4_from_checkpoint",
    "quantize_graph",
    "quantize_weights",
    "run_awq",
    "run_calibration",
]
