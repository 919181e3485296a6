"""GPU benchmark and correctness sweep of the hybridtrt SSD and MoE kernels, in one call.

    python benchmarks/gpu/run.py [--build-dir DIR] [--skip-build] [--quick] [--only ssd|moe] [--no-write] [--dry-run]

1. Builds plugins/ for this GPU's architecture (``hybridtrt.plugins.build``).
2. Checks the kernels against the PyTorch ``_ref`` ops in fp32 math on the same rounded inputs (y is float32
   for every activation dtype, C ABI 3; gates from hybridtrt/plugins/tolerances.json) on random inputs:
   fp32 / fp16 / bf16, head_dim 64 / 80 / 128, L in {1, 127, 128, 129, 2048, 16384}, with and without an
   initial state, outputs poisoned with NaN so that an unwritten element fails; the state update for every
   activation x state dtype, in place and out of place; one CUDA-graph capture of each op.
3. Times them on Nemotron-Nano-9B-v2 shapes (H=128, P=80, N=128, G=8):
   - state update: achieved GB/s (state read + write) as a fraction of a measured device-to-device
     copy of the same bytes (goal >= 0.8 at batch >= 32);
   - chunked scan: tokens/s against the PyTorch chunked reference (``mamba2_chunk_scan_eager``) on the
     same GPU, and against mamba_ssm's Triton ``mamba_chunk_scan_combined`` / ``selective_state_update``
     when mamba_ssm is installed (the anchors to beat).
4. The MoE experts (moe_bench.py, issue 26): MoeExperts / MoeExpertsFp8 at Nemotron-3-Nano-30B-A3B and Super
   shapes checked against expected_moe_experts(_fp8) (bf16 and FP8 experts, tactics auto / prefill / decode,
   T in {1, 8, 64, 2048}, y and unchosen experts NaN-poisoned), one decode call captured in a CUDA graph, and
   timed (decode batch 1 / 8 / 64, 2,048-token prefill) beside moe_traffic.py's modelled bytes and a copy of them.
5. Prints tables and appends them, with date and device, to benchmarks/RESULTS.md.

Exit code: 0 when every check passes, 1 when a correctness check fails (timings are still written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hybridtrt.ops import mamba2_chunk_scan_eager, mamba2_state_update_eager  # noqa: E402
from hybridtrt.plugins.build import build_plugins  # noqa: E402
from hybridtrt.plugins.kernels import KernelLibrary, scan_workspace_bytes  # noqa: E402
from hybridtrt.plugins.ptxas import format_table, hot_kernels, parse_ptxas  # noqa: E402
from hybridtrt.plugins.tolerances import expected_chunk_scan, expected_state_update, kernel_gate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_bench  # noqa: E402  (benchmarks/gpu/moe_bench.py: the MoE section)
import traffic  # noqa: E402  (benchmarks/gpu/traffic.py: the byte-traffic model of the scan)

RESULTS = REPO / "benchmarks" / "RESULTS.md"
#: "cuda", or "cpu" under --dry-run (eager PyTorch stands in for the kernels; exercises the script only).
DEVICE = "cuda"
#: Nemotron-Nano-9B-v2 Mamba-2 mixer.
NANO = {"heads": 128, "head_dim": 80, "d_state": 128, "groups": 8, "chunk_size": 128}
#: Sweep sizes; --quick and --dry-run shrink them.
CHECK_LENGTHS = [1, 127, 128, 129, 2048, 16384]
UPDATE_BATCHES = [1, 8, 32, 64, 128, 256]
SCAN_SHAPES = [(1, 2048), (4, 2048), (1, 16384)]
UPDATE_CHECK_BATCH = 33  # odd on purpose: no batch-size assumption
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Sections of the run (--only picks one): the SSD kernels, the MoE experts (moe_bench.py).
SECTIONS = ("ssd", "moe")


# ---------------------------------------------------------------------------------------------------
# helpers


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def diagnose(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where a failed output is wrong: NaN count (unwritten elements) and the index of the worst error."""
    got, want = got.float(), want.float()
    nan = int((~torch.isfinite(got)).sum())
    err = (got - want).abs().nan_to_num(float("inf"))
    worst = int(err.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    return f"{nan} non-finite of {got.numel()}, worst |err| {float(err.max()):.3g} at {index}"


def make_inputs(batch, length, heads, head_dim, groups, d_state, dtype, state_dtype, seed=0):
    """Random SSD inputs with realistic ranges (dt in [0.01, 0.21], A in [-4.5, -0.5])."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)

    x = rnd(batch, length, heads, head_dim)
    dt = (torch.rand(batch, length, heads, generator=g, device=DEVICE) * 0.2 + 0.01).to(dtype)
    A = -torch.rand(heads, generator=g, device=DEVICE) * 4 - 0.5
    B = rnd(batch, length, groups, d_state, scale=0.5)
    C = rnd(batch, length, groups, d_state, scale=0.5)
    D = torch.randn(heads, generator=g, device=DEVICE)
    s0 = torch.randn(batch, heads, head_dim, d_state, generator=g, device=DEVICE).to(state_dtype)
    return x, dt, A, B, C, D, s0


def nan_y(x: torch.Tensor) -> torch.Tensor:
    """The kernels' y for ``x``: float32 whatever x's dtype, poisoned with NaN."""
    return torch.full(x.shape, float("nan"), dtype=torch.float32, device=x.device)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_cuda(fn, *, warmup: int = 3, iters: int = 20, before=None) -> float:
    """Median seconds per call, CUDA events (wall clock under --dry-run); ``before()`` (say an L2 flush) is
    enqueued ahead of every call, outside the timed span."""
    if DEVICE != "cuda":
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


@dataclass
class Report:
    sections: list[tuple[str, str]]
    failures: list[str]

    def add(self, title: str, text: str) -> None:
        print(f"\n## {title}\n{text}", flush=True)
        self.sections.append((title, text))


# ---------------------------------------------------------------------------------------------------
# correctness


def check_chunk_scan(lib: KernelLibrary, report: Report, quick: bool) -> None:
    lengths = [n for n in CHECK_LENGTHS if not (quick and n > 2048)]
    rows = []
    for dname, dtype in DTYPES.items():
        for head_dim in (64, 80, 128):
            for length in lengths:
                for with_init in (True, False):
                    batch = 1 if length >= 2048 else 2
                    x, dt, A, B, C, D, s0 = make_inputs(batch, length, 4, head_dim, 2, 128, dtype, torch.float32)
                    if not with_init:
                        s0.zero_()
                    y = nan_y(x)
                    final = torch.full_like(s0, float("nan"))
                    lib.chunk_scan(
                        x, dt, A, B, C, D, s0 if with_init else None, y=y, final_state=final,
                        chunk_size=NANO["chunk_size"],
                    )  # fmt: skip
                    sync()
                    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
                    finite = bool(torch.isfinite(y).all() and torch.isfinite(final).all())
                    ey, es = rel_l2(y, y_ref), rel_l2(final.float(), s_ref.float())
                    ok = finite and ey <= kernel_gate("scan_y", dtype) and es <= kernel_gate("state", dtype)
                    if not ok:
                        report.failures.append(
                            f"chunk_scan {dname} P={head_dim} L={length} init={with_init}: "
                            f"y {diagnose(y, y_ref)} [b,l,h,p]; state {diagnose(final, s_ref)} [b,h,p,n]"
                        )
                    rows.append([dname, head_dim, length, with_init, f"{ey:.2e}", f"{es:.2e}", "ok" if ok else "FAIL"])
    report.add(
        "Correctness: Mamba2ChunkScan vs mamba2_chunk_scan_ref in fp32 math, y float32 "
        f"(B<=2, H=4, G=2, N=128, chunk_size={NANO['chunk_size']}, fp32 state, NaN-poisoned outputs; "
        f"y gates fp32/fp16/bf16 {'/'.join(format(kernel_gate('scan_y', d), 'g') for d in DTYPES.values())})",
        table(["act", "P", "L", "init", "rel L2 y", "rel L2 state", "result"], rows),
    )


def check_state_update(lib: KernelLibrary, report: Report) -> None:
    rows = []
    for dname, dtype in DTYPES.items():
        for sname, sdtype in DTYPES.items():
            for head_dim in (64, 80, 128):
                for d_state in (64, 128):
                    for in_place in (False, True):
                        x, dt, A, B, C, D, s0 = make_inputs(
                            UPDATE_CHECK_BATCH, 1, 8, head_dim, 2, d_state, dtype, sdtype, seed=1
                        )
                        x, dt, B, C = (t[:, 0].contiguous() for t in (x, dt, B, C))
                        y_ref, s_ref = expected_state_update(x, dt, A, B, C, D, s0)
                        state = s0.clone()
                        y = nan_y(x)
                        out = state if in_place else torch.full_like(state, float("nan"))
                        lib.state_update(x, dt, A, B, C, D, state, y=y, new_state=out)
                        sync()
                        finite = bool(torch.isfinite(y).all() and torch.isfinite(out).all())
                        ey, es = rel_l2(y, y_ref), rel_l2(out.float(), s_ref.float())
                        ok = (finite and ey <= kernel_gate("update_y", dtype, sdtype)
                              and es <= kernel_gate("state", dtype, sdtype))  # fmt: skip
                        if not ok:
                            report.failures.append(
                                f"state_update {dname}/{sname} P={head_dim} N={d_state} in_place={in_place}: "
                                f"y {diagnose(y, y_ref)} [b,h,p]; state {diagnose(out, s_ref)} [b,h,p,n]"
                            )
                        result = "ok" if ok else "FAIL"
                        rows.append([dname, sname, head_dim, d_state, in_place, f"{ey:.2e}", f"{es:.2e}", result])
    report.add(
        "Correctness: Mamba2StateUpdate vs mamba2_state_update_ref in fp32 math, y float32 "
        f"(B={UPDATE_CHECK_BATCH}, H=8, G=2, NaN-poisoned outputs; y gate {kernel_gate('update_y', torch.float32):g} "
        "for every dtype: y comes from the fp32 new state)",
        table(["act", "state", "P", "N", "in place", "rel L2 y", "rel L2 state", "result"], rows),
    )


def check_graph_capture(lib: KernelLibrary, report: Report) -> None:
    """Both launchers captured in a CUDA graph and replayed: no host sync, no allocation inside."""
    if DEVICE != "cuda":
        return
    x, dt, A, B, C, D, s0 = make_inputs(2, 200, 8, 64, 2, 128, torch.bfloat16, torch.float32, seed=2)
    y, final = nan_y(x), torch.empty_like(s0)
    size = lib.chunk_scan_workspace_size(2, 200, 8, 64, 2, 128, 128, "bfloat16", "bfloat16", "float32")
    ws = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    x1, dt1, B1, C1 = (t[:, 0].contiguous() for t in (x, dt, B, C))
    y1, state = nan_y(x1), s0.clone()
    lib.prepare("bfloat16", 128)  # the shared-memory opt-in, outside the capture (as the plugin's attachToContext)
    lib.state_update(x1, dt1, A, B1, C1, D, state, y=y1, new_state=state)
    torch.cuda.synchronize()
    state.copy_(s0)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=final, workspace=ws, chunk_size=128)
        lib.state_update(x1, dt1, A, B1, C1, D, state, y=y1, new_state=state)
    y.fill_(float("nan"))
    state.copy_(s0)
    graph.replay()
    torch.cuda.synchronize()
    y_ref, s_ref = expected_chunk_scan(x, dt, A, B, C, D, s0)
    y1_ref, st_ref = expected_state_update(x1, dt1, A, B1, C1, D, s0)
    errs = [rel_l2(y, y_ref), rel_l2(final, s_ref), rel_l2(y1, y1_ref), rel_l2(state, st_ref)]
    gates = [kernel_gate(output, torch.bfloat16) for output in ("scan_y", "state", "update_y", "state")]
    ok = all(e <= g for e, g in zip(errs, gates)) and bool(torch.isfinite(y).all() and torch.isfinite(y1).all())
    if not ok:
        report.failures.append("CUDA graph replay")
    report.add(
        "CUDA graph capture + replay (bf16, fp32 state)",
        table(["scan y", "scan state", "update y", "update state", "result"],
              [[*(f"{e:.2e}" for e in errs), "ok" if ok else "FAIL"]]),  # fmt: skip
    )


# ---------------------------------------------------------------------------------------------------
# timing


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of a device-to-device copy of nbytes (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), iters=50)
    return 2 * nbytes / t / 1e9


def try_mamba_ssm():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001 - optional anchor, any import failure means "not available"
        return None, None, f"mamba_ssm not available ({type(err).__name__})"
    return selective_state_update, mamba_chunk_scan_combined, "mamba_ssm available"


def bench_state_update(lib: KernelLibrary, report: Report, quick: bool) -> None:
    h, p, n, g = NANO["heads"], NANO["head_dim"], NANO["d_state"], NANO["groups"]
    ssu, _, note = try_mamba_ssm()
    rows = []
    for sname in ("fp32", "bf16"):
        sdtype = DTYPES[sname]
        for batch in [b for b in UPDATE_BATCHES if not (quick and b > 128)]:
            x, dt, A, B, C, D, s0 = make_inputs(batch, 1, h, p, g, n, torch.bfloat16, sdtype, seed=4)
            x, dt, B, C = (t[:, 0].contiguous() for t in (x, dt, B, C))
            state, y = s0.clone(), nan_y(x)
            t = time_cuda(lambda: lib.state_update(x, dt, A, B, C, D, state, y=y, new_state=state), iters=100)
            state_bytes = state.numel() * state.element_size()
            moved = 2 * state_bytes + x.numel() * (2 + 4) + 2 * B.numel() * 2  # x bf16 in, y fp32 out
            gbs = moved / t / 1e9
            copy = copy_bandwidth(state_bytes)
            anchor = "n/a"
            if ssu is not None:
                st = s0.clone()
                dt_h = dt.float()[:, :, None].expand(batch, h, p)
                A_h = A[:, None, None].expand(h, p, n)
                D_h = D[:, None].expand(h, p)
                t_ref = time_cuda(lambda: ssu(st, x, dt_h, A_h, B, C, D_h), iters=100)
                anchor = f"{t_ref / t:.2f}x"
            rows.append([sname, batch, f"{t * 1e6:.1f}", f"{gbs:.0f}", f"{copy:.0f}", f"{gbs / copy:.2f}", anchor])
    report.add(
        f"Mamba2StateUpdate, Nemotron-Nano-9B-v2 (H={h}, P={p}, N={n}, G={g}), bf16 activations, in place "
        f"(goal: >= 0.80 of copy at batch >= 32; anchor: mamba_ssm selective_state_update, {note})",
        table(["state", "batch", "us", "GB/s", "copy GB/s", "fraction of copy", "speed-up vs mamba_ssm"], rows),
    )


def bench_chunk_scan(lib: KernelLibrary, report: Report, quick: bool) -> None:
    h, p, n, g, q = NANO["heads"], NANO["head_dim"], NANO["d_state"], NANO["groups"], NANO["chunk_size"]
    _, mcs, note = try_mamba_ssm()
    rows = []
    shapes = SCAN_SHAPES if not quick else SCAN_SHAPES[:1]
    for dname in ("bf16", "fp16", "fp32"):
        dtype = DTYPES[dname]
        for batch, length in shapes:
            x, dt, A, B, C, D, s0 = make_inputs(batch, length, h, p, g, n, dtype, torch.float32, seed=5)
            y, final = nan_y(x), torch.empty_like(s0)
            size = lib.chunk_scan_workspace_size(batch, length, h, p, g, n, q, dname_to(dname), dname_to(dname), "float32")
            ws = torch.empty(size, dtype=torch.uint8, device=DEVICE)
            t = time_cuda(
                lambda: lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=final, workspace=ws, chunk_size=q)
            )
            tokens = batch * length
            model_shapes = traffic.Shapes(h, p, n, g, q, length, act=4 if dtype == torch.float32 else 2)
            model_gbs = traffic.totals(traffic.ours(model_shapes))[0] * tokens / t / 1e9
            try:
                t_eager = time_cuda(lambda: mamba2_chunk_scan_eager(x, dt, A, B, C, D, s0, q), warmup=1, iters=5)
                eager = f"{tokens / t_eager / 1e6:.2f}"
                speedup = f"{t_eager / t:.1f}x"
            except torch.OutOfMemoryError:
                eager, speedup = "OOM", "n/a"
                empty_cache()
            anchor = "n/a"
            if mcs is not None and dtype != torch.float32:
                t_m = time_cuda(
                    lambda: mcs(x, dt, A, B, C, chunk_size=q, D=D, initial_states=s0, return_final_states=True)
                )
                anchor = f"{t_m / t:.2f}x"
            rows.append(
                [dname, batch, length, f"{t * 1e3:.2f}", f"{tokens / t / 1e6:.2f}", eager, speedup, anchor,
                 f"{size / 2**20:.0f}", f"{model_gbs:.0f}"]  # fmt: skip
            )
            del x, dt, B, C, y, final, ws
            empty_cache()
    report.add(
        f"Mamba2ChunkScan, Nemotron-Nano-9B-v2 (H={h}, P={p}, N={n}, G={g}), fp32 state "
        f"(PyTorch reference: mamba2_chunk_scan_eager chunk_size={q}; "
        f"anchor: mamba_ssm mamba_chunk_scan_combined, {note})",
        table(
            ["act", "batch", "L", "ms", "Mtok/s", "PyTorch Mtok/s", "speed-up vs PyTorch", "speed-up vs mamba_ssm",
             "workspace MiB", "model GB/s (traffic.py bytes / time)"],  # fmt: skip
            rows,
        ),
    )


class EagerStandIn(moe_bench.MoeEagerStandIn):
    """--dry-run: the PyTorch eager ops behind the `KernelLibrary` interface, on CPU (the MoE methods inherited).

    Exercises every line of this script without a GPU (for CI of the script); its numbers measure
    nothing and are never written to RESULTS.md. Like the kernels (C ABI 3) it returns the SSD ops' y in float32:
    the eager ops run in fp32 math on the (rounded) inputs. The MoE experts' y is in x's dtype, as the kernels'.
    """

    def chunk_scan_workspace_size(self, batch, seq_len, heads, head_dim, groups, d_state, chunk_size, act, *dtypes) -> int:
        return scan_workspace_bytes(batch, seq_len, heads, head_dim, d_state, chunk_size, act)

    def prepare(self, act_dtype=None, d_state=None) -> None:
        pass

    def chunk_scan(self, x, dt, A, B, C, D, initial_state, *, y, final_state, workspace=None, chunk_size=128):
        s0 = initial_state if initial_state is not None else torch.zeros_like(final_state)
        y_, s_ = mamba2_chunk_scan_eager(x.float(), dt.float(), A, B.float(), C.float(), D, s0, chunk_size)
        y.copy_(y_)
        final_state.copy_(s_)
        return y, final_state

    def state_update(self, x, dt, A, B, C, D, state, *, y, new_state):
        y_, s_ = mamba2_state_update_eager(x.float(), dt.float(), A, B.float(), C.float(), D, state)
        y.copy_(y_)
        new_state.copy_(s_)
        return y, new_state


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def dname_to(short: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[short]


# ---------------------------------------------------------------------------------------------------


def write_results(report: Report, device: str, build_seconds: float) -> None:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {stamp} — {device}\n",
        f"commit {commit or 'unknown'}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"host {platform.node()}, kernels build {build_seconds:.0f} s; "
        f"checks: {'all passed' if not report.failures else 'FAILED: ' + '; '.join(report.failures)}\n",
    ]
    for title, text in report.sections:
        lines.append(f"\n### {title}\n\n{text}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# GPU benchmark results\n")
    with RESULTS.open("a") as f:
        f.write("".join(lines))
    print(f"\nappended to {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=None, help="CMake build dir (default: plugins/build)")
    parser.add_argument("--skip-build", action="store_true", help="use the library found by library_path()")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="drop L=16384 checks and the largest timings; MoE: no T=2048 checks, no timing of the other path",
    )
    parser.add_argument("--only", choices=SECTIONS, default=None, help="run one section (default: all of them)")
    parser.add_argument("--no-write", action="store_true", help=f"do not append to {RESULTS.name}")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: run the whole script on CPU with eager PyTorch standing in for the kernels and tiny "
        "shapes (tests the script, measures nothing, writes nothing)",
    )
    args = parser.parse_args(argv)
    sections = SECTIONS if args.only is None else (args.only,)
    if args.dry_run:
        return dry_run(sections)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    device = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    print(f"device: {device}")
    report = Report(sections=[], failures=[])
    build_seconds = math.nan
    if args.skip_build:
        lib = KernelLibrary()
    else:
        start = time.perf_counter()
        result = build_plugins(build_dir=args.build_dir, cuda_archs=f"{major}{minor}")
        build_seconds = time.perf_counter() - start
        report.add(
            f"ptxas (sm_{major}{minor}, built in {build_seconds:.0f} s)",
            "```\n" + format_table(hot_kernels(parse_ptxas(result.ptxas_log.read_text()))) + "\n```",
        )
        lib = KernelLibrary(result.kernels_library)
    torch.backends.cuda.matmul.allow_tf32 = False  # the references' fp32 matmuls in fp32
    if "ssd" in sections:
        check_state_update(lib, report)
        check_chunk_scan(lib, report, args.quick)
        check_graph_capture(lib, report)
        bench_state_update(lib, report, args.quick)
        bench_chunk_scan(lib, report, args.quick)
    if "moe" in sections:
        moe_bench.run_section(lib, moe_harness(report), moe_bench.Sweep.full(args.quick))
    if report.failures:
        print("\nFAILED checks (index order in brackets):\n  " + "\n  ".join(report.failures))
    if not args.no_write:
        write_results(report, device, build_seconds)
    return 1 if report.failures else 0


def moe_harness(report: Report) -> moe_bench.Harness:
    """This script's device, timer, comparisons and report, lent to the MoE section."""
    return moe_bench.Harness(DEVICE, time_cuda, rel_l2, diagnose, report)


def dry_run(sections: tuple[str, ...] = SECTIONS) -> int:
    """--dry-run: every check and timing path on CPU with tiny shapes."""
    global DEVICE, CHECK_LENGTHS, UPDATE_BATCHES, SCAN_SHAPES, UPDATE_CHECK_BATCH
    DEVICE = "cpu"
    torch.set_num_threads(1)  # tiny shapes: OpenMP's wake-ups cost more than they save (a busy 2-core box: 15 s -> 4 s)
    UPDATE_CHECK_BATCH = 3
    CHECK_LENGTHS, UPDATE_BATCHES, SCAN_SHAPES = [1, 65], [1, 4], [(1, 128)]
    NANO.update(heads=16, groups=2)
    report = Report(sections=[], failures=[])
    lib = EagerStandIn()
    if "ssd" in sections:
        check_state_update(lib, report)  # type: ignore[arg-type]
        check_chunk_scan(lib, report, quick=False)  # type: ignore[arg-type]
        bench_state_update(lib, report, quick=False)  # type: ignore[arg-type]
        bench_chunk_scan(lib, report, quick=False)  # type: ignore[arg-type]
    if "moe" in sections:
        moe_bench.run_section(lib, moe_harness(report), moe_bench.Sweep.dry())  # type: ignore[arg-type]
    print("\ndry run finished: " + ("FAILED " + "; ".join(report.failures) if report.failures else "all checks passed"))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
