"""Which yardstick runs beside a judgement (DESIGN.md §8).

A gate allows ``ratio ×`` the yardstick's distance from the truth, so the yardstick must not share
the systematic error of the thing judged; otherwise the bound grows with the very error it should
catch (a reference with a wrong dt rule, judged against HF with the reference's own fp64 run as
yardstick, passed at 4× its own gap). The rule: **the yardstick runs the truth's own code at another
precision**.

- An artefact (ONNX Runtime, TensorRT, recorded outputs) is judged against our PyTorch reference: the
  yardstick is the reference in fp64 (fp32 artefacts) or in the artefact's half dtype.
- Our reference is judged against HF transformers (oracle #2): the yardstick is HF in fp64, whose
  distance from HF fp32 is HF's own fp32 rounding, independent of anything we wrote.
- An FP8 artefact is judged against the FP8 reference (our reference with the export's Q/DQ, in
  fp32): the yardstick is the FP8 reference in the export's dtype; for an fp32 export, the fp32 FP8
  reference with a 2^-16 dither before every quantizer (`hybridtrt.exporter.fp8_reference.Dither`:
  fp64 flips FP8 roundings almost never, another fp32 kernel now and then, each flip carried on). The
  recipe's cost (``fp8-recipe``: the FP8 reference against the unquantized truth) has as yardstick
  the same layers quantized with ideal per-call scales, which share no calibrated number.
- An NVFP4 artefact with FP4 activations (``nvfp4-w4a4``) is judged like an FP8 one: against the 4-bit
  reference with its activations quantized per call, the yardstick that reference in the export's dtype
  (fp32 exports: dithered by 2^-16 before every quantizer).
- A 4-bit INT4 recipe's cost (``int4-recipe``: the 4-bit weights' reference against the unquantized
  truth) has as yardstick the same layers rounded to nearest at the same blocks, without AWQ's
  calibrated pre-quant scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hybridtrt.judge.tolerances import yardstick_of

#: What is judged: an exported artefact against our reference, or our reference against HF.
Judged = Literal["artefact", "reference"]


@dataclass(frozen=True)
class Yardstick:
    """A second run of the truth's implementation.

    Attributes:
        implementation: ``"reference"`` (our PyTorch model) or ``"hf"`` (HF transformers).
        dtype: ``"fp64" | "fp16" | "bf16"``.
    """

    implementation: Literal["reference", "hf"]
    dtype: str
    #: Which FP8 emulation the reference runs: ``"recipe"`` (the export's scales), ``"dithered"``
    #: (the same with `hybridtrt.exporter.fp8_reference.Dither`), ``"dynamic"`` (ideal per-call
    #: scales on the same layers), None (unquantized).
    fp8: Literal["recipe", "dithered", "dynamic"] | None = None
    #: ``"rtn"``: the export's 4-bit layers rounded to nearest at the same blocks (no AWQ scales).
    weights: Literal["rtn"] | None = None
    #: The quantized activations' format in the name (``fp8``; ``nvfp4-w4a4`` for FP4 activations).
    activations: str = "fp8"

    @property
    def name(self) -> str:
        a = self.activations
        fp8 = {"recipe": f"{a}-", "dithered": f"{a}-", "dynamic": f"{a}-dynamic-"}.get(self.fp8 or "", "")
        fp8 += "int4-rtn-" if self.weights == "rtn" else ""
        suffix = "-dithered" if self.fp8 == "dithered" else ""
        return f"{'pytorch' if self.implementation == 'reference' else 'hf'}-{fp8}{self.dtype}{suffix}"


def yardstick_for(judged: Judged, precision: str, export_dtype: str = "fp32") -> Yardstick | None:
    """The yardstick of judging ``judged`` at ``precision`` (None: the floors alone gate);
    ``export_dtype`` is the artefact's model dtype (FP8 artefacts compute in it around the Q/DQ)."""
    if judged == "reference":
        return Yardstick("hf", "fp64")
    subject = yardstick_of(precision)
    if subject == "export":  # an fp32 FP8 (or FP4-activation) export: an fp32 run that flips roundings as another fp32 kernel would
        activations = "nvfp4-w4a4" if precision == "nvfp4-w4a4" else "fp8"
        return Yardstick("reference", export_dtype, fp8="dithered" if export_dtype == "fp32" else "recipe", activations=activations)
    if subject == "fp8-dynamic":
        return Yardstick("reference", "fp32", fp8="dynamic")
    if subject == "int4-rtn":
        return Yardstick("reference", "fp32", weights="rtn")
    return None if subject is None else Yardstick("reference", subject)
