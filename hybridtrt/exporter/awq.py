"""Activation-aware INT4 scaling (AWQ, Lin et al. 2024, "AWQ: Activation-aware Weight Quantization"),
the calibrated form of ``--quantize int4`` (DESIGN.md §7).

A linear ``y = x W^T`` whose input channel ``j`` carries large activations loses more output to the
INT4 rounding of column ``j`` than one whose inputs are small. AWQ scales those columns up before
quantizing and the activations down by the same factor: ``y = (x · p) (W / p)^T`` with a per-input
``pre_quant_scale`` ``p``, which moves rounding error from the important channels to the others.
The search, per linear, on the calibration activations ``X`` (its input, real tokens only):

    s(α) = mean|X|^α, normalised by sqrt(max s · min s);   p = 1 / s rounded to the model dtype
    error(α) = ‖ (X · p) · INT4(W / p)^T − X W^T ‖²  over a seeded sample of at most `SAMPLE_ROWS` rows
    α ∈ {0, 0.1, …, 1}  (`ALPHAS`; α = 0 is p = 1, plain round to nearest)

``s = mean|X|^α`` is the paper's and AutoAWQ's form (ModelOpt's ``awq_lite`` also divides by the
weight's mean magnitude to the power 1 − α).

The α with the least error wins (α = 0 included, so AWQ is never worse than round to nearest on the
sample). ``INT4`` is the export's own blocked rounding (`hybridtrt.graphs.weight_only`, same blocks).
In the graph ``p`` is a ``Mul`` on the MatMul's input (``{scope}/pre_quant_scale/Mul``), as TensorRT-LLM
applies ModelOpt's ``pre_quant_scale``; TensorRT fuses such pointwise ops into their producer. Not
folded into the preceding norm weight: that would also rescale the router and the routed experts
that read the same norm in MoE layers, and attention's q/k/v would have to share one ``p``.

Memory: one linear's sample (`SAMPLE_ROWS` × in) at a time beside the calibration forward passes;
on a lazy model the search runs while the linear's layer is loaded, once the last batch reached it,
so every weight is read once (`hybridtrt.models.lazy.LazyWeights.lockstep`).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.calibration import Batch, matmul_node_name
from hybridtrt.exporter.weight_only_reference import int4_dequantized
from hybridtrt.models.lazy import LazyWeights
from hybridtrt.models.model import HybridLM

#: α grid: 0, 0.1, …, 1 (ModelOpt's ``awq_lite`` default ``alpha_step = 0.1``,
#: modelopt/torch/quantization/config.py): half the time of AutoAWQ's 21 points, which took 45-51 s per
#: full-size Nano-9B-v2 MLP linear on 2 cores.
ALPHAS = tuple(i / 10 for i in range(11))
#: Calibration rows per linear the error is measured on (a seeded sample of the real tokens).
SAMPLE_ROWS = 512
#: Weight elements dequantized at a time during the search (16 MiB of fp32).
ROWS_ELEMENTS = 4 << 20


@dataclass(frozen=True)
class AwqScale:
    """The search's result for one linear.

    Attributes:
        alpha: The chosen exponent (0: round to nearest).
        pre_quant_scale: ``p [in]`` (float32 holding model-dtype values).
        rtn_error / awq_error: Relative output error ``‖Δy‖ / ‖y‖`` on the sample, at α = 0 and at ``alpha``.
    """

    alpha: float
    pre_quant_scale: np.ndarray
    rtn_error: float
    awq_error: float


def encode_scale(p: np.ndarray) -> str:
    """``p`` for ``hybridtrt.json``: base64 of its little-endian float32 bytes."""
    return base64.b64encode(np.asarray(p, dtype="<f4").tobytes()).decode("ascii")


def decode_scale(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def search(w: Tensor, x: Tensor, mean_abs: Tensor, block: int, dtype: torch.dtype) -> AwqScale:
    """The best α for ``w [out, in]`` (model dtype) on the sample ``x [R, in]``, given the mean
    ``|x|`` per input over all calibration tokens (module docstring). The weight is dequantized a
    slice of output rows at a time (blocks run along ``in``, so rows are independent): temporaries
    stay near `ROWS_ELEMENTS` whatever the layer's size."""
    x32 = x.to(torch.float32)
    out_rows = w.shape[0]
    step = max(1, ROWS_ELEMENTS // max(1, w.shape[1]))
    y = torch.cat([x32 @ w[r : r + step].to(dtype).to(torch.float32).t() for r in range(0, out_rows, step)], dim=1)
    norm = float(torch.linalg.vector_norm(y)) or 1.0
    mean = mean_abs.to(torch.float32).clamp(min=1e-8)
    best: tuple[float, float, Tensor] | None = None
    rtn = 0.0
    for alpha in ALPHAS:
        s = mean.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        p = (1.0 / s).to(dtype)
        if not bool(torch.isfinite(p).all()) or bool((p == 0).any()):
            continue
        xp = x32 * p.to(torch.float32)
        squared = 0.0
        for r in range(0, out_rows, step):
            deq = int4_dequantized(w[r : r + step], block, dtype, pre_scale=p).to(torch.float32)
            squared += float(torch.sum((xp @ deq.t() - y[:, r : r + step]) ** 2))
        err = squared**0.5 / norm
        if alpha == 0.0:
            rtn = err
        if best is None or err < best[1]:
            best = (alpha, err, p)
    assert best is not None  # α = 0 (p = 1) is always finite
    return AwqScale(best[0], best[2].to(torch.float32).numpy().copy(), rtn, best[1])


def awq_search(
    model: HybridLM,
    batches: Sequence[Batch],
    blocks: Mapping[str, int],
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, AwqScale]:
    """Run the calibration batches and search ``p`` for every linear named in ``blocks``.

    Args:
        model: The reference model in the export dtype (eager or lazy).
        batches: ``(ids, mask)`` calibration batches.
        blocks: ``{MatMul node: INT4 block}`` of the linears to search (`eligible_blocks`).
        seed: Seed of the row sample.
        progress: ``progress(done, total)`` (batches on an eager model, layer groups on a lazy one).

    Returns:
        ``{MatMul node: AwqScale}`` for every linear of ``blocks`` the batches reached.
    """
    batches = list(batches)
    if not batches:
        raise QuantizationError("the calibration set is empty", fix="give at least one prompt or --calib-random N ≥ 1")
    dtype = model.dtype
    modules = {m: matmul_node_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and matmul_node_name(n) in blocks}
    per_batch = max(1, SAMPLE_ROWS // len(batches))
    samples: dict[str, list[Tensor]] = {}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    calls: dict[str, int] = {}
    out: dict[str, AwqScale] = {}
    local = threading.local()
    lock = threading.Lock()

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        node = modules[module]
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1])[local.mask]
        gen = torch.Generator().manual_seed(seed + local.index)
        pick = torch.randperm(rows.shape[0], generator=gen)[:per_batch]
        with lock:
            samples.setdefault(node, []).append(rows[pick].to(torch.float32))
            sums[node] = sums.get(node, 0) + rows.to(torch.float32).abs().sum(dim=0)
            counts[node] = counts.get(node, 0) + rows.shape[0]
            calls[node] = calls.get(node, 0) + 1
            last = calls[node] == len(batches)
        if last:  # every batch has passed this linear: its weights are loaded now
            x_sample = torch.cat(samples.pop(node))
            mean_abs = sums.pop(node) / max(counts[node], 1)
            out[node] = search(module.weight.detach(), x_sample, mean_abs, blocks[node], dtype)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    try:
        def run(index: int, ids: Tensor, mask: Tensor) -> None:
            local.index, local.mask = index, mask.reshape(-1) != 0
            model(ids, mask, logits="last", keep_states=False)

        weights = getattr(model, "weights", None)
        if isinstance(weights, LazyWeights):
            weights.lockstep([lambda k=k, ids=ids, mask=mask: run(k, ids, mask) for k, (ids, mask) in enumerate(batches)], progress)
        else:
            with torch.no_grad():
                for k, (ids, mask) in enumerate(batches):
                    run(k, ids, mask)
                    if progress is not None:
                        progress(k + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dict(sorted(out.items()))


def describe(results: Mapping[str, AwqScale]) -> dict[str, Any]:
    """The recipe's ``"awq"`` entry: α, the errors and ``p`` of every searched linear."""
    return {
        "alphas": {n: r.alpha for n, r in results.items()},
        "error": {n: {"rtn": round(r.rtn_error, 6), "awq": round(r.awq_error, 6)} for n, r in results.items()},
        "pre_quant_scales": {n: encode_scale(r.pre_quant_scale) for n, r in results.items()},
        "grid": list(ALPHAS),
        "sample_rows": SAMPLE_ROWS,
    }


__all__ = ["ALPHAS", "SAMPLE_ROWS", "AwqScale", "awq_search", "decode_scale", "describe", "encode_scale", "search"]
