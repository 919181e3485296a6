"""Verification before publishing: the whole graph, or windows of decoder layers in bounded memory."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hybridtrt.errors import ExportError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.exporter.verify import verify_export, window_plan
from hybridtrt.graphs.external_data import external_index
from hybridtrt.models import load_model

SPLIT = ExportOptions(split=True)


def test_window_plan():
    assert window_plan([10, 10, 10, 10], 25) == [(0, 1), (2, 3)]
    assert window_plan([10, 30, 10], 25) == [(0, 0), (1, 1), (2, 2)]  # a layer above budget is its own window
    assert window_plan([1] * 5, 100) == [(0, 4)]
    assert window_plan([7], 1) == [(0, 0)]


@pytest.fixture(scope="module", params=["tiny-nemotron-h", "tiny-mamba2"])
def exported(request, make_export):
    ckpt, out = make_export(request.param, SPLIT)
    return ckpt, out, read_manifest(out)


@pytest.mark.parametrize("lazy", [False, True])
def test_layer_windows_cover_every_layer_and_agree_with_the_whole_graph(exported, lazy):
    ckpt, out, manifest = exported
    model = load_model(ckpt, lazy=lazy)
    full = verify_export(out, model, manifest, mode="full")
    layers = verify_export(out, model, manifest, mode="layers", parameter_bytes=1)  # 1 byte: one layer per window
    n = model.config.num_layers
    for file, graph in layers["graphs"].items():
        assert graph["windows"] == [[i, i] for i in range(n + 1)]  # member n: the head alone
        # Both pass the fp32 floors; windows start from the reference's hidden state, so their
        # error is at most the whole graph's (which accumulates through every layer).
        assert 0 < graph["worst"]["rel_l2"] <= full["graphs"][file]["worst"]["rel_l2"] * 10
        assert full["graphs"][file]["worst"]["rel_l2"] <= full["graphs"][file]["worst"]["bound"] <= 1e-4
    assert layers["method"] == "layer-windows" and full["method"] == "full-graph"
    assert full["truth"] == "fp32 reference" and full["yardstick"] is None and full["executor"] == "onnxruntime-cpu"
    # Bigger windows, same verdict.
    wide = verify_export(out, model, manifest, mode="layers", parameter_bytes=32 * 400_000)  # 400 KB windows
    assert all(len(g["windows"]) < n for g in wide["graphs"].values())


def _plant_fault(out, tmp_path, tensor: str, factor: float = 1.5, dtype=np.float32):
    """A copy of the export with one weight scaled by ``factor`` in weights.data."""
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    location, offset, length = external_index(bad / "model.onnx")[tensor]
    with open(bad / location, "r+b") as f:
        f.seek(offset)
        w = np.frombuffer(f.read(length), dtype=dtype) * dtype(factor)
        f.seek(offset)
        f.write(w.astype(dtype).tobytes())
    return bad


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_planted_weight_fault_is_caught(make_export, tmp_path, mode):
    ckpt, out = make_export("tiny-nemotron-h", SPLIT)
    bad = _plant_fault(out, tmp_path, "model.layers.4.mixer.in_proj.weight_t")
    model = load_model(ckpt, lazy=True)
    with pytest.raises(ExportError, match="layers 4..4" if mode == "layers" else "disagrees with the fp32 reference") as e:
        verify_export(bad, model, read_manifest(bad), mode=mode, parameter_bytes=1)
    assert "present_ssm_state.4" in str(e.value)


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_fp16_export_judged_against_fp32_with_fp16_yardstick(make_export, tmp_path, mode):
    """A correct fp16 export passes (each output within max(floor, 2× the fp16 reference's own
    distance from the fp32 reference)); the same export with one layer's weight 10% off fails."""
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16", split=False, verify=False))
    half, truth = load_model(ckpt, "fp16", lazy=True), load_model(ckpt, lazy=True)
    record = verify_export(out, half, read_manifest(out), truth=truth, mode=mode, parameter_bytes=1)
    assert record["truth"] == "fp32 reference" and record["yardstick"] == "fp16 reference"
    worst = record["worst"]
    assert worst["yardstick_rel_l2"] > 0 and worst["rel_l2"] <= worst["bound"] == max(record["gate"][_kind(worst["output"])]["max_rel_l2"], 2 * worst["yardstick_rel_l2"])
    bad = _plant_fault(out, tmp_path, "model.layers.4.mixer.in_proj.weight_t", 1.1, np.float16)
    with pytest.raises(ExportError, match=r"beyond the fp16 gate \(the fp16 reference is the yardstick\)") as e:
        verify_export(bad, half, read_manifest(bad), truth=truth, mode=mode, parameter_bytes=1)
    assert "present_ssm_state.4" in str(e.value) and ("layers 4..4" in str(e.value)) == (mode == "layers")


def _kind(output: str) -> str:
    from hybridtrt.exporter.verify import _kind as kind

    return kind(output.split(" (")[0])


def test_half_precision_needs_the_fp32_truth(make_export):
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16", split=False, verify=False))
    with pytest.raises(ValueError, match="needs the fp32 reference"):
        verify_export(out, load_model(ckpt, "fp16"), read_manifest(out))
