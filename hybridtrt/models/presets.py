"""Built-in tiny random models, written as real checkpoint directories (config.json + safetensors
+ tokenizer.json) so that every path — loading, export, validation — is exercised as for a real
checkpoint. ``initializer_range`` ≈ 0.3 so that the Mamba branch visibly matters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hybridtrt.errors import InputError
from hybridtrt.files import usual_permissions
from hybridtrt.models.config import config_from_dict
from hybridtrt.models.loading import INDEX_FILE, SINGLE_FILE, WEIGHT_NAMES, to_checkpoint_name
from hybridtrt.models.moe import unstack_experts
from hybridtrt.models.model import HybridLM
from hybridtrt.models.tokenizer import TOKENIZER_FILE

_NEMOTRON_BASE: dict[str, Any] = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "mamba_hidden_act": "silu",
    "mlp_hidden_act": "relu2",
    "use_conv_bias": True,
    "use_bias": False,
    "mlp_bias": False,
    "attention_bias": False,
    "conv_kernel": 4,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "residual_in_fp32": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

#: Sizes of the tiny Nemotron presets (Mamba-2 and attention layers).
_TINY_NEMOTRON_SIZES: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "ssm_state_size": 16,
    "n_groups": 2,
    "chunk_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

#: The MoE fields the tiny Nemotron-3 presets share (16 routed experts with a shared expert 2× their width).
_TINY_MOE: dict[str, Any] = {
    "intermediate_size": 32,
    "n_routed_experts": 16,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 64,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
}

#: name -> HF config.json contents. Sizes are deliberately odd-shaped where it tests something.
PRESETS: dict[str, dict[str, Any]] = {
    # The demo / test default: every block kind, GQA, n_groups > 1.
    "tiny-nemotron-h": {
        **_NEMOTRON_BASE,
        **_TINY_NEMOTRON_SIZES,
        "hybrid_override_pattern": "M*M-M*-M",
        "intermediate_size": 128,
    },
    # Plain Mamba-2 (HF Mamba2ForCausalLM naming), n_groups = 1, tied embeddings.
    "tiny-mamba2": {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_heads": 8,
        "head_dim": 16,
        "expand": 2,
        "state_size": 16,
        "n_groups": 1,
        "conv_kernel": 4,
        "chunk_size": 16,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    # Nemotron-3-Nano-30B-A3B's structure scaled down: `layers_block_type` form, MoE layers with a
    # shared expert (2× the routed width), top-6 of the routed experts, sigmoid router with a
    # correction bias, norm_topk_prob, routed_scaling_factor 2.5, no groups (n_group 1), and the
    # RoPE fields that HF's NemotronH ignores.
    "tiny-nemotron3-moe": {
        **_NEMOTRON_BASE,
        **_TINY_NEMOTRON_SIZES,
        **_TINY_MOE,
        "layers_block_type": ["mamba", "moe", "mamba", "moe", "mamba", "attention", "moe"],
        "num_experts_per_tok": 6,
        "routed_scaling_factor": 2.5,
        "moe_latent_size": None,
        "num_nextn_predict_layers": 0,
        "rope_theta": 10000,
        "partial_rotary_factor": 1.0,
    },
    # Nemotron-3-Super-120B-A12B's structure scaled down (architectures.py "nemotron-3-super-120b-a12b"):
    # latent MoE, top-k of many experts, routed_scaling_factor 5.0, and its multi-token-prediction head
    # as NVIDIA's config.json declares it (num_nextn_predict_layers 1, mtp_hybrid_override_pattern "*E";
    # tensors mtp.layers.{0,1}.*, written per expert: `create_checkpoint`).
    "tiny-nemotron3-super": {
        **_NEMOTRON_BASE,
        **_TINY_NEMOTRON_SIZES,
        **_TINY_MOE,
        "hybrid_override_pattern": "MEMEM*EME",
        "num_experts_per_tok": 4,
        "routed_scaling_factor": 5.0,
        "moe_latent_size": 32,
        "num_nextn_predict_layers": 1,
        "mtp_hybrid_override_pattern": "*E",
    },
    # Nemotron-Nano-9B-v2-like ratios at ~110M parameters: head_dim 80, d_state 128, G = 8.
    "small-nemotron-h": {
        **_NEMOTRON_BASE,
        "vocab_size": 32000,
        "hidden_size": 640,
        "hybrid_override_pattern": "M-M-M*-M-M-M*-M-",
        "mamba_num_heads": 16,
        "mamba_head_dim": 80,
        "ssm_state_size": 128,
        "n_groups": 8,
        "chunk_size": 128,
        "num_attention_heads": 10,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 2560,
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The HF config dict of a preset with ``overrides`` applied."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}", fix=f"choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


@torch.no_grad()
def random_model(hf_config: dict[str, Any], *, seed: int = 0, initializer_range: float = 0.3) -> HybridLM:
    """A reference model with random weights that make every branch matter.

    Linear, embedding and conv weights ~ N(0, initializer_range); norms ~ 1 + N(0, 0.1);
    ``A = -U(1, 16)``; ``dt_bias`` = softplus⁻¹(log-uniform(0.01, 0.3)); ``D`` ~ 1 + N(0, 0.3).
    """
    config = config_from_dict(hf_config)
    gen = torch.Generator().manual_seed(seed)
    return randomize(HybridLM(config), gen, initializer_range).eval()


@torch.no_grad()
def randomize(module: torch.nn.Module, gen: torch.Generator, initializer_range: float = 0.3) -> torch.nn.Module:
    """Fill ``module``'s parameters as `random_model` describes (norms by name: ``…norm…``)."""

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=gen)))
        elif leaf == "dt_bias":
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.3) - math.log(0.01)) + math.log(0.01))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "D":
            normal(p, 1.0, 0.3)
        elif "norm" in name.rsplit(".", 2)[-2] or name.startswith("norm_f"):
            normal(p, 1.0, 0.1)
        else:
            normal(p, 0.0, initializer_range)
    return module


@torch.no_grad()
def random_mtp_tensors(config, *, seed: int = 0, initializer_range: float = 0.3) -> dict[str, torch.Tensor]:
    """A random MTP head of ``config`` as the checkpoint's ``mtp.*`` tensors (experts per expert)."""
    from hybridtrt.models.mtp import PREFIX, MTPHead

    head = randomize(MTPHead(config), torch.Generator().manual_seed(seed + 1_000_003), initializer_range)
    return unstack_experts({PREFIX + k: v.detach().contiguous() for k, v in head.state_dict().items()})


def _is_checkpoint_file(path: Path) -> bool:
    """The files a checkpoint directory is made of; ``--force`` replaces exactly these."""
    return path.name in ("config.json", INDEX_FILE, TOKENIZER_FILE) or path.suffix == ".safetensors"


def prepare_checkpoint_dir(out_dir: str | Path, *, force: bool = False) -> Path:
    """Create ``out_dir`` for a new checkpoint, refusing to write into a non-empty directory.

    A new checkpoint written over an old one would mix files (a stale shard index next to a new
    single-file checkpoint loads the old weights), so a non-empty directory is refused unless
    ``force``, which removes the old checkpoint files first and leaves anything else alone.

    Raises:
        InputError: ``out_dir`` is a file, or a non-empty directory without ``force``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory", fix="choose another -o/--output")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(p.name for p in entries[:3]) + (" …" if len(entries) > 3 else "")
        raise InputError(
            f"{out} is not empty ({len(entries)} entries: {shown})",
            fix="choose a new directory, or pass --force to replace its checkpoint files",
        )
    for p in entries:
        if p.is_file() and _is_checkpoint_file(p):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(
    model: HybridLM,
    hf_config: dict[str, Any],
    out_dir: str | Path,
    *,
    max_shard_bytes: int | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` and HF-named safetensors (sharded with an index when
    ``max_shard_bytes`` is given) into an existing directory. MoE experts are written per expert, as
    the hub checkpoints and HF's ``save_pretrained`` store them. ``extra``: more checkpoint tensors by
    their checkpoint name (an MTP head's ``mtp.*``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = WEIGHT_NAMES[model.config.family].prefixes[0]
    tensors = unstack_experts({to_checkpoint_name(k, prefix): v.detach().contiguous() for k, v in model.state_dict().items()})
    tensors.update(extra or {})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        usual_permissions([out / SINGLE_FILE])
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        usual_permissions([out / fname])
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def create_checkpoint(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    initializer_range: float = 0.3,
    max_shard_bytes: int | None = None,
    with_tokenizer: bool = True,
    force: bool = False,
    **overrides: Any,
) -> Path:
    """Create a random checkpoint directory of preset ``name`` (with config ``overrides``).

    ``out_dir`` must be new or empty unless ``force`` (see `prepare_checkpoint_dir`).
    """
    hf_config = preset_config(name, **overrides)
    prepare_checkpoint_dir(out_dir, force=force)
    model = random_model(hf_config, seed=seed, initializer_range=initializer_range)
    mtp = random_mtp_tensors(model.config, seed=seed, initializer_range=initializer_range) if model.config.mtp_layers else None
    out = save_checkpoint(model, hf_config, out_dir, max_shard_bytes=max_shard_bytes, extra=mtp)
    if with_tokenizer:
        from hybridtrt.models.tokenizer import write_byte_tokenizer

        write_byte_tokenizer(out, hf_config["vocab_size"])
    return out
