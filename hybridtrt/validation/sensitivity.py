"""FP8 sensitivity per quantized linear layer, and the ``--exclude`` flags that reach a target cosine.

For an FP8 export, the unquantized graph is exported again from the checkpoint (in the export's
dtype, weights streamed) and, for every linear layer the export's recipe quantized, a copy with Q/DQ on **that layer only**
is built with the same graph pass the exporter uses (`hybridtrt.graphs.fp8_qdq.insert_fp8_qdq`),
the recipe's recorded activation scales and weight-scale mode, then run with ONNX Runtime on the
validation prompts. Each layer's score is its last-token logits against the fp32 PyTorch reference
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
from hybridtrt.exporter.manifest import Manifest
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
class Sensitivity:
    """Per-layer FP8 sensitivity of one export and the exclusions that reach ``target_cosine``.

    Attributes:
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
        scales = self.recipe["activation_scales"]
        amax = {n: float(scales[n]) * FP8_E4M3_MAX for n in nodes}
        insert_fp8_qdq(proto, amax, exclude=_only(nodes), weight_scale=self.recipe.get("weight_scale", "tensor"), base_dir=str(self.folder))
        _set_recorded_scales(proto, {n: scales[n] for n in nodes})
        return proto

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
    scale = ["--weight-scale", "channel"] if recipe.get("weight_scale") == "channel" else []
    command = shlex.join(["hybridtrt", "export", str(checkpoint), "-o", str(out), "--quantize", "fp8", *calib, *scale, *flags])
    return flags, command


def check_recipe(manifest: Manifest, export_dir: str | Path) -> list[str]:
    """The quantized nodes `fp8_sensitivity` can rebuild: those with a recorded activation scale.

    Raises:
        InputError: Not an FP8 export, or quantized nodes without a recorded activation scale
            (MoE routed experts keep per-expert scales under ``"experts"``; not measured yet).
    """
    recipe = manifest.quantization
    if not recipe or not recipe.get("quantized"):
        raise InputError(f"--sensitivity needs an FP8 export; {export_dir} is not quantized", fix="export with `hybridtrt export CKPT -o OUT --quantize fp8 …`")
    scales = recipe.get("activation_scales", {})
    other = [n for n in recipe["quantized"] if n not in scales]
    if other:
        raise InputError(
            f"--sensitivity rebuilds linear layers from their recorded activation scale; {len(other)} quantized node(s) of "
            f"{export_dir} have none (e.g. {other[0]}: MoE routed experts are not measured yet)",
            fix="measure the other layers on an export made with `--exclude 'experts/'`",
        )
    return list(recipe["quantized"])


def fp8_sensitivity(
    export_dir: str | Path,
    manifest: Manifest,
    reference_model: Any,
    checkpoint: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    target_cosine: float,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Measure the sensitivity of every quantized linear layer of an FP8 export.

    Args:
        export_dir: The FP8 export.
        manifest: Its ``hybridtrt.json`` (the recipe: quantized nodes, activation scales, weight-scale mode).
        reference_model: The fp32 PyTorch reference (loaded from ``checkpoint``).
        checkpoint: The source checkpoint (already checked against the export's sha256).
        input_ids / attention_mask: ``[B, L]`` left-padded prompts; the prefill's last-token logits are scored.
        target_cosine: Whole-model logits cosine the exclusion search aims for.
        progress: ``progress(done, total)`` after each measured graph.

    Returns:
        The `Sensitivity`.

    Raises:
        InputError: Not an FP8 export.
    """
    from hybridtrt.exporter.export import MODEL_FILE, ExportOptions, export

    nodes = check_recipe(manifest, export_dir)
    recipe = manifest.quantization
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
        # The unquantized graph, exported as the FP8 export was but without Q/DQ: weights streamed
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
        result = Sensitivity(target_cosine, layers, none, full, float(np.abs(full_logits - exported).max()))

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
        if progress is not None:
            progress(total, total)
    return result


__all__ = ["LayerSensitivity", "Sensitivity", "check_recipe", "describe_node", "exclude_pattern", "fp8_sensitivity", "smallest_exclusion"]
