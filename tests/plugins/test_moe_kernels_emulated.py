"""The MoE expert kernels (plugins/kernels/src/moeExperts.cu) run on the CPU against the PyTorch references.

The same emulated library as tests/plugins/test_kernels_emulated.py (``emulated_kernels``: one std::thread per CUDA
thread, a scalar stand-in for the WMMA tile, launches validated as the GPU would). Every call starts from poisoned
memory: y is NaN, the workspace 0xFF bytes (NaN for fp32 / fp16 / bf16 / e4m3, -1 for int32), and the weights (and
FP8 scales) of every expert no pair chose are NaN, so an unwritten output, a routing entry read before it is written
or a read of an unchosen expert shows up as a non-finite y. The truth is `expected_moe_experts` /
`expected_moe_experts_fp8` (`moe_experts_grouped` / the MoeExpertsFp8 arithmetic in fp32 math on the same rounded
inputs), gated by ``moe_y`` in tolerances.json; each gate is shown failing on a planted fault (a wrong k order, a
dropped pair, an unscaled FP8 input, a read of the wrong expert: `hybridtrtEmulationPlantMoe`).

Cost is the number of emulated blocks (about a millisecond each), so the shapes are small (D, I <= 128) and the
E = 512, T = 2048 grid runs its routing in full but only the GEMM and sum blocks of 8 tokens (block filters).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from hybridtrt.ops.moe import group_by_expert, moe_experts_grouped, moe_experts_ref
from hybridtrt.plugins.kernels import MOE_DTYPE_CODES, MOE_TACTICS, STATUS_NAMES, KernelLibrary
from hybridtrt.plugins.tolerances import expected_moe_experts, expected_moe_experts_fp8, kernel_gate
from tests.plugins.test_kernels_emulated import launches, rel_l2  # the SSD emulation tests' helpers

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATUS = {name: code for code, name in STATUS_NAMES.items()}
FP8 = torch.float8_e4m3fn
#: emulation::Plants::moeFault (moeExperts.cu MoeFault).
FAULTS = {"swap_k": 1, "drop_pair": 2, "unscaled_fp8_input": 3, "wrong_expert": 4}
#: Dynamic shared memory of the GEMM launches by path, any operand size (moeExperts.cu GemmLayout / DecodeLayout).
GEMM_SMEM = {18688: "prefill", 24960: "decode"}
#: Routed experts of Nemotron-3 (hybridtrt/models/architectures.py): Nano-30B-A3B and Super-120B-A12B (latent 1024).
NANO = {"experts": 128, "top_k": 6, "hidden": 2688, "inter": 1856}
SUPER = {"experts": 512, "top_k": 22, "hidden": 1024, "inter": 2688}


@pytest.fixture(scope="module")
def kernels(emulated_kernels: Path) -> KernelLibrary:
    lib = KernelLibrary(emulated_kernels)
    raw = lib._lib
    raw.hybridtrtEmulationReset.argtypes = [ctypes.c_int32, ctypes.c_int32]
    raw.hybridtrtEmulationLaunchCount.restype = ctypes.c_int64
    raw.hybridtrtEmulationLaunch.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    raw.hybridtrtEmulationLastError.restype = ctypes.c_char_p
    raw.hybridtrtEmulationAddBlockFilter.argtypes = [ctypes.c_int64] * 6
    raw.hybridtrtEmulationPlantMoe.argtypes = [ctypes.c_int32]
    return lib


@pytest.fixture
def emu(kernels: KernelLibrary) -> ctypes.CDLL:
    """The raw library, reset: an sm_89 that runs its launches, no opt-in, error, filter or planted fault."""
    kernels._lib.hybridtrtEmulationReset(89, 0)
    return kernels._lib


def check(name: str, got: torch.Tensor, want: torch.Tensor, gate: float) -> None:
    """Non-finite values first (an unwritten or poisoned element), then rel L2 against the gate."""
    bad = int((~torch.isfinite(got.float())).sum())
    assert bad == 0, f"{name}: {bad} unwritten / non-finite elements"
    err = rel_l2(got.float(), want.float())
    assert err <= gate, f"{name}: rel L2 {err:.3g} > {gate:.1g}"


# -- problems --------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One MoE call: ``x [T,D]``, ``idx / w [T,K]``, ``up [E,I,D]``, ``down [E,D,I]`` (x's dtype or e4m3) and, for FP8,
    the scales. The weights (and scales) of experts no pair chose are NaN."""

    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """``(T, K, E, D, I)``."""
        return self.x.shape[0], self.idx.shape[1], self.up.shape[0], self.x.shape[1], self.up.shape[1]

    @property
    def fp8(self) -> bool:
        return self.up.dtype == FP8

    def expected(self) -> torch.Tensor:
        if self.fp8:
            s = self.scales
            return expected_moe_experts_fp8(self.x, self.idx, self.w, self.up, s["up_w"], s["up_in"], self.down, s["down_w"], s["down_in"])
        return expected_moe_experts(self.x, self.idx, self.w, self.up, self.down)

    def gate(self) -> float:
        return kernel_gate("moe_y", self.x.dtype, *([FP8] if self.fp8 else []))


def random_routing(tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """``[T, K]`` int64: K distinct experts per token, in random order."""
    return torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].contiguous()


def fp8_weights(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, O, N]`` as the FP8 pass stores it (hybridtrt/graphs/fp8_qdq.py quantize_expert_weights): e4m3 codes of
    ``w / scale`` saturated, ``scale = amax / 448`` per expert ``[E, 1]`` or per expert and output channel ``[E, O]``."""
    amax = w.abs().amax(dim=2) if per_channel else w.abs().amax(dim=(1, 2))[:, None]
    scale = (amax / 448).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale[:, :, None]).clamp(-448, 448).to(FP8), scale


def make_problem(
    tokens: int, top_k: int, experts: int, hidden: int, inter: int, dtype: torch.dtype, *, seed: int,
    idx: torch.Tensor | None = None, fp8: str | None = None,
) -> Problem:  # fmt: skip
    """Random inputs (weights scaled so that h and y stay O(1)); ``fp8`` is None, ``"tensor"`` or ``"channel"``
    (the weight-scale granularity). FP8 input scales follow the exporter's calibration rule: amax / 448 of the inputs
    an expert saw in a calibration run that reached only the first half of the experts; the others carry the
    fallback, the largest reached scale (hybridtrt/graphs/fp8_qdq.py expert_input_scales)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    idx = random_routing(tokens, top_k, experts, gen) if idx is None else idx
    w = torch.rand(tokens, top_k, generator=gen) / top_k
    up = torch.randn(experts, inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    chosen = torch.zeros(experts, dtype=torch.bool)
    valid = idx[(idx >= 0) & (idx < experts)]
    chosen[valid] = True
    scales: dict[str, torch.Tensor] = {}
    if fp8 is None:
        up, down = up.to(dtype), down.to(dtype)
    else:
        up, scales["up_w"] = fp8_weights(up, fp8 == "channel")
        down, scales["down_w"] = fp8_weights(down, fp8 == "channel")
        reached = torch.arange(experts) < experts // 2
        amax_in = torch.rand(experts, generator=gen) * 2 + 1.5  # |x| beyond 1.5 sigma saturates a few elements
        amax_h = torch.rand(experts, generator=gen) + 0.5
        fallback_in, fallback_h = amax_in[reached].max(), amax_h[reached].max()
        scales["up_in"] = torch.where(reached, amax_in, fallback_in) / 448
        scales["down_in"] = torch.where(reached, amax_h, fallback_h) / 448
        for s in scales.values():
            s[~chosen] = float("nan")
    for stack in (up, down):  # e4m3 has no masked_fill: its NaN is the code 0x7F
        (stack.view(torch.uint8) if fp8 else stack)[~chosen] = 0x7F if fp8 else float("nan")
    return Problem(x, idx, w, up, down, scales)


@dataclass
class Run:
    status: int
    y: torch.Tensor
    workspace: torch.Tensor  #: the bytes the call used (256-byte aligned start)
    layout: dict[str, int]

    def section(self, name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
        start = self.layout[name]
        return self.workspace[start : start + count * torch.empty(0, dtype=dtype).element_size()].view(dtype)


def run_moe(kernels: KernelLibrary, prob: Problem, tactic: str, *, index_dtype: torch.dtype = torch.int64,
            workspace_bytes: int | None = None) -> Run:  # fmt: skip
    """hybridtrtMoeExperts(Fp8) on CPU tensors, from a NaN y and a 0xFF workspace."""
    tokens, top_k, experts, hidden, inter = prob.dims
    act = str(prob.x.dtype).removeprefix("torch.")
    weight = "float8_e4m3fn" if prob.fp8 else None
    layout = kernels.moe_workspace_layout(tokens, top_k, experts, hidden, inter, act, weight)
    size = layout["end"] if workspace_bytes is None else workspace_bytes
    buffer = torch.full((size + 256,), 0xFF, dtype=torch.uint8)
    offset = (-buffer.data_ptr()) % 256
    ws = buffer[offset : offset + size]
    y = torch.full((tokens, hidden), float("nan"), dtype=prob.x.dtype)
    idx = prob.idx.to(index_dtype).contiguous()
    common = (tokens, top_k, experts, hidden, inter)
    tail = (CODES[prob.x.dtype], MOE_DTYPE_CODES[str(index_dtype).removeprefix("torch.")], MOE_TACTICS[tactic], ws.data_ptr(), size, None)
    lib = kernels._lib
    if prob.fp8:
        s = prob.scales
        status = lib.hybridtrtMoeExpertsFp8(
            prob.x.data_ptr(), idx.data_ptr(), prob.w.data_ptr(), prob.up.data_ptr(), s["up_w"].data_ptr(),
            s["up_in"].data_ptr(), prob.down.data_ptr(), s["down_w"].data_ptr(), s["down_in"].data_ptr(), y.data_ptr(),
            *common, s["up_w"].shape[1], s["down_w"].shape[1], *tail,
        )  # fmt: skip
    else:
        status = lib.hybridtrtMoeExperts(
            prob.x.data_ptr(), idx.data_ptr(), prob.w.data_ptr(), prob.up.data_ptr(), prob.down.data_ptr(), y.data_ptr(),
            *common, *tail,
        )  # fmt: skip
    return Run(int(status), y, buffer[offset:], layout)


def gemm_path(emu) -> str:
    """The path the last call took, read from its GEMM launches' shared memory (launch 3, after the routing)."""
    gemm = next(launch for launch in launches(emu)[3:] if launch["smem"] > 0)
    return GEMM_SMEM[gemm["smem"]]


# -- correctness -------------------------------------------------------------------------------------------------------

#: (dtype, tactic, T, K, E, D, I): every dtype on both paths, E in {8, 128, 512}, K in {1, 6, 22}, T in {1, 7, 128};
#: I = 96 / D = 96 leave a partial 64-wide output tile. T = 2048: `test_routing_at_scale_matches_group_by_expert`.
CASES = [
    ("fp32", "prefill", 128, 1, 8, 64, 96),
    ("bf16", "prefill", 128, 6, 128, 96, 64),
    ("fp16", "prefill", 7, 6, 8, 32, 64),
    ("fp16", "decode", 7, 6, 128, 64, 96),
    ("bf16", "decode", 1, 22, 512, 32, 64),
    ("fp32", "decode", 7, 22, 512, 48, 32),
]


@pytest.mark.parametrize(("dtype", "tactic", "tokens", "top_k", "experts", "hidden", "inter"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])  # fmt: skip
def test_moe_experts_match_the_reference(kernels, emu, dtype, tactic, tokens, top_k, experts, hidden, inter) -> None:
    """y against `moe_experts_grouped` in fp32 math (the gate covers the kernels' rounding of h, of each expert output
    and of y to x's dtype); for half dtypes also against `moe_experts_grouped` in x's dtype itself, which rounds at
    the same points (emulated: bit for bit in bf16, 4e-5 in fp16): a tenth of the gate. The weights of every expert
    no pair chose are NaN and the workspace starts as NaN bytes."""
    prob = make_problem(tokens, top_k, experts, hidden, inter, DTYPES[dtype], seed=tokens * experts + top_k)
    run = run_moe(kernels, prob, tactic)
    assert run.status == 0, emu.hybridtrtEmulationLastError()
    assert run.y.dtype == prob.x.dtype
    check("y", run.y, prob.expected(), prob.gate())
    if dtype != "fp32":
        native = moe_experts_grouped(prob.x, prob.idx, prob.w, experts, lambda e: (prob.up[e], prob.down[e]))
        check("y vs moe_experts_grouped in x's dtype", run.y, native, prob.gate() / 10)
    if tokens * top_k <= 64:  # the sequential twin, token by token
        ref = moe_experts_ref(prob.x.float(), prob.idx, prob.w, prob.up.float(), prob.down.float())
        check("y vs moe_experts_ref", run.y, ref, prob.gate())
    log = launches(emu)
    assert all(launch["ok"] for launch in log) and len(log) == 6  # count, scan, permute, up, down, sum
    assert gemm_path(emu) == tactic
    assert all(launch["smem"] <= 48 * 1024 for launch in log)  # no opt-in anywhere: capturable as it is


def test_auto_tactic_picks_decode_for_few_rows_per_expert(kernels, emu) -> None:
    """``auto`` = decode while T·K <= 16·E: T = 7 (42 pairs, E = 8) decodes, T = 128 (768 pairs) prefills; both paths
    give the same y within the gate."""
    assert (kernels.moe_tactic(7, 6, 8), kernels.moe_tactic(22, 6, 8), kernels.moe_tactic(128, 6, 8)) == ("decode", "prefill", "prefill")
    assert kernels.moe_tactic(64, 22, 512) == kernels.moe_tactic(1, 6, 128) == "decode"
    assert kernels.moe_tactic(2048, NANO["top_k"], NANO["experts"]) == "prefill"
    prob = make_problem(7, 6, 8, 32, 32, torch.bfloat16, seed=5)
    run = run_moe(kernels, prob, "auto")
    assert run.status == 0 and gemm_path(emu) == "decode"
    check("y (auto)", run.y, prob.expected(), prob.gate())


@pytest.mark.parametrize("tactic", ["prefill", "decode"])
def test_all_tokens_on_one_expert_and_empty_experts(kernels, emu, tactic) -> None:
    """128 tokens all choose expert 3 (128 rows: two prefill work items, eight decode passes) and one of experts 5 / 6;
    the other five experts are empty (and NaN). The routing read back: expert offsets, the chosen list, the work list,
    the header."""
    gen = torch.Generator().manual_seed(3)
    second = torch.where(torch.rand(128, generator=gen) < 0.5, 5, 6)
    idx = torch.stack([torch.full((128,), 3), second], dim=1)
    idx[::2] = idx[::2].flip(1)  # expert 3 at k = 1 for every other token
    prob = make_problem(128, 2, 8, 32, 48, torch.bfloat16, seed=3, idx=idx.contiguous())
    run = run_moe(kernels, prob, tactic)
    assert run.status == 0, emu.hybridtrtEmulationLastError()
    check("y", run.y, prob.expected(), prob.gate())
    n5, n6 = int((second == 5).sum()), int((second == 6).sum())
    counts = [0, 0, 0, 128, 0, n5, n6, 0]
    offsets = run.section("expert_offsets", torch.int32, 9).tolist()
    assert offsets == [sum(counts[:e]) for e in range(9)]
    header = run.section("header", torch.int32, 4).tolist()
    work_items = 2 + -(-n5 // 64) + -(-n6 // 64)
    assert header == [0, work_items, 3, 0]  # skipped, work items, chosen experts
    assert run.section("active_experts", torch.int32, 3).tolist() == [3, 5, 6]
    assert run.section("work_expert", torch.int32, work_items).tolist() == [3, 3] + [5] * -(-n5 // 64) + [6] * -(-n6 // 64)
    assert run.section("work_row", torch.int32, 2).tolist() == [0, 64]


def test_routing_at_scale_matches_group_by_expert(kernels, emu) -> None:
    """E = 512, top-22, T = 2048 (45,056 pairs, 176 routing tiles): the routing runs in full and is read back — every
    row's pair is `group_by_expert`'s order (tokens ascending within an expert), every pair's row its inverse, the
    expert offsets the cumulative counts, the work list and the chosen list complete. Tokens 0..7 chose experts 0..21
    (in a shuffled k order) and no other token did, so those experts' work items are the first 22: the GEMM blocks of
    those items and the sum blocks of tokens 0..7 run (block filters), and y[:8] must match the reference while the
    rest of y stays NaN (never written). Every launch is validated with its full grid."""
    tokens, top_k, experts, hidden, inter = 2048, 22, 512, 32, 32
    gen = torch.Generator().manual_seed(2048)
    head = torch.stack([torch.randperm(22, generator=gen) for _ in range(8)])
    tail = random_routing(tokens - 8, top_k, experts - 22, gen) + 22
    idx = torch.cat([head, tail]).contiguous()
    prob = make_problem(tokens, top_k, experts, hidden, inter, torch.bfloat16, seed=11, idx=idx)
    for _ in range(3):  # count, scan, permute: every block
        emu.hybridtrtEmulationAddBlockFilter(0, 1 << 30, 0, 1, 0, 1)
    emu.hybridtrtEmulationAddBlockFilter(0, 22, 0, 1, 0, 1)  # up GEMM: work items of experts 0..21
    emu.hybridtrtEmulationAddBlockFilter(0, 22, 0, 1, 0, 1)  # down GEMM
    emu.hybridtrtEmulationAddBlockFilter(0, 2, 0, 1, 0, 1)  # weighted sum: tokens 0..7
    run = run_moe(kernels, prob, "prefill")
    assert run.status == 0, emu.hybridtrtEmulationLastError()
    log = launches(emu)
    assert all(launch["ok"] for launch in log)
    assert [launch["grid"][0] for launch in log] == [176, 1, 176, 704 + 512, 704 + 512, 512]

    pairs = tokens * top_k
    order, groups = group_by_expert(idx, experts)
    row_pair = run.section("row_pair", torch.int32, pairs).long()
    pair_row = run.section("pair_row", torch.int32, pairs).long()
    assert torch.equal(row_pair, order)
    assert torch.equal(pair_row[row_pair], torch.arange(pairs))
    counts = torch.bincount(idx.flatten(), minlength=experts)
    offsets = run.section("expert_offsets", torch.int32, experts + 1).long()
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    items = int((-(-counts // 64)).sum())
    assert run.section("header", torch.int32, 3).tolist() == [0, items, int((counts > 0).sum())]
    work_expert = run.section("work_expert", torch.int32, items).long()
    assert torch.equal(work_expert, torch.repeat_interleave(torch.arange(experts), -(-counts // 64)))
    assert torch.equal(run.section("active_experts", torch.int32, len(groups)).long(), torch.tensor([e for e, _ in groups]))

    want = expected_moe_experts(prob.x[:8], idx[:8], prob.w[:8], prob.up, prob.down)
    check("y of tokens 0..7", run.y[:8], want, prob.gate())
    assert torch.isnan(run.y[8:]).all(), "the sum wrote tokens whose blocks did not run"


@pytest.mark.parametrize(
    ("dtype", "scale", "tactic", "tokens", "top_k", "experts"),
    [("fp32", "tensor", "prefill", 64, 6, 8), ("bf16", "channel", "decode", 7, 6, 128), ("fp16", "channel", "prefill", 7, 22, 512)],
    ids=["fp32-per_expert-prefill", "bf16-per_channel-decode", "fp16-per_channel-prefill"],
)  # fmt: skip
def test_fp8_experts_match_the_fp8_reference(kernels, emu, dtype, scale, tactic, tokens, top_k, experts) -> None:
    """MoeExpertsFp8 against `expected_moe_experts_fp8` (the MoeExpertsFp8 body's arithmetic, fake_quantize of
    hybridtrt/exporter/fp8_reference.py): per-expert and per-channel weight scales; half the experts carry the
    fallback input scale; some inputs pass +-448 after scaling (saturation). The quantized up inputs in the
    workspace must equal torch's float8_e4m3fn of x / up_input_scale[e] (clamped) bit for bit."""
    prob = make_problem(tokens, top_k, experts, 64, 96, DTYPES[dtype], seed=experts + tokens, fp8=scale)
    run = run_moe(kernels, prob, tactic)
    assert run.status == 0, emu.hybridtrtEmulationLastError()
    check("y", run.y, prob.expected(), prob.gate())
    assert gemm_path(emu) == tactic and len(launches(emu)) == 7  # + the x quantization

    pairs, hidden = tokens * top_k, prob.x.shape[1]
    row_pair = run.section("row_pair", torch.int32, pairs).long()
    experts_of_rows = prob.idx.flatten()[row_pair]
    scaled = prob.x[row_pair // top_k].float() / prob.scales["up_in"][experts_of_rows][:, None]
    want = scaled.clamp(-448, 448).to(FP8).view(torch.uint8)
    got = run.section("x_quant", torch.uint8, pairs * hidden).view(pairs, hidden)
    assert torch.equal(got, want), f"{int((got != want).sum())} e4m3 codes differ from torch's"
    assert (scaled.abs() > 448).any(), "no saturated input: the test does not cover saturation"
    fell_back = experts_of_rows >= experts // 2
    assert fell_back.any() and (~fell_back).any(), "the rows must use both calibrated and fallback scales"


@pytest.mark.parametrize(("index_dtype", "tactic"), [(torch.int64, "prefill"), (torch.int32, "decode")], ids=["int64", "int32"])
def test_indices_outside_the_experts_are_skipped(kernels, emu, index_dtype, tactic) -> None:
    """Indices E, -1 and the extremes of the index dtype add nothing to y and address no memory: the expert stacks sit
    inside NaN guard experts on both sides (a read of expert -1 or E would make y non-finite); the header counts
    the skipped pairs and their rows are -1."""
    tokens, top_k, experts, hidden, inter = 16, 4, 8, 32, 32
    gen = torch.Generator().manual_seed(9)
    idx = random_routing(tokens, top_k, experts, gen)
    extreme = torch.iinfo(index_dtype)
    bad = [(0, 1, experts), (3, 0, -1), (5, 3, extreme.max), (9, 2, extreme.min), (15, 0, experts + 1)]
    for t, k, v in bad:
        idx[t, k] = v
    prob = make_problem(tokens, top_k, experts, hidden, inter, torch.float16, seed=9, idx=idx)
    for name in ("up", "down"):  # expert -1 and expert E are NaN guards around the real stack
        stack = getattr(prob, name)
        guarded = torch.full((experts + 2, *stack.shape[1:]), float("nan"), dtype=stack.dtype)
        guarded[1:-1] = stack
        setattr(prob, name, guarded[1:-1])  # a view: its storage has the guards
    run = run_moe(kernels, prob, tactic, index_dtype=index_dtype)
    assert run.status == 0, emu.hybridtrtEmulationLastError()
    check("y", run.y, prob.expected(), prob.gate())
    assert run.section("header", torch.int32, 1).item() == len(bad)
    pair_row = run.section("pair_row", torch.int32, tokens * top_k)
    assert all(pair_row[t * top_k + k] == -1 for t, k, _ in bad)


# -- planted faults: each gate fails --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "fp8", "tactic", "failure"),
    [
        ("swap_k", None, "prefill", "rel L2"),
        ("drop_pair", None, "decode", "rel L2"),
        ("unscaled_fp8_input", "tensor", "prefill", "rel L2"),
        ("wrong_expert", None, "decode", "non-finite"),
    ],
)  # fmt: skip
def test_planted_faults_fail_the_gate(kernels, emu, fault, fp8, tactic, failure) -> None:
    """The test of the tests: a weighted sum that pairs w[t,k] with the output of (t, k+1 mod K) (emulated: rel L2
    0.78 against the bf16 gate 1.5e-2), a routing that drops one of 42 pairs (0.096), an FP8 up input quantized
    without its scale (1.0 against 1e-3) — each fails the gate; an up GEMM that reads expert e+1 while only even
    experts are chosen reads NaN-poisoned weights and fails the finiteness check."""
    idx = random_routing(7, 6, 8, torch.Generator().manual_seed(17)) * 2  # experts 0, 2, ..., 14 of 16
    prob = make_problem(7, 6, 16, 32, 32, torch.bfloat16 if fp8 is None else torch.float32, seed=17, idx=idx, fp8=fp8)
    check("y without a fault", run_moe(kernels, prob, tactic).y, prob.expected(), prob.gate())
    emu.hybridtrtEmulationPlantMoe(FAULTS[fault])
    run = run_moe(kernels, prob, tactic)
    assert run.status == 0
    with pytest.raises(AssertionError, match=failure):
        check("y", run.y, prob.expected(), prob.gate())


# -- launch validation ------------------------------------------------------------------------------------------------


def test_invalid_arguments_are_refused_before_any_launch(kernels, emu) -> None:
    """Every argument is checked on the host: each refusal names its status and enqueues nothing."""
    prob = make_problem(4, 2, 8, 32, 32, torch.bfloat16, seed=1)
    lib = kernels._lib
    size = kernels.moe_workspace_size(4, 2, 8, 32, 32, "bfloat16")
    buffer = torch.zeros(size + 512, dtype=torch.uint8)
    ws = (buffer.data_ptr() + 255) // 256 * 256
    y = torch.zeros(4 * 32 + 8, dtype=torch.bfloat16)
    base = {"x": prob.x.data_ptr(), "idx": prob.idx.data_ptr(), "w": prob.w.data_ptr(), "up": prob.up.data_ptr(),
            "down": prob.down.data_ptr(), "y": y.data_ptr(), "T": 4, "K": 2, "E": 8, "D": 32, "I": 32, "act": 2,
            "index": 4, "tactic": 0, "ws": ws, "size": size}  # fmt: skip

    def call(**change) -> str:
        a = {**base, **change}
        status = lib.hybridtrtMoeExperts(a["x"], a["idx"], a["w"], a["up"], a["down"], a["y"], a["T"], a["K"], a["E"],
                                         a["D"], a["I"], a["act"], a["index"], a["tactic"], a["ws"], a["size"], None)  # fmt: skip
        return STATUS_NAMES[status]

    refusals = {
        "INVALID_SHAPE": [{"K": 0}, {"E": 0}, {"E": 4097}, {"D": 24}, {"I": 0}, {"I": 65552}, {"T": -1}, {"T": 2**30, "K": 2}],
        "UNSUPPORTED_DTYPE": [{"act": 3}, {"act": -1}, {"index": 2}, {"index": 5}],
        "INVALID_TACTIC": [{"tactic": 3}, {"tactic": -1}],
        "NULL_POINTER": [{"x": None}, {"idx": None}, {"w": None}, {"up": None}, {"down": None}, {"y": None}, {"ws": None}],
        "MISALIGNED_POINTER": [{"y": y.data_ptr() + 2}, {"up": prob.up.data_ptr() + 8}, {"ws": ws + 16}],
        "WORKSPACE_TOO_SMALL": [{"size": size - 1}, {"size": 0}],
    }  # fmt: skip
    for status, changes in refusals.items():
        for change in changes:
            assert call(**change) == status, change
    assert call(T=0) == "SUCCESS"  # y [0, D]: nothing to do
    assert emu.hybridtrtEmulationLaunchCount() == 0

    scales = torch.ones(8, 32)
    fp8 = [prob.x.data_ptr(), prob.idx.data_ptr(), prob.w.data_ptr(), prob.up.data_ptr(), scales.data_ptr(),
           scales.data_ptr(), prob.down.data_ptr(), scales.data_ptr(), scales.data_ptr(), y.data_ptr(), 4, 2, 8, 32, 32]  # fmt: skip
    fp8_size = kernels.moe_workspace_size(4, 2, 8, 32, 32, "bfloat16", "float8_e4m3fn")
    assert fp8_size > size  # + the quantized up inputs
    for cols, status in (((2, 1), "INVALID_SHAPE"), ((1, 16), "INVALID_SHAPE"), ((32, 32), "WORKSPACE_TOO_SMALL")):
        assert STATUS_NAMES[lib.hybridtrtMoeExpertsFp8(*fp8, *cols, 2, 4, 0, ws, size, None)] == status
    fp8[5] = None  # up_input_scale
    assert STATUS_NAMES[lib.hybridtrtMoeExpertsFp8(*fp8, 1, 1, 2, 4, 0, ws, fp8_size, None)] == "NULL_POINTER"
    assert emu.hybridtrtEmulationLaunchCount() == 0
    assert "tactic" in kernels.status_string(STATUS["INVALID_TACTIC"])


@pytest.mark.parametrize(("model", "tokens"), [("nano", 16384), ("nano", 64), ("super", 16384), ("super", 8)])
def test_nemotron3_launches_are_valid(kernels, emu, model, tokens) -> None:
    """Nemotron-3 Nano / Super expert shapes at a 16,384-token prefill and at decode batches, both weight formats,
    validated (not run) by the emulator as the GPU would: grid limits, and no kernel above the 48 KiB of shared
    memory that needs no opt-in (so a captured CUDA graph needs no preparation). The workspace of the largest T fits
    every smaller T."""
    shape = NANO if model == "nano" else SUPER
    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    fake = 1 << 40  # aligned addresses never dereferenced (validate-only)
    for weight in (None, "float8_e4m3fn"):
        emu.hybridtrtEmulationReset(89, 1)
        size = kernels.moe_workspace_size(tokens, top_k, experts, hidden, inter, "bfloat16", weight)
        assert kernels.moe_workspace_size(tokens // 2 + 1, top_k, experts, hidden, inter, "bfloat16", weight) <= size
        args = (fake, fake, fake, fake, fake, fake, tokens, top_k, experts, hidden, inter)
        if weight is None:
            status = kernels._lib.hybridtrtMoeExperts(*args, 2, 4, 0, fake, size, None)
        else:
            status = kernels._lib.hybridtrtMoeExpertsFp8(*args[:4], fake, fake, fake, fake, fake, fake, *args[6:], inter, hidden, 2, 4, 0, fake, size, None)
        assert status == 0, emu.hybridtrtEmulationLastError()
        log = launches(emu)
        assert len(log) == (6 if weight is None else 7) and all(launch["ok"] for launch in log)
        assert max(launch["smem"] for launch in log) <= 48 * 1024
        assert gemm_path(emu) == kernels.moe_tactic(tokens, top_k, experts)
