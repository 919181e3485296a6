"""Byte-traffic model of the chunked SSD scan: bytes moved per token per layer, ours vs mamba_ssm's design.

    python benchmarks/gpu/traffic.py [--length 2048] [--chunk 128] [--act-bytes 2] [--state-bytes 4]

No GPU needed: a model of the global-memory traffic of each kernel of three designs of one Mamba-2 scan
(prefill, batch 1, Nemotron-Nano-9B-v2 shapes by default: H = 128 heads, P = 80, N = 128, G = 8), per token
of the sequence:

- ``hybridtrt (2 kernels)``: the kernels of this repository — chunk start states computed in one pass over the
  sequence per head (state passing fused), written once and read once in the activation dtype;
- ``hybridtrt before`` (3 kernels): 64-token chunks, fp32 chunk states written, read and rewritten by a
  state-passing kernel, then read again — what the kernels did before the chunk_size / fusion change;
- ``mamba_ssm 5-kernel SSD`` (``mamba_chunk_scan_combined`` forward): ``_chunk_cumsum_fwd`` (fp32 dA_cumsum
  and dt), ``_chunk_state_fwd`` (fp32 chunk states), ``_state_passing_fwd`` (fp32 in, ``out_dtype=C.dtype``
  out), ``_bmm_chunk_fwd`` (fp32 C.B^T per group and chunk), ``_chunk_scan_fwd``.

Model: every kernel reads each tensor region it needs once from DRAM and writes its outputs once (re-reads of
the same data inside one kernel — B and C shared by the heads of a group, x re-read per row tile — are L2 hits),
nothing stays in L2 between kernels; per-sequence tensors (initial / final state) are spread over ``--length``
tokens. It ranks designs by memory traffic; it is not a timing (GPU-unverified until a device runs
benchmarks/gpu/run.py). Our start-state bytes come from `hybridtrt.plugins.kernels.scan_workspace_bytes`, the
mirror of the C ABI's workspace query, so the model cannot drift from the kernels.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hybridtrt.plugins.kernels import scan_workspace_bytes  # noqa: E402

#: Nemotron-Nano-9B-v2's Mamba-2 mixer (hidden 4480).
NANO = {"hidden": 4480, "heads": 128, "head_dim": 80, "d_state": 128, "groups": 8, "chunk_size": 128}


@dataclass(frozen=True)
class Shapes:
    heads: int
    head_dim: int
    d_state: int
    groups: int
    chunk: int
    length: int
    act: int = 2  #: bytes of x, B, C, y, dt (bf16)
    state: int = 4  #: bytes of the initial / final state (fp32)

    @property
    def state_elements(self) -> int:
        """H * P * N: one state."""
        return self.heads * self.head_dim * self.d_state


#: One kernel of a design: name -> {term: bytes per token}.
Kernel = tuple[str, dict[str, float]]


def ours(s: Shapes) -> list[Kernel]:
    """This repository's two kernels (chunkStateKernel with state passing fused, chunkOutputKernel)."""
    act_name = {2: "bfloat16", 4: "float32"}[s.act]
    starts = scan_workspace_bytes(1, s.length, s.heads, s.head_dim, s.d_state, s.chunk, act_name) / s.length
    per_seq = s.state_elements * s.state / s.length
    x, bc, dt = s.heads * s.head_dim * s.act, s.groups * s.d_state * s.act, s.heads * s.act
    return [
        ("chunkStateKernel", {"x": x, "B": bc, "dt": dt, "initial state": per_seq, "start states (write)": starts,
                              "final state": per_seq}),
        ("chunkOutputKernel", {"x": x, "B": bc, "C": bc, "dt": dt, "start states (read)": starts, "y": x}),
    ]  # fmt: skip


def ours_before(s: Shapes) -> list[Kernel]:
    """The previous three kernels: 64-token chunks, fp32 chunk states written, read, rewritten, read."""
    states = s.state_elements * 4 / 64
    per_seq = s.state_elements * s.state / s.length
    x, bc, dt = s.heads * s.head_dim * s.act, s.groups * s.d_state * s.act, s.heads * s.act
    decay = s.heads * 4 / 64
    return [
        ("chunkStateKernel", {"x": x, "B": bc, "dt": dt, "chunk states (write)": states, "decay": decay}),
        ("statePassingKernel", {"chunk states (read)": states, "decay": decay, "initial state": per_seq,
                                "start states (write)": states, "final state": per_seq}),
        ("chunkOutputKernel", {"x": x, "B": bc, "C": bc, "dt": dt, "start states (read)": states, "y": x}),
    ]  # fmt: skip


def mamba_ssm(s: Shapes) -> list[Kernel]:
    """mamba_ssm's mamba_chunk_scan_combined forward (5 Triton kernels)."""
    per_seq = s.state_elements * s.state / s.length
    x, bc = s.heads * s.head_dim * s.act, s.groups * s.d_state * s.act
    dt_in, dt32 = s.heads * s.act, s.heads * 4  # dt in; fp32 dt and dA_cumsum per (head, token)
    states32 = s.state_elements * 4 / s.chunk
    states_out = s.state_elements * s.act / s.chunk  # out_dtype=C.dtype
    cb = s.groups * s.chunk * 4  # fp32 [G, Q, Q] per chunk = G * Q * 4 bytes per token
    return [
        ("_chunk_cumsum_fwd", {"dt": dt_in, "dA_cumsum (write)": dt32, "dt fp32 (write)": dt32}),
        ("_chunk_state_fwd", {"x": x, "B": bc, "dt fp32": dt32, "dA_cumsum": dt32, "chunk states (write)": states32}),
        ("_state_passing_fwd", {"chunk states (read)": states32, "dA_cumsum (chunk ends)": s.heads * 4 / s.chunk,
                                "initial state": per_seq, "start states (write)": states_out, "final state": per_seq}),
        ("_bmm_chunk_fwd", {"B": bc, "C": bc, "CB (write)": cb}),
        ("_chunk_scan_fwd", {"CB": cb, "x": x, "dt fp32": dt32, "dA_cumsum": dt32, "C": bc,
                             "start states (read)": states_out, "y": x}),
    ]  # fmt: skip


DESIGNS = {"hybridtrt (2 kernels)": ours, "hybridtrt before (3 kernels, chunk 64)": ours_before, "mamba_ssm 5-kernel SSD": mamba_ssm}

_STATE_TERMS = ("states", "state")


def totals(kernels: list[Kernel]) -> tuple[float, float]:
    """(all bytes, bytes of chunk / start states: the round trips the designs differ in) per token."""
    total = sum(v for _, terms in kernels for v in terms.values())
    state = sum(v for _, terms in kernels for k, v in terms.items() if "states" in k)
    return total, state


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(s: Shapes) -> str:
    """The per-kernel tables and the summary with ratios against mamba_ssm, as Markdown."""
    out = [f"Shapes: H={s.heads} P={s.head_dim} N={s.d_state} G={s.groups}, chunk {s.chunk}, L={s.length}, "
           f"{s.act}-byte activations, {s.state}-byte state (bytes per token per layer)\n"]  # fmt: skip
    summary = []
    base_total, base_state = totals(mamba_ssm(s))
    for name, design in DESIGNS.items():
        kernels = design(s)
        rows = [[k, term, f"{v:,.0f}"] for k, terms in kernels for term, v in terms.items()]
        total, state = totals(kernels)
        out.append(f"### {name}\n\n" + table(rows, ["kernel", "tensor", "bytes/token"]) + f"\n\ntotal {total:,.0f} B/token\n")
        summary.append([name, str(len(kernels)), f"{state:,.0f}", f"{total:,.0f}", f"{state / base_state:.2f}", f"{total / base_total:.2f}"])
    out.append("### Summary\n\n" + table(summary, ["design", "kernels", "state B/token", "total B/token", "state vs mamba_ssm", "total vs mamba_ssm"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=2048, help="tokens of the prefill (spreads the per-sequence state I/O)")
    p.add_argument("--chunk", type=int, default=NANO["chunk_size"], help="chunk_size (Nemotron-Nano-9B-v2: 128; mamba_ssm default 256)")
    p.add_argument("--act-bytes", type=int, default=2, choices=[2, 4], help="bytes per activation element (bf16: 2)")
    p.add_argument("--state-bytes", type=int, default=4, choices=[2, 4], help="bytes per initial/final state element")
    args = p.parse_args(argv)
    shapes = Shapes(NANO["heads"], NANO["head_dim"], NANO["d_state"], NANO["groups"], args.chunk, args.length, args.act_bytes, args.state_bytes)
    print(f"# Chunked SSD scan, bytes moved per token per layer (model; Nemotron-Nano-9B-v2, hidden {NANO['hidden']})\n")
    print(report(shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
