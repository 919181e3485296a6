"""HF transformers as oracle #2: load the same checkpoint with ``transformers`` and expose it with
the `Stepper` protocol and our state names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hybridtrt.errors import MissingDependencyError


def import_transformers() -> Any:
    """``transformers`` with its logging quietened, or a typed error naming the extra to install."""
    try:
        import transformers
        import transformers.utils.logging as hf_logging
    except ImportError:
        raise MissingDependencyError(
            "HF transformers is not installed", fix="pip install 'hybridtrt[hf]' (transformers ≥ 5)"
        ) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """HF's own ``*ForCausalLM`` for the checkpoint (eager attention; EOS disabled)."""
    transformers = import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_states(cache: Any, layer_types: tuple[str, ...] | str) -> dict[str, torch.Tensor]:
    """HF ``DynamicCache`` -> ``{present_name: tensor}``."""
    out = {}
    for i, kind in enumerate(layer_types):
        if kind == "M":
            out[f"present_conv_state.{i}"] = cache.get_conv_state(i, state_idx=0)
            out[f"present_ssm_state.{i}"] = cache.get_recurrent_state(i, state_idx=0)
        elif kind == "*":
            out[f"present.{i}.key"] = cache.layers[i].keys
            out[f"present.{i}.value"] = cache.layers[i].values
    return out


class HfStepper:
    """`Stepper` over an HF model; the state is HF's own cache object."""

    def __init__(self, model: Any, layer_types: str) -> None:
        self.model = model
        self.layer_types = layer_types

    def zero_state(self, batch: int) -> Any:
        return None

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any, decode: bool):
        out = self.model(input_ids, attention_mask=attention_mask, cache=state, use_cache=True)
        return out.logits[:, -1].float(), out.cache

    def named_states(self, state: Any) -> dict[str, torch.Tensor]:
        return hf_states(state, self.layer_types)
