"""Graph I/O names and shapes (DESIGN.md §6) — the one place that spells them.

Used by the exporter (to name graph inputs/outputs), the manifest, and every runtime backend (to
feed ``present_*`` back as ``past_*``), so the names can never drift apart.

Two KV-cache flavours share the state names:

========================  ==========================================  ==========================
flavour                   position inputs                             KV state
========================  ==========================================  ==========================
``dynamic`` (default)     ``attention_mask [B, past + L]``            ``[B, H_kv, past, D]``,
                                                                      grows by L (concatenated)
``static``                ``cache_position [B]``,                     ``[B, H_kv, N, D]``, N =
                          ``padding_length [B]``                      ``max_cache_len``, written
                                                                      in place (TensorScatter)
========================  ==========================================  ==========================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from hybridtrt.models.config import ATTENTION, MAMBA, HybridConfig

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
CACHE_POSITION = "cache_position"
PADDING_LENGTH = "padding_length"
LOGITS = "logits"
#: The final hidden states after ``norm_f`` (what the LM head reads; the MTP head's input), an
#: output of speculative exports (`export --speculative`).
HIDDEN_STATES = "last_hidden_state"
#: The MTP graph's own output hidden state (``mtp.onnx``: what a chained draft reads).
MTP_HIDDEN_OUT = "mtp_hidden_state"

# Symbolic dimension names.
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "past+seq"

DYNAMIC, STATIC = "dynamic", "static"


@dataclass(frozen=True)
class CacheFlavour:
    """How a graph holds its KV cache.

    Attributes:
        kind: ``"dynamic"`` (grows, ``attention_mask`` input) or ``"static"`` (fixed capacity,
            ``cache_position``/``padding_length`` inputs, in-place writes).
        max_cache_len: Capacity ``N`` of a static cache (positions, padding included); None for
            the dynamic flavour.
    """

    kind: Literal["dynamic", "static"] = DYNAMIC
    max_cache_len: int | None = None

    @property
    def static(self) -> bool:
        return self.kind == STATIC

    def position_inputs(self) -> list[str]:
        """Graph inputs between ``input_ids`` and the states."""
        return [CACHE_POSITION, PADDING_LENGTH] if self.static else [ATTENTION_MASK]


DYNAMIC_CACHE = CacheFlavour()


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state of one decoder layer.

    Attributes:
        layer: Decoder layer index.
        kind: ``"conv" | "ssm" | "key" | "value"``.
        past_name / present_name: Graph input / output names.
        shape: Dims with symbolic names for dynamic axes (input side; the KV output has ``past+seq``).
        dtype: ``"model"`` or ``"state"`` — resolved against the export's dtypes.
    """

    layer: int
    kind: str
    past_name: str
    present_name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def state_specs(config: HybridConfig, flavour: CacheFlavour = DYNAMIC_CACHE) -> list[StateSpec]:
    """All states in graph order: by layer index; conv before ssm, key before value."""
    c = config
    specs: list[StateSpec] = []
    for i, kind in enumerate(c.layer_types):
        if kind == MAMBA:
            specs.append(StateSpec(i, "conv", f"past_conv_state.{i}", f"present_conv_state.{i}", (BATCH, c.conv_dim, c.conv_kernel), "model"))
            specs.append(
                StateSpec(
                    i,
                    "ssm",
                    f"past_ssm_state.{i}",
                    f"present_ssm_state.{i}",
                    (BATCH, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size),
                    "state",
                )
            )
        elif kind == ATTENTION:
            length = flavour.max_cache_len if flavour.static else PAST
            kv = (BATCH, c.num_key_value_heads, length, c.attention_head_dim)
            specs.append(StateSpec(i, "key", f"past_key_values.{i}.key", f"present.{i}.key", kv, "model"))
            specs.append(StateSpec(i, "value", f"past_key_values.{i}.value", f"present.{i}.value", kv, "model"))
    return specs


def input_names(config: HybridConfig, flavour: CacheFlavour = DYNAMIC_CACHE) -> list[str]:
    return [INPUT_IDS, *flavour.position_inputs()] + [s.past_name for s in state_specs(config, flavour)]


def output_names(config: HybridConfig, per_layer: bool = False, hidden: bool = False) -> list[str]:
    layers = [f"layer_output.{i}" for i in range(config.num_layers)] if per_layer else []
    return [LOGITS] + [s.present_name for s in state_specs(config)] + layers + ([HIDDEN_STATES] if hidden else [])


def present_shape(spec: StateSpec) -> tuple[int | str, ...]:
    """Output-side shape: a dynamic KV grows by ``seq``; every other state keeps its shape."""
    return tuple(TOTAL if d == PAST else d for d in spec.shape)


def io_shapes(
    config: HybridConfig, logits: str, decode: bool, per_layer: bool, flavour: CacheFlavour = DYNAMIC_CACHE, hidden: bool = False
) -> dict[str, tuple[int | str, ...]]:
    """Every graph input/output name -> its shape with symbolic dims (DESIGN.md §6)."""
    c = config
    seq: int | str = 1 if decode else SEQ
    positions = {CACHE_POSITION: (BATCH,), PADDING_LENGTH: (BATCH,)} if flavour.static else {ATTENTION_MASK: (BATCH, TOTAL)}
    shapes: dict[str, tuple[int | str, ...]] = {
        INPUT_IDS: (BATCH, seq),
        **positions,
        LOGITS: (BATCH, c.vocab_size) if logits == "last" else (BATCH, seq, c.vocab_size),
    }
    for spec in state_specs(c, flavour):
        shapes[spec.past_name] = spec.shape
        shapes[spec.present_name] = present_shape(spec)
    if per_layer:
        for i in range(c.num_layers):
            shapes[f"layer_output.{i}"] = (BATCH, seq, c.hidden_size)
    if hidden:
        shapes[HIDDEN_STATES] = (BATCH, seq, c.hidden_size)
    return shapes


#: The first default-domain opset with ``TensorScatter`` (the static cache's in-place write).
STATIC_MIN_OPSET = 24


def cache_flavour(kind: str, max_cache_len: int | None, opset: int) -> CacheFlavour:
    """The flavour an export asked for (``--kv-cache``, ``--max-cache-len``, ``--opset``), checked.

    Raises:
        ExportError: An unknown kind, a static cache without a positive capacity, a capacity on a
            dynamic cache, or an opset without ``TensorScatter``.
    """
    from hybridtrt.errors import ExportError

    if kind not in (DYNAMIC, STATIC):
        raise ExportError(f"--kv-cache {kind!r} is not a KV-cache flavour", fix=f"use --kv-cache {DYNAMIC} or --kv-cache {STATIC}")
    if kind == DYNAMIC:
        if max_cache_len is not None:
            raise ExportError(f"--max-cache-len {max_cache_len} only applies to --kv-cache static", fix="add --kv-cache static, or drop --max-cache-len")
        return DYNAMIC_CACHE
    if max_cache_len is None or max_cache_len < 1:
        raise ExportError(
            f"--kv-cache static needs --max-cache-len N ≥ 1 (the KV capacity: prompt, padding and new tokens), got {max_cache_len}",
            fix="e.g. --kv-cache static --max-cache-len 4096",
        )
    if opset < STATIC_MIN_OPSET:
        raise ExportError(
            f"--kv-cache static writes the cache with TensorScatter, which needs opset ≥ {STATIC_MIN_OPSET}, got --opset {opset}",
            fix=f"use --opset {STATIC_MIN_OPSET} (the default) or the dynamic cache",
        )
    return CacheFlavour(STATIC, max_cache_len)
