"""TrtModel snapshots on the CPU, with the fake TensorRT of test_buffers (ORT behind the context)."""

from __future__ import annotations

import pytest
import torch

from hybridtrt.errors import InputError
from hybridtrt.runtime.onnxruntime import OrtModel
from hybridtrt.runtime.snapshot import snapshot_prompt
from tests.runtime.test_buffers import _cpu_trt_model, export_dir  # noqa: F401  (fixture)


def test_trt_snapshot_round_trip_and_cross_runtime(monkeypatch, export_dir, tmp_path):  # noqa: F811
    model, _ = _cpu_trt_model(monkeypatch, export_dir, tmp_path)
    ort = OrtModel(export_dir)
    prefix, tail = torch.tensor([[7, 8, 9, 10, 11]]), torch.tensor([[12, 13]])
    straight = ort.generate(torch.cat([prefix, tail], 1), max_new_tokens=5).tokens

    snap = snapshot_prompt(model, prefix)
    assert snap.past == 5 and snap.states["present.1.key"].shape == (1, 2, 5, 16)
    assert torch.equal(model.generate(tail, max_new_tokens=5, snapshot=snap).tokens, straight)
    # a snapshot taken on ONNX Runtime restores into the engine's device buffers
    assert torch.equal(model.generate(tail, max_new_tokens=5, snapshot=snapshot_prompt(ort, prefix)).tokens, straight)


def test_trt_refuses_out_of_vocabulary_ids(monkeypatch, export_dir, tmp_path):  # noqa: F811
    model, _ = _cpu_trt_model(monkeypatch, export_dir, tmp_path)
    assert model.vocab_size == 256
    with pytest.raises(InputError, match="token id 300"):
        model.generate(torch.tensor([[1, 300]]), max_new_tokens=2)
