"""The streamed export of FP8 and MoE models is byte-identical to the weight-loaded export (the
rest of the streaming contract: tests/exporter/test_streaming.py)."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.exporter.eager import write_graphs
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.models.loading import open_checkpoint
from tests.exporter.streaming_checks import assert_identical, trace_for_real  # noqa: F401 (autouse fixture)
from tests.models.hf import save_hf_checkpoint


@pytest.mark.parametrize(("weight_scale", "dtype", "split", "kv_cache"), [("tensor", "fp32", True, "static"), ("channel", "fp16", False, "dynamic")])
def test_fp8_streamed_export_is_byte_identical(make_checkpoint, tmp_path, weight_scale, dtype, split, kv_cache):
    """FP8: scales from sequential calibration on the lazy reference, FP8 bytes streamed; the first
    case also in the static-cache flavour (cache_position/padding_length inputs, fixed-capacity KV)."""
    ckpt = make_checkpoint("tiny-nemotron-h", initializer_range=0.05)
    static = {"max_cache_len": 16} if kv_cache == "static" else {}
    options = ExportOptions(dtype=dtype, split=split, verify=False, kv_cache=kv_cache, **static)

    def quant():
        return QuantizeOptions(calib_random=6, batch=4, weight_scale=weight_scale)

    result = export(ckpt, tmp_path / "streamed", options, quantize=quant())
    names = write_graphs(ckpt, tmp_path / "eager", options, quantize=quant())
    assert ("decode.onnx" in names) == split
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)
    assert result.manifest.quantization["quantized"] and result.manifest.kv_cache == kv_cache


def test_moe_hf_per_expert_checkpoint_streams_stacked_experts(tmp_path, monkeypatch):
    """An MoE checkpoint as HF saves it (one tensor per expert): the stacked expert initializers are
    streamed from the per-expert tensors one expert at a time (never the whole stack),
    byte-identical to the loaded model's."""
    from hybridtrt.models.loading import Checkpoint

    whole: list[str] = []
    read_stored = Checkpoint.read_stored
    monkeypatch.setattr(Checkpoint, "read_stored", lambda self, name: whole.append(name) or read_stored(self, name))
    ckpt = save_hf_checkpoint("tiny-nemotron3-moe", tmp_path / "hf", dtype=torch.bfloat16, initializer_range=0.05)
    checkpoint = open_checkpoint(ckpt, "fp16")
    stacked = [p for p in checkpoint.parameters.values() if p.parts]
    assert stacked and all(len(p.parts) == p.shape[0] for p in stacked)
    assert checkpoint.parameters["layers.1.mixer.gate.weight"].dtype == torch.float32  # router kept fp32
    options = ExportOptions(dtype="fp16", verify=False)
    export(ckpt, tmp_path / "streamed", options)
    assert not {p.name for p in stacked} & set(whole)
    names = write_graphs(ckpt, tmp_path / "eager", options)
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)


def test_moe_fp8_experts_streamed_export_is_byte_identical(make_checkpoint, tmp_path):
    """FP8 expert weights (`MoeExpertsFp8`) are quantized while streaming, with the same bytes."""
    ckpt = make_checkpoint("tiny-nemotron3-moe", initializer_range=0.05)
    options = ExportOptions(split=False, verify=False)

    def quant():
        return QuantizeOptions(calib_random=6, batch=4)

    result = export(ckpt, tmp_path / "streamed", options, quantize=quant())
    names = write_graphs(ckpt, tmp_path / "eager", options, quantize=quant())
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)
    assert result.manifest.quantization["experts"]
