"""A ModelOpt FP8 checkpoint is exported as NVIDIA wrote it: its FP8 weight bytes, its scales, its
choice of layers (no calibration), judged against the PyTorch model of the checkpoint's own
dequantized weights (tests/fixtures/modelopt: written by nvidia-modelopt 0.47.0 itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hybridtrt.cli.main import main
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.graphs.fp8_qdq import LM_HEAD_NODE, quantize_weight, quantize_weight_with_scale
from hybridtrt.models.weights import WeightIndex

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt" / "fp8"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modelopt") / "fp8"
    export(FIXTURE, out, ExportOptions(dtype="bf16"))  # the checkpoint's dtype, as the CLI chooses
    return out


def _checkpoint_fp8(index: WeightIndex, module: str) -> np.ndarray:
    """The checkpoint's FP8 weight ``[out, in]`` as the export stores it, ``[in, out]``, in bytes."""
    return index.read(f"backbone.{module}.weight").view(torch.uint8).numpy().T


def test_weights_scales_and_layers_are_the_checkpoints(exported):
    """Every FP8 initializer is the checkpoint's FP8 weight byte for byte (transposed to [in, out]); each
    scale is the checkpoint's, as ModelOpt's bf16 dequantization rounds it; the quantized layers are the
    checkpoint's and nothing else (lm_head and conv1d stay bf16); both graphs carry the same recipe."""
    manifest = json.loads((exported / "hybridtrt.json").read_text())
    recipe = manifest["quantization"]
    assert recipe["source"].startswith("checkpoint: FP8 per-tensor from hf_quant_config.json (modelopt 0.47.0)")
    assert not recipe["calibration"] and recipe["default_exclusions"] == []
    index = WeightIndex([FIXTURE / "model.safetensors"])
    modules = sorted(n.removeprefix("backbone.").removesuffix(".weight_scale") for n in index.tensors if n.endswith(".weight_scale"))
    assert sorted(recipe["quantized"]) == sorted(f"/model/{m.replace('.', '/').replace('layers/', 'layers.')}/MatMul" for m in modules)
    assert recipe["excluded"] == {LM_HEAD_NODE: "not quantized in the checkpoint"}
    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(exported / graph))
        types = {t.name: t.data_type for t in proto.graph.initializer}
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        for module in modules:
            node = f"/model/{module.replace('.', '/').replace('layers/', 'layers.')}/MatMul"
            assert np.array_equal(inits[f"model.{module}.weight_t_fp8"].view(np.uint8), _checkpoint_fp8(index, module)), (graph, module)
            for ours, theirs in (("weight_scale", "weight_scale"), ("input_scale", "input_scale")):
                name = f"model.{module}.{ours}"
                assert types[name] == onnx.TensorProto.BFLOAT16
                assert float(inits[name]) == float(index.read(f"backbone.{module}.{theirs}").to(torch.bfloat16).float())
            assert recipe["activation_scales"][node] == float(index.read(f"backbone.{module}.input_scale").to(torch.bfloat16).float())
    # Published only when verification passed: against our model with the checkpoint's recipe applied.
    assert manifest["verification"]["truth"] == "FP8 reference (fp32)" and manifest["verification"]["method"] == "full-graph"


def test_byte_identity_can_fail():
    """The byte check is not vacuous: the checkpoint's weights quantized with a scale 10 % off (another
    recipe's) give other FP8 bytes than the checkpoint's, every one of them. (Scales derived from the
    dequantized weights, amax / 448 as `--quantize fp8` does, give the checkpoint's bytes: ModelOpt's FP8
    weight scale is that same per-tensor max.)"""
    index = WeightIndex([FIXTURE / "model.safetensors"])
    modules = [n.removeprefix("backbone.").removesuffix(".weight_scale") for n in index.tensors if n.endswith(".weight_scale")]
    for module in modules:
        scale = index.read(f"backbone.{module}.weight_scale").to(torch.bfloat16)
        w = (index.read(f"backbone.{module}.weight").to(torch.bfloat16) * scale).float().numpy().T
        assert np.array_equal(quantize_weight(w, "tensor", onnx.TensorProto.BFLOAT16)[0].view(np.uint8), _checkpoint_fp8(index, module))
        ours, _ = quantize_weight_with_scale(w, float(scale) * 1.1, onnx.TensorProto.BFLOAT16)
        assert not np.array_equal(ours.view(np.uint8), _checkpoint_fp8(index, module)), module


def test_validate_and_inspect_say_what_was_read(exported, tmp_path, capsys):
    """`hybridtrt validate` passes against the FP8 reference built from the checkpoint's own recipe, and
    `inspect` names where the scales came from."""
    assert main(["validate", str(exported), "--random", "2", "--steps", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    capsys.readouterr()
    assert main(["inspect", str(exported)]) == 0
    assert "quantization: the checkpoint's own scales, FP8 per-tensor from hf_quant_config.json (modelopt 0.47.0): 8 linear layers quantized" in " ".join(capsys.readouterr().out.split())


def test_the_export_passes_the_parser_rules_of_11_1(exported):
    """Both graphs would parse on TensorRT 11.1, with and without the plugins (the same FP8 Q/DQ form as
    `--quantize fp8`'s: float8e4m3fn weights, bf16 scales, zero points)."""
    from hybridtrt.engine.dispatch import emulate_dispatch
    from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS

    for graph in ("model.onnx", "decode.onnx"):
        for plugins in (HYBRIDTRT_CREATORS, frozenset()):
            report = emulate_dispatch(exported / graph, "11.1.0", plugins=plugins)
            assert report.ok, (graph, report.problems)
