"""The polygraphy bridge: files polygraphy reads unmodified, and the printed command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridtrt.cli.main import main
from hybridtrt.validation.polygraphy_bridge import compare_with_polygraphy, write_polygraphy_data
from tests.validation.faults import perturb_weight


def _run_printed(cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("polygraphy", path=env["PATH"]), "polygraphy CLI must be installed beside hybridtrt"
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h")


def test_printed_onnxrt_command_passes(exported, tmp_path):
    _, out = exported
    files = write_polygraphy_data(out, None, tmp_path / "pg")
    verdicts = compare_with_polygraphy(files)
    assert list(verdicts) == ["onnxrt"] and verdicts["onnxrt"].passed, verdicts["onnxrt"].failures
    assert files.check_error_stat == "mean" and set(files.atol) == set(files.feeds and _outputs(files))
    proc = _run_printed(files.commands["onnxrt"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout + proc.stderr


def _outputs(files) -> set[str]:
    from polygraphy.comparator import RunResults

    return set(RunResults.load(str(files.reference))[0][1][0].keys())


def test_printed_command_fails_on_planted_fault(exported, tmp_path):
    _, out = exported
    faulty = shutil.copytree(out, tmp_path / "faulty")
    files = write_polygraphy_data(faulty, None, tmp_path / "pg")  # reference from the intact checkpoint
    perturb_weight(faulty, "model.layers.2.mixer.out_proj.weight_t", 1.2)
    verdict = compare_with_polygraphy(files)["onnxrt"]
    assert not verdict.passed
    # Every failure names its iteration, the output, polygraphy's statistic and the tolerance it broke.
    assert any(f.startswith("prefill: logits: mean |Δ| ") and "> atol" in f and "call gate" in f for f in verdict.failures), verdict.failures
    assert not any("layer_output.1:" in f or "present_ssm_state.0:" in f for f in verdict.failures)  # before the fault
    proc = _run_printed(files.commands["onnxrt"])
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_gate_tolerances_pass_fp32_rounding_at_large_magnitudes_and_fail_past_the_gate(tmp_path):
    """The small preset's case without its minute of export: layer outputs at |x| ≈ 10⁴ with fp32
    rounding noise (rel L2 2e-6, below the 1e-5 layer gate) fail polygraphy's fixed elementwise
    atol/rtol 1e-3 but pass the gate-derived tolerances; an error 3× the gate fails them, named."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from hybridtrt.judge.tolerances import polygraphy_tolerance
    from hybridtrt.validation.polygraphy_bridge import REFERENCE_RUNNER, BridgeFiles, gate_tolerances, judge

    rng = np.random.default_rng(0)
    reference = [{"logits": rng.normal(0, 8, (2, 512)).astype(np.float32), "layer_output.3": rng.normal(0, 2000, (2, 24, 640)).astype(np.float32)} for _ in range(2)]

    def noisy(rel: float, name: str = "") -> list[dict[str, np.ndarray]]:
        """Error of rel L2 ``rel`` on ``name`` (every output when empty; 2e-6 on the others), spread
        over the tensor as reordering leaves it: the same size near zero as on large elements."""
        rms = lambda v: float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))  # noqa: E731
        return [
            {k: (v + (rel if k == name or not name else 2e-6) * rms(v) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in it.items()}
            for it in reference
        ]

    path = tmp_path / "reference.json"
    results = RunResults()
    results.append((REFERENCE_RUNNER, [IterationResult(o, runner_name=REFERENCE_RUNNER) for o in reference]))
    results.save(str(path))

    def verdict(files: BridgeFiles, outputs) -> list[str]:
        run = RunResults()
        run.append(("onnxrt", [IterationResult(o, runner_name="onnxrt") for o in outputs]))
        return judge(files, run)["onnxrt"].failures

    fixed = BridgeFiles(path, path, path, *polygraphy_tolerance("fp32"))
    assert any("layer_output.3" in f for f in verdict(fixed, noisy(2e-6)))  # what `demo --preset small-nemotron-h` hit
    atol, rtol, stat = gate_tolerances("fp32", reference)
    gated = BridgeFiles(path, path, path, atol, rtol, check_error_stat=stat)
    assert stat == "mean" and rtol == 0 and atol["layer_output.3"] > 100 * atol["logits"]
    assert verdict(gated, noisy(2e-6)) == []
    failures = verdict(gated, noisy(3e-5, "layer_output.3"))
    assert [f.split(": ", 2)[:2] for f in failures] == [["prefill", "layer_output.3"], ["decode", "layer_output.3"]], failures
    assert all("layer gate" in f and "> atol" in f for f in failures)


def test_compare_cli_prints_commands(exported, tmp_path, capsys):
    _, out = exported
    assert main(["compare", str(out), "--out", str(tmp_path / "pg")]) == 0
    text = capsys.readouterr().out
    assert "polygraphy run" in text and "--onnxrt" in text and "--trt --strongly-typed" in text
    assert (tmp_path / "pg" / "inputs.json").is_file() and (tmp_path / "pg" / "reference.json").is_file()
