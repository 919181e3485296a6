"""FP8 calibration (DESIGN.md §7): per-tensor amax of the input activation of every linear layer,
measured on the PyTorch reference and keyed by the exported MatMul node name.

MoE layers (DESIGN.md §7): each routed expert is its own pair of linears, so its activations get
their own scales. A hook on every `hybridtrt.models.moe.Experts` records, per expert, how many
(token, k) pairs of real (not padding) tokens were routed to it and the amax of its up-projection
input and of its down-projection input (``relu(up x)²``), keyed by the exported ``MoeExperts`` node name
(`ExpertAmax`). An expert no calibration token reached keeps ``tokens == 0`` and amax 0; the FP8
pass gives it the stated fallback scale.

``calibration_batches`` turns a prompt file (one prompt per non-empty line, tokenized with the
checkpoint's tokenizer, left-padded) or a number of random sequences into ``(ids, mask)`` batches;
``calibrate`` runs them through the model with forward pre-hooks on every ``nn.Linear`` — on a lazy
model (`hybridtrt.models.lazy`) with sequential onloading: each decoder layer's weights are read
once for all batches, with the same numbers as batch after batch on the loaded model;
``calibration_hash`` fingerprints the token ids for the recipe record in ``hybridtrt.json``.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybridtrt.errors import QuantizationError
from hybridtrt.graphs.fp8_qdq import ExpertAmax
from hybridtrt.graphs.naming import scope_path
from hybridtrt.models.lazy import LazyWeights
from hybridtrt.models.model import HybridLM
from hybridtrt.models.moe import Experts
from hybridtrt.ops.moe import group_by_expert, relu2
from hybridtrt.ops.moe_onnx import MOE_EXPERTS
from hybridtrt.reading import read_text
from hybridtrt.runtime.generation import left_pad

#: One calibration batch: ``ids [B, L] int64``, ``mask [B, L] int64`` (1 = token, 0 = left padding).
Batch = tuple[Tensor, Tensor]


#: What `calibrate` measures per node: a linear's input amax, or a MoE layer's `ExpertAmax`.
Amax = float | ExpertAmax


def moe_node_name(module_name: str) -> str:
    """Exported MoeExperts node of an `Experts` module: ``"layers.1.mixer.experts"`` ->
    ``"/model/layers.1/mixer/experts/MoeExperts"``."""
    return scope_path(module_name, wrapper_prefix="") + "/" + MOE_EXPERTS


def expert_amax(x: Tensor, topk_indices: Tensor, experts: Experts) -> ExpertAmax:
    """`ExpertAmax` of one call of the routed experts ``experts`` (``x [T, D]``, ``topk_indices
    [T, K]``), computed as the experts compute (model dtype, grouped by expert; a lazy model's
    experts are read one at a time)."""
    num_experts = experts.num_experts
    order, groups = group_by_expert(topk_indices, num_experts)
    xs = x[order // topk_indices.shape[1]]
    tokens, up, down = [0] * num_experts, [0.0] * num_experts, [0.0] * num_experts
    for expert, rows in groups:
        tokens[expert] = rows.stop - rows.start
        up[expert] = float(xs[rows].abs().max().float())
        down[expert] = float(relu2(xs[rows] @ experts.weights_of(expert)[0].t()).max().float())
    return ExpertAmax(tokens, up, down)


def matmul_node_name(module_name: str) -> str:
    """Exported MatMul node of a linear module.

    ``"layers.0.mixer.in_proj"`` -> ``"/model/layers.0/mixer/in_proj/MatMul"`` (the naming pass's
    rule, `hybridtrt.graphs.naming.scope_path`, applied to the module path inside `HybridLM`).
    """
    return scope_path(module_name, wrapper_prefix="") + "/MatMul"


@torch.no_grad()
def calibrate(
    model: HybridLM,
    batches: Iterable[Batch],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Amax]:
    """Max ``|x|`` of the input of every ``nn.Linear`` (and per expert of every MoE layer) over all batches.

    The hook sees exactly the tensor the exported MatMul consumes (for ``in_proj`` that is
    ``h * mask``, as in `Mamba2Mixer.forward`). Each batch runs as one prefill from zero states.
    On a `LazyHybridLM` the batches run in lock-step (`LazyWeights.lockstep`): every layer's
    weights are read once, and the amax table is identical to the batch-by-batch one.

    Args:
        model: The reference model, in the dtype that will be exported (eager or lazy).
        batches: ``(ids [B, L], mask [B, L])`` pairs.
        progress: Called as ``progress(done, total)`` after each batch (eager) or each layer's
            weights read (lazy).

    Returns:
        ``{MatMul node name: amax}`` for every linear layer the batches reached (the LM head is a
        plain matmul in `HybridLM`, not a module call, so it never appears), and
        ``{MoeExperts node name: ExpertAmax}`` for every MoE layer.

    Raises:
        QuantizationError: No batches, or a non-finite activation.
    """
    batches = list(batches)
    if not batches:
        raise QuantizationError("the calibration set is empty", fix="give at least one prompt or --calib-random N ≥ 1")
    amax: dict[str, Amax] = {}
    names = {m: matmul_node_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    experts = {m: moe_node_name(n) for n, m in model.named_modules() if isinstance(m, Experts)}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        value = float(x.abs().max().float()) if x.numel() else 0.0
        key = names[module]
        amax[key] = max(amax.get(key, 0.0), value)

    # The running batch's mask, flattened like the MoE's tokens; per thread, because a lazy model
    # runs its batches in lock-step threads (`LazyWeights.lockstep`).
    real = threading.local()

    def experts_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        keep = real.mask  # left padding is not a token an expert "saw"
        stats = expert_amax(args[0].detach()[keep], args[1][keep], module)
        key = experts[module]
        amax[key] = amax[key].merge(stats) if key in amax else stats

    handles = [m.register_forward_pre_hook(hook) for m in names]
    handles += [m.register_forward_pre_hook(experts_hook) for m in experts]
    was_training = model.training
    model.eval()
    try:
        weights = getattr(model, "weights", None)

        def run(ids: Tensor, mask: Tensor) -> None:
            real.mask = mask.reshape(-1) != 0
            model(ids, mask, logits="last", keep_states=False)  # activations only: no layer's states outlive it

        if isinstance(weights, LazyWeights):
            weights.lockstep([lambda ids=ids, mask=mask: run(ids, mask) for ids, mask in batches], progress)
        else:
            for done, (ids, mask) in enumerate(batches, 1):
                run(ids, mask)
                if progress is not None:
                    progress(done, len(batches))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    bad = {k: v for k, v in amax.items() if not (v.finite() if isinstance(v, ExpertAmax) else math.isfinite(v))}
    if bad:
        raise QuantizationError(
            f"non-finite calibration activations at {sorted(bad)}",
            fix="the model overflows on these prompts in this dtype; calibrate in fp32 or check the checkpoint",
        )
    return dict(sorted(amax.items()))


def check_calibration_source(calib_file: str | Path | None, calib_random: int | None) -> None:
    """Exactly one calibration source, and it exists (cheap: run before any real work).

    Raises:
        QuantizationError: Neither or both given, a missing file, or ``calib_random < 1``.
    """
    if (calib_file is None) == (calib_random is None):
        raise QuantizationError(
            "FP8 calibration needs exactly one source: a prompt file or a number of random sequences"
            + (f" (got both --calib {calib_file} and --calib-random {calib_random})" if calib_file is not None else ""),
            fix="pass --calib PROMPTS.txt (one prompt per line) or --calib-random N",
        )
    if calib_file is not None and not Path(calib_file).is_file():
        raise QuantizationError(f"calibration file {calib_file} does not exist", fix="give --calib a text file with one prompt per line")
    if calib_random is not None and calib_random < 1:
        raise QuantizationError(f"--calib-random must be ≥ 1, got {calib_random}")


def _read_prompts(calib_file: str | Path) -> list[str]:
    path = Path(calib_file)
    text = read_text(path, what="calibration file", error=QuantizationError, fix="give --calib a UTF-8 text file with one prompt per line", limit=16 * 2**20)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantizationError(f"calibration file {path} has no prompts", fix="put one prompt per non-empty line")
    return prompts


def calibration_batches(
    tokenizer: Any | None,
    *,
    calib_file: str | Path | None,
    calib_random: int | None,
    vocab_size: int,
    seq_len: int = 64,
    batch: int = 4,
    seed: int = 0,
    pad_id: int = 0,
) -> list[Batch]:
    """The calibration set as ``(ids [B, L], mask [B, L])`` batches.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` (needed for ``calib_file``), or None.
        calib_file: Text file, one prompt per non-empty line; each is tokenized, truncated to its
            last ``seq_len`` tokens and left-padded within its batch.
        calib_random: Number of random sequences of ``seq_len`` ids in ``[0, vocab_size)``.
        vocab_size: The model's vocabulary size (token ids at or above it are refused).
        seq_len: Maximum tokens per sequence.
        batch: Sequences per batch.
        seed: Seed of the random sequences.
        pad_id: Id written at padded positions (masked out, so its value does not matter).

    Returns:
        The batches, in file order (deterministic for the same arguments).

    Raises:
        QuantizationError: Neither or both sources given, the file is missing or empty, no
            tokenizer for a file, bad sizes, or token ids outside the vocabulary.
    """
    check_calibration_source(calib_file, calib_random)
    if seq_len < 1 or batch < 1:
        raise QuantizationError(f"calibration seq_len and batch must be ≥ 1, got {seq_len} and {batch}")
    rows: list[list[int]]
    if calib_file is not None:
        prompts = _read_prompts(calib_file)
        if tokenizer is None:
            raise QuantizationError(
                f"--calib {calib_file} needs a tokenizer, but the checkpoint has no tokenizer.json",
                fix="add tokenizer.json to the checkpoint, or calibrate with --calib-random N",
            )
        rows = [list(tokenizer.encode(p).ids)[-seq_len:] for p in prompts]
        rows = [r for r in rows if r]
        if not rows:
            raise QuantizationError(f"every prompt in {calib_file} tokenizes to nothing", fix="use non-empty prompts")
        too_big = max(max(r) for r in rows)
        if too_big >= vocab_size:
            raise QuantizationError(
                f"the tokenizer produced id {too_big}, outside the model's vocabulary ({vocab_size})",
                fix="use the checkpoint's own tokenizer.json",
            )
    else:
        assert calib_random is not None
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, vocab_size, (calib_random, seq_len), generator=gen).tolist()
    return [left_pad(rows[i : i + batch], pad_id) for i in range(0, len(rows), batch)]


def calibration_hash(batches: Iterable[Batch]) -> str:
    """``sha256:<hex>`` of the calibration token ids and masks (shapes included), for the recipe."""
    h = hashlib.sha256()
    for ids, mask in batches:
        for t in (ids, mask):
            t = t.detach().to(torch.int64).contiguous().cpu()
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().astype("<i8").tobytes())
    return "sha256:" + h.hexdigest()


__all__ = [
    "Amax",
    "Batch",
    "ExpertAmax",
    "calibrate",
    "calibration_batches",
    "calibration_hash",
    "check_calibration_source",
    "expert_amax",
    "matmul_node_name",
    "moe_node_name",
]
