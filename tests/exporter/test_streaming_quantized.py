"""The streamed export of FP8 and MoE models is byte-identical to the weight-loaded export (the
rest of the streaming contract: tests/exporter/test_streaming.py)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from hybridtrt.exporter.eager import write_graphs
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter import trace_cache
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.graphs.fp8_qdq import quantize_expert_weights
from hybridtrt.models.loading import open_checkpoint
from tests.exporter.streaming_checks import assert_identical, optimize_for_real  # noqa: F401 (autouse fixture)
from tests.models.hf import save_hf_checkpoint
from tests.static_capacity import CAPACITY


def test_fp8_streamed_export_is_byte_identical(make_checkpoint, tmp_path):
    """FP8: scales from sequential calibration on the lazy reference, FP8 bytes streamed, for both
    graphs, in the static-cache flavour (cache_position/padding_length inputs, fixed-capacity KV).
    Per-channel scales in fp16: the MoE case below."""
    ckpt = make_checkpoint("tiny-nemotron-h", initializer_range=0.05)
    options = ExportOptions(split=True, verify=False, kv_cache="static", max_cache_len=CAPACITY)  # the suite's one capacity: a replayed trace

    def quant():
        return QuantizeOptions(calib_random=6, batch=4)

    result = export(ckpt, tmp_path / "streamed", options, quantize=quant())
    names = write_graphs(ckpt, tmp_path / "eager", options, quantize=quant())
    assert "decode.onnx" in names
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)
    assert result.manifest.quantization["quantized"] and result.manifest.kv_cache == "static"


def test_moe_hf_per_expert_checkpoint_streams_stacked_experts(tmp_path, monkeypatch):
    """An MoE checkpoint as HF saves it (one tensor per expert): the stacked expert initializers are
    streamed from the per-expert tensors one expert at a time (never the whole stack), in fp16 and
    with FP8 experts (scales and FP8 bytes expert by expert), byte-identical to the loaded model's."""
    from hybridtrt.models.loading import Checkpoint

    whole: list[str] = []
    read_stored = Checkpoint.read_stored
    monkeypatch.setattr(Checkpoint, "read_stored", lambda self, name: whole.append(name) or read_stored(self, name))
    ckpt = save_hf_checkpoint("tiny-nemotron3-moe", tmp_path / "hf", dtype=torch.bfloat16, initializer_range=0.05)
    checkpoint = open_checkpoint(ckpt, "fp16")
    stacked = [p for p in checkpoint.parameters.values() if p.parts]
    assert stacked and all(len(p.parts) == p.shape[0] for p in stacked)
    assert checkpoint.parameters["layers.1.mixer.gate.weight"].dtype == torch.float32  # router kept fp32
    options = ExportOptions(dtype="fp16", verify=False, split=False)  # the experts are the point, not the decode graph
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path / "traces"))  # empty: this export traces, the FP8 one below replays
    export(ckpt, tmp_path / "streamed", options)
    assert not {p.name for p in stacked} & set(whole)
    names = write_graphs(ckpt, tmp_path / "eager", options)
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)

    # FP8 experts: scales and bytes expert by expert, equal to quantizing the whole stack (the full
    # FP8 MoE export against the eager path: the next test). The trace is the one above's, replayed.
    whole.clear()  # the eager path above reads whole stacks, as a loaded model does
    export(ckpt, tmp_path / "fp8", options, quantize=QuantizeOptions(calib_random=4, batch=4))
    assert not {p.name for p in stacked} & set(whole)
    inits = {t.name: t for t in onnx.load(str(tmp_path / "fp8" / "model.onnx")).graph.initializer}
    for p in stacked:
        w_fp8, scale = quantize_expert_weights(checkpoint.read(p.name).numpy(), "tensor")
        stem = "model." + p.name
        assert inits[stem + "_fp8"].raw_data == w_fp8.tobytes(), p.name
        np.testing.assert_array_equal(numpy_helper.to_array(inits[stem.removesuffix("_proj") + "_weight_scale"]), scale)


def test_moe_fp8_experts_streamed_export_is_byte_identical(make_checkpoint, tmp_path):
    """FP8 expert weights (`MoeExpertsFp8`) and every linear are quantized while streaming, with the
    same bytes, per output channel (per expert and channel for the experts), in fp16."""
    ckpt = make_checkpoint("tiny-nemotron3-moe", initializer_range=0.05)
    options = ExportOptions(dtype="fp16", split=False, verify=False)

    def quant():
        return QuantizeOptions(calib_random=6, batch=4, weight_scale="channel")

    result = export(ckpt, tmp_path / "streamed", options, quantize=quant())
    names = write_graphs(ckpt, tmp_path / "eager", options, quantize=quant())
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)
    assert result.manifest.quantization["experts"] and result.manifest.quantization["weight_scale"] == "channel"
