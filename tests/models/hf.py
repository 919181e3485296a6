"""HF transformers as oracle #2 (test-side import guard around `hybridtrt.validation.hf`)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="HF transformers is the parity oracle")

from hybridtrt.validation.hf import hf_states, load_hf  # noqa: E402

__all__ = ["hf_states", "load_hf", "save_hf_checkpoint"]


def save_hf_checkpoint(preset: str, out, *, dtype=None, max_shard_size: str | None = None, seed: int = 0, **overrides):
    """A checkpoint as users have them: HF transformers' own ``*ForCausalLM(config).save_pretrained``
    (random init; bf16 / sharded on request; HF writes Nemotron-H with the ``backbone.`` prefix),
    plus the preset's byte tokenizer."""
    import torch
    import transformers

    from hybridtrt.models.presets import preset_config
    from hybridtrt.models.tokenizer import write_byte_tokenizer

    cfg = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    write_byte_tokenizer(out, cfg["vocab_size"])
    return out
