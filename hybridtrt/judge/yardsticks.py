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

    @property
    def name(self) -> str:
        return f"{'pytorch' if self.implementation == 'reference' else 'hf'}-{self.dtype}"


def yardstick_for(judged: Judged, precision: str) -> Yardstick | None:
    """The yardstick of judging ``judged`` at ``precision`` (None: the floors alone gate)."""
    if judged == "reference":
        return Yardstick("hf", "fp64")
    dtype = yardstick_of(precision)
    return None if dtype is None else Yardstick("reference", dtype)
