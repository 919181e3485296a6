"""One GPU check of hybridtrt, from a clean checkout, in at most ten minutes: one JSON of results.

    bash benchmarks/gpu/check.sh [--out PATH] [--only STEP,...] [--total-budget S] [--workdir DIR] [--keep]
    python benchmarks/gpu/check.py --render RESULT.json [--append-results]

Steps, in order, each in its own process under ``timeout`` with its own time budget (seconds):

1. ``build`` (90): ``hybridtrt plugins build`` for this GPU's architecture, with the TensorRT plugins when a
   TensorRT root with headers is found ($TENSORRT_ROOT, else an ``include/`` of the tensorrt wheel), kernels
   alone otherwise. Proves the CUDA sources compile here; records the ptxas spills of the hot kernels.
2. ``pytest`` (160): ``pytest -m "gpu or tensorrt"`` (the kernels against the ``_ref`` ops on the GPU, the
   TensorRT backend end to end); counts from the junit XML.
3. ``engines`` (150): a tiny checkpoint (``preset tiny-nemotron-h --initializer-range 0.02``) exported as bf16
   and as FP8 (``--dtype bf16 --quantize fp8 --calib-random 4``), each built (``hybridtrt build``) and judged by
   ``hybridtrt validate --backend trt`` (the verdict: the PyTorch reference's gates), beside ``--backend ort``
   on the same prompts and a direct TensorRT-vs-ONNX-Runtime greedy generation (tokens, logits cosine).
4. ``double_load`` (40): in one process, a build followed by a load of its engine, then two more `TrtModel`
   on the bf16 engine of step 3: the plugin library is registered once and every load works.
5. ``static`` (80): a ``--kv-cache static --max-cache-len 256`` export, built and run by
   ``TrtModel.generate``: CUDA-graph captures / replays (`DecodeGraphs`) and tokens equal to ONNX Runtime's,
   with graphs and without.
6. ``timing`` (60): the scan kernel at Nemotron-Nano-9B-v2 shapes (H=128, P=80, N=128, G=8, chunk 128),
   bf16 and fp16, L = 2,048 / 16,384 / 65,536, batch 1: ms, Mtok/s, workspace, traffic-model GB/s, and y /
   final state against the eager chunked reference in fp32 math (gates of hybridtrt/plugins/tolerances.json).

A step that cannot run here is ``skipped`` with the reason (no CUDA GPU, no nvcc, no TensorRT bindings — no
wheel is installable without a registry —, an earlier step that did not produce what it needs, no time left);
one that runs and goes wrong, or outlives its budget, ``fail``s. Exit code 1 when any step failed, else 0.
The JSON (default ``$OUT/gpu_check.json`` when $OUT is set, else benchmarks/gpu/check.json) is rewritten
after every step; the steps' logs go beside it (``.log``). ``--render`` turns a JSON into the Markdown
section for benchmarks/RESULTS.md (``--append-results`` appends it).

Test hook: ``HYBRIDTRT_GPU_CHECK_PLANT=pass,fail,timeout`` adds steps that pass / fail / outlive a 1 s budget
(tests/plugins/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "RESULTS.md"
#: Whole-check budget: the device runs one command for at most 10 minutes, start-up and copies included.
TOTAL_BUDGET_S = 590
PLANT_ENV = "HYBRIDTRT_GPU_CHECK_PLANT"
WIDTH = 80
SCHEMA = 1
#: Step outcomes.
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
#: Step outcome -> its count's key in the JSON summary.
COUNTS = {PASS: "passed", FAIL: "failed", SKIPPED: "skipped"}


class Skip(Exception):
    """Raised by a step that finds it cannot run here; the message names what is missing."""


class StepFailure(Exception):
    """Raised by a step whose check went wrong; the message says what (the log has the details).

    Attributes:
        output: What the command printed before it was stopped (`Context.run` on a timeout), else "".
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


# ---------------------------------------------------------------------------------------------------
# the machine


@dataclass
class Machine:
    """What this machine offers, probed once by the driver process.

    Attributes:
        facts: Device facts recorded in the JSON (GPU name, driver, CUDA, torch, nvcc, TensorRT, ...).
        missing: Requirement name -> why it is not met (absent when met).
    """

    facts: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def _output(cmd: list[str], timeout: float = 30) -> str | None:
    """stdout of ``cmd``, or None when it cannot run, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def find_tensorrt_root() -> tuple[Path | None, str]:
    """A TensorRT root with ``include/NvInferRuntime.h``: $TENSORRT_ROOT, else the tensorrt wheel's package dirs.

    Returns:
        ``(root, where)``; root None and ``where`` the places looked at when none has the headers.
    """
    looked: list[str] = []
    env = os.environ.get("TENSORRT_ROOT")
    candidates: list[Path] = [Path(env)] if env else []
    if not env:
        looked.append("$TENSORRT_ROOT unset")
    for module in ("tensorrt", "tensorrt_libs", "tensorrt_bindings"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates += [Path(location), Path(location).parent]
    for root in candidates:
        if (root / "include" / "NvInferRuntime.h").is_file():
            return root.resolve(), str(root)
        looked.append(f"no include/NvInferRuntime.h in {root}")
    if len(candidates) == (1 if env else 0):
        looked.append("no tensorrt wheel")
    return None, "; ".join(looked)


def probe() -> Machine:
    """Device facts and unmet requirements of this machine (never raises)."""
    m = Machine()
    f = m.facts
    f["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    f["host"] = platform.node()
    f["python"] = platform.python_version()
    f["commit"] = (_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "").strip() or None
    status = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    f["dirty"] = bool(status.strip()) if status is not None else None

    smi = shutil.which("nvidia-smi")
    query = _output([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]) if smi else None
    if query:
        name, driver, memory = ([p.strip() for p in query.splitlines()[0].split(",")] + [None, None, None])[:3]
        f.update(gpu=name, driver=driver, gpu_memory=memory)
    header = _output([smi]) if smi else None
    match = re.search(r"CUDA Version:\s*([\d.]+)", header or "")
    f["cuda_driver"] = match.group(1) if match else None
    if not smi:
        f["nvidia_smi"] = "not found"

    try:
        import torch
    except Exception as err:  # noqa: BLE001 - ImportError, or OSError from a broken CUDA install: no GPU either way
        f["torch"] = None
        m.missing["cuda_gpu"] = f"no CUDA GPU (torch is not importable: {err})"
    else:
        f["torch"] = torch.__version__
        f["cuda_torch"] = torch.version.cuda
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            f["compute_capability"] = f"sm_{major}{minor}"
            f.setdefault("gpu", torch.cuda.get_device_name())
            if (major, minor) < (8, 9):
                m.missing["sm89"] = f"the GPU is sm_{major}{minor}; the kernels target sm_89 / sm_90"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            m.missing["cuda_gpu"] = f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False{hint})"
    if "cuda_gpu" in m.missing:
        m.missing["sm89"] = m.missing["cuda_gpu"]

    try:
        from hybridtrt.plugins.build import find_nvcc
    except ImportError as err:
        f["hybridtrt_import_error"] = str(err)
        nvcc = Path(shutil.which("nvcc")) if shutil.which("nvcc") else None
    else:
        nvcc = find_nvcc()
    if nvcc is None:
        m.missing["nvcc"] = "no nvcc (the CUDA compiler) on PATH, $CUDACXX, $CUDA_HOME/bin or /usr/local/cuda/bin"
    else:
        match = re.search(r"release ([\d.]+)", _output([str(nvcc), "--version"]) or "")
        f["nvcc"] = match.group(1) if match else str(nvcc)
    if shutil.which("cmake") is None:
        m.missing["cmake"] = "no cmake on PATH"

    if importlib.util.find_spec("tensorrt") is None:
        m.missing["tensorrt"] = "no TensorRT Python bindings (no `tensorrt` module; no wheel is installable without a registry)"
        f["tensorrt"] = None
    else:
        version = _output([sys.executable, "-c", "import tensorrt; print(tensorrt.__version__)"], timeout=120)
        f["tensorrt"] = version.strip() if version else None
        if version is None:
            m.missing["tensorrt"] = "the TensorRT Python bindings do not import (`python -c 'import tensorrt'` fails)"
    if importlib.util.find_spec("polygraphy") is None:
        m.missing["polygraphy"] = "no polygraphy (hybridtrt build runs through its API)"
    if importlib.util.find_spec("pytest") is None:
        m.missing["pytest"] = "no pytest"
    root, where = find_tensorrt_root()
    f["tensorrt_root"] = str(root) if root else None
    f["tensorrt_root_search"] = where
    return m


# ---------------------------------------------------------------------------------------------------
# steps


@dataclass
class Context:
    """What a step's process gets: where to work, what earlier steps made, and its deadline.

    Attributes:
        workdir: Shared scratch directory of this check (exports, engines, logs).
        artefacts: Paths earlier steps produced (``kernels_library``, ``trt_library``, ``bf16_engine``, ...).
        facts: The driver's `Machine.facts`.
        deadline: ``time.monotonic()`` by which the step must have written its result.
        result_path: Where the step's result JSON goes (rewritten by `save`).
        figures: What the step measured (goes into its JSON record).
        produced: Artefacts this step made, and ``missing`` reasons for those it could not.
    """

    workdir: Path
    artefacts: dict[str, Any]
    facts: dict[str, Any]
    deadline: float
    result_path: Path
    figures: dict[str, Any] = field(default_factory=dict)
    produced: dict[str, Any] = field(default_factory=dict)

    def left(self, margin: float = 3.0) -> float:
        """Seconds this step may still spend on a command (a margin kept to write the result)."""
        return max(1.0, self.deadline - time.monotonic() - margin)

    def save(self, status: str = "running", reason: str | None = None) -> None:
        record = {"status": status, "reason": reason, "figures": self.figures, "artefacts": self.produced}
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(self.result_path)

    def run(self, cmd: list[str], *, what: str, check: bool = True) -> tuple[int, str, float]:
        """Run ``cmd`` from the repository root within the step's time; echo its output to the step log.

        Returns:
            ``(exit code, output, seconds)``.

        Raises:
            StepFailure: It did not finish in time, or (``check``) exited non-zero.
        """
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=self.left(), check=False)
        except subprocess.TimeoutExpired as err:
            out = _text(err.stdout) + _text(err.stderr)
            print(out, flush=True)
            raise StepFailure(f"{what} did not finish in {time.perf_counter() - start:.0f} s", output=out) from None
        out = proc.stdout + proc.stderr
        seconds = time.perf_counter() - start
        print(out, flush=True)
        if check and proc.returncode != 0:
            raise StepFailure(f"{what} exited {proc.returncode}: {_last_line(out)}")
        return proc.returncode, out, seconds

    def cli(self, *args: str, what: str, check: bool = True) -> tuple[int, str, float]:
        """``hybridtrt ARGS`` (as ``python -m hybridtrt.cli.main``: no install needed)."""
        return self.run([sys.executable, "-m", "hybridtrt.cli.main", *args], what=what, check=check)

    def cli_parallel(self, jobs: dict[str, list[str]]) -> float:
        """Several ``hybridtrt`` commands at once (exports are CPU-bound); seconds until all finished.

        Raises:
            StepFailure: One did not finish in time or exited non-zero.
        """
        start = time.perf_counter()
        procs = {}
        for name, args in jobs.items():
            cmd = [sys.executable, "-m", "hybridtrt.cli.main", *args]
            print(f"$ {' '.join(cmd)} &", flush=True)
            log = (self.workdir / f"{name}.log").open("w")
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
        failed: list[str] = []
        for name, (proc, log) in procs.items():
            try:
                code = proc.wait(timeout=self.left())
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            log.close()
            out = (self.workdir / f"{name}.log").read_text()
            print(f"--- {name} ---\n{out}", flush=True)
            if code != 0:
                failed.append(f"{name} " + ("did not finish in time" if code is None else f"exited {code}: {_last_line(out)}"))
        if failed:
            raise StepFailure("; ".join(failed))
        return time.perf_counter() - start


@dataclass(frozen=True)
class Step:
    """One step of the check.

    Attributes:
        name: Key in the JSON.
        budget_s: Its time budget (the ``timeout`` of its process).
        needs: Requirements of the machine (`Machine.missing` keys) it cannot run without.
        uses: ``(step, artefact)`` pairs it needs from earlier steps.
        body: The step; returns a one-line summary, raises `Skip` / `StepFailure` (or anything: a failure).
    """

    name: str
    budget_s: int
    needs: tuple[str, ...]
    uses: tuple[tuple[str, str], ...]
    body: Callable[[Context], str]


STEPS: dict[str, Step] = {}


def step(name: str, budget_s: int, needs: Iterable[str] = (), uses: Iterable[tuple[str, str]] = ()) -> Callable:
    """Register a step (in order of registration)."""

    def register(body: Callable[[Context], str]) -> Callable[[Context], str]:
        STEPS[name] = Step(name, budget_s, tuple(needs), tuple(uses), body)
        return body

    return register


TRT = ("cuda_gpu", "tensorrt", "polygraphy")


@step("build", 90, needs=("cuda_gpu", "sm89", "nvcc", "cmake"))
def build_step(ctx: Context) -> str:
    from hybridtrt.plugins.build import build_plugins
    from hybridtrt.plugins.ptxas import hot_kernels, parse_ptxas

    arch = ctx.facts["compute_capability"].removeprefix("sm_")
    root = ctx.facts.get("tensorrt_root")
    command = ["hybridtrt", "plugins", "build", "--cuda-archs", arch] + (["--tensorrt-root", root] if root else [])
    ctx.figures["command"] = " ".join(command)
    print("$ " + ctx.figures["command"], flush=True)
    result = build_plugins(tensorrt_root=root, cuda_archs=arch)
    ctx.produced["kernels_library"] = str(result.kernels_library)
    if result.trt_library is not None:
        ctx.produced["trt_library"] = str(result.trt_library)
    else:
        ctx.produced.setdefault("missing", {})["trt_library"] = (
            "plugins built without TensorRT headers (" + ctx.facts.get("tensorrt_root_search", "") + ")"
        )
    kernels = hot_kernels(parse_ptxas(result.ptxas_log.read_text())) if result.ptxas_log.is_file() else []
    spills = [k for k in kernels if k.spill_stores or k.spill_loads]
    ctx.figures.update(
        build_s=round(result.seconds, 1),
        cuda_archs=result.cuda_archs,
        tensorrt_root=str(result.tensorrt_root) if result.tensorrt_root else None,
        trt_library=ctx.produced.get("trt_library"),
        hot_kernels=len(kernels),
        spilling_kernels=[f"{k.kernel} {k.arch}" for k in spills],
    )
    what = "kernels + TensorRT plugins" if result.trt_library else "kernels only (no TensorRT headers)"
    return f"sm_{arch} {what}, {len(spills)} spilling, {result.seconds:.0f} s"


def marked_test_files(root: Path = REPO / "tests") -> list[Path]:
    """The test modules that carry the ``gpu`` or ``tensorrt`` marker (``pytest.mark.gpu`` / ``.tensorrt``)."""
    pattern = re.compile(r"\bmark\.(gpu|tensorrt)\b")
    return sorted(p for p in root.rglob("test_*.py") if pattern.search(p.read_text(errors="replace")))


@step("pytest", 160, needs=("cuda_gpu", "pytest"))
def pytest_step(ctx: Context) -> str:
    """``pytest -m "gpu or tensorrt"`` on the modules that carry those markers: collecting only them, an unrelated
    module that does not import with the device's packages cannot fail the step."""
    junit = ctx.workdir / "junit.xml"
    junit.unlink(missing_ok=True)
    files = [str(p.relative_to(REPO)) for p in marked_test_files()] or ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", *files]  # fmt: skip
    ctx.figures["command"] = 'pytest -m "gpu or tensorrt" ' + " ".join(files)
    try:
        code, out, seconds = ctx.run(cmd, what="pytest", check=False)
    except StepFailure as err:
        ctx.figures.update(pytest_counts(err.output, junit=None))
        raise StepFailure(f"pytest did not finish in its budget; so far {count_line(ctx.figures)}") from None
    counts = pytest_counts(out, junit if junit.is_file() else None)
    ctx.figures.update(counts, exit_code=code, seconds_pytest=round(seconds, 1))
    if code not in (0, 5) or counts["failed"] or counts["errors"]:
        names = ", ".join(counts.get("failed_tests", [])[:3])
        raise StepFailure(f"pytest exit {code}: {count_line(counts)}" + (f" ({names})" if names else ""))
    return count_line(counts)


def pytest_counts(out: str, junit: Path | None) -> dict[str, Any]:
    """Test counts from pytest's junit XML, else its ``-q`` summary line, else its progress characters.

    Returns:
        ``{"passed", "failed", "skipped", "errors", "source"}`` plus ``failed_tests`` and ``skip_reasons``
        (the three commonest) when the XML has them.
    """
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    if junit is not None:
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            failed, reasons = [], {}
            for case in root.iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                kinds = {child.tag for child in case}
                if "failure" in kinds:
                    counts["failed"] += 1
                    failed.append(name)
                elif "error" in kinds:
                    counts["errors"] += 1
                    failed.append(name)
                elif "skipped" in kinds:
                    counts["skipped"] += 1
                    message = next(c for c in case if c.tag == "skipped").get("message", "")
                    reasons[message] = reasons.get(message, 0) + 1
                else:
                    counts["passed"] += 1
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
            return {**counts, "source": "junit", "failed_tests": failed[:20], "skip_reasons": dict(top)}
    last = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s", line)), "")
    summary = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", last)
    if summary:
        for number, kind in summary:
            key = {"error": "errors", "xfailed": "skipped", "xpassed": "passed"}.get(kind, kind)
            counts[key] += int(number)
        return {**counts, "source": "summary line"}
    progress = "".join(line for line in out.splitlines() if re.fullmatch(r"[.sFExX]+( +\[ *\d+%\])?", line.strip()))
    for char, key in ((".", "passed"), ("F", "failed"), ("s", "skipped"), ("E", "errors")):
        counts[key] = progress.count(char)
    return {**counts, "source": "progress (unfinished)"}


def count_line(c: dict[str, Any]) -> str:
    return f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped, {c.get('errors', 0)} errors"


#: ``--initializer-range`` of step `engines`' checkpoint: an LLM's usual init. The presets' default 0.3 is a
#: deliberately chaotic model whose FP8 export fails the FP8 gate on ONNX Runtime already
#: (benchmarks/fp8_accuracy.py); step `static` keeps 0.3, whose fp32 greedy tokens have no near-ties
#: (tests/runtime/test_tensorrt_gpu.py asserts TensorRT's equal ONNX Runtime's on it).
ENGINES_INIT_RANGE = "0.02"


def ensure_checkpoint(ctx: Context, initializer_range: str | None = None) -> Path:
    """A tiny ``tiny-nemotron-h`` checkpoint in the workdir (made once per initializer range)."""
    ckpt = ctx.workdir / f"checkpoint-{initializer_range or 'default'}"
    if not (ckpt / "config.json").is_file():
        extra = ["--initializer-range", initializer_range] if initializer_range else []
        ctx.cli("preset", "tiny-nemotron-h", "-o", str(ckpt), *extra, "--force", what="preset")
    return ckpt


#: Exports of step `engines`: name -> export flags.
ENGINE_VARIANTS = {"bf16": ["--dtype", "bf16"], "fp8": ["--dtype", "bf16", "--quantize", "fp8", "--calib-random", "4"]}
#: Profiles of the small engines: validate's default prompts (4 rows, <= 48 tokens, 8 steps) fit.
ENGINE_LIMITS = ["--max-batch", "4", "--max-input-len", "64", "--max-cache-len", "128"]
PROMPTS = {"ids": [[5, 17, 99, 42, 7, 3, 250, 64], [0, 0, 0, 3, 4, 200, 11, 9]],
           "mask": [[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]}  # fmt: skip


def _plugins_flag(ctx: Context) -> list[str]:
    lib = ctx.artefacts.get("trt_library")
    return ["--plugins", lib] if lib else []


def worst_check(report: dict[str, Any]) -> dict[str, Any] | None:
    """The worst check of a ``validate --json`` report: the first failing one, else the largest rel L2 / allowed."""
    checks = report.get("checks") or []
    if not checks:
        return None

    def badness(c: dict[str, Any]) -> tuple[int, float]:
        ratio = (c.get("rel_l2") or 0.0) / c["allowed"] if c.get("allowed") else (1.0 - (c.get("cosine") or 0.0))
        return (0 if c.get("passed") else 1, ratio if c.get("finite", True) else float("inf"))

    c = max(checks, key=badness)
    keys = ("phase", "name", "step", "rel_l2", "allowed", "cosine", "max_abs", "failures")
    return {k: c.get(k) for k in keys}


def validate(ctx: Context, export: Path, backend: str, engine: Path | None, tag: str) -> dict[str, Any]:
    """``hybridtrt validate EXPORT --backend BACKEND`` with a JSON report: verdict, worst check, token agreement."""
    out = ctx.workdir / f"validate-{tag}-{backend}.json"
    args = ["validate", str(export), "--backend", backend, "--json", str(out), "--random", "4", "--steps", "8"]
    code, _, seconds = ctx.cli(*args, *(["--engine", str(engine)] if engine else []), what=f"validate {tag} {backend}", check=False)
    if code not in (0, 1) or not out.is_file():
        raise StepFailure(f"validate {tag} --backend {backend} exited {code} without a report")
    report = json.loads(out.read_text())
    return {
        "verdict": "PASS" if report.get("passed") else "FAIL",
        "worst": worst_check(report),
        "token_agreement": report.get("token_agreement"),
        "teacher_forced_top1": report.get("teacher_forced_top1"),
        "seconds": round(seconds, 1),
    }


def compare_generation(a: Any, b: Any, max_new_tokens: int = 8) -> dict[str, Any]:
    """Greedy generation of `a` against `b` on `PROMPTS`.

    Logits are compared on the steps whose context both share: up to and including the first step where a
    token differs (after it the two continue different texts).

    Returns:
        tokens_equal, token_agreement, steps_compared, first / min logits cosine, max logits rel L2, finite.
    """
    import torch

    ids, mask = torch.tensor(PROMPTS["ids"]), torch.tensor(PROMPTS["mask"])
    ra = a.generate(ids, mask, max_new_tokens=max_new_tokens, keep_logits=True)
    rb = b.generate(ids, mask, max_new_tokens=max_new_tokens, keep_logits=True)
    cosines, rels, finite = [], [], True
    for i, (la, lb) in enumerate(zip(ra.logits, rb.logits)):
        la, lb = la.double().flatten(), lb.double().flatten()
        finite = finite and bool(torch.isfinite(la).all())
        cosines.append(float(torch.nn.functional.cosine_similarity(la, lb, dim=0)))
        rels.append(float((la - lb).norm() / lb.norm().clamp_min(1e-30)))
        if not torch.equal(ra.tokens[:, i], rb.tokens[:, i]):
            break
    return {
        "tokens_equal": bool(torch.equal(ra.tokens, rb.tokens)),
        "token_agreement": float((ra.tokens == rb.tokens).float().mean()),
        "steps_compared": len(cosines),
        "first_logits_cosine": cosines[0] if cosines else None,
        "min_logits_cosine": min(cosines) if cosines else None,
        "max_logits_rel_l2": max(rels) if rels else None,
        "finite": finite,
    }


@step("engines", 150, needs=TRT, uses=(("build", "kernels_library"),))
def engines_step(ctx: Context) -> str:
    from hybridtrt.engine.sidecar import read_sidecar
    from hybridtrt.runtime.onnxruntime import OrtModel
    from hybridtrt.runtime.tensorrt import TrtModel

    ckpt = ensure_checkpoint(ctx, ENGINES_INIT_RANGE)
    exports = {v: ctx.workdir / f"export-{v}" for v in ENGINE_VARIANTS}
    seconds = ctx.cli_parallel(
        {f"export-{v}": ["export", str(ckpt), "-o", str(exports[v]), *flags, "--no-verify", "--force"] for v, flags in ENGINE_VARIANTS.items()}
    )
    ctx.figures["exports_s"] = round(seconds, 1)  # both at once
    ctx.produced["bf16_export"] = str(exports["bf16"])
    verdicts = []
    for variant, export in exports.items():
        fig: dict[str, Any] = ctx.figures.setdefault(variant, {})
        engine = ctx.workdir / f"{variant}.engine"
        _, _, seconds_build = ctx.cli("build", str(export), "-o", str(engine), *ENGINE_LIMITS, *_plugins_flag(ctx), what=f"build {variant}")
        fig["build_s"] = round(seconds_build, 1)
        ctx.produced[f"{variant}_engine"] = str(engine)
        sidecar = read_sidecar(engine)
        fig["engine_MiB"] = round(engine.stat().st_size / 2**20, 2)
        fig["plugins"] = sidecar.get("plugins")
        fig["attention"] = sidecar.get("attention")
        ctx.save()
        fig["validate_trt"] = validate(ctx, export, "trt", engine, variant)
        fig["validate_ort"] = validate(ctx, export, "ort", None, variant)
        fig["trt_vs_ort"] = compare_generation(TrtModel(engine), OrtModel(export))
        ctx.save()
        verdicts.append((variant, fig["validate_trt"]["verdict"], fig["validate_ort"]["verdict"]))
    failed = [f"{v} TensorRT {t}" + (" (ONNX Runtime fails too: the export's own error)" if o == "FAIL" else "")
              for v, t, o in verdicts if t != "PASS"]  # fmt: skip
    if failed:
        raise StepFailure("validate: " + "; ".join(failed))
    return ", ".join(f"{v} {t}" for v, t, _ in verdicts) + " (validate --backend trt)"


@step("double_load", 40, needs=TRT, uses=(("engines", "bf16_engine"), ("build", "trt_library")))
def double_load_step(ctx: Context) -> str:
    import tensorrt as trt
    import torch

    from hybridtrt.engine.build import build_engine
    from hybridtrt.engine.plugin_registry import loaded_libraries
    from hybridtrt.runtime.tensorrt import TrtModel

    lib = ctx.artefacts["trt_library"]
    ids = torch.tensor(PROMPTS["ids"])
    start = time.perf_counter()
    built = build_engine(ctx.artefacts["bf16_export"], ctx.workdir / "double.engine", plugins=lib,
                         max_batch=2, max_input_len=16, max_cache_len=32).engine  # fmt: skip
    ctx.figures["build_s"] = round(time.perf_counter() - start, 1)
    tokens = {}
    for label, engine in (("built_then_loaded", built), ("first", ctx.artefacts["bf16_engine"]), ("second", ctx.artefacts["bf16_engine"])):
        model = TrtModel(engine)
        tokens[label] = model.generate(ids, max_new_tokens=6).tokens
        ctx.figures[f"{label}_tokens"] = tokens[label].tolist()
    libraries = loaded_libraries(trt)
    ctx.figures.update(loads=3, builds=1, libraries_registered=[str(x.path) for x in libraries])
    if len(libraries) != 1:
        raise StepFailure(f"{len(libraries)} plugin libraries registered after 1 build + 3 loads (expected 1)")
    if not torch.equal(tokens["first"], tokens["second"]):
        raise StepFailure("two TrtModel on the same engine generated different tokens")
    return "1 build + 3 loads in one process, 1 library registered"


@step("static", 80, needs=TRT, uses=(("build", "kernels_library"),))
def static_step(ctx: Context) -> str:
    import torch

    from hybridtrt.runtime.onnxruntime import OrtModel
    from hybridtrt.runtime.tensorrt import TrtModel

    ckpt = ensure_checkpoint(ctx)
    export, engine = ctx.workdir / "export-static", ctx.workdir / "static.engine"
    _, _, seconds = ctx.cli("export", str(ckpt), "-o", str(export), "--kv-cache", "static", "--max-cache-len", "256",
                            "--no-verify", "--force", what="static export")  # fmt: skip
    ctx.figures["export_s"] = round(seconds, 1)
    _, _, seconds = ctx.cli("build", str(export), "-o", str(engine), "--max-batch", "2", "--max-input-len", "64",
                            "--max-cache-len", "256", *_plugins_flag(ctx), what="static build")  # fmt: skip
    ctx.figures["build_s"] = round(seconds, 1)
    ctx.save()
    ids, mask = torch.tensor(PROMPTS["ids"]), torch.tensor(PROMPTS["mask"])
    new = 16
    expected = OrtModel(export, use_decode_graph=False).generate(ids, mask, max_new_tokens=new).tokens
    model = TrtModel(engine)
    graphed = model.generate(ids, mask, max_new_tokens=new)
    graphs = model.decode_graphs
    eager = TrtModel(engine, cuda_graphs=False).generate(ids, mask, max_new_tokens=new)
    ctx.figures.update(
        kv_cache=model.flavour.kind,
        max_cache_len=model.flavour.max_cache_len,
        captures=getattr(graphs, "captures", None),
        replays=getattr(graphs, "replays", None),
        tokens_equal_ort=bool(torch.equal(graphed.tokens, expected)),
        eager_tokens_equal_ort=bool(torch.equal(eager.tokens, expected)),
        decode_tokens_per_s_graphs=round(graphed.decode_tokens_per_s, 1),
        decode_tokens_per_s_eager=round(eager.decode_tokens_per_s, 1),
        new_tokens=new,
    )
    problems = []
    if graphs is None or not graphs.captures or not graphs.replays:
        problems.append(f"no CUDA-graph replay (captures {ctx.figures['captures']}, replays {ctx.figures['replays']})")
    if not ctx.figures["tokens_equal_ort"]:
        problems.append("tokens (CUDA graphs) differ from ONNX Runtime's")
    if not ctx.figures["eager_tokens_equal_ort"]:
        problems.append("tokens (eager) differ from ONNX Runtime's")
    if problems:
        raise StepFailure("; ".join(problems))
    return f"{graphs.captures} captures, {graphs.replays} replays, tokens == ORT"


#: Step `timing`: Nemotron-Nano-9B-v2 scan shapes and lengths.
TIMING_LENGTHS = [2048, 16384, 65536]
TIMING_DTYPES = ["bf16", "fp16"]


def time_scans(lib: Any, *, lengths: list[int], dtypes: list[str], shape: dict[str, int] | None = None,
               check: bool = True, progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Time `KernelLibrary.chunk_scan` (batch 1) with benchmarks/gpu/run.py's helpers; check it against the eager
    chunked reference in fp32 math on the same rounded inputs.

    Args:
        lib: A `KernelLibrary` (or run.py's `EagerStandIn` on CPU, as the tests do).
        lengths / dtypes: L values and activation dtypes (``"bf16"``, ``"fp16"``, ``"fp32"``).
        shape: ``heads, head_dim, d_state, groups, chunk_size``; None means run.NANO (Nemotron-Nano-9B-v2).
        check: Compare y and the final state with the reference (skipped, and said, when it runs out of memory).
        progress: Called with each row as it is done (the step saves its partial figures).

    Returns:
        One row per (dtype, L): ms, Mtok/s, workspace MiB, traffic-model GB/s, rel L2 of y / state, the gates and
        ``check`` (``ok``, ``FAIL: ...`` — an error of the kernel call too —, or ``not checked (...)``).
    """
    sys.path.insert(0, str(HERE))
    import run  # benchmarks/gpu/run.py: inputs, timing, traffic model

    s = dict(run.NANO if shape is None else shape)
    rows = []
    for dname in dtypes:
        for length in lengths:
            try:
                row = _scan_row(run, lib, dname, length, s, check)
            except Exception as err:  # noqa: BLE001 - a kernel error or OOM is this row's failure; the next rows still run
                row = {"act": dname, "L": length, "check": f"FAIL: {type(err).__name__}: {_first_line(str(err))}"}
            run.empty_cache()
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def _scan_row(run: Any, lib: Any, dname: str, length: int, s: dict[str, int], check: bool) -> dict[str, Any]:
    """One (dtype, L) row of `time_scans`."""
    import torch

    from hybridtrt.ops import mamba2_chunk_scan_eager
    from hybridtrt.plugins.tolerances import kernel_gate

    h, p, n, g, q = s["heads"], s["head_dim"], s["d_state"], s["groups"], s["chunk_size"]
    dtype = run.DTYPES[dname]
    x, dt, A, B, C, D, s0 = run.make_inputs(1, length, h, p, g, n, dtype, torch.float32, seed=5)
    y, final = run.nan_y(x), torch.empty_like(s0)
    act = run.dname_to(dname)
    size = lib.chunk_scan_workspace_size(1, length, h, p, g, n, q, act, act, "float32")
    ws = torch.empty(size, dtype=torch.uint8, device=x.device)
    t = run.time_cuda(lambda: lib.chunk_scan(x, dt, A, B, C, D, s0, y=y, final_state=final, workspace=ws, chunk_size=q))
    model = run.traffic.Shapes(h, p, n, g, q, length, act=4 if dtype == torch.float32 else 2)
    row: dict[str, Any] = {
        "act": dname, "L": length, "ms": round(t * 1e3, 4), "Mtok_s": round(length / t / 1e6, 2),
        "workspace_MiB": round(size / 2**20, 1),
        "model_GBps": round(run.traffic.totals(run.traffic.ours(model))[0] * length / t / 1e9, 1),
        "gate_y": kernel_gate("scan_y", dtype), "gate_state": kernel_gate("state", dtype),
    }  # fmt: skip
    if not check:
        return row
    del ws
    try:
        y_ref, s_ref = mamba2_chunk_scan_eager(x.float(), dt.float(), A, B.float(), C.float(), D, s0, q)
        run.sync()
    except torch.OutOfMemoryError:
        row["check"] = "not checked (reference out of memory)"
        return row
    finite = bool(torch.isfinite(y).all() and torch.isfinite(final).all())
    row["rel_l2_y"], row["rel_l2_state"] = run.rel_l2(y, y_ref), run.rel_l2(final, s_ref)
    ok = finite and row["rel_l2_y"] <= row["gate_y"] and row["rel_l2_state"] <= row["gate_state"]
    row["check"] = "ok" if ok else f"FAIL: y {run.diagnose(y, y_ref)}; state {run.diagnose(final, s_ref)}"
    return row


@step("timing", 60, needs=("cuda_gpu", "sm89"), uses=(("build", "kernels_library"),))
def timing_step(ctx: Context) -> str:
    from hybridtrt.plugins.kernels import KernelLibrary

    lib = KernelLibrary(ctx.artefacts["kernels_library"])
    lib.prepare()
    ctx.figures["shape"] = "Nemotron-Nano-9B-v2: H=128, P=80, N=128, G=8, chunk 128, batch 1, fp32 state"
    rows: list[dict[str, Any]] = []
    ctx.figures["scan"] = rows

    def progress(row: dict[str, Any]) -> None:
        rows.append(row)
        ctx.save()

    time_scans(lib, lengths=TIMING_LENGTHS, dtypes=TIMING_DTYPES, progress=progress)
    bad = [f"{r['act']} L={r['L']}: {r['check']}" for r in rows if str(r.get("check", "")).startswith("FAIL")]
    if bad:
        raise StepFailure("; ".join(bad))
    best = max((r for r in rows if "ms" in r), key=lambda r: r["L"])
    checked = sum(r.get("check") == "ok" for r in rows)
    return f"L={best['L']} {best['act']}: {best['ms']:.2f} ms, {best['Mtok_s']:.1f} Mtok/s; {checked}/{len(rows)} checked ok"


def planted_steps(spec: str) -> None:
    """The test hook: ``pass`` adds a step that passes, ``fail`` one that fails, ``timeout`` one that outlives its
    1 s budget."""
    kinds = {k.strip() for k in spec.split(",") if k.strip()}
    if "pass" in kinds:

        @step("planted_pass", 10)
        def planted_pass(ctx: Context) -> str:
            ctx.figures["planted"] = True
            return "planted pass"

    if "fail" in kinds:

        @step("planted_fail", 10)
        def planted_fail(ctx: Context) -> str:
            ctx.figures["planted"] = True
            raise StepFailure(f"planted failure ({PLANT_ENV})")

    if "timeout" in kinds:

        @step("planted_timeout", 1)
        def planted_timeout(ctx: Context) -> str:
            time.sleep(60)
            return "unreachable"


# ---------------------------------------------------------------------------------------------------
# the step process


def run_step(name: str, workdir: Path) -> int:
    """Body of ``check.py --step NAME``: run one step, write ``NAME.result.json`` (status, reason, figures)."""
    context = json.loads((workdir / "context.json").read_text())
    ctx = Context(
        workdir=workdir,
        artefacts=context["artefacts"],
        facts=context["facts"],
        deadline=time.monotonic() + context["timeout_s"],
        result_path=workdir / f"{name}.result.json",
    )
    ctx.save()
    try:
        summary = STEPS[name].body(ctx)
    except Skip as err:
        print(f"skipped: {err}")
        ctx.save(SKIPPED, str(err))
    except StepFailure as err:
        print(f"FAILED: {err}")
        ctx.save(FAIL, str(err))
    except BaseException as err:  # noqa: BLE001 - any error of a step is its failure, recorded with the traceback
        traceback.print_exc()
        ctx.save(FAIL, f"{type(err).__name__}: {_first_line(str(err))}")
    else:
        ctx.figures["summary"] = summary
        ctx.save(PASS)
    return 0


# ---------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Check:
    """The driver: probes the machine, runs the steps in order, writes the JSON after each."""

    out: Path
    workdir: Path
    total_budget: float
    only: set[str] | None
    keep_workdir: bool = True
    machine: Machine = field(default_factory=Machine)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    artefacts: dict[str, Any] = field(default_factory=dict)
    missing_artefacts: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def log(self) -> Path:
        return self.out.with_suffix(".log")

    def skip_reason(self, s: Step) -> str | None:
        if self.only is not None and s.name not in self.only:
            return f"not selected (--only {','.join(sorted(self.only))})"
        missing = list(dict.fromkeys(self.machine.missing[n] for n in s.needs if n in self.machine.missing))
        if missing:
            return "; ".join(missing)
        for producer, artefact in s.uses:
            if artefact in self.artefacts:
                continue
            record = self.records.get(producer, {"status": "not run", "reason": None})
            why = self.missing_artefacts.get(artefact) or f"{record['status']}: {record.get('reason')}"
            return f"needs {artefact} from step {producer} ({why})"
        return None

    def run(self) -> int:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        try:
            self.machine = probe()
        except Exception as err:  # noqa: BLE001 - never crash: an unreadable machine skips every step, saying why
            why = f"probing the machine failed ({type(err).__name__}: {err})"
            self.machine = Machine(facts={"probe_error": why}, missing=dict.fromkeys(("cuda_gpu", "sm89", "nvcc", "cmake", "pytest"), why))
        self.write()
        for s in STEPS.values():
            try:
                self.records[s.name] = self.run_one(s)
            except Exception as err:  # noqa: BLE001 - the driver must not crash: an internal error fails the step
                reason = f"check.py internal error: {type(err).__name__}: {err}"
                self.records[s.name] = {"status": FAIL, "reason": reason, "seconds": 0.0, "budget_s": s.budget_s}
            self.write()
            print(self.row(s.name, self.records[s.name]), flush=True)
        self.write()
        print("\n" + self.table() + "\n" + self.summary_line() + f"\nresults: {self.out}", flush=True)
        return 1 if any(r["status"] == FAIL for r in self.records.values()) else 0

    def run_one(self, s: Step) -> dict[str, Any]:
        reason = self.skip_reason(s)
        left = self.total_budget - (time.monotonic() - self.started) - 5
        if reason is None and left < min(s.budget_s, 10):
            reason = f"no time left in the {self.total_budget:.0f} s budget ({max(left, 0):.0f} s)"
        if reason is not None:
            return {"status": SKIPPED, "reason": reason, "seconds": 0.0, "budget_s": s.budget_s}
        timeout = int(max(1, min(s.budget_s, left)))
        print(f"{s.name}: running (budget {timeout} s) ...", flush=True)
        (self.workdir / "context.json").write_text(
            json.dumps({"artefacts": self.artefacts, "facts": self.machine.facts, "timeout_s": timeout}, default=str)
        )
        result = self.workdir / f"{s.name}.result.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", s.name, "--workdir", str(self.workdir)]
        if shutil.which("timeout"):
            cmd = ["timeout", "--kill-after=5", str(timeout), *cmd]
        step_log = self.workdir / f"{s.name}.log"
        start = time.monotonic()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        with step_log.open("w") as log:
            try:
                code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout + 15, check=False).returncode
            except subprocess.TimeoutExpired:
                code = 124
        seconds = time.monotonic() - start
        text = step_log.read_text(errors="replace")
        with self.log.open("a") as f:
            f.write(f"\n===== {s.name} ({seconds:.1f} s, exit {code}) =====\n{text}")
        record: dict[str, Any] = {"status": FAIL, "reason": None}
        if result.is_file():
            done = json.loads(result.read_text())
            record.update(status=done["status"], reason=done["reason"], **done.get("figures", {}))
            produced = done.get("artefacts", {})
            self.missing_artefacts.update(produced.pop("missing", {}))
            self.artefacts.update(produced)
        if code in (124, 137) or (result.is_file() and record["status"] == "running"):
            record.update(status=FAIL, reason=f"timed out after {timeout} s (budget {s.budget_s} s)")
        elif record["status"] == "running" or not result.is_file():
            record.update(status=FAIL, reason=f"the step's process exited {code} without a result: {_last_line(text)}")
        record.update(seconds=round(seconds, 1), budget_s=s.budget_s)
        if record["status"] == FAIL and text.strip():
            record["log_tail"] = text.strip().splitlines()[-25:]
        return record

    def document(self) -> dict[str, Any]:
        counts = {label: sum(r["status"] == k for r in self.records.values()) for k, label in COUNTS.items()}
        return {
            "schema": SCHEMA,
            "device": self.machine.facts,
            "total_budget_s": self.total_budget,
            "seconds": round(time.monotonic() - self.started, 1),
            "workdir": str(self.workdir) if self.keep_workdir else None,
            "steps": self.records,
            "summary": {**counts, "skip_reasons": self.skip_reasons(), "exit_code": 1 if counts["failed"] else 0},
        }

    def write(self) -> None:
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.document(), indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def skip_reasons(self) -> dict[str, list[str]]:
        """Each reason a step was skipped for (a step missing two things counts under both) -> the steps."""
        reasons: dict[str, list[str]] = {}
        for name, r in self.records.items():
            if r["status"] == SKIPPED:
                for reason in str(r["reason"]).split("; "):
                    reasons.setdefault(reason, []).append(name)
        return reasons

    @staticmethod
    def row(name: str, r: dict[str, Any]) -> str:
        seconds = f"{r['seconds']:6.1f}" if r.get("status") != SKIPPED else "     -"
        what = r.get("summary") if r["status"] == PASS else r.get("reason")
        line = f"{name:<15} {r['status']:<8}{seconds}  {what or ''}"
        return line if len(line) <= WIDTH else line[: WIDTH - 1] + "…"

    def table(self) -> str:
        head = f"{'step':<15} {'status':<8}{'secs':>6}  result"
        return "\n".join([head, "-" * WIDTH, *(self.row(n, r) for n, r in self.records.items())])

    def summary_line(self) -> str:
        return summary_line(self.document())


def summary_line(doc: dict[str, Any]) -> str:
    """``GPU check: 2 passed, 0 failed, 4 skipped (engines, static: no TensorRT ...)``."""
    s = doc["summary"]
    line = f"GPU check: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped"
    if s["skip_reasons"]:
        line += " (" + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in s["skip_reasons"].items()) + ")"
    return line


# ---------------------------------------------------------------------------------------------------
# RESULTS.md


def render(doc: dict[str, Any]) -> str:
    """The Markdown section of benchmarks/RESULTS.md for one check's JSON."""
    d = doc["device"]
    lines = [
        f"\n## {d.get('date')} — GPU check on {d.get('gpu') or 'no GPU'} ({d.get('compute_capability') or '-'})\n",
        f"`bash benchmarks/gpu/check.sh`: commit {d.get('commit')}{' (dirty)' if d.get('dirty') else ''}, driver "
        f"{d.get('driver')} (CUDA {d.get('cuda_driver')}), torch {d.get('torch')} (CUDA {d.get('cuda_torch')}), nvcc "
        f"{d.get('nvcc')}, TensorRT {d.get('tensorrt') or 'none'}; {doc['seconds']:.0f} s of {doc['total_budget_s']:.0f}. "
        f"{summary_line(doc)}.\n",
        "\n| step | status | s | result |\n|---|---|---|---|",
    ]
    for name, r in doc["steps"].items():
        what = (r.get("summary") if r["status"] == PASS else r.get("reason")) or ""
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {what.replace('|', '/')} |")
    scan = (doc["steps"].get("timing") or {}).get("scan") or []
    if scan:
        lines.append(f"\n{doc['steps']['timing'].get('shape', '')}\n")
        lines.append("| act | L | ms | Mtok/s | workspace MiB | model GB/s | rel L2 y | rel L2 state | check |\n|---|---|---|---|---|---|---|---|---|")
        formats = {"ms": ".3f", "Mtok_s": ".1f", "workspace_MiB": ".0f", "model_GBps": ".0f", "rel_l2_y": ".2e", "rel_l2_state": ".2e"}
        for r in scan:
            cells = [r["act"], r["L"], *("-" if r.get(k) is None else format(r[k], f) for k, f in formats.items()), r.get("check", "-")]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _last_line(text: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|Error|FAILED|Traceback", line)]
    return (errors or lines or ["(no output)"])[-1][:300]


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else HERE / "check.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: $OUT/gpu_check.json, else benchmarks/gpu/check.json)")
    parser.add_argument("--only", default=None, help=f"comma-separated steps to run (others are skipped): {', '.join(STEPS)}")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help=f"seconds for the whole check (default {TOTAL_BUDGET_S})")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory for exports, engines and logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp workdir")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="print a result JSON as a RESULTS.md section")
    parser.add_argument("--append-results", action="store_true", help=f"with --render: append it to {RESULTS.relative_to(REPO)}")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get(PLANT_ENV):
        planted_steps(os.environ[PLANT_ENV])
    if args.step is not None:
        return run_step(args.step, args.workdir)
    if args.render is not None:
        text = render(json.loads(args.render.read_text()))
        print(text)
        if args.append_results:
            with RESULTS.open("a") as f:
                f.write(text)
            print(f"appended to {RESULTS}")
        return 0
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    unknown = sorted((only or set()) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hybridtrt-gpu-check-"))
    keep = args.workdir is not None or args.keep
    check = Check(out=(args.out or default_out()).resolve(), workdir=workdir, total_budget=args.total_budget, only=only, keep_workdir=keep)
    try:
        return check.run()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
