"""Model configuration parsed from an HF ``config.json``.

One parser per model family, held in a registry keyed by ``model_type`` (DESIGN.md §3). Block
letters: ``M`` Mamba-2 mixer, ``*`` attention, ``-`` MLP, ``E`` mixture of experts (Nemotron-3).

Nemotron-3 MoE fields (``E`` layers), against HF transformers' ``NemotronHMoE`` (the math we copy):

* supported: ``n_routed_experts`` (alias ``num_local_experts``), ``num_experts_per_tok``,
  ``moe_intermediate_size``, ``moe_shared_expert_intermediate_size``, ``n_shared_experts`` (0 or 1),
  ``n_group``, ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``, ``moe_latent_size``
  (latent MoE: ``fc1_latent_proj`` / ``fc2_latent_proj`` around the routed experts), ``mlp_bias``
  and ``mlp_hidden_act`` (``relu2``) for the experts as for the MLP;
* the multi-token-prediction head, not part of the main model: ``num_nextn_predict_layers`` and
  ``mtp_layers_block_type`` / ``mtp_hybrid_override_pattern`` (Nemotron-3 Super/Ultra:
  `HybridConfig.mtp_layers` / ``mtp_pattern``). The main model never reads the ``mtp.*`` tensors
  (HF transformers has no MTP module and drops them; the main model's logits do not depend on
  them); `hybridtrt.models.mtp` loads them as the draft head of speculative decoding;
* refused (`ConfigError` naming the field): ``n_shared_experts
  > 1`` (HF builds one shared MLP of ``moe_shared_expert_intermediate_size`` whatever the count,
  vLLM one of ``count × size``: ambiguous), sizes and groupings that make the router ill-defined;
* ignored, because they do not change the computation (as in HF): ``rope_theta`` /
  ``partial_rotary_factor`` (HF's ``NemotronHAttention`` applies no rotary embedding, nor does
  vLLM's), ``moe_shared_expert_overlap`` (a scheduling hint), ``output_router_logits`` (training),
  ``mtp_hybrid_override_pattern`` / ``mtp_layers_block_type`` while ``num_nextn_predict_layers``
  is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hybridtrt.errors import ConfigError

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
SUPPORTED_BLOCKS = (MAMBA, ATTENTION, MLP, MOE)

# HF spells block types several ways across releases; all map to our letters.
_BLOCK_NAMES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}


@dataclass(frozen=True)
class MoeConfig:
    """The ``E`` layers of a Nemotron-3 model (HF ``NemotronHMoE``).

    Attributes:
        num_experts: Routed experts ``E`` (``n_routed_experts``).
        top_k: Experts per token (``num_experts_per_tok``).
        intermediate_size: Routed expert width (``moe_intermediate_size``).
        shared_intermediate_size: Shared expert width; 0 = no shared expert (``n_shared_experts: 0``).
        latent_size: Latent MoE width (``moe_latent_size``): routed experts run on
            ``fc1_latent_proj(h)`` and their sum goes through ``fc2_latent_proj``; None = no latent.
        n_group: Expert groups for group-limited routing (``n_group``).
        topk_group: Groups a token may use (``topk_group``).
        norm_topk_prob: Normalise the selected experts' sigmoid scores to sum to 1.
        routed_scaling_factor: Multiplies the routing weights.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    latent_size: int | None
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


@dataclass(frozen=True)
class HybridConfig:
    """Everything the reference model and the exporter need, in one flat, validated record.

    Mamba sizes: ``d_inner = mamba_num_heads * mamba_head_dim``,
    ``conv_dim = d_inner + 2 * n_groups * ssm_state_size``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    layer_norm_epsilon: float
    tie_word_embeddings: bool
    residual_in_fp32: bool
    #: Nemotron-H multiplies the RMSNorm weight in fp32, plain Mamba-2 in the model dtype.
    norm_weight_in_fp32: bool
    # Mamba-2 mixer
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    use_conv_bias: bool
    mamba_bias: bool
    time_step_limit: tuple[float, float]
    # Attention
    num_attention_heads: int
    num_key_value_heads: int
    attention_head_dim: int
    # MLP
    intermediate_size: int
    mlp_bias: bool
    # Tokens
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    # Mixture of experts (``E`` layers); None when the model has none.
    moe: MoeConfig | None = None
    #: The dtype the checkpoint declares (``dtype``/``torch_dtype`` in config.json) as
    #: ``fp32 | fp16 | bf16``; None when it declares none we know. The export's default dtype.
    checkpoint_dtype: str | None = None
    #: Multi-token-prediction layers the checkpoint carries (``num_nextn_predict_layers``, tensors
    #: ``mtp.*``) and their block pattern (``mtp_hybrid_override_pattern``): not part of the main model,
    #: not read; 0 and "" without them.
    mtp_layers: int = 0
    mtp_pattern: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def pattern(self) -> str:
        return "".join(self.layer_types)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    def layers_of(self, kind: str) -> list[int]:
        """Decoder layer indices whose block letter is ``kind``."""
        return [i for i, t in enumerate(self.layer_types) if t == kind]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = self.pattern
        d["time_step_limit"] = [self.time_step_limit[0], _json_float(self.time_step_limit[1])]
        return d


def _json_float(v: float) -> float | str:
    return "inf" if math.isinf(v) else v


def _get(cfg: dict[str, Any], *names: str, default: Any = ...) -> Any:
    """First present key among ``names`` (HF renamed many fields over time)."""
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is ...:
        raise ConfigError(
            f"config.json has no {' / '.join(repr(n) for n in names)}",
            fix="use the config.json that came with the checkpoint (HF format)",
        )
    return default


def _int(cfg: dict[str, Any], *names: str, default: Any = ..., minimum: int = 1) -> int:
    """A whole-number field (HF writes ints; an integral float such as ``64.0`` is accepted).

    Raises:
        ConfigError: naming the field and its value when it is not a whole number ≥ ``minimum``.
    """
    value = _get(cfg, *names, default=default)
    name = next((n for n in names if cfg.get(n) is not None), names[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"{name}={value!r} in config.json is not a whole number", fix=f"set {name} to an integer ≥ {minimum}")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} in config.json must be ≥ {minimum}", fix=f"set {name} to an integer ≥ {minimum}")
    return int(value)


def _float(cfg: dict[str, Any], *names: str, default: Any = ...) -> float:
    """A real-number field; infinities as HF writes them (``{"__float__": "Infinity"}``) are decoded on load."""
    value = _get(cfg, *names, default=default)
    name = next((n for n in names if cfg.get(n) is not None), names[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name}={value!r} in config.json is not a number", fix=f"set {name} to a number")
    return float(value)


def _time_step_limit(cfg: dict[str, Any], *names: str) -> tuple[float, float]:
    """The ``dt`` clamp ``time_step_limit`` ``[lo, hi]`` (transformers writes ``[0.0, {"__float__": "Infinity"}]``;
    NemotronH also accepts it as ``mamba_dt_limit``); ``(0, inf)``, mamba_ssm's default, when absent."""
    value = _get(cfg, *(names or ("time_step_limit",)), default=None)
    if value is None:
        return 0.0, math.inf
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in value)
    if not ok or not 0 <= value[0] <= value[1]:
        raise ConfigError(
            f"time_step_limit={value!r} in config.json is not [lo, hi] with 0 ≤ lo ≤ hi",
            fix='write it as transformers does, e.g. [0.0, {"__float__": "Infinity"}]',
        )
    return float(value[0]), float(value[1])


def _single_token(value: Any) -> int | None:
    """``bos/eos/pad_token_id``: an int, a list of ints (the first counts) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"token id {value!r} in config.json is not a non-negative integer", fix="fix bos/eos/pad_token_id")
    return value


#: How transformers spells dtypes in config.json -> ours.
_HF_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _declared_dtype(cfg: dict[str, Any]) -> str | None:
    """``dtype`` (transformers ≥ 5) or ``torch_dtype`` (older) of config.json, as ours."""
    value = cfg.get("dtype", cfg.get("torch_dtype"))
    return _HF_DTYPES.get(value) if isinstance(value, str) else None


def decode_hf_floats(value: Any) -> Any:
    """Undo transformers' JSON encoding of non-finite floats (``{"__float__": "Infinity"}``), recursively."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            try:
                return float(value["__float__"])
            except ValueError:
                raise ConfigError(f"config.json has an unreadable float {value!r}") from None
        return {k: decode_hf_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_hf_floats(v) for v in value]
    return value


def _parse_pattern(cfg: dict[str, Any]) -> tuple[str, ...]:
    if "hybrid_override_pattern" in cfg and cfg["hybrid_override_pattern"]:
        letters = list(str(cfg["hybrid_override_pattern"]))
        source = "hybrid_override_pattern"
    elif cfg.get("layers_block_type"):
        names = cfg["layers_block_type"]
        unknown = sorted({n for n in names if n not in _BLOCK_NAMES})
        if unknown:
            raise ConfigError(
                f"layers_block_type has unknown block types {unknown}",
                fix=f"use one of {sorted(_BLOCK_NAMES)}",
            )
        letters = [_BLOCK_NAMES[n] for n in names]
        source = "layers_block_type"
    else:
        raise ConfigError(
            "config.json has neither 'hybrid_override_pattern' nor 'layers_block_type'",
            fix="a Nemotron-H config names its layer pattern, e.g. \"hybrid_override_pattern\": \"M-M*-M\"",
        )
    for i, letter in enumerate(letters):
        if letter not in SUPPORTED_BLOCKS:
            raise ConfigError(
                f"{source} has unknown block letter {letter!r} at layer {i}",
                fix="letters are M (Mamba-2), * (attention), - (MLP), E (mixture of experts)",
            )
    if not letters:
        raise ConfigError(f"{source} is empty", fix="the model needs at least one layer")
    return tuple(letters)


def _parse_moe(cfg: dict[str, Any]) -> MoeConfig:
    """The MoE fields of a Nemotron-3 config (see the module docstring for what is refused)."""
    shared = _int(cfg, "n_shared_experts", default=1, minimum=0)
    if shared not in (0, 1):
        raise ConfigError(
            f"n_shared_experts={shared} is not supported: HF transformers builds one shared expert of "
            "moe_shared_expert_intermediate_size whatever the count, vLLM one of count × that size",
            fix="use a checkpoint with n_shared_experts 0 or 1 (every Nemotron-3 checkpoint has 1)",
        )
    latent = _int(cfg, "moe_latent_size") if cfg.get("moe_latent_size") is not None else None
    return MoeConfig(
        num_experts=_int(cfg, "n_routed_experts", "num_local_experts"),
        top_k=_int(cfg, "num_experts_per_tok"),
        intermediate_size=_int(cfg, "moe_intermediate_size"),
        shared_intermediate_size=_int(cfg, "moe_shared_expert_intermediate_size") if shared else 0,
        latent_size=latent,
        n_group=_int(cfg, "n_group", default=1),
        topk_group=_int(cfg, "topk_group", default=1),
        norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=True)),
        routed_scaling_factor=_float(cfg, "routed_scaling_factor", default=1.0),
    )


def _validate_moe(m: MoeConfig) -> None:
    """Refuse MoE sizes for which HF's router is ill-defined (it would crash or pick masked experts)."""
    for field_name in ("num_experts", "top_k", "intermediate_size", "n_group", "topk_group"):
        value = getattr(m, field_name)
        if value < 1:
            raise ConfigError(f"MoE {field_name}={value} must be a positive integer")
    if m.latent_size is not None and m.latent_size < 1:
        raise ConfigError(f"moe_latent_size={m.latent_size} must be a positive integer or null")
    if m.shared_intermediate_size < 0:
        raise ConfigError(f"moe_shared_expert_intermediate_size={m.shared_intermediate_size} must be ≥ 0")
    if m.num_experts % m.n_group:
        raise ConfigError(
            f"n_routed_experts={m.num_experts} is not divisible by n_group={m.n_group}",
            fix="n_group must divide the number of routed experts",
        )
    if m.num_experts // m.n_group < 2:
        raise ConfigError(
            f"n_group={m.n_group} leaves {m.num_experts // m.n_group} expert per group; the router scores a "
            "group by its two best experts",
            fix="use at least 2 experts per group (n_routed_experts / n_group ≥ 2)",
        )
    if m.topk_group > m.n_group:
        raise ConfigError(f"topk_group={m.topk_group} exceeds n_group={m.n_group}", fix="topk_group ≤ n_group")
    reachable = m.topk_group * (m.num_experts // m.n_group)
    if m.top_k > reachable:
        raise ConfigError(
            f"num_experts_per_tok={m.top_k} exceeds the {reachable} experts of the topk_group={m.topk_group} "
            "groups a token may use",
            fix="num_experts_per_tok ≤ topk_group × n_routed_experts / n_group",
        )


def _parse_nemotron_h(cfg: dict[str, Any]) -> HybridConfig:
    layer_types = _parse_pattern(cfg)
    act = _get(cfg, "mlp_hidden_act", default="relu2")
    if act != "relu2":
        raise ConfigError(f"mlp_hidden_act={act!r} is not supported", fix="Nemotron-H MLPs use 'relu2'")
    if _get(cfg, "mamba_hidden_act", default="silu") != "silu":
        raise ConfigError(f"mamba_hidden_act={cfg['mamba_hidden_act']!r} is not supported", fix="use 'silu'")
    if cfg.get("attention_bias"):
        raise ConfigError(
            "attention_bias=true is not supported (Nemotron-H attention has no biases)",
            fix="set attention_bias to false if the checkpoint has no q/k/v/o biases",
        )
    heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    return HybridConfig(
        family="nemotron_h",
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        layer_types=layer_types,
        layer_norm_epsilon=_float(cfg, "layer_norm_epsilon", default=1e-5),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        # HF's NemotronHBlock keeps the residual in the model dtype whatever the config says.
        residual_in_fp32=False,
        norm_weight_in_fp32=True,
        mamba_num_heads=_int(cfg, "mamba_num_heads"),
        mamba_head_dim=_int(cfg, "mamba_head_dim"),
        ssm_state_size=_int(cfg, "ssm_state_size", default=128),
        n_groups=_int(cfg, "n_groups", "mamba_n_groups", default=8),
        conv_kernel=_int(cfg, "conv_kernel", "mamba_d_conv", default=4),
        chunk_size=_int(cfg, "chunk_size", "mamba_chunk_size", default=128),
        use_conv_bias=bool(_get(cfg, "use_conv_bias", "mamba_conv_bias", default=True)),
        mamba_bias=bool(_get(cfg, "use_bias", default=False)),
        # The dt rule of the served kernels (DESIGN.md §3): clamp to time_step_limit, never to
        # time_step_min (an initialisation range of dt_bias, as in mamba_ssm's Mamba2 dt_min).
        time_step_limit=_time_step_limit(cfg, "time_step_limit", "mamba_dt_limit"),
        num_attention_heads=heads,
        num_key_value_heads=_int(cfg, "num_key_value_heads", default=heads),
        attention_head_dim=_int(cfg, "head_dim", "attention_head_dim", default=hidden // heads),
        intermediate_size=_int(cfg, "intermediate_size", default=4 * hidden),
        mlp_bias=bool(_get(cfg, "mlp_bias", default=False)),
        bos_token_id=_single_token(cfg.get("bos_token_id")),
        eos_token_id=_single_token(cfg.get("eos_token_id")),
        pad_token_id=_single_token(cfg.get("pad_token_id")),
        moe=_parse_moe(cfg) if MOE in layer_types else None,
        **_parse_mtp(cfg),
    )


def _parse_mtp(cfg: dict[str, Any]) -> dict[str, Any]:
    """``mtp_layers`` / ``mtp_pattern`` of a Nemotron-H config (0 and "" without MTP layers).

    The pattern follows HF transformers' ``NemotronHConfig`` (transformers 5.25.0,
    models/nemotron_h/configuration_nemotron_h.py, ``__post_init__``): ``mtp_layers_block_type`` (a list of block names); the legacy
    ``mtp_hybrid_override_pattern`` string when the list is absent or HF's default; HF's default
    ``["full_attention", "moe"]`` (``*E``) when neither is given.
    """
    layers = _int(cfg, "num_nextn_predict_layers", default=0, minimum=0)
    if not layers:
        return {}
    names = cfg.get("mtp_layers_block_type")
    legacy = cfg.get("mtp_hybrid_override_pattern")
    default = ["full_attention", "moe"]
    if legacy is not None and (names is None or names == default):
        if not isinstance(legacy, str) or not legacy or any(letter not in SUPPORTED_BLOCKS for letter in legacy):
            raise ConfigError(f"mtp_hybrid_override_pattern={legacy!r} is not a block pattern", fix="letters are M, *, - and E (vLLM's NemotronH-MTP builds * and E)")
        return {"mtp_layers": layers, "mtp_pattern": legacy}
    names = default if names is None else names
    if not isinstance(names, list) or not names or any(n not in _BLOCK_NAMES for n in names):
        raise ConfigError(f"mtp_layers_block_type={names!r} is not a list of block types", fix=f"use a non-empty list of {sorted(_BLOCK_NAMES)}")
    return {"mtp_layers": layers, "mtp_pattern": "".join(_BLOCK_NAMES[n] for n in names)}


def _parse_mamba2(cfg: dict[str, Any]) -> HybridConfig:
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_heads")
    head_dim = _int(cfg, "head_dim")
    expand = _int(cfg, "expand", default=2)
    if hidden * expand != heads * head_dim:
        raise ConfigError(
            f"hidden_size*expand ({hidden * expand}) != num_heads*head_dim ({heads * head_dim})",
            fix="fix num_heads/head_dim/expand so that they agree",
        )
    if _get(cfg, "hidden_act", default="silu") != "silu":
        raise ConfigError(f"hidden_act={cfg['hidden_act']!r} is not supported", fix="use 'silu'")
    lo, hi = _time_step_limit(cfg)
    return HybridConfig(
        family="mamba2",
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        layer_types=(MAMBA,) * _int(cfg, "num_hidden_layers"),
        layer_norm_epsilon=_float(cfg, "layer_norm_epsilon", default=1e-5),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        residual_in_fp32=bool(_get(cfg, "residual_in_fp32", default=True)),
        norm_weight_in_fp32=False,
        mamba_num_heads=heads,
        mamba_head_dim=head_dim,
        ssm_state_size=_int(cfg, "state_size", default=128),
        n_groups=_int(cfg, "n_groups", default=8),
        conv_kernel=_int(cfg, "conv_kernel", default=4),
        chunk_size=_int(cfg, "chunk_size", default=256),
        use_conv_bias=bool(_get(cfg, "use_conv_bias", default=True)),
        mamba_bias=bool(_get(cfg, "use_bias", default=False)),
        time_step_limit=(lo, hi),
        num_attention_heads=0,
        num_key_value_heads=0,
        attention_head_dim=0,
        intermediate_size=0,
        mlp_bias=False,
        bos_token_id=_single_token(cfg.get("bos_token_id")),
        eos_token_id=_single_token(cfg.get("eos_token_id")),
        pad_token_id=_single_token(cfg.get("pad_token_id")),
    )


#: model_type -> parser. Add a family by adding a parser here (and its weight names in loading.py).
CONFIG_PARSERS: dict[str, Callable[[dict[str, Any]], HybridConfig]] = {
    "nemotron_h": _parse_nemotron_h,
    "mamba2": _parse_mamba2,
}


def _validate(c: HybridConfig) -> HybridConfig:
    if not c.layer_norm_epsilon > 0:
        raise ConfigError(f"layer_norm_epsilon={c.layer_norm_epsilon} must be > 0", fix="use the checkpoint's value (e.g. 1e-5)")
    if MAMBA in c.layer_types:
        if c.mamba_num_heads % c.n_groups:
            raise ConfigError(
                f"mamba_num_heads={c.mamba_num_heads} is not divisible by n_groups={c.n_groups}",
                fix="n_groups must divide the number of Mamba heads",
            )
        if c.d_inner % c.n_groups:
            raise ConfigError(f"d_inner={c.d_inner} is not divisible by n_groups={c.n_groups}")
        if c.chunk_size < 1 or c.conv_kernel < 1:
            raise ConfigError(f"chunk_size={c.chunk_size}, conv_kernel={c.conv_kernel} must be ≥ 1")
    if ATTENTION in c.layer_types:
        if c.num_key_value_heads < 1 or c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={c.num_key_value_heads}",
                fix="GQA needs num_attention_heads % num_key_value_heads == 0",
            )
    if MOE in c.layer_types:
        assert c.moe is not None, "a config with E layers must carry MoeConfig"
        _validate_moe(c.moe)
    return c


def config_from_dict(cfg: dict[str, Any]) -> HybridConfig:
    """Parse an HF config dict. Raises `ConfigError` for anything unsupported."""
    cfg = decode_hf_floats(cfg)
    model_type = cfg.get("model_type")
    parser = CONFIG_PARSERS.get(model_type)  # type: ignore[arg-type]
    if parser is None:
        raise ConfigError(
            f"model_type={model_type!r} is not supported",
            fix=f"supported model types: {', '.join(sorted(CONFIG_PARSERS))}",
        )
    return _validate(dataclasses.replace(parser(cfg), checkpoint_dtype=_declared_dtype(cfg)))


def dt_clamp_bounds(cfg: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The ``(lo, hi)`` of each dt clamp some implementation applies, for a NemotronH config dict:
    ``time_step_limit`` (the reference's, DESIGN.md §3), ``[time_step_min, inf)`` (older HF
    releases) and ``none``; names as `hybridtrt.validation.hf.DtClamp`."""
    cfg = decode_hf_floats(cfg)
    return {
        "time_step_limit": _time_step_limit(cfg, "time_step_limit", "mamba_dt_limit"),
        "time_step_min": (_float(cfg, "time_step_min", "mamba_dt_min", default=0.001), math.inf),
        "none": (0.0, math.inf),
    }


#: Largest config.json read (HF configs are a few KiB; the biggest carry a tokenizer-sized vocab list).
MAX_CONFIG_BYTES = 16 * 2**20


def read_config_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``checkpoint_dir/config.json`` as a dict, or a `ConfigError` naming what is wrong with it.

    Read through `hybridtrt.reading.read_json`: a FIFO or ``/dev/zero`` in its place, a file over
    `MAX_CONFIG_BYTES`, binary bytes, JSON nested deeper than the cap or a number Python will not parse
    are refused before anything is allocated. Bare ``Infinity``/``NaN`` tokens are accepted (HF writes
    them); the field parsers refuse a NaN where a number is needed.
    """
    from hybridtrt.reading import expect_object, read_json

    path = Path(checkpoint_dir) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"no config.json in {checkpoint_dir}", fix="point at an HF checkpoint directory")
    fix = "use the config.json that came with the checkpoint"
    cfg = read_json(path, what="config", error=ConfigError, fix=fix, limit=MAX_CONFIG_BYTES, allow_nonfinite=True)
    return expect_object(cfg, source=str(path), error=ConfigError, fix=fix)


def load_config(checkpoint_dir: str | Path) -> HybridConfig:
    """Read ``checkpoint_dir/config.json``."""
    return config_from_dict(read_config_json(checkpoint_dir))
