"""The multi-token-prediction (MTP) head of Nemotron-3 Super/Ultra, the draft model of speculative
decoding (DESIGN.md §11).

NVIDIA's definition, as vLLM runs it (``vllm/model_executor/models/nemotron_h_mtp.py`` at
vllm-project/vllm 01ca27739feb, ``NemotronHMultiTokenPredictor``; HF transformers has no MTP module and drops the tensors): the
``num_nextn_predict_layers × len(mtp pattern)`` layers ``mtp.layers.{i}`` are ordinary Nemotron-H
decoder blocks (``norm`` + ``mixer``: ``*`` attention with a KV cache of its own, ``E`` MoE), the
first of a step also holding ``enorm``, ``hnorm`` and ``eh_proj [hidden, 2·hidden]`` (no bias), the
last ``final_layernorm``. For position ``t``::

    x_t   = eh_proj(cat(enorm(embed(token_{t+1})), hnorm(h_t)))   # embedding first
    x_t   = x_t + mixer_j(norm_j(x_t))                            # each block j of the pattern
    out_t = final_layernorm(x_t);  logits_t = lm_head(out_t)      # predicts token_{t+2}

``h_t`` is the main model's final hidden state after ``norm_f`` (what its LM head reads: vLLM's
``NemotronHModel.forward`` returns ``norm_f(hidden_states, residual)`` and the proposer hands that
to the draft). The embedding table and the LM head are the main model's (vLLM loads the
checkpoint's ``embeddings``/``lm_head`` into the draft). Drafting ``K`` tokens chains the head: draft
``k + 1`` reads draft ``k``'s token and the head's own ``out`` in place of ``h``.

vLLM asserts one MTP step (``num_nextn_predict_layers == 1``) and builds ``*`` and ``E`` only; we
refuse more steps, and build ``-`` (MLP) too, but not ``M``: a Mamba layer in the draft would need
its own state rollback, and no published checkpoint has one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from hybridtrt.errors import CheckpointError, ConfigError
from hybridtrt.models.cache import HybridCache
from hybridtrt.models.config import ATTENTION, MAMBA, MOE, HybridConfig
from hybridtrt.models.layers import RMSNorm
from hybridtrt.models.model import Block, HybridLM, growing_positions, meta_modules, run_blocks

#: Checkpoint prefix of the head's tensors (``language_model.`` in multimodal checkpoints, stripped
#: as vLLM's ``load_weights`` does).
PREFIX = "mtp."
_MULTIMODAL = "language_model."


def check_mtp_config(config: HybridConfig) -> None:
    """Refuse an MTP head this module cannot build (before anything is read).

    Raises:
        ConfigError: No MTP layers, more than one MTP step, a Mamba block in the pattern, or an
            ``E`` block in a model without MoE settings.
    """
    if not config.mtp_layers:
        raise ConfigError("the checkpoint has no MTP layers (num_nextn_predict_layers is 0)", fix="use --speculative ngram, which needs no draft head")
    if config.mtp_layers != 1:
        raise ConfigError(
            f"num_nextn_predict_layers={config.mtp_layers}: hybridtrt runs one MTP step, as vLLM's NemotronH-MTP does (it asserts one)",
            fix="use --speculative ngram, or a checkpoint with one MTP layer",
        )
    if MAMBA in config.mtp_pattern:
        raise ConfigError(f"MTP pattern {config.mtp_pattern!r} has a Mamba block, which no MTP head has been published with", fix="use --speculative ngram")
    if MOE in config.mtp_pattern and config.moe is None:
        raise ConfigError(f"MTP pattern {config.mtp_pattern!r} has an MoE block, the model has no MoE settings", fix="check config.json (n_routed_experts, …)")


class MTPLayer(Block):
    """One ``mtp.layers.{i}``: a decoder block, plus the fusion of the step's first layer
    (``enorm``, ``hnorm``, ``eh_proj``) and the norm of its last (``final_layernorm``)."""

    def __init__(self, config: HybridConfig, kind: str, first: bool, last: bool) -> None:
        super().__init__(config, kind)
        c = config
        if first:
            self.enorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon, c.norm_weight_in_fp32)
            self.hnorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon, c.norm_weight_in_fp32)
            self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        if last:
            self.final_layernorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon, c.norm_weight_in_fp32)


class MTPHead(nn.Module):
    """The MTP head of ``config`` (one step of ``config.mtp_pattern``); parameter names are the
    checkpoint's without ``mtp.`` (``layers.0.eh_proj.weight``)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        check_mtp_config(config)
        self.config = config
        n = len(config.mtp_pattern)
        self.layers = nn.ModuleList([MTPLayer(config, kind, i == 0, i == n - 1) for i, kind in enumerate(config.mtp_pattern)])

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.kind == ATTENTION]

    def new_cache(self, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> HybridCache:
        """Empty KV (no position yet) of the head's attention layers for ``batch`` rows."""
        c = self.config
        cache = HybridCache()
        for i in self.attention_layers:
            cache.key[i] = torch.zeros(batch, c.num_key_value_heads, 0, c.attention_head_dim, dtype=dtype, device=device)
            cache.value[i] = torch.zeros_like(cache.key[i])
        return cache

    def forward(self, main: HybridLM, hidden: Tensor, next_ids: Tensor, attention_mask: Tensor, cache: HybridCache) -> tuple[Tensor, Tensor, HybridCache]:
        """Draft logits for ``L`` positions.

        Args:
            main: The main model (its embedding table and LM head are the head's).
            hidden: ``[B, L, hidden]``: the main model's ``norm_f`` output at positions ``t``
                (`CausalLMOutput.last_hidden`), or this head's own ``out`` when chaining drafts.
            next_ids: ``[B, L]``: the token at ``t + 1`` for each position.
            attention_mask: ``[B, past + L]`` over the head's KV positions, 0 for padding and holes
                (the same mask as the main model's: head position ``t`` is main position ``t``).
            cache: The head's KV after ``past`` positions.

        Returns:
            ``logits [B, L, V]`` (fp32) predicting the token at ``t + 2``, ``out [B, L, hidden]``
            (the hidden state a chained draft reads) and the new cache.
        """
        positions = growing_positions(attention_mask, next_ids.shape[1], main.dtype)
        row = positions.mask[:, :, None] != 0
        first = self.layers[0]
        fused = torch.cat([first.enorm(main.embed(next_ids)), first.hnorm(hidden.to(main.dtype))], dim=-1)
        h = torch.where(row, first.eh_proj(fused), 0.0)
        h, new, _ = run_blocks(self.layers, h, positions, cache)
        out = self.layers[-1].final_layernorm(h)
        return main.head_logits(out), out, new


def _checkpoint_sources(names: list[str]) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """``{our name: (checkpoint name, per-expert tensors)}`` of the checkpoint's ``mtp.*`` tensors,
    as the checkpoint spells them (with its ``language_model.`` prefix, if any): a tensor stored
    whole has no per-expert tensors (None); a stack of per-expert ones is named by its stacked name
    (``mtp.layers.1.mixer.experts.up_proj``) and lists them in expert order."""
    from hybridtrt.models.loading import per_expert_groups

    mtp = {n.removeprefix(_MULTIMODAL): n for n in names if n.removeprefix(_MULTIMODAL).startswith(PREFIX)}
    stacks = per_expert_groups(mtp)
    parts = {p for group in stacks.values() for p in group}
    out: dict[str, tuple[str, tuple[str, ...] | None]] = {k.removeprefix(PREFIX): (mtp[k], None) for k in mtp if k not in parts}
    out.update({k.removeprefix(PREFIX): (k, tuple(mtp[p] for p in group)) for k, group in stacks.items()})
    return out


def load_mtp(path: str | Path, main: HybridLM) -> MTPHead:
    """The MTP head of checkpoint ``path`` in ``main``'s dtype and device, strictly matched.

    Raises:
        ConfigError: See `check_mtp_config`.
        CheckpointError: ``mtp.*`` tensors missing, unexpected, of the wrong shape, not floating
            point (a quantized head: ModelOpt's Nemotron recipes leave it unquantized), or NaN/Inf.
    """
    from hybridtrt.models.loading import FLOAT_CODES, check_finite, open_checkpoint
    from hybridtrt.models.moe import FP32_PARAMETERS

    checkpoint = open_checkpoint(path)  # headers only; tensors are converted to main's dtype below
    config = checkpoint.config
    check_mtp_config(config)
    with meta_modules():
        head = MTPHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    sources = _checkpoint_sources(list(checkpoint.index.tensors))
    missing = sorted(k for k in expected if k not in sources)
    unexpected = sorted(sources[k][0] for k in sources if k not in expected)
    if missing or unexpected:
        parts = [f"{title} ({len(items)}): {', '.join(items[:12])}{' …' if len(items) > 12 else ''}" for title, items in (("missing", [PREFIX + m for m in missing]), ("unexpected", unexpected)) if items]
        raise CheckpointError(f"the checkpoint's MTP head does not match its config (pattern {config.mtp_pattern!r}): " + "; ".join(parts), fix="check num_nextn_predict_layers and mtp_layers_block_type against the mtp.* tensors")
    fp32 = [re.compile(p) for p in FP32_PARAMETERS]
    state = {}
    for k, shape in expected.items():
        stored, group = sources[k]
        tensors = list(group) if group is not None else [stored]
        bad = [t for t in tensors if checkpoint.index[t].dtype not in FLOAT_CODES]
        if bad:
            raise CheckpointError(f"MTP tensor {bad[0]} is {checkpoint.index[bad[0]].dtype}, not floating point", fix="export the MTP head from an unquantized checkpoint; ModelOpt's recipes leave it unquantized")
        value = torch.stack([checkpoint.index.read(t) for t in tensors]) if group is not None else checkpoint.index.read(stored)
        if tuple(value.shape) != shape:
            raise CheckpointError(f"MTP tensor {stored}: checkpoint {tuple(value.shape)} vs head {shape}", fix="check that config.json belongs to these weights")
        dtype = torch.float32 if any(p.search("." + k) for p in fp32) else main.dtype
        converted = value.to(dtype)
        check_finite(converted, stored, value)
        state[k] = converted.to(main.device)
    head.load_state_dict(state, strict=True, assign=True)
    return head.requires_grad_(False).eval()
