"""What validation compares: a `Stepper` plus how to name its states and (optionally) its
per-layer outputs. One adapter per kind of model; all speak numpy/torch by our state names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybridtrt.runtime.generation import Stepper, TorchStepper


@dataclass
class Subject:
    """A model under comparison.

    Attributes:
        name: Shown in reports (``"pytorch"``, ``"onnxruntime"``, ``"tensorrt"``, ``"hf"``).
        stepper: Runs calls.
        named_states: state -> ``{present_name: array}``.
        layer_outputs: ``(ids, mask) -> {"layer_output.{i}": [B, L, hidden]}`` from zero state, or
            None when the subject cannot expose them.
    """

    name: str
    stepper: Stepper
    named_states: Callable[[Any], dict[str, Any]]
    layer_outputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None


def torch_subject(model: Any, state_dtype: torch.dtype = torch.float32) -> Subject:
    """The PyTorch reference (oracle #1)."""
    stepper = TorchStepper(model, state_dtype)

    @torch.no_grad()
    def layers(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        out = model(ids, mask, model.new_cache(ids.shape[0], state_dtype), logits="last", scan_mode="scan", output_hidden_states=True)
        return {f"layer_output.{i}": h for i, h in enumerate(out.hidden_states)}

    return Subject("pytorch", stepper, lambda cache: cache.named_states(), layers)


def ort_subject(ort_model: Any) -> Subject:
    """An export directory on ONNX Runtime."""
    plan = ort_model.plan
    has_layers = bool(ort_model.manifest.per_layer_outputs)

    def layers(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        out = ort_model.run(ids, mask, plan.zeros(ids.shape[0]))
        return {k: v for k, v in out.items() if k.startswith("layer_output.")}

    return Subject("onnxruntime", ort_model, ort_model.named_states, layers if has_layers else None)


def engine_subject(trt_model: Any) -> Subject:
    """A TensorRT engine (needs TensorRT and a GPU)."""
    return Subject("tensorrt", trt_model, trt_model.named_states, None)


def hf_subject(hf_model: Any, layer_types: str) -> Subject:
    """HF transformers' own model (oracle #2)."""
    from hybridtrt.validation.hf import HfStepper

    stepper = HfStepper(hf_model, layer_types)
    return Subject("hf-transformers", stepper, stepper.named_states, None)
