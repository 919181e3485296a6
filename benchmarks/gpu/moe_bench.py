"""MoE section of benchmarks/gpu/run.py: the routed-experts kernels (plugins/kernels/include/hybridtrt/moeKernels.h)
checked against their CPU references and timed, at Nemotron-3-Nano-30B-A3B and -Super-120B-A12B shapes.

Called by run.py (after the SSD sections, in the same call), never run alone. Per layer shape (E experts, top-K,
expert input D: the hidden size, Super's latent size 1024; expert width I, from `moe_traffic.Layer`):

1. **Correctness** — bf16 activations, bf16 experts and FP8 experts (Nano: per-output-channel weight scales
   ``[E, I] / [E, D]``, Super: one per expert ``[E, 1]``), tactics auto / prefill / decode, T in {1, 8, 64, 2048}.
   Every call starts from poisoned memory: y NaN, the workspace 0xFF bytes, and the weights (and FP8 scales) of
   every expert no pair chose NaN; the routing draws its experts from three quarters of them, so that even at
   T = 2,048 a quarter stays unchosen. The truth is `expected_moe_experts` / `expected_moe_experts_fp8` (fp32 math
   on the same rounded inputs, on the same device), the gate ``moe_y`` of tolerances.json; the workspace header's
   skipped-pair count must be 0. An unwritten element or a read of an unchosen expert is a non-finite y: it fails.
2. **CUDA graph** — one decode call (T = 8, tactic auto) per layer and format captured, then the tokens, routing
   and routing weights changed in the captured buffers (and the newly unchosen experts poisoned) before the
   replay: y must be the new inputs' (the graph reads the device buffers; no host sync or allocation inside).
3. **Timing** — uniform routing over all experts (moe_traffic.py's assumption), T = 1, 8, 64 (decode batches) and a
   2,048-token prefill chunk, each call captured in a CUDA graph and replayed (as the static-cache runtime runs it:
   no Python launch overhead in the figure) with L2 flushed before every replay (a real step runs the other layers
   in between): median of CUDA-event times. Beside it, moe_traffic.py's bytes of the call for the ideal (each
   chosen expert's weights read once, x read, y written) and for the plugin, both with this routing's count of
   chosen experts A; GB/s = the plugin's modelled bytes / the measured time, and its fraction of a measured
   device-to-device copy moving the same bytes (read + write), L2 flushed the same way. The path the auto tactic
   does not take is timed too ("other us"): it shows whether the rule (decode while T·K <= 16·E) picks the faster.

Under ``run.py --dry-run`` eager PyTorch stands in for the kernels (`MoeEagerStandIn`) on shrunk shapes (`Sweep.dry`):
every path and table runs on CPU, the numbers measure nothing.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

import moe_traffic  # benchmarks/gpu/moe_traffic.py (run.py puts this folder on sys.path)
from hybridtrt.ops.moe import moe_experts_eager
from hybridtrt.plugins.kernels import KernelLibrary
from hybridtrt.plugins.tolerances import expected_moe_experts, expected_moe_experts_fp8, kernel_gate

#: The Nemotron-3 MoE layers of the sweep (hybridtrt/models/architectures.py) and their FP8 weight-scale granularity
#: (hybridtrt/graphs/fp8_qdq.py WeightScale: "channel" = [E, out], "tensor" = one per expert [E, 1]).
MODELS = {"nemotron-3-nano-30b-a3b": "channel", "nemotron-3-super-120b-a12b": "tensor"}
#: Tokens per call: decode batches 1 / 8 / 64 and a prefill chunk.
TOKENS = (1, 8, 64, 2048)
TACTICS = ("auto", "prefill", "decode")
FORMATS = ("bf16", "fp8")
FP8 = torch.float8_e4m3fn
ACT = torch.bfloat16
#: Decode batch of the CUDA-graph check.
GRAPH_TOKENS = 8
#: Fraction of a layer's experts the check routing may choose: the rest are unchosen at every T.
REACHABLE = 0.75


class Report(Protocol):
    """run.py's Report: ``add`` prints a section and keeps it for RESULTS.md; ``failures`` fail the run (exit 1)."""

    failures: list[str]

    def add(self, title: str, text: str) -> None: ...


@dataclass(frozen=True)
class Harness:
    """What run.py lends this section: where tensors live, its timer and comparison helpers, its report."""

    device: str
    time: Callable[..., float]  #: run.time_cuda(fn, *, warmup, iters, before): median seconds per call
    rel_l2: Callable[[torch.Tensor, torch.Tensor], float]
    diagnose: Callable[[torch.Tensor, torch.Tensor], str]
    report: Report

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class Sweep:
    """Shapes of one run: the layers with their FP8 weight-scale granularity, the tokens per call."""

    layers: tuple[tuple[moe_traffic.Layer, str], ...]
    check_tokens: tuple[int, ...]
    time_tokens: tuple[int, ...]
    other_path: bool  #: also time the path the auto tactic does not take

    @classmethod
    def full(cls, quick: bool) -> Sweep:
        """The GPU sweep; ``quick`` drops the T = 2,048 checks and the other path's timing."""
        layers = tuple((moe_traffic.Layer.of(name), scale) for name, scale in MODELS.items())
        return cls(layers, TOKENS[:3] if quick else TOKENS, TOKENS, not quick)

    @classmethod
    def dry(cls) -> Sweep:
        """--dry-run: both layers shrunk (D, I multiples of 16), T up to 64, where the auto rule turns to prefill."""
        layers = (
            (moe_traffic.Layer("nano-30b-a3b shrunk", experts=8, top_k=3, inner=48, dim=64), "channel"),
            (moe_traffic.Layer("super-120b-a12b shrunk", experts=16, top_k=6, inner=64, dim=32), "tensor"),
        )
        return cls(layers, TOKENS[:3], TOKENS[:3], True)


@dataclass(frozen=True)
class RoutedCall(moe_traffic.Call):
    """`moe_traffic.Call` with the chosen-expert count A of an actual routing instead of its expected value."""

    chosen: int = 0

    @property
    def active(self) -> float:
        return float(self.chosen)


# ---------------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Tokens:
    """One call's inputs: ``x [T, D]`` bf16, ``idx [T, K]`` int64 (K distinct experts per token), ``w [T, K]`` fp32."""

    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor

    @classmethod
    def random(cls, layer: moe_traffic.Layer, tokens: int, device: str, *, seed: int, reachable: float = 1.0) -> Tokens:
        """Routing uniform over the first ``reachable`` fraction of a random permutation of the experts."""
        g = torch.Generator(device=device).manual_seed(seed)
        e, k = layer.experts, layer.top_k
        score = torch.rand(tokens, e, generator=g, device=device)
        banned = torch.randperm(e, generator=g, device=device)[max(k, round(e * reachable)) :]
        score[:, banned] = 2.0  # argsort ascending: never among the first K
        idx = score.argsort(dim=1)[:, :k].contiguous()
        w = torch.rand(tokens, k, generator=g, device=device) / k
        x = torch.randn(tokens, layer.dim, generator=g, device=device).to(ACT)
        return cls(x, idx, w)

    def chosen(self, experts: int) -> torch.Tensor:
        """``[E]`` bool: the experts some pair chose."""
        mask = torch.zeros(experts, dtype=torch.bool, device=self.idx.device)
        mask[self.idx.reshape(-1)] = True
        return mask

    def copy_(self, other: Tokens) -> None:
        """Write ``other``'s values into these buffers (the ones a CUDA graph captured)."""
        self.x.copy_(other.x)
        self.idx.copy_(other.idx)
        self.w.copy_(other.w)


@dataclass
class Experts:
    """One layer's expert stacks in one format: the clean ones (timing) and a working copy that `poison` fills.

    bf16: ``up [E, I, D]``, ``down [E, D, I]``. fp8: the same as float8_e4m3fn codes with ``scales``:
    ``up_w [E, I | 1]``, ``up_in [E]``, ``down_w [E, D | 1]``, ``down_in [E]`` fp32.
    """

    fmt: str
    up: torch.Tensor
    down: torch.Tensor
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    work: dict[str, torch.Tensor] = field(init=False)  #: the poisoned copy of up, down and the scales

    @classmethod
    def random(cls, layer: moe_traffic.Layer, fmt: str, weight_scale: str, device: str, *, seed: int) -> Experts:
        """Weights scaled so that h and y stay O(1); FP8 as the FP8 pass stores them (codes of ``w / (amax/448)``,
        saturated) with input scales ``amax / 448`` of a plausible calibration (x: amax 3-5, h: 8-16)."""
        g = torch.Generator(device=device).manual_seed(seed)
        e, i, d = layer.experts, layer.inner, layer.dim
        up = torch.randn(e, i, d, generator=g, device=device, dtype=ACT).mul_(d**-0.5)
        down = torch.randn(e, d, i, generator=g, device=device, dtype=ACT).mul_(i**-0.5)
        if fmt == "bf16":
            return cls(fmt, up, down)
        (up8, up_w), (down8, down_w) = (_fp8_codes(w, weight_scale) for w in (up, down))
        del up, down
        scales = {
            "up_w": up_w,
            "up_in": (torch.rand(e, generator=g, device=device) * 2 + 3) / 448,
            "down_w": down_w,
            "down_in": (torch.rand(e, generator=g, device=device) * 8 + 8) / 448,
        }
        return cls(fmt, up8, down8, scales)

    def __post_init__(self) -> None:
        self.work = {"up": torch.empty_like(self.up), "down": torch.empty_like(self.down)}
        self.work.update({name: torch.empty_like(s) for name, s in self.scales.items()})

    def poison(self, chosen: torch.Tensor) -> None:
        """The working copy = the clean stacks with every unchosen expert's weights (and scales) NaN (e4m3's NaN is
        the code 0x7F: float8 has no fill)."""
        unchosen = ~chosen
        for name, clean in (("up", self.up), ("down", self.down), *self.scales.items()):
            work = self.work[name]
            work.copy_(clean)
            if work.dtype == FP8:
                work.view(torch.uint8)[unchosen] = 0x7F
            else:
                work[unchosen] = float("nan")

    def stacks(self, poisoned: bool) -> dict[str, torch.Tensor]:
        """``up``, ``down`` and the scales: the working (poisoned) copy or the clean one."""
        return dict(self.work) if poisoned else {"up": self.up, "down": self.down, **self.scales}

    def call(self, lib: KernelLibrary, t: Tokens, tactic: str, y: torch.Tensor, ws: torch.Tensor, *,
             poisoned: bool) -> None:  # fmt: skip
        """Enqueue hybridtrtMoeExperts(Fp8) into the preallocated ``y`` and workspace ``ws``."""
        s = self.stacks(poisoned)
        if self.fmt == "bf16":
            lib.moe_experts(t.x, t.idx, t.w, s["up"], s["down"], tactic=tactic, y=y, workspace=ws)
        else:
            lib.moe_experts_fp8(t.x, t.idx, t.w, s["up"], s["up_w"], s["up_in"], s["down"], s["down_w"], s["down_in"],
                                tactic=tactic, y=y, workspace=ws)  # fmt: skip

    def expected(self, t: Tokens) -> torch.Tensor:
        """``[T, D]`` fp32: the CPU reference of this call in fp32 math, run on t's device, on the poisoned copy (it
        reads the chosen experts only)."""
        s = self.work
        if self.fmt == "bf16":
            return expected_moe_experts(t.x, t.idx, t.w, s["up"], s["down"])
        with torch.device(t.x.device):  # the reference allocates its buffers on the default device
            return expected_moe_experts_fp8(t.x, t.idx, t.w, s["up"], s["up_w"], s["up_in"], s["down"], s["down_w"],
                                            s["down_in"])  # fmt: skip

    def gate(self) -> float:
        return kernel_gate("moe_y", ACT, *([FP8] if self.fmt == "fp8" else []))

    def workspace(self, lib: KernelLibrary, layer: moe_traffic.Layer, max_tokens: int, device: str) -> torch.Tensor:
        """uint8 scratch for any call of up to ``max_tokens`` tokens (torch allocations are 256-byte aligned)."""
        size = lib.moe_workspace_size(max_tokens, layer.top_k, layer.experts, layer.dim, layer.inner, "bfloat16",
                                      "float8_e4m3fn" if self.fmt == "fp8" else None)  # fmt: skip
        return torch.empty(size, dtype=torch.uint8, device=device)


def _fp8_codes(w: torch.Tensor, weight_scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, O, N]`` -> (e4m3 codes of ``w / scale`` saturated, ``scale [E, O]`` or ``[E, 1]`` fp32), as
    hybridtrt/graphs/fp8_qdq.py quantize_expert_weights; 16 experts at a time (bounded fp32 temporaries)."""
    e, o = w.shape[:2]
    codes = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(e, o if weight_scale == "channel" else 1, dtype=torch.float32, device=w.device)
    for first in range(0, e, 16):
        part = w[first : first + 16].float()
        amax = part.abs().amax(dim=2) if weight_scale == "channel" else part.abs().amax(dim=(1, 2))[:, None]
        scale[first : first + 16] = (amax / 448).clamp_min(torch.finfo(torch.float32).tiny)
        codes[first : first + 16] = (part / scale[first : first + 16, :, None]).clamp_(-448, 448).to(FP8)
    return codes, scale


def skipped_pairs(ws: torch.Tensor) -> int:
    """The workspace header's count of skipped pairs of the last call (kHYBRIDTRT_MOE_WS_HEADER, element 0)."""
    return int(ws[:4].view(torch.int32)[0])


def captured(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after one call outside it: lazy module loading); returns the replay. A host
    sync or an allocation inside ``fn`` fails the capture. On CPU (--dry-run) the "replay" is ``fn`` itself."""
    if device != "cuda":
        return fn
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def block(legend: str, text: str) -> str:
    """A section body: the legend wrapped at 80 columns, then the fixed-width table in a code block."""
    return textwrap.fill(legend, 80) + "\n\n```\n" + text + "\n```"


# ---------------------------------------------------------------------------------------------------------------------
# the section


def run_section(lib: KernelLibrary, h: Harness, sweep: Sweep) -> None:
    """Checks, the CUDA-graph check and the timings of every layer of ``sweep``; failures go to ``h.report``."""
    graph_rows: list[list[str]] = []
    for n, (layer, weight_scale) in enumerate(sweep.layers):
        check_rows: list[list[str]] = []
        time_rows: list[list[str]] = []
        max_tokens = max(*sweep.check_tokens, *sweep.time_tokens, GRAPH_TOKENS)
        for fmt in FORMATS:
            experts = Experts.random(layer, fmt, weight_scale, h.device, seed=100 * n)
            ws = experts.workspace(lib, layer, max_tokens, h.device)
            check_rows += check_layer(lib, h, layer, experts, ws, sweep.check_tokens, seed=100 * n + 1)
            graph_rows.append(check_graph(lib, h, layer, experts, ws, seed=100 * n + 2))
            time_rows += time_layer(lib, h, layer, experts, ws, sweep, seed=100 * n + 3)
            del experts, ws
            if h.device == "cuda":
                torch.cuda.empty_cache()
        shape = f"E={layer.experts}, K={layer.top_k}, D={layer.dim}, I={layer.inner}"
        gates = f"gates bf16 {kernel_gate('moe_y', ACT):g}, fp8 {kernel_gate('moe_y', ACT, FP8):g}"
        scales = "per output channel [E, out]" if weight_scale == "channel" else "one per expert [E, 1]"
        h.report.add(
            f"MoE correctness, {layer.name} ({shape})",
            block(
                "MoeExperts / MoeExpertsFp8 against expected_moe_experts / expected_moe_experts_fp8 in fp32 math: "
                f"rel L2 of y, {gates} (tolerances.json moe_y). bf16 activations, int64 ids; FP8 weight scales "
                f"{scales}. Before every call y is NaN, the workspace 0xFF and the unchosen experts' weights and "
                "scales NaN ('unread': how many); 'path': what the tactic ran.",
                moe_traffic.table(check_rows, ["format", "T", "tactic", "path", "unread", "rel L2", "gate", "result"]),
            ),
        )
        h.report.add(
            f"MoE timing, {layer.name} ({shape})",
            block(
                "bf16 activations, uniform routing, CUDA-graph replays with L2 flushed before each, median us per "
                "call. path: the auto tactic's; A: experts chosen; ideal, plugin: moe_traffic.py's bytes of this call "
                "(MB, with this A); GB/s: plugin bytes / us; copy: a device-to-device copy moving as many bytes "
                "(GB/s); frac: GB/s / copy; other us: the path auto does not take.",
                moe_traffic.table(
                    time_rows, ["format", "T", "path", "us", "A", "ideal", "plugin", "GB/s", "copy", "frac", "other us"]
                ),
            ),
        )
    h.report.add(
        f"MoE CUDA graph: a decode call (T={GRAPH_TOKENS}, tactic auto) captured and replayed",
        block(
            "After the capture, x, the routing and its weights are rewritten in the captured buffers, the experts "
            "now unchosen poisoned and y set to NaN: the replay must compute the new inputs' y (no host sync, no "
            "allocation inside the call, or the capture fails).",
            moe_traffic.table(graph_rows, ["layer", "format", "path", "rel L2", "gate", "result"]),
        ),
    )


def _verdict(h: Harness, what: str, y: torch.Tensor, want: torch.Tensor, gate: float,
             ws: torch.Tensor) -> tuple[str, str]:  # fmt: skip
    """``(rel L2, "ok" | "FAIL")``: non-finite values first, then the gate, then the skipped-pair count (0)."""
    finite = bool(torch.isfinite(y).all())
    err = h.rel_l2(y, want)
    skipped = skipped_pairs(ws)
    ok = finite and err <= gate and skipped == 0
    if not ok:
        h.report.failures.append(f"{what}: y {h.diagnose(y, want)} [t,d]; {skipped} pairs skipped")
    return f"{err:.2e}", "ok" if ok else "FAIL"


def check_layer(lib: KernelLibrary, h: Harness, layer: moe_traffic.Layer, experts: Experts, ws: torch.Tensor,
                tokens: tuple[int, ...], *, seed: int) -> list[list[str]]:  # fmt: skip
    """Every T x tactic on poisoned memory against the reference (computed once per T: same inputs)."""
    rows = []
    for t_count in tokens:
        t = Tokens.random(layer, t_count, h.device, seed=seed + t_count, reachable=REACHABLE)
        chosen = t.chosen(layer.experts)
        experts.poison(chosen)
        want = experts.expected(t)
        unread = str(int((~chosen).sum()))
        for tactic in TACTICS:
            y = torch.full((t_count, layer.dim), float("nan"), dtype=ACT, device=h.device)
            ws.fill_(0xFF)
            experts.call(lib, t, tactic, y, ws, poisoned=True)
            h.sync()
            path = lib.moe_tactic(t_count, layer.top_k, layer.experts) if tactic == "auto" else tactic
            what = f"moe {layer.name} {experts.fmt} T={t_count} tactic={tactic}"
            err, result = _verdict(h, what, y, want, experts.gate(), ws)
            rows.append([experts.fmt, str(t_count), tactic, path, unread, err, f"{experts.gate():g}", result])
    return rows


def check_graph(lib: KernelLibrary, h: Harness, layer: moe_traffic.Layer, experts: Experts, ws: torch.Tensor, *,
                seed: int) -> list[str]:  # fmt: skip
    """One decode call captured, its inputs rewritten, replayed: y must be the rewritten inputs'."""
    t = Tokens.random(layer, GRAPH_TOKENS, h.device, seed=seed, reachable=REACHABLE)
    y = torch.full((GRAPH_TOKENS, layer.dim), float("nan"), dtype=ACT, device=h.device)
    experts.poison(t.chosen(layer.experts))
    replay = captured(lambda: experts.call(lib, t, "auto", y, ws, poisoned=True), h.device)
    t.copy_(Tokens.random(layer, GRAPH_TOKENS, h.device, seed=seed + 1, reachable=REACHABLE))
    experts.poison(t.chosen(layer.experts))
    y.fill_(float("nan"))
    ws.fill_(0xFF)
    replay()
    h.sync()
    want = experts.expected(t)
    err, result = _verdict(h, f"moe {layer.name} {experts.fmt} CUDA graph replay", y, want, experts.gate(), ws)
    path = lib.moe_tactic(GRAPH_TOKENS, layer.top_k, layer.experts)
    return [layer.name, experts.fmt, path, err, f"{experts.gate():g}", result]


def time_layer(lib: KernelLibrary, h: Harness, layer: moe_traffic.Layer, experts: Experts, ws: torch.Tensor,
               sweep: Sweep, *, seed: int) -> list[list[str]]:  # fmt: skip
    """Median time of the auto path (and the other one) per T, beside the modelled bytes and a copy of them."""
    flush = torch.empty(_flush_bytes(h.device), dtype=torch.uint8, device=h.device)
    rows = []
    for t_count in sweep.time_tokens:
        t = Tokens.random(layer, t_count, h.device, seed=seed + t_count)
        y = torch.empty(t_count, layer.dim, dtype=ACT, device=h.device)
        path = lib.moe_tactic(t_count, layer.top_k, layer.experts)
        other = next(p for p in ("decode", "prefill") if p != path)
        seconds = {}
        for tactic in (path, other) if sweep.other_path else (path,):
            replay = captured(lambda tactic=tactic: experts.call(lib, t, tactic, y, ws, poisoned=False), h.device)
            seconds[tactic] = h.time(replay, before=flush.zero_)
            del replay
        call = RoutedCall(layer, t_count, experts.fmt, chosen=int(t.chosen(layer.experts).sum()))
        ideal, plugin = moe_traffic.ideal(call), moe_traffic.plugin(call)
        gbs = plugin / seconds[path] / 1e9
        copy = copy_bandwidth(h, int(plugin) // 2, flush)
        rows.append([
            experts.fmt, str(t_count), path, f"{seconds[path] * 1e6:.1f}", str(call.chosen), f"{ideal / 1e6:.1f}",
            f"{plugin / 1e6:.1f}", f"{gbs:.0f}", f"{copy:.0f}", f"{gbs / copy:.2f}",
            f"{seconds[other] * 1e6:.1f}" if other in seconds else "-",
        ])  # fmt: skip
    return rows


def copy_bandwidth(h: Harness, nbytes: int, flush: torch.Tensor) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted), replayed and flushed as the calls are."""
    src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=h.device)
    dst = torch.empty_like(src)
    replay = captured(lambda: dst.copy_(src), h.device)
    return 2 * src.numel() / h.time(replay, before=flush.zero_) / 1e9


def _flush_bytes(device: str) -> int:
    """Four times the L2 (a write of it evicts the weights of the previous replay); 1 KiB on CPU."""
    if device != "cuda":
        return 1024
    return 4 * getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)


# ---------------------------------------------------------------------------------------------------------------------
# --dry-run


class MoeEagerStandIn:
    """--dry-run: eager PyTorch behind the MoE methods of `KernelLibrary`, on CPU (run.py's EagerStandIn inherits it).

    bf16 experts: `moe_experts_eager` in x's dtype (h and each expert output rounded to bf16, as the kernels do);
    FP8 experts: the FP8 reference `expected_moe_experts_fp8`, rounded to x's dtype. Only the chosen experts are
    read, so the NaN poisoning is exercised for real; the workspace is used only for the skipped-pair count.
    """

    def moe_tactic(self, tokens: int, top_k: int, experts: int) -> str:
        """hybridtrtMoeExpertsTactic's rule: decode while T·K <= 16·E."""
        return "decode" if tokens * top_k <= 16 * experts else "prefill"

    def moe_workspace_size(self, *args: Any) -> int:
        return 256  # the header: all the stand-in writes

    @staticmethod
    def _write_header(ws: torch.Tensor, idx: torch.Tensor, experts: int) -> None:
        """The skipped-pair count (ids outside [0, E)) where the kernels keep it."""
        ws[:4].view(torch.int32).fill_(int(((idx < 0) | (idx >= experts)).sum()))

    def moe_experts(self, x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
                    up_proj: torch.Tensor, down_proj: torch.Tensor, *, tactic: str, y: torch.Tensor,
                    workspace: torch.Tensor, stream: Any = None) -> torch.Tensor:  # fmt: skip
        y.copy_(moe_experts_eager(x, topk_indices, topk_weights, up_proj, down_proj))
        self._write_header(workspace, topk_indices, up_proj.shape[0])
        return y

    def moe_experts_fp8(self, x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
                        up_proj: torch.Tensor, up_weight_scale: torch.Tensor, up_input_scale: torch.Tensor,
                        down_proj: torch.Tensor, down_weight_scale: torch.Tensor, down_input_scale: torch.Tensor,
                        *, tactic: str, y: torch.Tensor, workspace: torch.Tensor,
                        stream: Any = None) -> torch.Tensor:  # fmt: skip
        y.copy_(expected_moe_experts_fp8(x, topk_indices, topk_weights, up_proj, up_weight_scale, up_input_scale,
                                         down_proj, down_weight_scale, down_input_scale))  # fmt: skip
        self._write_header(workspace, topk_indices, up_proj.shape[0])
        return y
