"""``hybridtrt validate --load-outputs``: outputs recorded by the real ``polygraphy run`` CLI (in a
subprocess, as on a GPU machine without PyTorch), checked here against the reference; a fault
planted in the saved JSON fails and is named."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridtrt.cli.main import main


def _polygraphy(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a printed ``polygraphy run`` line as a user would (the venv's CLI on PATH)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("polygraphy", path=env["PATH"]), "polygraphy CLI must be installed beside hybridtrt"
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def recorded(make_export, tmp_path_factory):
    """``(export_dir, polygraphy_dir, printed commands)``: ``hybridtrt compare --per-layer`` wrote
    the inputs and printed the commands; ONNX Runtime's outputs, with every layer output, were
    recorded by the printed ``polygraphy run … --save-outputs`` line."""
    _, out = make_export("tiny-nemotron-h")
    pg = tmp_path_factory.mktemp("pg")
    assert main(["compare", str(out), "-o", str(pg), "--per-layer"]) == 0
    from hybridtrt.validation.polygraphy_bridge import write_polygraphy_data

    files = write_polygraphy_data(out, None, pg, per_layer=True)  # the same files, and their argv
    _polygraphy(files.argv["onnxrt-save"])
    return out, pg, files


def _json_report(tmp_path: Path, argv: list[str]) -> tuple[int, dict]:
    path = tmp_path / "report.json"
    code = main([*argv, "--json", str(path)])
    return code, json.loads(path.read_text()) if path.exists() else {}


def test_round_trip_through_the_polygraphy_cli_passes(recorded, tmp_path, capsys):
    out, pg, _ = recorded
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(pg / "onnxrt.json"), "--per-layer"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert report["passed"] and report["precision"] == "fp32" and report["steps"] == 1
    layer_outputs = {c["name"] for c in report["checks"] if c["phase"] == "layer" and c["name"].startswith("layer_output.")}
    assert layer_outputs == {f"layer_output.{i}" for i in range(8)}  # recorded under their graph names, mapped back
    assert {(c["phase"], c["name"]) for c in report["checks"]} >= {("prefill", "logits"), ("decode", "logits"), ("prefill", "present_ssm_state.7")}
    assert "onnxrt-runner" in text and "PASS" in text


def _plant(src: Path, dst: Path, iteration: int, name: str, factor: float) -> None:
    """Multiply one recorded tensor of one iteration by ``factor`` in a copy of the RunResults JSON."""
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(src))
    runner, iterations = next(iter(results.items()))
    iterations[iteration][name] = iterations[iteration][name] * np.float32(factor)
    results.save(str(dst))


def test_planted_state_fault_in_the_saved_json_fails_and_is_named(recorded, tmp_path, capsys):
    out, pg, _ = recorded
    bad = tmp_path / "bad.json"
    _plant(pg / "onnxrt.json", bad, 0, "present_ssm_state.4", 1.01)
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(bad), "--load-inputs", str(pg / "inputs.json"), "--per-layer"])
    text = capsys.readouterr().out
    assert code == 1 and "FAIL" in text
    assert report["first_divergence"]["layer"] == 4 and report["first_divergence"]["tensor"] == "present_ssm_state.4"
    assert "first divergence: layer 4 — present_ssm_state.4" in text
    failing = {(c["phase"], c["name"]) for c in report["checks"] if not c["passed"]}
    assert failing == {("prefill", "present_ssm_state.4"), ("layer", "present_ssm_state.4")}


def test_planted_layer_output_fault_is_named_first(recorded, tmp_path):
    out, pg, files = recorded
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.validation.layers import layer_taps

    tensor = layer_taps(out, read_manifest(out)).tensors["layer_output.2"]
    assert tensor in files.onnx_outputs and not tensor.startswith("layer_output")
    bad = tmp_path / "bad.json"
    _plant(pg / "onnxrt.json", bad, 1, tensor, 1.001)  # the decode iteration
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(bad), "--load-inputs", str(pg / "inputs.json"), "--per-layer"])
    assert code == 1
    assert report["first_divergence"] == {"layer": 2, "tensor": "layer_output.2", "why": report["first_divergence"]["why"], "step": 1}
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["layer_output.2"]  # logits of a single call untouched


def test_directory_of_per_iteration_files_and_default_inputs(recorded, tmp_path):
    """``--save-outputs DIR`` (polygraphy's streamed form); inputs found beside the results."""
    out, pg, files = recorded
    work = shutil.copytree(pg, tmp_path / "pg")
    argv = [a.replace(str(pg), str(work)) for a in files.argv["onnxrt-save"]]
    argv[-1] = str(work / "onnxrt_dir")
    _polygraphy(argv)
    assert sorted(p.name for p in (work / "onnxrt_dir").iterdir()) == ["0000000000.json", "0000000001.json"]
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(work / "onnxrt_dir")])
    assert code == 0 and report["steps"] == 1
    assert any(str(work / "inputs.json") in note for note in report["notes"])


def test_engine_route_chains_per_profile_files(recorded, tmp_path):
    """The two-profile engine route: one recording per profile, chained on both sides. Recorded
    here with ONNX Runtime standing in for the engine (runner names differ by timestamp)."""
    out, pg, files = recorded
    saved = []
    for phase in ("prefill", "decode"):
        saved.append(tmp_path / f"ort.{phase}.json")
        _polygraphy(["polygraphy", "run", str(files.model), "--onnxrt", "--load-inputs", str(pg / f"inputs.{phase}.json"), "--save-outputs", str(saved[-1])])
    printed = files.argv["validate-engine"]
    assert printed[:3] == ["hybridtrt", "validate", str(out)]
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", *map(str, saved), "--load-inputs", str(pg / "inputs.prefill.json"), str(pg / "inputs.decode.json")])
    assert code == 0 and report["steps"] == 1 and " + " in report["backend"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda pg: ["--load-outputs", str(pg / "reference.json")], "only hybridtrt compare's reference"),
        (lambda pg: ["--load-outputs", str(pg / "onnxrt.json"), "--load-inputs", str(pg / "inputs.prefill.json")], "have 2 iteration(s), the inputs 1"),
        (lambda pg: ["--load-outputs", str(pg / "missing.json")], "does not exist"),
        (lambda pg: ["--load-outputs", str(pg / "inputs.json")], "not a polygraphy RunResults"),
        (lambda pg: ["--load-outputs", str(pg / "onnxrt.json"), "--runner", "trt"], "--runner 'trt' is not in"),
        (lambda pg: ["--load-outputs", str(pg / "onnxrt.json"), "--backend", "trt"], "takes no --backend"),
    ],
)
def test_bad_recorded_inputs_are_typed_errors(recorded, capsys, extra, message):
    out, pg, _ = recorded
    assert main(["validate", str(out), *extra(pg)]) == 2
    err = capsys.readouterr().err
    assert "[input]" in err and message in err and "Traceback" not in err


def test_printed_commands_round_trip_through_shlex(recorded):
    _, _, files = recorded
    assert set(files.commands) >= {"onnxrt", "trt", "onnxrt-save", "trt-save", "validate", "engine-prefill", "engine-decode", "validate-engine"}
    for name, line in files.commands.items():
        assert shlex.split(line) == files.argv[name], name
    assert any(a.startswith("input_ids:[") for a in files.argv["trt"])  # the zsh/bash-hostile argument, quoted
    assert "'input_ids:[" in files.commands["trt"]


def test_an_moe_recording_is_judged_with_routing_held(make_export, tmp_path):
    """For MoE exports the printed save command records each router's TopK indices; the reference
    is held to the recording's expert choices and the choices are gated: recorded choices moved to
    other experts fail the routing gate at that layer."""
    from polygraphy.comparator import RunResults

    from hybridtrt.graphs.held_routing import router_outputs
    from hybridtrt.validation.polygraphy_bridge import write_polygraphy_data

    _, out = make_export("tiny-nemotron3-moe")
    pg = tmp_path / "pg"
    files = write_polygraphy_data(out, None, pg)
    routers = router_outputs(out / "model.onnx")
    assert sorted(routers) == [1, 3, 6] and files.routers == list(routers.values()) and set(routers.values()) <= set(files.onnx_outputs)
    assert "--per-layer" not in files.argv["validate"]
    _polygraphy(files.argv["onnxrt-save"])
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(pg / "onnxrt.json")])
    assert code == 0 and report["passed"], report["notes"]
    assert sorted(report["routing"]) == ["1", "3", "6"] and all(r["flipped"] == 0 for r in report["routing"].values())
    assert report["routing_held_to"] == "backend"  # the reference follows the recording

    results = RunResults.load(str(pg / "onnxrt.json"))
    _, iterations = next(iter(results.items()))
    iterations[0][routers[3]] = (iterations[0][routers[3]] + 1) % 16  # every choice of layer 3 moved
    results.save(str(tmp_path / "bad.json"))
    code, report = _json_report(tmp_path, ["validate", str(out), "--load-outputs", str(tmp_path / "bad.json"), "--load-inputs", str(pg / "inputs.json")])
    assert code == 1 and not report["passed"]
    failed = [why.split(":")[0] for why in report["routing_failures"]]
    assert failed[0] == "MoE layer 3" and "MoE layer 1" not in failed, failed  # named from the first moved layer on
