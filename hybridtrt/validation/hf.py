"""HF transformers as oracle #2: load the same checkpoint with ``transformers`` and expose it with
the `Stepper` protocol and our state names; and what each transformers release does differently
from the reference (`HF_DT_RULES`), as data taken from its source.

HF is an oracle with known per-release differences, never the definition (DESIGN.md §3): the
reference follows the kernels the models are trained and served with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from hybridtrt.extras import import_transformers
from hybridtrt.models.config import dt_clamp_bounds, read_config_json

#: Where a release clamps NemotronH's ``dt`` (after softplus): to ``config.time_step_limit``, to
#: ``[time_step_min, inf)``, or not at all.
DtClamp = Literal["time_step_limit", "time_step_min", "none"]


@dataclass(frozen=True)
class HfDtRule:
    """How a range of transformers releases clamps NemotronH's ``dt`` in its torch path (the path
    that runs on CPU, and on GPU without mamba_ssm).

    Attributes:
        releases: The transformers versions this rule covers.
        prefill: The clamp of the chunked path (every call of more than one token).
        decode: The clamp of the one-token recurrent path on an existing state.
        tail: The clamp of the last ``recurrent_states_to_keep`` tokens of a call made while the
            cache records past states (speculative decoding), None where releases have no such path.
        source: Where in ``models/nemotron_h/modeling_nemotron_h.py`` the rule is written.
    """

    releases: str
    prefill: DtClamp
    decode: DtClamp
    tail: DtClamp | None
    source: str

    def covers(self, version: str) -> bool:
        return SpecifierSet(self.releases).contains(Version(version), prereleases=True)


#: Read off each release's ``modeling_nemotron_h.py`` (transformers has NemotronH from 5.3.0; the
#: boundaries were bisected on the released wheels). Rules for NemotronH configs only: HF's Mamba2
#: clamps to ``time_step_limit`` in both paths in every release, as the reference does.
HF_DT_RULES: tuple[HfDtRule, ...] = (
    HfDtRule(
        ">=5.3,<5.15", prefill="time_step_min", decode="time_step_min", tail=None,
        source="NemotronHMamba2Mixer.torch_forward: `torch.clamp(dt, self.time_step_min)` in the cached "
        "one-token branch and in the SSD branch (the CUDA path passes `dt_limit=config.time_step_limit`)",
    ),
    HfDtRule(
        ">=5.15,<5.25", prefill="time_step_min", decode="none", tail=None,
        source="NemotronHMamba2Mixer.__init__: `self.time_step_limit = (config.time_step_min, float('inf'))` "
        "→ `mamba2_chunk_scan(dt_limit=...)`; the recurrent `mamba2_selective_state_update` takes no limit",
    ),
    HfDtRule(
        ">=5.25", prefill="time_step_limit", decode="none", tail="none",
        source="NemotronHMamba2Mixer.__init__: `self.time_step_limit = config.time_step_limit` → "
        "`mamba2_scan_forward`: `mamba2_chunk_scan(dt_limit=...)`; the one-token path and the recorded "
        "tail (`cache.get_recurrent_states_to_keep`) go through `mamba2_selective_state_update`, no limit",
    ),
)


def hf_dt_rule(version: str) -> HfDtRule | None:
    """The rule of transformers ``version`` (None: a release this table does not know)."""
    return next((rule for rule in HF_DT_RULES if rule.covers(version)), None)


def clamp_bounds(clamp: DtClamp, raw_config: dict[str, Any]) -> tuple[float, float]:
    """``(lo, hi)`` that a clamp applies to ``dt`` for a NemotronH ``config.json`` (parsed as the
    reference parses it, `hybridtrt.models.config.dt_clamp_bounds`).

    ``(0, inf)`` is the identity on softplus outputs, so "none" and a default limit agree.
    """
    return dt_clamp_bounds(raw_config)[clamp]


def hf_differences(checkpoint: str | Path, reference_limit: tuple[float, float], version: str | None = None) -> list[str]:
    """Where the installed (or given) transformers release clamps ``dt`` otherwise than the
    reference on this checkpoint, one line each; empty when they agree everywhere."""
    raw = read_config_json(checkpoint)
    if raw.get("model_type") != "nemotron_h":
        return []
    version = version or import_transformers().__version__
    rule = hf_dt_rule(version)
    if rule is None:
        return [f"transformers {version} is not in the table of known dt rules (hybridtrt.validation.hf.HF_DT_RULES)"]
    ours = _interval(reference_limit)
    out = []
    for path, clamp in (("prefill", rule.prefill), ("decode", rule.decode), ("speculative tail", rule.tail)):
        if clamp is None:
            continue
        bounds = clamp_bounds(clamp, raw)
        if bounds != reference_limit:
            out.append(
                f"transformers {version} clamps {path} dt to {_interval(bounds)} where the reference clamps to "
                f"{ours} (DESIGN.md §3): expect differences wherever such a dt falls outside"
            )
    return out


def _interval(bounds: tuple[float, float]) -> str:
    lo, hi = bounds
    return f"[{lo:g}, {'∞' if math.isinf(hi) else f'{hi:g}'}]"


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """HF's own ``*ForCausalLM`` for the checkpoint: eager attention, the eager per-expert loop for
    MoE (the grouped-GEMM default takes no fp64), EOS disabled."""
    from hybridtrt.errors import CheckpointError
    from hybridtrt.models.modelopt import read_recipe

    # transformers 5.25 has no quantizer for quant_method "modelopt" (transformers/quantizers/auto.py): it would
    # take the FP8 / packed NVFP4 tensors for the weights (NVFP4: a size-mismatch error inside from_pretrained).
    declared = read_recipe(Path(path))
    if declared is not None:
        raise CheckpointError(
            f"{path} is a ModelOpt {declared[0].get('quant_algo')} checkpoint ({declared[1]}): HF transformers has no loader for "
            "ModelOpt's quantized weights (no 'modelopt' quantizer), so it cannot be the oracle here",
            fix="compare the BF16 release of the model with --reference hf (our reading of the quantized weights is checked "
            "against ModelOpt's own dequantization)",
        )
    transformers = import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", dtype=dtype
    )
    model.generation_config.eos_token_id = None
    return model.eval()


def _cache_arg(model: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


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
        self._cache_arg = _cache_arg(model)

    def zero_state(self, batch: int) -> Any:
        return None

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any, decode: bool):
        out = self._forward(input_ids, attention_mask, state)
        return out.logits[:, -1].float(), _cache_of(out)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any) -> Any:
        """One forward call; the cache argument is ``cache`` from transformers 5.24 on (``past_key_values`` before)."""
        return self.model(input_ids, attention_mask=attention_mask, use_cache=True, **{self._cache_arg: state})

    def named_states(self, state: Any) -> dict[str, torch.Tensor]:
        return hf_states(state, self.layer_types)


class RowwiseHfStepper(HfStepper):
    """`HfStepper` that runs each row of a left-padded batch on its own, without its padding.

    HF's eager attention adds ``finfo(dtype).min`` to masked scores; in fp64 a fully masked query
    (a left-padding position) overflows to -inf, softmax gives NaN, and HF's Mamba layers carry the
    NaN into the real tokens (``hidden * mask`` is NaN for NaN). Unpadded rows never meet that path.
    The state is one HF cache per row; KV states are re-padded on the left (with zeros, at
    positions no comparison reads).
    """

    def zero_state(self, batch: int) -> Any:
        return [None] * batch

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any, decode: bool):
        """As `HfStepper.step`; every row must have a real token in the call (validation's prefill
        and decode steps do: left padding only precedes a row's first token)."""
        logits, caches = [], []
        new = input_ids.shape[1]
        for row, cache in enumerate(state):
            real = attention_mask[row].bool()
            out = self._forward(input_ids[row : row + 1, real[-new:]], torch.ones(1, int(real.sum()), dtype=attention_mask.dtype), cache)
            logits.append(out.logits[:, -1].float())
            caches.append(_cache_of(out))
        return torch.cat(logits), caches

    def named_states(self, state: Any) -> dict[str, torch.Tensor]:
        rows = [hf_states(cache, self.layer_types) for cache in state]
        out = {}
        for name in rows[0]:
            tensors = [r[name] for r in rows]
            if name.startswith("present."):  # KV [1, H_kv, S_row, D]: left-pad to the longest row
                length = max(t.shape[2] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0)) for t in tensors]
            out[name] = torch.cat(tensors)
        return out
