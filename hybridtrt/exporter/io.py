"""Graph I/O names and shapes (DESIGN.md §6) — the one place that spells them.

Used by the exporter (to name graph inputs/outputs), the manifest, and every runtime backend (to
feed ``present_*`` back as ``past_*``), so the names can never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hybridtrt.models.config import ATTENTION, MAMBA, HybridConfig

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"

# Symbolic dimension names.
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "past+seq"


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


def state_specs(config: HybridConfig) -> list[StateSpec]:
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
            kv = (BATCH, c.num_key_value_heads, PAST, c.attention_head_dim)
            specs.append(StateSpec(i, "key", f"past_key_values.{i}.key", f"present.{i}.key", kv, "model"))
            specs.append(StateSpec(i, "value", f"past_key_values.{i}.value", f"present.{i}.value", kv, "model"))
    return specs


def input_names(config: HybridConfig) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK] + [s.past_name for s in state_specs(config)]


def output_names(config: HybridConfig) -> list[str]:
    return [LOGITS] + [s.present_name for s in state_specs(config)]


def present_shape(spec: StateSpec) -> tuple[int | str, ...]:
    """Output-side shape: KV grows by ``seq``."""
    return tuple(TOTAL if d == PAST else d for d in spec.shape)
