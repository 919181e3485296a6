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
#: Type variable of each input/output name: x/y share T, states share S, dt, B/C and A/D their own.
_TYPE_OF = {
    "x": "T",
    "y": "T",
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
    ("T", _FLOATS, "activations x and output y"),
    ("Tdt", _FLOATS, "final step size dt"),
    ("Tbc", _FLOATS, "B and C"),
    ("F", ["tensor(float)"], "A and D, fp32"),
    ("S", _FLOATS, "SSM state"),
]


def _outputs_like(inputs: tuple[str, ...], outputs: tuple[str, ...]):
    """Type and shape inference: each output has the type and shape of the input it mirrors
    (``y`` ← ``x``, ``final_state``/``new_state`` ← ``initial_state``/``state``, DESIGN.md §5)."""
    mirrors = {"y": "x", "final_state": "initial_state", "new_state": "state"}
    sources = [inputs.index(mirrors[o]) for o in outputs]

    def infer(ctx: onnx.shape_inference.InferenceContext) -> None:
        for out, source in enumerate(sources):
            if ctx.has_input(source):
                ctx.set_output_type(out, ctx.get_input_type(source))

    return infer


def _schema(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], attrs: tuple[str, ...], doc: str) -> OpSchema:
    schema = OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        doc=doc,
        inputs=[OpSchema.FormalParameter(n, _TYPE_OF[n]) for n in inputs],
        outputs=[OpSchema.FormalParameter(n, _TYPE_OF[n]) for n in outputs],
        type_constraints=_CONSTRAINTS,
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
    schema.set_type_and_shape_inference_function(_outputs_like(inputs, outputs))
    return schema


def register_schemas() -> None:
    """Register both op schemas with ``onnx.defs`` once per process."""
    specs = [
        (CHUNK_SCAN, CHUNK_SCAN_INPUTS, CHUNK_SCAN_OUTPUTS, CHUNK_SCAN_ATTRS, "Mamba-2 chunked SSD scan (prefill)."),
        (STATE_UPDATE, STATE_UPDATE_INPUTS, STATE_UPDATE_OUTPUTS, STATE_UPDATE_ATTRS, "Mamba-2 one-token state update."),
    ]
    for name, ins, outs, attrs, doc in specs:
        if not onnx.defs.has(name, DOMAIN):
            onnx.defs.register_schema(_schema(name, ins, outs, attrs, doc))
