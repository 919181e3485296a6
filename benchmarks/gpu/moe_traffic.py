"""Byte and FLOP model of one routed-experts (MoE) layer call: the grouped-GEMM kernels of issue 26 (plugins/kernels/src/moeExperts.cu), the
function bodies TensorRT and ONNX Runtime run today, and the ideal, for Nemotron-3-Nano-30B-A3B and
Nemotron-3-Super-120B-A12B.

    python benchmarks/gpu/moe_traffic.py [--tokens 1 8 64 2048] [--formats bf16 fp8 nvfp4]

No GPU needed. One call of a MoE layer on ``T`` tokens (decode: ``T`` = batch; prefill: a 2,048-token chunk),
top-``k`` of ``E`` experts, expert width ``I``, expert input ``D`` (the hidden size; Super's latent size 1024),
under uniform routing (each token picks ``k`` distinct experts uniformly; trained routers are skewed, which
lowers ``A`` and raises ``C`` below):

- ``P = T·k`` (token, expert) pairs; ``A = E·(1 − (1 − k/E)^T)`` experts chosen by at least one token
  (expected value, exact under uniform routing); ``C`` = the most pairs any expert gets (expected maximum of
  ``E`` binomials ``B(T, k/E)``, treating the experts as independent).
- Weight bytes of one expert: ``2·I·D`` elements at ``w`` bytes (bf16 2; fp8 1, its per-expert scale
  negligible; NVFP4 0.5 + 1/16 for its FP8 block scales, its global scale negligible).

Designs, bytes read + written in DRAM per call (every op's output written once and read once by its consumer,
nothing kept in L2 between kernels; pointwise chains counted as one fused kernel):

- **ideal**: each chosen expert's weights read once (``A·W``), ``x`` read and ``y`` written once.
- **plugin** (issue 26's contract, DESIGN.md §5): routing on device (ids and weights read, a per-expert
  histogram, the ``P`` pair permutation written and read twice), the up GEMM gathers ``x`` rows in its
  prologue (``P·D`` activations read), writes ``h = relu(up·x)²`` (bf16; FP8 experts: quantized to fp8 in the
  epilogue), the down GEMM reads it and writes each pair's fp32 output, the combine reads those and writes
  ``y``. Each chosen expert's weights are read once: the weight term equals the ideal's.
- **function body** (`hybridtrt.ops.moe_onnx`, what TensorRT builds of ``MoeExperts`` without the plugin, and
  ONNX Runtime runs): the one-hot dispatch (``[P, E]`` fp32 planes), ``x`` scattered into ``[A, C, D]``
  zero-padded blocks, ``Gather`` of the chosen experts' weights (a materialized copy: read, written, read
  again by the MatMul — 3× the ideal weight bytes), the MatMuls on the padded blocks, the transposed output
  gathered back per pair and summed in fp32. FP8 (``MoeExpertsFp8``) casts all ``E`` experts' weights to
  fp32 before gathering (TensorRT does not build it: ONNX Runtime's cost). NVFP4 (``MoeExpertsNvfp4``)
  gathers the chosen experts' packed codes, then unpacks them through int64 indices into an fp32 table
  lookup (ONNX Runtime's cost; TensorRT needs the plugin).

FLOPs: the GEMMs only (``2·rows·I·D`` per projection): ideal and plugin ``P`` rows, the function body
``A·C`` rows (its padding), the dense fallback body (``MoeExpertsDense``) ``E·T``.

It ranks designs; it is not a timing. A GPU measurement needs the plugin's kernels (issue 26, not written
yet): until then nothing here is GPU-verified.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hybridtrt.models.architectures import ARCHITECTURES  # noqa: E402

#: Bytes per weight element, by expert format.
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}
ACT = 2  #: bf16 activations
F32 = 4
INDEX = 8  #: int64 expert ids (the graph's ``topk_indices``)
PERM = 4  #: int32 permutation entries in the plugin's workspace


@dataclass(frozen=True)
class Layer:
    """One MoE layer's shapes: ``E`` experts, top-``k``, expert width ``I``, expert input ``D``."""

    name: str
    experts: int
    top_k: int
    inner: int
    dim: int

    @classmethod
    def of(cls, architecture: str) -> Layer:
        c = ARCHITECTURES[architecture]
        dim = c.get("moe_latent_size") or c["hidden_size"]
        return cls(architecture, c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], dim)


def chosen_experts(e: int, k: int, t: int) -> float:
    """Expected number of experts some token chose: ``E·(1 − (1 − k/E)^T)``."""
    return e * (1.0 - (1.0 - k / e) ** t)


def capacity(e: int, k: int, t: int) -> float:
    """Expected largest pair count of one expert: E[max of ``E`` independent ``B(T, k/E)``]."""
    p = k / e
    cdf, total = 0.0, 0.0
    for c in range(t + 1):
        cdf += math.comb(t, c) * p**c * (1 - p) ** (t - c)
        total += 1.0 - min(cdf, 1.0) ** e  # P(max > c)
        if 1.0 - min(cdf, 1.0) ** e < 1e-12:
            break
    return total


@dataclass(frozen=True)
class Call:
    """One call: expected pair, expert and capacity counts for ``tokens`` tokens."""

    layer: Layer
    tokens: int
    fmt: str

    @property
    def pairs(self) -> int:
        return self.tokens * self.layer.top_k

    @property
    def active(self) -> float:
        return chosen_experts(self.layer.experts, self.layer.top_k, self.tokens)

    @property
    def cap(self) -> float:
        return max(1.0, capacity(self.layer.experts, self.layer.top_k, self.tokens))

    @property
    def matrix(self) -> int:
        """Elements of one projection of one expert (``I·D``)."""
        return self.layer.inner * self.layer.dim

    @property
    def expert_bytes(self) -> float:
        return 2 * self.matrix * WEIGHT_BYTES[self.fmt]


def ideal(c: Call) -> float:
    return c.active * c.expert_bytes + 2 * c.tokens * c.layer.dim * ACT


def plugin(c: Call) -> float:
    d, i, p, t, e = c.layer.dim, c.layer.inner, c.pairs, c.tokens, c.layer.experts
    routing = p * (INDEX + F32) + 2 * e * F32 + 3 * p * PERM
    h = 2 * p * i * (1 if c.fmt == "fp8" else ACT)
    per_pair = 2 * p * d * F32
    return c.active * c.expert_bytes + routing + p * d * ACT + h + per_pair + p * F32 + t * d * ACT


def function_body(c: Call) -> float:
    d, i, p, t, e = c.layer.dim, c.layer.inner, c.pairs, c.tokens, c.layer.experts
    a, cap = c.active, c.cap
    rows = a * cap
    dispatch = p * e * F32 * 5 + p * (INDEX + F32) + e * F32 * 4  # one-hot, its sum, cumsum (read+write), gather
    blocks = rows * d * ACT * 2 + p * d * ACT + t * d * ACT  # zero blocks written, scattered into; x rows read
    if c.fmt == "bf16":
        weights = 3 * a * 2 * c.matrix * ACT  # gathered copy: read, write, read by the MatMul
    elif c.fmt == "fp8":
        weights = 2 * (e * c.matrix * (1 + F32) + a * c.matrix * F32 * 2 + a * c.matrix * F32 * 2 + a * c.matrix * F32)
    else:  # nvfp4: gather packed codes, unpack (uint8 nibbles, int64 indices), table lookup, scale, cast
        codes = a * c.matrix / 2
        unpack = codes * 2 + a * c.matrix * (1 + 1) + a * c.matrix * (1 + INDEX) + a * c.matrix * (INDEX + F32)
        scales = e * c.matrix / 16 * (1 + F32) + a * c.matrix / 16 * F32 * 2
        weights = 2 * (codes * 2 + unpack + scales + a * c.matrix * F32 * 2 + a * c.matrix * (F32 + ACT) + a * c.matrix * ACT)
    gemms = rows * d * ACT * 2 + rows * i * ACT * 2 + rows * i * ACT * 2 + rows * d * ACT  # x^T copy, h, relu², down out
    combine = rows * d * ACT * 2 + p * d * (ACT + F32) + p * d * F32 * 2 + p * F32 + t * d * (F32 + ACT)
    return dispatch + blocks + weights + gemms + combine


def flops(c: Call) -> dict[str, float]:
    per_row = 2 * 2 * c.matrix  # up and down, 2 FLOPs per multiply-add
    return {"ideal": c.pairs * per_row, "body": c.active * c.cap * per_row, "dense": c.layer.experts * c.tokens * per_row}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def report(layer: Layer, tokens: list[int], formats: list[str]) -> str:
    rows = []
    for t in tokens:
        for fmt in formats:
            c = Call(layer, t, fmt)
            best, ours, body = ideal(c), plugin(c), function_body(c)
            f = flops(c)
            rows.append([
                str(t), fmt, f"{c.active:.0f}", f"{c.cap:.1f}", _size(best), f"{ours / best:.2f}×", f"{body / best:.2f}×",
                _size(best / t), f"{f['body'] / f['ideal']:.2f}×",
            ])  # fmt: skip
    header = ["tokens", "format", "A", "C", "ideal", "plugin", "body", "ideal/token", "body FLOPs"]
    return table(rows, header)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 2048], help="tokens per call (decode batch sizes; 2048: a prefill chunk)")
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8", "nvfp4"], choices=list(WEIGHT_BYTES))
    p.add_argument("--models", nargs="+", default=["nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b"], choices=[n for n, c in ARCHITECTURES.items() if c.get("n_routed_experts")])
    args = p.parse_args(argv)
    for name in args.models:
        layer = Layer.of(name)
        print(f"# {name}: E = {layer.experts}, top-{layer.top_k}, I = {layer.inner}, D = {layer.dim}")
        print("# one MoE layer call, bytes in DRAM")
        print("# A: experts chosen, C: largest pairs per expert (expected, uniform routing);")
        print("# ideal: bytes per call; plugin, body: × those bytes; body FLOPs: × the ideal's\n")
        print(report(layer, args.tokens, args.formats))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
