"""4-bit weights through `hybridtrt export`: a ModelOpt NVFP4 checkpoint as NVIDIA wrote it (its E2M1
codes, block and global scales, its layers; tests/fixtures/modelopt/nvfp4 was written by
nvidia-modelopt 0.47.0), and our own INT4 (``--quantize int4``), each verified against the 4-bit
weights' reference and validated through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import hybridtrt.graphs.weight_only as weight_only
from hybridtrt.cli.main import main
from hybridtrt.errors import ExportError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.quantize import WeightOnlyOptions
from hybridtrt.graphs.fp8_qdq import LM_HEAD_NODE
from hybridtrt.graphs.quantized_types import packed_bytes
from hybridtrt.models.weights import WeightIndex

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt" / "nvfp4"


def _node(module: str) -> str:
    return "/model/" + module.replace(".", "/").replace("layers/", "layers.") + "/MatMul"


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_an_nvfp4_checkpoint_exports_as_its_own_4bit_weights(tmp_path, capsys):
    """Every float4e2m1 initializer holds the checkpoint's E2M1 codes (transposed to [in, out]), every
    block scale its FP8 bytes, every global scale its weight_scale_2; exactly its layers are 4-bit
    (the LM head and conv1d stay bf16); verification judged the graphs against the reference of the
    checkpoint's dequantized weights, and `validate` passes on ONNX Runtime (float4e2m1 emulated)."""
    out = tmp_path / "out"
    export(FIXTURE, out, ExportOptions(dtype="bf16"))
    manifest = json.loads((out / "hybridtrt.json").read_text())
    recipe = manifest["weight_only"]
    assert manifest["quantization"] is None and recipe["scheme"] == "nvfp4" and recipe["format"] == "float4e2m1"
    assert recipe["source"].startswith("checkpoint: NVFP4 (blocks of 16) from hf_quant_config.json (modelopt 0.47.0)")
    assert manifest["verification"]["truth"] == "nvfp4 weights' fp32 reference"
    index = WeightIndex([FIXTURE / "model.safetensors"])
    modules = sorted(n.removeprefix("backbone.").removesuffix(".weight_scale_2") for n in index.tensors if n.endswith(".weight_scale_2"))
    dense = [m for m in modules if m != "lm_head"]
    assert sorted(recipe["quantized"]) == sorted(_node(m) for m in dense)
    assert recipe["excluded"][LM_HEAD_NODE] == "not quantized in the checkpoint"  # ModelOpt's default exclusion
    for graph in ("model.onnx", "decode.onnx"):
        inits = _initializers(out / graph)
        for module in dense:
            stored = index.read(f"backbone.{module}.weight").numpy()  # [out, in/2], low nibble first
            codes = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(stored.shape[0], -1)
            fp4 = inits[f"model.{module}.weight_t_fp4"]
            assert fp4.data_type == TensorProto.FLOAT4E2M1 and list(fp4.dims) == [codes.shape[1], codes.shape[0]]
            assert fp4.raw_data == packed_bytes(np.ascontiguousarray(codes.T).view(ml_dtypes.float4_e2m1fn)).tobytes(), module
            block = inits[f"model.{module}.weight_block_scale"]
            assert block.raw_data == np.ascontiguousarray(index.read(f"backbone.{module}.weight_scale").view(torch.uint8).numpy().T).tobytes()
            assert onnx.numpy_helper.to_array(inits[f"model.{module}.weight_scale_2"]) == index.read(f"backbone.{module}.weight_scale_2").item()
    capsys.readouterr()
    assert main(["validate", str(out), "--random", "2", "--steps", "2"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_nvfp4_routed_experts_export_as_the_checkpoints_own_bytes(tmp_path, capsys):
    """An NVFP4 MoE checkpoint (written by ModelOpt 0.47.0): each MoE layer's routed experts become one
    ``MoeExpertsNvfp4`` whose codes, block scales and global scales are the checkpoint's, expert by expert
    (with ``--fp4-activations``, which gives the linears FP4 activations and leaves the experts' alone);
    verified and validated on ONNX Runtime; `build --check-tensorrt` refuses the op without a plugin and
    names ``--dequantize-experts``, whose export (routed experts in bf16) it would build."""
    moe = FIXTURE.parent / "nvfp4-moe"
    out = tmp_path / "out"
    assert main(["export", str(moe), "-o", str(out), "--fp4-activations"]) == 0  # the linears W4A4; the routed experts stay W4A16
    recipe = json.loads((out / "hybridtrt.json").read_text())["weight_only"]
    layers = [1, 3]
    assert [n for n in recipe["quantized"] if "/experts/" in n] == [f"/model/layers.{i}/mixer/experts/MoeExpertsNvfp4" for i in layers]
    assert sorted(recipe["activations"]["input_scales"]) == sorted(n for n in recipe["quantized"] if n.endswith("/MatMul"))
    index = WeightIndex([moe / "model.safetensors"])
    inits = _initializers(out / "model.onnx")
    for i in layers:
        experts = sorted({int(n.split(".")[5]) for n in index.tensors if n.startswith(f"backbone.layers.{i}.mixer.experts.")})
        for proj in ("up", "down"):
            stored = [f"backbone.layers.{i}.mixer.experts.{e}.{proj}_proj" for e in experts]
            codes, block, glob = (inits[f"model.layers.{i}.mixer.experts.{proj}_{k}"] for k in ("codes", "block_scale", "global_scale"))
            assert codes.data_type == TensorProto.UINT8 and block.data_type == TensorProto.FLOAT8E4M3FN
            assert codes.raw_data == b"".join(index.read(f"{m}.weight").numpy().tobytes() for m in stored)
            assert block.raw_data == b"".join(index.read(f"{m}.weight_scale").view(torch.uint8).numpy().tobytes() for m in stored)
            assert onnx.numpy_helper.to_array(glob).tolist() == [index.read(f"{m}.weight_scale_2").item() for m in stored]
    capsys.readouterr()
    assert main(["validate", str(out), "--random", "2", "--steps", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["build", str(out), "--check-tensorrt", "11.1"]) == 2
    assert "--dequantize-experts" in capsys.readouterr().err.replace("\n", " ")
    kept = tmp_path / "kept"
    assert main(["export", str(moe), "-o", str(kept), "--dequantize-experts", "--no-verify"]) == 0
    graph = onnx.load(str(kept / "model.onnx"), load_external_data=False)
    assert sorted(n.op_type for n in graph.graph.node if n.domain == "hybridtrt" and "Moe" in n.op_type) == ["MoeExperts", "MoeExperts"]
    assert (kept / "weights.data").stat().st_size > 1.5 * (out / "weights.data").stat().st_size
    assert main(["build", str(kept), "--check-tensorrt", "11.1"]) == 0


def test_fp4_activations_export_the_checkpoints_input_scales_and_pass_every_gate(tmp_path, capsys):
    """``--fp4-activations`` (W4A4, Blackwell): one ``trt::TRT_FP4DynamicQuantize`` per 4-bit linear
    with the checkpoint's own ``input_scale``, verified in fp32 against the W4A4 reference (its
    dithered run the yardstick), validated through the CLI, and what TensorRT 11.1 would build."""
    out = tmp_path / "out"
    assert main(["export", str(FIXTURE), "-o", str(out), "--dtype", "fp32", "--fp4-activations"]) == 0
    manifest = json.loads((out / "hybridtrt.json").read_text())
    recipe = manifest["weight_only"]
    index = WeightIndex([FIXTURE / "model.safetensors"])
    want = {_node(n.removeprefix("backbone.").removesuffix(".input_scale")): index.read(n).item()
            for n in index.tensors if n.endswith(".input_scale") and not n.startswith("lm_head")}  # fmt: skip
    assert recipe["activations"]["input_scales"] == want and sorted(want) == sorted(recipe["quantized"])
    assert manifest["verification"]["truth"] == "nvfp4 W4A4 fp32 reference" and "dithered" in manifest["verification"]["yardstick"]
    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(out / graph), load_external_data=False)
        scales = {t.name: onnx.numpy_helper.to_array(t).item() for t in proto.graph.initializer if t.name.endswith(".input_scale")}
        quantizers = [n for n in proto.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
        assert len(quantizers) == len(want) and all(n.domain == "trt" for n in quantizers)
        assert {n.name.removesuffix("/input_quantizer/TRT_FP4DynamicQuantize") + "/MatMul": scales[n.input[1]] for n in quantizers} == pytest.approx(want, rel=0)
    capsys.readouterr()
    assert main(["validate", str(out), "--random", "2", "--steps", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "PASS" in printed and "pytorch-nvfp4-w4a4" in printed
    assert main(["build", str(out), "--check-tensorrt", "11.1"]) == 0
    assert "IDynamicQuantizeLayer" in capsys.readouterr().out


@pytest.mark.parametrize("plant", ["reference-without-activations", "emulation-truncates"])
def test_fp4_activation_errors_fail_verification(tmp_path, monkeypatch, plant):
    """Planted errors, each on one side of the judgement: the reference forgetting the activations'
    quantization, and ONNX Runtime's emulation rounding E2M1 toward zero (Floor for Round)."""
    import hybridtrt.exporter.weight_only_reference as reference
    import hybridtrt.graphs.fp4_emulation as emulation

    if plant == "reference-without-activations":
        monkeypatch.setattr(reference, "_fp4_activation_forward", lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias))
    else:
        right = emulation._dynamic_dequantize

        def truncating(dq, quantizer, c):
            nodes = right(dq, quantizer, c)
            for node in nodes:
                node.op_type = "Floor" if node.op_type == "Round" else node.op_type
            return nodes

        monkeypatch.setattr(emulation, "_dynamic_dequantize", truncating)
    with pytest.raises(ExportError, match="beyond"):
        export(FIXTURE, tmp_path / "out", ExportOptions(dtype="fp32", split=False, fp4_activations=True))
    assert not (tmp_path / "out" / "hybridtrt.json").exists()


def test_fp4_activations_need_an_nvfp4_checkpoint(tmp_path):
    fp8 = FIXTURE.parent / "fp8"
    with pytest.raises(ExportError, match="a ModelOpt FP8 checkpoint"):
        export(fp8, tmp_path / "a", ExportOptions(dtype="fp32", fp4_activations=True))
    with pytest.raises(ExportError, match="--dequantize exports no 4-bit weights"):
        export(FIXTURE, tmp_path / "b", ExportOptions(dtype="fp32", fp4_activations=True, dequantize=True))


def test_a_wrong_int4_scale_fails_verification(make_checkpoint, tmp_path, monkeypatch):
    """Planted error: the exporter's scales from amax / 8 (a wrong bound) — export-time verification
    against the reference (which computes amax / 7 on its own) refuses to publish."""
    monkeypatch.setattr(weight_only, "INT4_MAX", 8)
    with pytest.raises(ExportError, match="beyond"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", ExportOptions(dtype="fp32", split=False), weight_only=WeightOnlyOptions("int4", block_size=32))
    assert not (tmp_path / "out" / "hybridtrt.json").exists()


@pytest.fixture(scope="module")
def awq_export(make_checkpoint, tmp_path_factory):
    # Weights of a trained model's scale (0.05): at the suite's usual 0.3, eight INT4 layers leave the
    # logits far from the truth (rel L2 0.78, cosine 0.70), where comparing two recipes' costs is chance.
    checkpoint = make_checkpoint("tiny-nemotron-h", initializer_range=0.05)
    out = tmp_path_factory.mktemp("awq") / "out"
    assert main(["export", str(checkpoint), "-o", str(out), "--quantize", "int4", "--calib-random", "4", "--block-size", "32", "--dtype", "bf16"]) == 0
    return checkpoint, out


def test_awq_export_in_bf16_is_verified_and_validated(awq_export, capsys):
    """``--quantize int4 --calib-random 4 --block-size 32``: AWQ's pre-quant scales as a Mul before
    every 4-bit linear, the recipe records α, the errors and the scales; bf16 with scales large enough
    to live in weights.data runs on ONNX Runtime, passes verification and `validate`, and `validate`
    reports the recipe's cost against the unquantized truth (the INT4 recipe gate)."""
    checkpoint, out = awq_export
    recipe = json.loads((out / "hybridtrt.json").read_text())["weight_only"]
    assert recipe["scheme"] == "int4" and recipe["block_size"] == 32 and recipe["blocks"] == {}
    assert LM_HEAD_NODE in recipe["excluded"] and len(recipe["quantized"]) == 20
    inits = _initializers(out / "model.onnx")
    for node in recipe["quantized"]:  # int4 in blocks of 32 along K, bf16 scales
        dotted = node.removesuffix("/MatMul").lstrip("/").replace("/", ".")
        q, scale = inits[f"{dotted}.weight_t_int4"], inits[f"{dotted}.weight_scale"]
        assert q.data_type == TensorProto.INT4 and scale.data_type == TensorProto.BFLOAT16
        assert scale.dims[0] * 32 == q.dims[0] and scale.dims[1] == q.dims[1]
    awq = recipe["awq"]
    assert set(awq["pre_quant_scales"]) == set(recipe["quantized"]) and recipe["calibration"]["source"] == "random:4"
    assert all(e["awq"] <= e["rtn"] for e in awq["error"].values())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.name.endswith("/pre_quant_scale/Mul") for n in graph.graph.node) == len(recipe["quantized"])
    capsys.readouterr()
    assert main(["validate", str(out), "--random", "2", "--steps", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "PASS" in printed and "INT4 recipe: within its gates" in printed and "pytorch-int4-rtn-fp32" in printed


def test_bad_awq_scales_fail_the_recipe_gate(awq_export):
    """Planted error: the recipe's pre-quant scales scrambled (each channel ×/÷ up to e³): the INT4
    reference then costs far more than plain rounding at the same blocks, and the recipe gate fails;
    the recipe as exported passes it."""
    import dataclasses

    from hybridtrt.exporter.awq import decode_scale, encode_scale
    from hybridtrt.exporter.fp8_reference import as_exported
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.models.loading import load_model
    from hybridtrt.validation.artefact import recipe_quality
    from hybridtrt.validation.runner import random_prompts

    checkpoint, out = awq_export
    manifest = read_manifest(out)
    ids, mask = random_prompts(2, 256, seed=0, min_len=8, max_len=16)
    good = recipe_quality(checkpoint, manifest, as_exported(load_model(checkpoint, "fp32"), manifest), ids, mask, steps=1)
    assert good.passed and good.precision == "int4-recipe"
    rng = np.random.default_rng(0)
    awq = dict(manifest.weight_only["awq"])
    awq["pre_quant_scales"] = {n: encode_scale(decode_scale(t) * np.exp(rng.uniform(-3, 3, decode_scale(t).size)).astype(np.float32)) for n, t in awq["pre_quant_scales"].items()}
    bad = dataclasses.replace(manifest, weight_only={**manifest.weight_only, "awq": awq})
    assert not recipe_quality(checkpoint, bad, as_exported(load_model(checkpoint, "fp32"), bad), ids, mask, steps=1).passed


def test_a_pre_scale_applied_the_wrong_way_fails_verification(make_checkpoint, tmp_path, monkeypatch):
    """Planted error: the exporter quantizing ``W · p`` instead of ``W / p`` — verification against the
    reference (which applies the recipe's ``p`` on its own) refuses to publish."""
    wrong = weight_only.quantize_int4

    def times_p(w, block, elem_type, pre_scale=None):
        if pre_scale is not None:
            w = np.asarray(w, np.float32) * pre_scale.values[:, None] ** 2  # (w · p²) / p = w · p
        return wrong(w, block, elem_type, pre_scale)

    monkeypatch.setattr(weight_only, "quantize_int4", times_p)
    options = WeightOnlyOptions("int4", block_size=32, calib_random=4)
    with pytest.raises(ExportError, match="beyond"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", ExportOptions(dtype="fp32", split=False), weight_only=options)


def test_nano_9b_v2s_blocks_at_full_size():
    """The README's claim, on the real Nemotron-Nano-9B-v2 shapes (a meta-device model): at
    --block-size 128 every 4-bit linear takes blocks of 128 except the MLP's down_proj (K = 15,680 =
    245 × 64), which takes 64; at 32 all take 32."""
    from hybridtrt.exporter.quantize import eligible_blocks
    from hybridtrt.models.architectures import ARCHITECTURES
    from hybridtrt.models.config import config_from_dict
    from hybridtrt.models.model import HybridLM, meta_modules

    with meta_modules():
        model = HybridLM(config_from_dict(ARCHITECTURES["nemotron-nano-9b-v2"]))
    blocks = eligible_blocks(model, WeightOnlyOptions("int4", block_size=128))
    down = {n for n in blocks if n.endswith("/down_proj/MatMul")}
    assert down and {blocks[n] for n in down} == {64}
    assert {b for n, b in blocks.items() if n not in down} == {128}
    assert set(eligible_blocks(model, WeightOnlyOptions("int4", block_size=32)).values()) == {32}


def test_int4_sensitivity_rebuilds_the_export_and_proposes_exclusions(awq_export):
    """`validate --sensitivity` on an INT4 export: each linear quantized alone with the export's own
    blocks and AWQ scales; everything quantized rebuilds the export file exactly (max |Δ| 0), and the
    proposed re-export line keeps the recipe (int4, its block size, its calibration)."""
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.models.loading import load_model
    from hybridtrt.validation.runner import random_prompts
    from hybridtrt.validation.sensitivity import layer_sensitivity

    checkpoint, out = awq_export
    manifest = read_manifest(out)
    ids, mask = random_prompts(2, 256, seed=0, min_len=8, max_len=16)
    from hybridtrt.exporter.recipes import load_recipe

    recipe = load_recipe("nemotron-3-nano-nvfp4-layout")
    result = layer_sensitivity(out, manifest, load_model(checkpoint, "fp32"), checkpoint, ids, mask, target_cosine=0.9999, recipe=recipe)
    assert result.scheme == "int4" and result.export_max_abs == 0.0
    assert len(result.layers) == len(manifest.weight_only["quantized"]) and result.layers[0].error >= result.layers[-1].error
    assert "--quantize int4 --block-size 32 --calib-random 4" in result.command
    # NVIDIA's layout measured beside it: its kept layers are the attention ones and the Mamba ones before them.
    compared = result.recipe
    assert compared.name == "nemotron-3-nano-nvfp4-layout" and 0 < compared.kept_weights < compared.quantized_weights
    assert {n.split("/")[2] for n in compared.kept} == {"layers.0", "layers.1", "layers.4", "layers.5"}  # tiny-nemotron-h: M*M-M*-M
    assert result.full.cosine <= compared.reached.cosine <= result.none.cosine + 1e-6


def test_verification_windows_count_4bit_weights_as_onnx_runtime_holds_them(awq_export):
    """ONNX Runtime folds a 4-bit weight's DequantizeLinear into fp32 at load: verification's layer
    windows count that (elements × 4 beside the packed bytes), so a window of 4-bit layers holds what
    a window of fp32 layers does, not 8× more (a 1B INT4 export planned 12 windows, not 56, and
    peaked 0.7 GiB above the fp32 export)."""
    from hybridtrt.exporter.verify import _layer_bytes

    _, out = awq_export
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    packed = {t.name: t for t in graph.graph.initializer if t.data_type == TensorProto.INT4}
    layer0 = {n.input[0] for n in graph.graph.node if n.name.startswith("/model/layers.0/") and n.op_type == "DequantizeLinear"} & set(packed)
    counted = _layer_bytes(graph, 8)[0]
    assert layer0 and counted >= sum(4 * int(np.prod(packed[n].dims)) + len(packed[n].raw_data or b"") for n in layer0)


def test_verification_windows_count_fp8_weights_as_onnx_runtime_holds_them():
    """An FP8 weight is folded to fp32 by ONNX Runtime like a 4-bit one (a [4096, 4096] float8 weight
    behind a DequantizeLinear adds 73–89 MiB to a session): windows count its bytes and 4 per element
    (a 1B FP8 export planned 20 windows of 4× its budget before); packed codes (uint8, gathered at run
    time) count as stored."""
    from onnx import helper

    from hybridtrt.exporter.verify import _resident_bytes

    fp8 = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [64, 32], bytes(64 * 32), raw=True)
    codes = helper.make_tensor("c", TensorProto.UINT8, [64, 16], bytes(64 * 16), raw=True)
    assert _resident_bytes(fp8) == 64 * 32 * 5 and _resident_bytes(codes) == 64 * 16


def test_nvfp4_routed_experts_verify_by_expert_ranges(tmp_path, monkeypatch):
    """A 4-bit routed-experts node too large for a verification window runs by ranges of experts (how a
    real Nemotron-3-NVFP4 layer is verified): each range is a slice of the packed codes, block and global
    scales, and the export is still within the fp32 gates."""
    import hybridtrt.exporter.verify as verify

    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", 1024)
    monkeypatch.setattr(verify, "WINDOW_FRACTION", 1 / 4096)
    out = tmp_path / "out"
    export(FIXTURE.parent / "nvfp4-moe", out, ExportOptions(dtype="fp32", split=False, verify_mode="layers"))
    entry = json.loads((out / "hybridtrt.json").read_text())["verification"]["graphs"]["model.onnx"]
    assert entry["expert_ranges"] == {f"/model/layers.{i}/mixer/experts/MoeExpertsNvfp4": 8 for i in (1, 3)}
