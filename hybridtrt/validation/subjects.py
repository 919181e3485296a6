"""What validation compares: a `Stepper` plus how to name its states and (optionally) its
per-layer outputs. One adapter per kind of model; all speak numpy/torch by our state names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from hybridtrt.models.config import MOE
from hybridtrt.models.moe import RoutingHold, held_routing
from hybridtrt.runtime.generation import Stepper, TorchStepper


@dataclass
class Subject:
    """A model under comparison.

    Attributes:
        name: Shown in reports (``"pytorch"``, ``"onnxruntime"``, ``"tensorrt"``, ``"hf"``).
        stepper: Runs calls.
        named_states: state -> ``{present_name: array}``.
        layer_outputs: ``(ids, mask) -> {"layer_output.{i}": [B, L, hidden]}`` from zero state, or
            None when the subject cannot expose them. May cover only some layers.
        layer_notes: Why some (or all) layer outputs are not exposed, one line each.
        moe_layers: Indices of the MoE layers.
        hold: ``hold(RoutingHold)`` -> a context under which every call and layer run records its
            MoE routing in the hold and, when the hold has ids, is held to them (None: this subject
            cannot take held expert ids).
        prefill_with_layers: ``(ids, mask, zero state) -> (logits, state, layer outputs)``: a
            prefill's `Stepper.step` and its `layer_outputs` from one pass, the same numbers
            (None: a subject that cannot, or whose layers come from another session).
        decode_at_once: ``(tokens [B, n], mask, state) -> (logits [B, n, V], state)``: ``n``
            teacher-forced decode steps in one call. Only for a subject whose numbers do not depend
            on the path (an fp64 run of a model without MoE layers: the chunked scan and the
            one-token update agree to ~1e-15, far below the fp32 rounding it measures); None: step
            by step.
    """

    name: str
    stepper: Stepper
    named_states: Callable[[Any], dict[str, Any]]
    layer_outputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None
    layer_notes: list[str] = field(default_factory=list)
    moe_layers: list[int] = field(default_factory=list)
    hold: Callable[[RoutingHold], ContextManager[Any]] | None = None
    prefill_with_layers: Callable[[torch.Tensor, torch.Tensor, Any], tuple[Any, Any, dict[str, Any]]] | None = None
    decode_at_once: Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None


def torch_subject(model: Any, state_dtype: torch.dtype = torch.float32, name: str = "pytorch") -> Subject:
    """The PyTorch reference (oracle #1), in the model's dtype with ``state_dtype`` SSM states; an
    fp64 one of a dense model (a yardstick) runs teacher-forced decode steps in one call
    (`Subject.decode_at_once`)."""
    stepper = TorchStepper(model, state_dtype)
    # fp64 throughout, so the path does not change its numbers; not with MoE layers, whose router
    # scores in fp32 (as HF's does: hybridtrt/models/moe.py), which the path does change (measured:
    # a yardstick distance 6.61e-7 step by step, 6.72e-7 at once, tiny-nemotron3-moe).
    exact = model.dtype == torch.float64 and state_dtype == torch.float64 and not model.config.layers_of(MOE)

    @torch.no_grad()
    def decode_at_once(tokens: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        device = model.device
        out = model(tokens.to(device), mask.to(device), cache, logits="all", scan_mode="scan")
        return out.logits.cpu(), out.cache

    @torch.no_grad()
    def prefill_with_layers(ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        device = model.device
        out = model(ids.to(device), mask.to(device), cache, logits="last", scan_mode="scan", output_hidden_states=True)
        return out.logits.cpu(), out.cache, {f"layer_output.{i}": h for i, h in enumerate(out.hidden_states)}

    def layers(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        return prefill_with_layers(ids, mask, model.new_cache(ids.shape[0], state_dtype))[2]

    return Subject(
        name, stepper, lambda cache: cache.named_states(), layers,
        moe_layers=list(model.config.layers_of(MOE)), hold=lambda hold: held_routing(model, hold), prefill_with_layers=prefill_with_layers,
        decode_at_once=decode_at_once if exact else None,
    )


def ort_subject(ort_model: Any) -> Subject:
    """An export directory on ONNX Runtime. Per-layer outputs come from the export's own graph
    outputs (``--per-layer`` exports) or from a temporary copy that exposes the located tensors."""
    from hybridtrt.validation.layers import exposed_session, layer_taps

    taps = layer_taps(ort_model.export_dir, ort_model.manifest)
    sessions: list[Any] = []  # built on first use: plain validation never pays for it
    ort_model.use_routing_graphs()  # MoE: calls can record and hold their routing

    def layers(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        if not sessions:
            sessions.append(ort_model.routing_session(exposed_session(taps)))
        out = ort_model.run(ids, mask, ort_model.plan.zeros(ids.shape[0]), session=sessions[0])
        return {name: out[tensor] for name, tensor in taps.tensors.items()}

    @contextlib.contextmanager
    def hold(routing: RoutingHold) -> Iterator[None]:
        ort_model.routing = routing
        try:
            yield
        finally:
            ort_model.routing = None

    return Subject(
        "onnxruntime", ort_model, ort_model.named_states, layers if taps.tensors else None, taps.notes(),
        moe_layers=list(ort_model.moe_layers), hold=hold,
    )


def engine_subject(trt_model: Any) -> Subject:
    """A TensorRT engine (needs TensorRT and a GPU). An engine has only its graph outputs, so
    per-layer validation compares its states; layer outputs go through polygraphy (see notes)."""
    note = (
        "a built engine exposes no layer outputs; for per-layer TensorRT results run the "
        "`polygraphy run … --trt --onnx-outputs …` command that `hybridtrt compare OUT --per-layer` "
        "prints and check them with `hybridtrt validate OUT --load-outputs`"
    )
    return Subject("tensorrt", trt_model, trt_model.named_states, None, [note])


def hf_subject(hf_model: Any, layer_types: str, name: str = "hf-transformers", rowwise: bool = False) -> Subject:
    """HF transformers' own model (oracle #2); ``rowwise`` runs each row of a batch alone, unpadded
    (`hybridtrt.validation.hf.RowwiseHfStepper`: HF in fp64 turns padding into NaN)."""
    from hybridtrt.validation.hf import HfStepper, RowwiseHfStepper

    stepper = (RowwiseHfStepper if rowwise else HfStepper)(hf_model, layer_types)
    return Subject(name, stepper, stepper.named_states, None)
