"""Nemotron-3 MoE checkpoints written by HF transformers itself (``NemotronHForCausalLM(config)
.save_pretrained``): the form users have (``backbone.`` prefix, per-expert tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="HF transformers is the parity oracle")

from hybridtrt.models.presets import PRESETS  # noqa: E402

#: Keys of our preset that HF's config constructor does not take (HF writes its own).
_NOT_HF_KWARGS = ("model_type", "architectures", "layers_block_type")


def hf_moe_config(**overrides: Any) -> dict[str, Any]:
    """HF config kwargs: ``tiny-nemotron3-moe`` with ``overrides`` (pattern as ``hybrid_override_pattern``)."""
    base = {k: v for k, v in PRESETS["tiny-nemotron3-moe"].items() if k not in _NOT_HF_KWARGS}
    base["hybrid_override_pattern"] = "MEMEM*E"
    return {**base, "initializer_range": 0.3, **overrides}


@torch.no_grad()
def save_hf_moe(out: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a random HF checkpoint and return its directory.

    HF's init leaves the router's ``e_score_correction_bias`` at zero; we draw it ~ N(0, 0.3) so the
    bias changes which experts are chosen. With ``n_shared_experts: 0`` HF still builds a shared
    expert (it ignores the count): its weights are zeroed, so HF computes exactly what a model
    without one computes, and `strip_shared_experts` gives our loader the checkpoint without them.
    """
    torch.manual_seed(seed)
    config = transformers.NemotronHConfig(**hf_moe_config(**overrides))
    model = transformers.NemotronHForCausalLM(config).eval()
    for name, bias in model.named_buffers():  # HF keeps the correction bias as a buffer
        if name.endswith("e_score_correction_bias"):
            bias.copy_(torch.randn(bias.shape) * 0.3)
    for name, p in model.named_parameters():
        if ".shared_experts." in name and not config.n_shared_experts:
            p.zero_()
    if dtype != torch.float32:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def strip_shared_experts(src: Path, dst: Path) -> Path:
    """Copy a single-file checkpoint without its (zero) shared-expert tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".shared_experts." not in k}, dst / "model.safetensors")
    return dst
