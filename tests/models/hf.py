"""HF transformers as oracle #2: load the same checkpoint directory and read its states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF transformers is the parity oracle")


def load_hf(path: Path):
    """HF's own model for the checkpoint (eager attention; EOS disabled for fixed-length greedy)."""
    import transformers.utils.logging as hf_logging

    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_states(cache, layer_types: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """HF DynamicCache -> our ``present_*`` names."""
    out = {}
    for i, kind in enumerate(layer_types):
        if kind == "M":
            out[f"present_conv_state.{i}"] = cache.get_conv_state(i, state_idx=0)
            out[f"present_ssm_state.{i}"] = cache.get_recurrent_state(i, state_idx=0)
        elif kind == "*":
            out[f"present.{i}.key"] = cache.layers[i].keys
            out[f"present.{i}.value"] = cache.layers[i].values
    return out
