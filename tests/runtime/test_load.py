"""`load()` picks the backend from the artefact."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hybridtrt.errors import ArtefactError, MissingDependencyError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.models import load_model
from hybridtrt.runtime.generation import TorchStepper, generate
from hybridtrt.runtime import load
from hybridtrt.runtime.onnxruntime import OrtModel


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))


@pytest.fixture(scope="module")
def reference_tokens(exported):
    ckpt, _ = exported
    ids = torch.tensor([[5, 17, 99, 42, 7]])
    return ids, generate(TorchStepper(load_model(ckpt)), ids, max_new_tokens=6).tokens


@pytest.mark.parametrize("which", ["dir", "onnx"])
def test_ort_backend_matches_reference(exported, reference_tokens, which):
    _, out = exported
    model = load(out if which == "dir" else out / "model.onnx")
    assert isinstance(model, OrtModel) and model.backend == "onnxruntime"
    ids, expected = reference_tokens
    assert torch.equal(model.generate(ids, max_new_tokens=6).tokens, expected)


def test_kwargs_pass_through(exported):
    model = load(exported[1], use_decode_graph=False)
    assert model.decode is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engine_without_tensorrt(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        load(engine)


def test_unknown_artefacts(tmp_path, exported):
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"x")
    with pytest.raises(ArtefactError, match="don't know how to load"):
        load(odd)
    with pytest.raises(ArtefactError, match="does not exist"):
        load(tmp_path / "nope.engine")
    with pytest.raises(ArtefactError, match="export it first"):
        load(exported[0])  # a checkpoint dir
    with pytest.raises(ArtefactError, match="no hybridtrt.json"):
        load(tmp_path)
