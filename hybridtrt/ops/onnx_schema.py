"""ONNX operator schemas for the ``hybridtrt`` custom ops (DESIGN.md §5).

Registering the schemas lets the exporter emit the ops with their declared outputs, and lets
``onnx.checker`` and shape inference validate nodes against the contract. Registration is
idempotent and process-wide.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from hybridtrt.ops.onnx_functions import (
    CHUNK_SCAN,
    CHUNK_SCAN_ATTRS,
    CHUNK_SCAN_INPUTS,
    CHUNK_SCAN_OUTPUTS,
    DOMAIN,
    DOMAIN_VERSION,
    STATE_UPDATE,
    STATE_UPDATE_ATTRS,
    STATE_UPDATE_INPUTS,
    STATE_UPDATE_OUTPUTS,
)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
#: Type variable of each input/output name: states share S; x, dt, B/C their own; A, D and y are fp32.
_TYPE_OF = {
    "x": "T",
    "y": "F",
    "dt": "Tdt",
    "A": "F",
    "D": "F",
    "B": "Tbc",
    "C": "Tbc",
    "initial_state": "S",
    "final_state": "S",
    "state": "S",
    "new_state": "S",
}
_CONSTRAINTS = [
    ("T", _FLOATS, "activations x"),
    ("Tdt", _FLOATS, "final step size dt"),
    ("Tbc", _FLOATS, "B and C"),
    ("F", ["tensor(float)"], "A, D and the output y: fp32"),
    ("S", _FLOATS, "SSM state"),
]


def _outputs_like(inputs: tuple[str, ...], outputs: tuple[str, ...], type_of: dict[str, str]):
    """Type and shape inference: each output has the shape of the input it mirrors (``y`` ← ``x``,
    ``final_state``/``new_state`` ← ``initial_state``/``state``) and its type, except an output of
    the fp32 type variable ``F`` (the scan ops' ``y``, DESIGN.md §5), which is float32 whatever
    ``x``'s type; the MoE ops' ``y`` has ``x``'s type."""
    mirrors = {"y": "x", "final_state": "initial_state", "new_state": "state"}
    sources = [inputs.index(mirrors[o]) for o in outputs]
    fp32 = [type_of[o] == "F" for o in outputs]

    def infer(ctx: onnx.shape_inference.InferenceContext) -> None:
        for out, source in enumerate(sources):
            known = ctx.get_input_type(source) if ctx.has_input(source) else None
            if known is not None:  # else left unknown, as ONNX's own ops do
                t = onnx.TypeProto()
                t.CopyFrom(known)
                if fp32[out]:
                    t.tensor_type.elem_type = onnx.TensorProto.FLOAT
                ctx.set_output_type(out, t)

    return infer


def _schema(
    name: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    attrs: tuple[str, ...],
    doc: str,
    type_of: dict[str, str] = _TYPE_OF,
    constraints: list[tuple[str, list[str], str]] = _CONSTRAINTS,
) -> OpSchema:
    schema = OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        doc=doc,
        inputs=[OpSchema.FormalParameter(n, type_of[n]) for n in inputs],
        outputs=[OpSchema.FormalParameter(n, type_of[n]) for n in outputs],
        type_constraints=constraints,
        attributes=[
            OpSchema.Attribute(
                a,
                OpSchema.AttrType.INT if a == "chunk_size" else OpSchema.AttrType.STRING,
                f"{a} (see DESIGN.md §5)",
                required=a == "chunk_size",
            )
            for a in attrs
        ],
    )
    schema.set_type_and_shape_inference_function(_outputs_like(inputs, outputs, type_of))
    return schema


def register_schemas() -> None:
    """Register the op schemas (scan ops and MoE ops) with ``onnx.defs`` once per process."""
    specs = [
        (CHUNK_SCAN, CHUNK_SCAN_INPUTS, CHUNK_SCAN_OUTPUTS, CHUNK_SCAN_ATTRS, "Mamba-2 chunked SSD scan (prefill)."),
        (STATE_UPDATE, STATE_UPDATE_INPUTS, STATE_UPDATE_OUTPUTS, STATE_UPDATE_ATTRS, "Mamba-2 one-token state update."),
    ]
    for name, ins, outs, attrs, doc in specs:
        if not onnx.defs.has(name, DOMAIN):
            onnx.defs.register_schema(_schema(name, ins, outs, attrs, doc))
    for schema in _moe_schemas():
        if not onnx.defs.has(schema.name, DOMAIN):
            onnx.defs.register_schema(schema)


#: MoE ops (hybridtrt/ops/moe_onnx.py): type variable of each input/output name.
_MOE_TYPE_OF = {
    "x": "T",
    "y": "T",
    "topk_indices": "I",
    "topk_weights": "F",
    "up_proj": "W",
    "down_proj": "W",
    "up_weight_scale": "F",
    "up_input_scale": "F",
    "down_weight_scale": "F",
    "down_input_scale": "F",
    "up_codes": "C",
    "down_codes": "C",
    "up_block_scale": "S",
    "down_block_scale": "S",
    "up_global_scale": "F",
    "down_global_scale": "F",
}


def _moe_schemas() -> list[OpSchema]:
    """Schemas of ``MoeExperts`` (weights in x's dtype), ``MoeExpertsFp8`` (float8e4m3fn weights) and
    ``MoeExpertsNvfp4`` (packed E2M1 codes, float8e4m3fn block scales)."""
    from hybridtrt.ops.moe_onnx import (
        MOE_EXPERTS,
        MOE_EXPERTS_ATTRS,
        MOE_EXPERTS_FP8,
        MOE_EXPERTS_FP8_INPUTS,
        MOE_EXPERTS_INPUTS,
        MOE_EXPERTS_NVFP4,
        MOE_EXPERTS_NVFP4_INPUTS,
        MOE_EXPERTS_OUTPUTS,
    )

    constraints = [
        ("T", _FLOATS, "activations x and output y"),
        ("I", ["tensor(int64)"], "selected experts"),
        ("F", ["tensor(float)"], "routing weights and FP8 scales, fp32"),
    ]
    return [
        _schema(name, inputs, MOE_EXPERTS_OUTPUTS, MOE_EXPERTS_ATTRS, doc, _MOE_TYPE_OF, [*constraints, ("W", weights, "expert weights")])
        for name, inputs, weights, doc in (
            (MOE_EXPERTS, MOE_EXPERTS_INPUTS, _FLOATS, "MoE routed relu² experts (Nemotron-3)."),
            (MOE_EXPERTS_FP8, MOE_EXPERTS_FP8_INPUTS, ["tensor(float8e4m3fn)"], "MoE routed relu² experts, FP8 weights."),
        )
    ] + [
        _schema(MOE_EXPERTS_NVFP4, MOE_EXPERTS_NVFP4_INPUTS, MOE_EXPERTS_OUTPUTS, MOE_EXPERTS_ATTRS, "MoE routed relu² experts, NVFP4 weights (W4A16).", _MOE_TYPE_OF,
                [*constraints, ("C", ["tensor(uint8)"], "packed E2M1 codes"), ("S", ["tensor(float8e4m3fn)"], "NVFP4 block scales")]),
    ]  # fmt: skip
