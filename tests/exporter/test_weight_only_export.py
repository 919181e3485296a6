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


@pytest.fixture(scope="module")
def int4_export(make_checkpoint, tmp_path_factory):
    checkpoint = make_checkpoint("tiny-nemotron-h")
    out = tmp_path_factory.mktemp("int4") / "out"
    assert main(["export", str(checkpoint), "-o", str(out), "--quantize", "int4", "--block-size", "64", "--dtype", "bf16"]) == 0
    return checkpoint, out


def test_int4_export_is_verified_and_validated(int4_export, capsys):
    """``--quantize int4``: the linear layers' weights are int4 in blocks of 64 along K (bf16 scales),
    the LM head stays bf16; the weights file is smaller than the bf16 one by the 4-bit share; the graph
    passes verification and `validate` against the INT4 weights' reference."""
    checkpoint, out = int4_export
    manifest = json.loads((out / "hybridtrt.json").read_text())
    recipe = manifest["weight_only"]
    assert recipe["scheme"] == "int4" and recipe["block_size"] == 64 and recipe["blocks"] == {}
    assert LM_HEAD_NODE in recipe["excluded"] and len(recipe["quantized"]) == 20
    inits = _initializers(out / "model.onnx")
    for node in recipe["quantized"]:
        dotted = node.removesuffix("/MatMul").lstrip("/").replace("/", ".")
        q, scale = inits[f"{dotted}.weight_t_int4"], inits[f"{dotted}.weight_scale"]
        assert q.data_type == TensorProto.INT4 and scale.data_type == TensorProto.BFLOAT16
        assert scale.dims[0] * 64 == q.dims[0] and scale.dims[1] == q.dims[1]
    capsys.readouterr()
    assert main(["validate", str(out), "--random", "2", "--steps", "2"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_a_wrong_int4_scale_fails_verification(make_checkpoint, tmp_path, monkeypatch):
    """Planted error: the exporter's scales from amax / 8 (a wrong bound) — export-time verification
    against the reference (which computes amax / 7 on its own) refuses to publish."""
    monkeypatch.setattr(weight_only, "INT4_MAX", 8)
    with pytest.raises(ExportError, match="beyond"):
        export(make_checkpoint("tiny-nemotron-h"), tmp_path / "out", ExportOptions(dtype="fp32", split=False), weight_only=WeightOnlyOptions("int4", block_size=32))
    assert not (tmp_path / "out" / "hybridtrt.json").exists()
