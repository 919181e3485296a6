"""The real architectures of the family, full size and scaled down, as HF ``config.json`` dicts.

Full-size shapes are the public configs (Nemotron-H 4B/8B/47B/56B, Nemotron-Nano-9B-v2/12B-v2,
Nemotron-3 Nano-30B-A3B and Super-120B-A12B, Mamba-Codestral-7B, state-spaces Mamba-2 2.7B). ``scaled_config`` keeps every property that shapes
the numerics — Mamba head_dim, d_state, n_groups, conv kernel, chunk size, attention head_dim and GQA
ratio, the layer pattern's order, residual dtype, tied embeddings — and shrinks the widths and the
depth, so tests and benchmarks run the real structure on a CPU in seconds.

``write_hf_checkpoint`` writes such a config with HF transformers' own ``save_pretrained`` (the
files users have), random weights with ``initializer_range``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_NEMOTRON_H: dict[str, Any] = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "vocab_size": 131072,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "mamba_hidden_act": "silu",
    "mlp_hidden_act": "relu2",
    "use_conv_bias": True,
    "use_bias": False,
    "mlp_bias": False,
    "attention_bias": False,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False,
    "tie_word_embeddings": False,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "torch_dtype": "bfloat16",
}

#: Nemotron-3's MoE router and expert fields (NemotronHTopkRouter: sigmoid scores + correction bias,
#: one group, normalised top-k, relu² experts, one shared expert).
_NEMOTRON_3 = {
    **_NEMOTRON_H, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "n_shared_experts": 1,
    "num_key_value_heads": 2, "num_nextn_predict_layers": 0,
}

_NEMOTRON_H_52 = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"

#: name -> full-size HF config (public shapes).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "nemotron-h-4b": {**_NEMOTRON_H, "hybrid_override_pattern": _NEMOTRON_H_52, "hidden_size": 3072, "mamba_num_heads": 112,
                      "num_attention_heads": 32, "intermediate_size": 12288},
    "nemotron-h-8b": {**_NEMOTRON_H, "hybrid_override_pattern": _NEMOTRON_H_52, "hidden_size": 4096, "mamba_num_heads": 128,
                      "num_attention_heads": 32, "intermediate_size": 21504},
    "nemotron-h-47b": {**_NEMOTRON_H, "hidden_size": 8192, "mamba_num_heads": 256, "ssm_state_size": 256,
                       "num_attention_heads": 64, "intermediate_size": 30720,
                       "hybrid_override_pattern": "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"},
    "nemotron-h-56b": {**_NEMOTRON_H, "hidden_size": 8192, "mamba_num_heads": 256, "ssm_state_size": 256,
                       "num_attention_heads": 64, "intermediate_size": 32768,
                       "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
                                                  "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"},
    "nemotron-nano-9b-v2": {**_NEMOTRON_H, "hidden_size": 4480, "mamba_num_heads": 128, "mamba_head_dim": 80,
                            "num_attention_heads": 40, "intermediate_size": 15680,
                            "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"},
    "nemotron-nano-12b-v2": {**_NEMOTRON_H, "hidden_size": 5120, "mamba_num_heads": 128, "mamba_head_dim": 80,
                             "num_attention_heads": 40, "intermediate_size": 20480,
                             "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"},
    # Nemotron-3 (MoE): config.json of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-* (52 layers, 128 experts,
    # top-6, routed_scaling_factor 2.5; also Megatron-Bridge `Nemotron3NanoProvider`) and of
    # nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-* (88 layers, 512 experts, top-22, latent MoE 1024,
    # routed_scaling_factor 5.0). Super's MTP layer (num_nextn_predict_layers 1) is left out here:
    # the main model's logits do not depend on it.
    "nemotron-3-nano-30b-a3b": {**_NEMOTRON_3, "hidden_size": 2688, "mamba_num_heads": 64, "mamba_head_dim": 64,
                                "num_attention_heads": 32, "intermediate_size": 1856, "n_routed_experts": 128,
                                "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
                                "moe_shared_expert_intermediate_size": 3712, "moe_latent_size": None,
                                "routed_scaling_factor": 2.5,
                                "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"},
    "nemotron-3-super-120b-a12b": {**_NEMOTRON_3, "hidden_size": 4096, "mamba_num_heads": 128, "mamba_head_dim": 64,
                                   "num_attention_heads": 32, "intermediate_size": 2688, "n_routed_experts": 512,
                                   "num_experts_per_tok": 22, "moe_intermediate_size": 2688,
                                   "moe_shared_expert_intermediate_size": 5376, "moe_latent_size": 1024,
                                   "routed_scaling_factor": 5.0,
                                   "hybrid_override_pattern": "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
                                                              "EMEMEMEMEM*EMEMEMEM*EMEMEMEME"},
    "mamba-codestral-7b": {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 32768,
                           "hidden_size": 4096, "num_hidden_layers": 64, "num_heads": 128, "head_dim": 64, "expand": 2,
                           "state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 256, "use_bias": False,
                           "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True, "layer_norm_epsilon": 1e-5,
                           "tie_word_embeddings": False, "time_step_limit": [0.0, float("inf")], "torch_dtype": "bfloat16"},
    "mamba2-2.7b": {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 50288,
                    "hidden_size": 2560, "num_hidden_layers": 64, "num_heads": 80, "head_dim": 64, "expand": 2,
                    "state_size": 128, "n_groups": 1, "conv_kernel": 4, "chunk_size": 256, "use_bias": False,
                    "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True, "layer_norm_epsilon": 1e-5,
                    "tie_word_embeddings": True, "time_step_limit": [0.0, float("inf")], "torch_dtype": "float32"},
}


def _pattern_prefix(pattern: str, layers: int) -> str:
    """The first ``layers`` blocks of ``pattern``, extended until it holds an attention block."""
    prefix = pattern[:layers]
    if "*" in pattern and "*" not in prefix:
        prefix = pattern[: pattern.index("*") + 1]
    return prefix


def scaled_config(name: str, *, width: int = 8, layers: int = 16, vocab: int = 512) -> dict[str, Any]:
    """A small copy of architecture ``name`` with the same numerics-shaping properties.

    Args:
        name: Key of `ARCHITECTURES`.
        width: Divide hidden size, head counts and MLP/expert/latent widths by this (head dims,
            d_state, n_groups, chunk size, the GQA ratio, the expert count and top-k are kept: routing
            over 128 or 512 experts is a property of the numerics).
        layers: Keep the first ``layers`` blocks of the pattern (at least up to one attention block).
        vocab: Vocabulary size.
    """
    full = ARCHITECTURES[name]
    cfg = {**full, "vocab_size": vocab}
    if cfg["model_type"] == "nemotron_h":
        groups = cfg["n_groups"]
        heads = max(groups, (cfg["mamba_num_heads"] // width) // groups * groups)
        kv = max(1, cfg["num_key_value_heads"] // width)
        q_per_kv = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
        cfg.update(
            hidden_size=cfg["hidden_size"] // width,
            mamba_num_heads=heads,
            num_key_value_heads=kv,
            num_attention_heads=kv * q_per_kv,
            intermediate_size=cfg["intermediate_size"] // width,
            hybrid_override_pattern=_pattern_prefix(cfg["hybrid_override_pattern"], layers),
        )
        for key in ("moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size"):
            if cfg.get(key):
                cfg[key] = max(1, cfg[key] // width)
    else:
        hidden = cfg["hidden_size"] // width
        groups = cfg["n_groups"]
        heads = hidden * cfg["expand"] // cfg["head_dim"]
        if heads % groups:
            raise ValueError(f"scaled {name}: {heads} heads do not split into {groups} groups; pick another width")
        cfg.update(hidden_size=hidden, num_heads=heads, num_hidden_layers=min(layers, cfg["num_hidden_layers"]))
    return cfg


def write_hf_checkpoint(
    config: dict[str, Any], out_dir: str | Path, *, dtype: str = "float32", seed: int = 0, initializer_range: float = 0.3,
    max_shard_size: str | None = None,
) -> Path:
    """Write ``config`` as a checkpoint with HF transformers' ``save_pretrained``.

    Weights are HF's own random initialisation with ``initializer_range`` (linear and embedding
    weights); the Mamba ``A_log``/``dt_bias``/``D`` keep HF's init. ``dtype`` is the stored dtype
    (``float32 | float16 | bfloat16``) and is recorded in ``config.json`` as transformers does.
    """
    import torch

    from hybridtrt.extras import import_transformers

    transformers = import_transformers()
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    fields["initializer_range"] = initializer_range
    if config["model_type"] == "nemotron_h":
        hf_config = transformers.NemotronHConfig(**fields)
        cls = transformers.NemotronHForCausalLM
    else:
        hf_config = transformers.Mamba2Config(**fields)
        cls = transformers.Mamba2ForCausalLM
    torch.manual_seed(seed)
    model = cls(hf_config).to(getattr(torch, dtype))
    out = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out
