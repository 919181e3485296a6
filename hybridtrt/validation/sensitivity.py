"""Quantization sensitivity per quantized linear layer (FP8 or INT4), and the ``--exclude`` flags that
reach a target cosine.

For an FP8 or INT4 export, the unquantized graph is exported again from the checkpoint (in the export's
dtype, weights streamed) and, for every linear layer the export's recipe quantized, a copy quantized on
**that layer only** is built with the same graph pass the exporter uses — FP8 Q/DQ
(`hybridtrt.graphs.fp8_qdq.insert_fp8_qdq`) with the recipe's recorded activation scales and
weight-scale mode, or 4-bit weights (`hybridtrt.graphs.weight_only.insert_weight_only`) with the
recipe's blocks and AWQ scales — then run with ONNX Runtime on the validation prompts. Each layer's score is its last-token logits against the fp32 PyTorch reference
(1 − cosine, rel L2, top-1). Layers are ranked, most sensitive first.

The exclusion search then measures — never estimates — the graph with everything quantized except
the k most sensitive layers, bisecting on k for the smallest k that reaches the target cosine
(the FP8 gate by default), and prints the ``hybridtrt export … --exclude`` flags for that set.
Two anchors are measured as well: nothing quantized (the export dtype's floor) and everything
quantized; the latter is compared with the export file itself, proving the rebuild reproduces it.

All graphs share one weights file in a temporary directory; each layer's copy adds only its own
FP8 weight, so memory and disk stay at one model's worth.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import onnx
import torch

from hybridtrt.errors import InputError
from hybridtrt.exporter.io import LOGITS
from hybridtrt.exporter.manifest import Manifest, pattern_of
from hybridtrt.graphs.fp8_qdq import FP8_E4M3_MAX, float_tensor, insert_fp8_qdq
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.runtime.states import StatePlan
from hybridtrt.validation.layers import ProtoSession
from hybridtrt.judge.metrics import Comparison, compare

_NODE = re.compile(r"^/model/layers\.(\d+)/mixer/(.+)/MatMul$")


@dataclass
class LayerSensitivity:
    """Logits error when only ``node`` is quantized.

    Attributes:
        node: MatMul node name (``/model/layers.4/mixer/out_proj/MatMul``).
        layer: Decoder layer index (None for a node outside the layers).
        kind: The layer's kind from ``hybridtrt.json`` (``mamba``, ``attention``, ``mlp``, …).
        projection: The linear inside the mixer (``in_proj``, ``q_proj``, ``experts.3/up_proj`` …).
        comparison: Last-token logits against the fp32 reference.
    """

    node: str
    layer: int | None
    kind: str
    projection: str
    comparison: Comparison

    @property
    def error(self) -> float:
        """1 − cosine (inf when non-finite): the ranking key."""
        return 1.0 - self.comparison.cosine if self.comparison.finite else float("inf")

    @property
    def label(self) -> str:
        return f"L{self.layer} {self.projection}" if self.layer is not None else self.node


@dataclass
class RecipeComparison:
    """A recipe's layer table (``--recipe``: e.g. NVIDIA's) measured beside the search's own.

    Attributes:
        name / source: The recipe's.
        kept: The export's quantized nodes the recipe keeps in the model dtype.
        kept_weights: Their weight elements, and ``quantized_weights`` all quantized nodes' (the
            recipe's bytes cost is ``kept_weights`` × (dtype bytes − 4-bit bytes)).
        reached: Everything quantized but ``kept``, vs the reference.
        overlap: Of the search's ``exclude``, those the recipe keeps too.
    """

    name: str
    source: str
    kept: list[str]
    kept_weights: int
    quantized_weights: int
    reached: Comparison
    overlap: list[str]


@dataclass
class Sensitivity:
    """Per-layer quantization sensitivity of one export and the exclusions that reach ``target_cosine``.

    Attributes:
        scheme: ``"fp8"`` or ``"int4"``.
        target_cosine: Whole-model logits cosine to reach.
        layers: Ranked, most sensitive first.
        none: Nothing quantized (the export dtype alone) vs the reference: the floor.
        full: Every recipe layer quantized vs the reference (the export, rebuilt).
        export_max_abs: Largest |rebuilt − export file| logit difference (0 when reproduced exactly).
        exclude: Nodes to keep unquantized, most sensitive first (empty when ``full`` reaches the target).
        reached: With ``exclude`` unquantized, vs the reference (None when the target is unreachable).
        flags: ``--exclude`` arguments for ``hybridtrt export`` (the recipe's own patterns first).
        command: A full ``hybridtrt export`` line with those flags (calibration as recorded).
    """

    target_cosine: float
    layers: list[LayerSensitivity]
    none: Comparison
    full: Comparison
    export_max_abs: float
    exclude: list[str] = field(default_factory=list)
    reached: Comparison | None = None
    flags: list[str] = field(default_factory=list)
    command: str = ""
    scheme: str = "fp8"
    recipe: RecipeComparison | None = None

    def by_kind(self) -> list[dict[str, Any]]:
        """One row per (kind, projection): count, worst and median 1 − cosine, in worst-first order."""
        groups: dict[tuple[str, str], list[float]] = {}
        for s in self.layers:
            groups.setdefault((s.kind, s.projection.rsplit("/", 1)[-1]), []).append(s.error)
        rows = [
            {"kind": k, "projection": p, "count": len(e), "worst": max(e), "median": median(e)}
            for (k, p), e in groups.items()
        ]
        return sorted(rows, key=lambda r: -r["worst"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [{**{k: v for k, v in asdict(s).items() if k != "comparison"}, **s.comparison.to_dict(), "one_minus_cosine": s.error} for s in self.layers]
        d["by_kind"] = self.by_kind()
        return d


def describe_node(node: str, layer_kinds: Sequence[str]) -> tuple[int | None, str, str]:
    """``(layer, kind, projection)`` of a quantized MatMul node name."""
    m = _NODE.match(node)
    if not m:
        return None, "other", node
    layer = int(m.group(1))
    return layer, layer_kinds[layer] if layer < len(layer_kinds) else "?", m.group(2)


def exclude_pattern(node: str) -> str:
    """The ``--exclude`` regex (``re.search`` on node names) that matches exactly ``node``'s layer:
    ``/model/layers.4/mixer/out_proj/MatMul`` -> ``layers\\.4/mixer/out_proj/`` (the slashes keep
    ``layers.4`` from matching ``layers.41``)."""
    scope = node.removeprefix("/model/").rsplit("/", 1)[0]
    return re.escape(scope) + "/"


def smallest_exclusion(n: int, reaches: Callable[[int], bool]) -> int | None:
    """Smallest ``k`` in ``0..n`` with ``reaches(k)`` (excluding the ``k`` most sensitive layers
    reaches the target), by bisection — assuming that excluding more never hurts, which holds up to
    noise; whatever is returned was measured to reach. None when even ``k = n`` does not."""
    if reaches(0):
        return 0
    if not reaches(n):
        return None
    lo, hi = 0, n  # reaches(lo) is False, reaches(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def _only(nodes: Sequence[str]) -> list[str]:
    """``--exclude`` patterns that leave exactly ``nodes`` quantizable (a negative lookahead)."""
    return ["^(?!(?:" + "|".join(re.escape(n) for n in nodes) + ")$)"]


class _Graphs:
    """The unquantized graph of the export, and copies of it with Q/DQ on chosen layers."""

    def __init__(self, folder: Path, base: onnx.ModelProto, recipe: dict[str, Any], feeds: dict[str, Any]) -> None:
        self.folder, self.base, self.recipe, self.feeds = folder, base, recipe, feeds

    def quantized(self, nodes: Sequence[str]) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.base)
        if not nodes:
            return proto
        if self.recipe.get("scheme") == "int4":  # the same 4-bit weights, AWQ's scales as recorded
            from hybridtrt.exporter.awq import decode_scale
            from hybridtrt.graphs.fp8_qdq import in_memory_quantizer
            from hybridtrt.graphs.weight_only import insert_weight_only

            awq = (self.recipe.get("awq") or {}).get("pre_quant_scales", {})
            insert_weight_only(
                proto, "int4", block_size=int(self.recipe["block_size"]), exclude=[*self.recipe.get("exclude_patterns", []), *_only(nodes)],
                quantizer=in_memory_quantizer(str(self.folder)), pre_scales={n: decode_scale(awq[n]) for n in nodes if n in awq},
            )  # fmt: skip
            return proto
        scales = self.recipe["activation_scales"]
        amax = {n: float(scales[n]) * FP8_E4M3_MAX for n in nodes}
        insert_fp8_qdq(proto, amax, exclude=_only(nodes), weight_scale=self.recipe.get("weight_scale", "tensor"), base_dir=str(self.folder))
        _set_recorded_scales(proto, {n: scales[n] for n in nodes})
        return proto

    def weight_dims(self, node: onnx.NodeProto) -> list[int]:
        """The dims of a MatMul's weight initializer."""
        inits = {t.name: t for t in self.base.graph.initializer}
        return list(inits[node.input[1]].dims) if node.input[1] in inits else [0]

    def logits(self, nodes: Sequence[str]) -> np.ndarray:
        out = ProtoSession(self.quantized(nodes), self.folder).run(self.feeds, [LOGITS])[LOGITS]
        return _last(out)


def _last(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    return logits[:, -1] if logits.ndim == 3 else logits


def _set_recorded_scales(proto: onnx.ModelProto, scales: dict[str, float]) -> None:
    """Give each activation quantizer exactly the export's recorded scale (the pass derives it from
    an amax, which could differ from the record in the last bit)."""
    wanted = {node.rsplit("/", 1)[0].lstrip("/").replace("/", ".") + ".input_scale": value for node, value in scales.items()}
    for i, t in enumerate(proto.graph.initializer):
        if t.name in wanted:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            proto.graph.initializer[i].CopyFrom(float_tensor(t.name, np.asarray(wanted[t.name], dtype=dtype), t.data_type))


def _export_flags(recipe: dict[str, Any], exclude: Sequence[str], checkpoint: str | Path, out: str | Path) -> tuple[list[str], str]:
    flags = []
    for pattern in [*recipe.get("exclude_patterns", []), *map(exclude_pattern, exclude)]:
        flags += ["--exclude", pattern]
    source = str(recipe.get("calibration", {}).get("source", ""))
    calib = ["--calib-random", source.split(":", 1)[1]] if source.startswith("random:") else ["--calib", source.split(":", 1)[-1] or "PROMPTS.txt"]
    if recipe.get("scheme") == "int4":
        scheme = ["int4", "--block-size", str(recipe["block_size"]), *(calib if recipe.get("awq") else [])]
    else:
        scheme = ["fp8", *calib, *(["--weight-scale", "channel"] if recipe.get("weight_scale") == "channel" else [])]
    command = shlex.join(["hybridtrt", "export", str(checkpoint), "-o", str(out), "--quantize", *scheme, *flags])
    return flags, command


def _compare_recipe(recipe: dict[str, Any], manifest: Manifest, nodes: Sequence[str], graphs: _Graphs, expected: np.ndarray, exclude: Sequence[str]) -> RecipeComparison:
    """Measure ``recipe``'s layer table on the export's quantized nodes (`RecipeComparison`)."""
    from hybridtrt.exporter.recipes import exclusions

    pattern = pattern_of(manifest.layers)
    rules = [re.compile(p) for p in exclusions(recipe, pattern)]
    kept = [n for n in nodes if any(rx.search(n) for rx in rules)]
    sizes = {n.name: int(np.prod(graphs.weight_dims(n))) for n in graphs.base.graph.node if n.name in nodes}
    reached = compare(graphs.logits([n for n in nodes if n not in kept]), expected, top1=True)
    return RecipeComparison(
        recipe["name"], recipe.get("source", ""), kept, sum(sizes[n] for n in kept), sum(sizes.values()), reached, [n for n in exclude if n in kept]
    )


def recipe_of(manifest: Manifest) -> dict[str, Any] | None:
    """The export's FP8 recipe, or its INT4 one (`hybridtrt.graphs.weight_only`); None otherwise."""
    if manifest.quantization:
        return manifest.quantization
    if manifest.weight_only and manifest.weight_only.get("scheme") == "int4":
        return manifest.weight_only
    return None


def check_recipe(manifest: Manifest, export_dir: str | Path) -> list[str]:
    """The quantized nodes `layer_sensitivity` can rebuild: an INT4 export's, an FP8 export's with a
    recorded activation scale.

    Raises:
        InputError: Not an FP8 or INT4 export (an NVFP4 checkpoint's 4-bit weights are its own, not a
            recipe to tune), or quantized nodes without a recorded activation scale (MoE routed
            experts keep per-expert scales under ``"experts"``; not measured yet).
    """
    recipe = recipe_of(manifest)
    if not recipe or not recipe.get("quantized"):
        raise InputError(
            f"--sensitivity needs an FP8 or INT4 export; {export_dir} is not one", fix="export with `hybridtrt export CKPT -o OUT --quantize fp8 …` (or int4)"
        )
    if recipe.get("scheme") == "int4":
        return list(recipe["quantized"])
    scales = recipe.get("activation_scales", {})
    other = [n for n in recipe["quantized"] if n not in scales]
    if other:
        raise InputError(
            f"--sensitivity rebuilds linear layers from their recorded activation scale; {len(other)} quantized node(s) of "
            f"{export_dir} have none (e.g. {other[0]}: MoE routed experts are not measured yet)",
            fix="measure the other layers on an export made with `--exclude 'experts/'`",
        )
    return list(recipe["quantized"])


def layer_sensitivity(
    export_dir: str | Path,
    manifest: Manifest,
    reference_model: Any,
    checkpoint: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    target_cosine: float,
    progress: Callable[[int, int], None] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Sensitivity:
    """Measure the sensitivity of every quantized linear layer of an FP8 or INT4 export.

    Args:
        export_dir: The FP8 or INT4 export.
        manifest: Its ``hybridtrt.json`` (the recipe: quantized nodes, and the activation scales and
            weight-scale mode, or the blocks and AWQ scales).
        reference_model: The fp32 PyTorch reference (loaded from ``checkpoint``).
        checkpoint: The source checkpoint (already checked against the export's sha256).
        input_ids / attention_mask: ``[B, L]`` left-padded prompts; the prefill's last-token logits are scored.
        target_cosine: Whole-model logits cosine the exclusion search aims for.
        progress: ``progress(done, total)`` after each measured graph.
        recipe: A recipe (`hybridtrt.exporter.recipes.load_recipe`) whose layer table is measured
            beside the search's (`RecipeComparison`).

    Returns:
        The `Sensitivity`.

    Raises:
        InputError: Not an FP8 or INT4 export.
    """
    from hybridtrt.exporter.export import MODEL_FILE, ExportOptions, export

    nodes = check_recipe(manifest, export_dir)
    compared, recipe = recipe, recipe_of(manifest)
    if not 0 < target_cosine <= 1:
        raise InputError(f"--target-cosine must be in (0, 1], got {target_cosine}", fix="e.g. --target-cosine 0.99")
    kinds = [entry["kind"] for entry in manifest.layers]
    total = len(nodes) + 3 + max(1, len(nodes)).bit_length()  # layers, anchors, bisection (upper bound)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with torch.no_grad():
        expected = reference_model(input_ids, attention_mask, logits="last").logits.float().numpy()
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(), **StatePlan.from_manifest(manifest).zeros(int(input_ids.shape[0]))}
    with tempfile.TemporaryDirectory(prefix="hybridtrt-sensitivity-") as tmp:
        # The unquantized graph, exported as the quantized export was but without it: weights streamed
        # from the checkpoint (one tensor at a time, never the whole model in memory).
        folder = Path(tmp) / "unquantized"
        options = ExportOptions(dtype=manifest.dtype, logits=manifest.logits, state_dtype=manifest.state_dtype, opset=manifest.opset, split=False, verify=False)
        export(checkpoint, folder, options)
        base = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        graphs = _Graphs(folder, base, recipe, feeds)
        exported = _last(OrtSession(Path(export_dir) / manifest.graphs["unified"].file).run(feeds, [LOGITS])[LOGITS])
        full_logits = graphs.logits(nodes)
        tick()
        none = compare(graphs.logits([]), expected, top1=True)
        tick()
        layers = []
        for node in nodes:
            layer, kind, projection = describe_node(node, kinds)
            layers.append(LayerSensitivity(node, layer, kind, projection, compare(graphs.logits([node]), expected, top1=True)))
            tick()
        layers.sort(key=lambda s: -s.error)
        ranked = [s.node for s in layers]
        full = compare(full_logits, expected, top1=True)
        result = Sensitivity(target_cosine, layers, none, full, float(np.abs(full_logits - exported).max()), scheme=str(recipe.get("scheme", "fp8")))

        # k = 0 is `full`, k = n is `none`; everything in between is measured when the search asks.
        measured: dict[int, Comparison] = {0: full, len(ranked): none}

        def at(k: int) -> Comparison:
            if k not in measured:
                measured[k] = compare(graphs.logits([n for n in nodes if n not in set(ranked[:k])]), expected, top1=True)
                tick()
            return measured[k]

        k = smallest_exclusion(len(ranked), lambda k: at(k).finite and at(k).cosine >= target_cosine)
        if k is not None:
            result.exclude, result.reached = ranked[:k], at(k)
        out = Path(export_dir).with_name(Path(export_dir).name + "-exclude")
        result.flags, result.command = _export_flags(recipe, result.exclude, checkpoint, out)
        if compared is not None:
            result.recipe = _compare_recipe(compared, manifest, nodes, graphs, expected, result.exclude)
        if progress is not None:
            progress(total, total)
    return result


#: The former name (FP8 only).
fp8_sensitivity = layer_sensitivity

__all__ = ["LayerSensitivity", "RecipeComparison", "Sensitivity", "check_recipe", "describe_node", "exclude_pattern", "fp8_sensitivity", "layer_sensitivity", "recipe_of", "smallest_exclusion"]
