"""A ModelOpt FP8 checkpoint is exported as NVIDIA wrote it: its FP8 weight bytes, its scales, its
choice of layers (no calibration), judged against the PyTorch model of the checkpoint's own
dequantized weights (tests/fixtures/modelopt: written by nvidia-modelopt 0.47.0 itself)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hybridtrt.cli.main import main
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.graphs.fp8_qdq import LM_HEAD_NODE, quantize_weight, quantize_weight_with_scale
from hybridtrt.models.weights import WeightIndex

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"
FIXTURE = FIXTURES / "fp8"


@pytest.fixture(scope="module", params=["fp8", "fp8-moe"])
def exported(request, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, export) of the dense FP8 fixture and of the MoE one (Nemotron-3's routed and shared
    experts FP8, the router not, as Nemotron-3-Nano-30B-A3B-FP8)."""
    checkpoint = FIXTURES / request.param
    out = tmp_path_factory.mktemp("modelopt") / request.param
    export(checkpoint, out, ExportOptions(dtype="bf16"))  # the checkpoint's dtype, as the CLI chooses
    return checkpoint, out


def _checkpoint_fp8(index: WeightIndex, module: str) -> np.ndarray:
    """The checkpoint's FP8 weight ``[out, in]`` as the export stores it, ``[in, out]``, in bytes."""
    return index.read(f"backbone.{module}.weight").view(torch.uint8).numpy().T


def _node(module: str) -> str:
    return "/model/" + module.replace(".", "/").replace("layers/", "layers.") + "/MatMul"


def test_weights_scales_and_layers_are_the_checkpoints(exported):
    """Every FP8 initializer is the checkpoint's FP8 weight byte for byte (a linear's transposed to
    [in, out]; the routed experts' stacked [E, out, in] as stored, expert by expert); each scale is the
    checkpoint's (a linear's as ModelOpt's bf16 dequantization rounds it, the experts' fp32 as written);
    the quantized layers are the checkpoint's and nothing else (lm_head, conv1d and the router stay
    bf16); both graphs carry the same recipe, and verification judged them against the FP8 reference."""
    checkpoint, out = exported
    manifest = json.loads((out / "hybridtrt.json").read_text())
    recipe = manifest["quantization"]
    assert recipe["source"].startswith("checkpoint: FP8 per-tensor from hf_quant_config.json (modelopt 0.47.0)")
    assert not recipe["calibration"] and recipe["default_exclusions"] == []
    index = WeightIndex([checkpoint / "model.safetensors"])
    quantized = sorted(n.removeprefix("backbone.").removesuffix(".weight_scale") for n in index.tensors if n.endswith(".weight_scale"))
    routed = [m for m in quantized if ".experts." in m]
    dense = [m for m in quantized if m not in routed]
    moe_layers = sorted({m.split(".experts.")[0] for m in routed})
    assert sorted(recipe["quantized"]) == sorted([_node(m) for m in dense] + [f"/model/{m.replace('.', '/').replace('layers/', 'layers.')}/experts/MoeExpertsFp8" for m in moe_layers])
    assert set(recipe["excluded"]) == {LM_HEAD_NODE} | {_node(f"{m}.gate") for m in moe_layers}
    assert all(reason == "not quantized in the checkpoint" for reason in recipe["excluded"].values())

    def scale(name: str) -> float:
        return float(index.read(f"backbone.{name}").float())

    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(out / graph))
        types = {t.name: t.data_type for t in proto.graph.initializer}
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        for module in dense:
            assert np.array_equal(inits[f"model.{module}.weight_t_fp8"].view(np.uint8), _checkpoint_fp8(index, module)), (graph, module)
            for which in ("weight_scale", "input_scale"):
                name = f"model.{module}.{which}"
                assert types[name] == onnx.TensorProto.BFLOAT16
                assert float(inits[name]) == float(index.read(f"backbone.{module}.{which}").to(torch.bfloat16).float())
            assert recipe["activation_scales"][_node(module)] == float(index.read(f"backbone.{module}.input_scale").to(torch.bfloat16).float())
        for layer in moe_layers:
            node = f"/model/{layer.replace('.', '/').replace('layers/', 'layers.')}/experts/MoeExpertsFp8"
            experts = sorted({int(m.split(".experts.")[1].split(".")[0]) for m in routed if m.startswith(layer + ".")})
            for proj in ("up", "down"):
                stacked = np.stack([index.read(f"backbone.{layer}.experts.{e}.{proj}_proj.weight").view(torch.uint8).numpy() for e in experts])
                assert np.array_equal(inits[f"model.{layer}.experts.{proj}_proj_fp8"].view(np.uint8), stacked), (graph, layer, proj)
                for which, ours in (("weight_scale", f"{proj}_weight_scale"), ("input_scale", f"{proj}_input_scale")):
                    theirs = [scale(f"{layer}.experts.{e}.{proj}_proj.{which}") for e in experts]
                    assert inits[f"model.{layer}.experts.{ours}"].reshape(-1).tolist() == theirs and recipe["experts"][node][ours] == theirs
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
    _, exported = exported
    assert main(["validate", str(exported), "--random", "2", "--steps", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    capsys.readouterr()
    assert main(["inspect", str(exported)]) == 0
    assert "quantization: the checkpoint's own scales, FP8 per-tensor from hf_quant_config.json (modelopt 0.47.0): " in " ".join(capsys.readouterr().out.split())


def test_the_parser_rules_of_11_1(exported):
    """The dense export would parse on TensorRT 11.1, with and without the plugins (the same FP8 Q/DQ
    form as `--quantize fp8`'s: float8e4m3fn weights, bf16 scales, zero points). FP8 routed experts
    parse into the `MoeExpertsFp8` plugin when libhybridtrt_trt.so is loaded; without it they are
    refused as `--quantize fp8`'s are, by name and with the fix (their function body casts to FP8,
    which TensorRT does not build)."""
    from hybridtrt.engine.dispatch import PLUGIN, emulate_dispatch
    from hybridtrt.engine.trt_rules import HYBRIDTRT_CREATORS

    checkpoint, exported = exported
    for graph in ("model.onnx", "decode.onnx"):
        for plugins in (HYBRIDTRT_CREATORS, frozenset()):
            report = emulate_dispatch(exported / graph, "11.1.0", plugins=plugins)
            if checkpoint.name == "fp8-moe" and not plugins:
                assert not report.ok and all("MoeExpertsFp8" in p for p in report.problems), report.problems
                assert any("libhybridtrt_trt.so" in p for p in report.problems), report.problems
            else:
                assert report.ok, (graph, report.problems)
            if checkpoint.name == "fp8-moe" and plugins:
                assert {n.importer for n in report.nodes if n.op.endswith("::MoeExpertsFp8")} == {PLUGIN}


def test_a_quantized_lm_head_is_kept_in_high_precision(tmp_path):
    """A recipe that quantizes lm_head too (not ModelOpt's default): the export keeps the LM head in bf16
    from its dequantized FP8 weights, says so in the recipe, and quantizes every other layer as written."""
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = shutil.copytree(FIXTURE, tmp_path / "ckpt")
    tensors = load_file(checkpoint / "model.safetensors")
    w = tensors["lm_head.weight"].float()
    scale = w.abs().max() / 448  # ModelOpt's per-tensor max rule
    tensors["lm_head.weight"] = (w / scale).to(torch.float8_e4m3fn)
    tensors["lm_head.weight_scale"], tensors["lm_head.input_scale"] = scale.reshape(()), torch.tensor(0.01)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    recipe = json.loads((checkpoint / "hf_quant_config.json").read_text())
    recipe["quantization"]["exclude_modules"] = [m for m in recipe["quantization"]["exclude_modules"] if not m.startswith("lm_head")]
    (checkpoint / "hf_quant_config.json").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    export(checkpoint, out, ExportOptions(dtype="bf16", split=False))
    written = json.loads((out / "hybridtrt.json").read_text())["quantization"]
    assert written["excluded"] == {LM_HEAD_NODE: "lm_head: FP8 in the checkpoint, kept in the model dtype (its dequantized weights)"}
    assert len(written["quantized"]) == 8 and "9 linear layers quantized" in written["source"]


def test_dequantize_exports_modelopts_own_dequantized_weights(tmp_path, capsys):
    """`--dequantize`: an NVFP4 checkpoint exports in bf16 with no Q/DQ (not as 4-bit weights), each
    quantized linear's weight exactly ModelOpt's own bf16 dequantization (its hash in the fixture), and
    the manifest and summary say where the weights came from."""
    import hashlib

    checkpoint, out = FIXTURES / "nvfp4", tmp_path / "out"
    # No verification here: the weights are checked bit for bit below, and the graph is the plain bf16 one.
    export(checkpoint, out, ExportOptions(dtype="bf16", split=False, verify=False, dequantize=True))
    manifest = json.loads((out / "hybridtrt.json").read_text())
    assert manifest["quantization"] is None and manifest["source"]["dequantized"].startswith("NVFP4 (blocks of 16) from hf_quant_config.json")
    proto = onnx.load(str(out / "model.onnx"))
    assert not [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weights = {t.name: t for t in proto.graph.initializer}
    theirs = json.loads((checkpoint / "dequantized.json").read_text())["sha256"]
    for name, digests in theirs.items():  # backbone.layers.0.mixer.in_proj.weight
        t = weights["model." + name.removeprefix("backbone.") + "_t"]
        assert t.data_type == onnx.TensorProto.BFLOAT16
        stored = np.frombuffer(numpy_helper.to_array(t).astype(np.float32).astype(ml_dtypes.bfloat16).tobytes(), np.uint16).reshape(t.dims)
        assert hashlib.sha256(np.ascontiguousarray(stored.T).tobytes()).hexdigest() == digests["bfloat16"], name
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "weights: dequantized to bf16 from the checkpoint's NVFP4 (blocks of 16)" in " ".join(capsys.readouterr().out.split())
