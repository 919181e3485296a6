"""FP8 calibration and the export-time quantization step (`quantize_graph`).

Shares the session export of ``tiny-nemotron-h`` (``initializer_range=0.05``) with
``tests/graphs/test_fp8_qdq.py``; both of its graphs (unified and decode) are quantized in memory,
loaded with their weights.
"""

from __future__ import annotations

import json
import re

import onnx
import pytest
import torch
from torch import nn

from hybridtrt.errors import QuantizationError
from hybridtrt.exporter import quantize as quantize_mod
from hybridtrt.exporter.calibration import calibrate, calibration_batches, calibration_hash, matmul_node_name
from hybridtrt.exporter.quantize import QuantizeOptions, quantize_graph
from hybridtrt.exporter.wrapper import GraphModule, example_inputs
from hybridtrt.graphs.fp8_qdq import QUANTIZABLE_PROJECTIONS
from hybridtrt.models.loading import load_model
from hybridtrt.models.tokenizer import load_tokenizer
from hybridtrt.runtime.onnxruntime import OrtSession
from hybridtrt.judge.metrics import compare

PRESET = "tiny-nemotron-h"
INIT_RANGE = 0.05
COSINE_MIN = 0.99  # DESIGN.md §8 FP8 gate
_PROJ = re.compile(r"/mixer/(" + "|".join(QUANTIZABLE_PROJECTIONS) + r")/MatMul$")


@pytest.fixture(scope="module")
def exported(make_export):
    ckpt, out = make_export(PRESET, initializer_range=INIT_RANGE)
    return ckpt, out, load_model(ckpt, "fp32")


def _random_batches(model, n: int = 8, seed: int = 0):
    return calibration_batches(None, calib_file=None, calib_random=n, vocab_size=model.config.vocab_size, seq_len=16, seed=seed)


# -- calibration ------------------------------------------------------------------------------


def test_matmul_node_name():
    assert matmul_node_name("layers.0.mixer.in_proj") == "/model/layers.0/mixer/in_proj/MatMul"
    assert matmul_node_name("layers.12.mixer.down_proj") == "/model/layers.12/mixer/down_proj/MatMul"


def test_amax_keys_cover_every_quantizable_layer(exported):
    _, out, model = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    quantizable = {n.name for n in graph.graph.node if n.op_type == "MatMul" and _PROJ.search(n.name)}
    amax = calibrate(model, _random_batches(model))
    assert set(amax) == quantizable
    assert all(v > 0 for v in amax.values())


def test_amax_matches_a_manual_computation(exported):
    _, _, model = exported
    batches = _random_batches(model, n=6)
    batches[0][1][:2, :5] = 0  # some left padding: in_proj sees h * mask
    seen: dict[str, float] = {}

    def hook(name):
        def fn(module, inputs, output):
            seen[name] = max(seen.get(name, 0.0), float(inputs[0].abs().max()))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ids, mask in batches:
            model(ids, mask, logits="last")
    for h in handles:
        h.remove()
    # Independent of hooks for layer 0: in_proj's input is RMSNorm(embedding) * mask.
    with torch.no_grad():
        layer0 = max(float((model.layers[0].normed(model.embeddings(ids))[0] * mask[..., None]).abs().max()) for ids, mask in batches)
    amax = calibrate(model, batches)
    assert amax == {matmul_node_name(n): v for n, v in seen.items()}
    assert amax["/model/layers.0/mixer/in_proj/MatMul"] == pytest.approx(layer0, rel=1e-6)


def test_calibration_progress_is_reported(exported):
    model = exported[2]
    calls: list[tuple[int, int]] = []
    calibrate(model, _random_batches(model, n=8), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


def test_prompt_file_batches_are_left_padded_and_truncated(exported, tmp_path):
    ckpt, _, model = exported
    prompts = tmp_path / "calib.txt"
    prompts.write_text("hello world\n\n" + "x" * 100 + "\nab\n", encoding="utf-8")
    tok = load_tokenizer(ckpt)
    batches = calibration_batches(tok, calib_file=prompts, calib_random=None, vocab_size=256, seq_len=32, batch=2)
    assert [tuple(ids.shape) for ids, _ in batches] == [(2, 32), (1, 2)]
    ids, mask = batches[0]
    assert mask[0].tolist() == [0] * 21 + [1] * 11  # "hello world" = 11 bytes, left-padded
    assert ids[0, 21:].tolist() == tok.encode("hello world").ids
    assert mask[1].all() and ids[1].tolist() == tok.encode("x" * 32).ids  # the last 32 tokens
    calibrate(model, batches)  # runs with padding


def test_random_batches_are_deterministic_and_hashed(exported):
    model = exported[2]
    a, b, c = _random_batches(model), _random_batches(model), _random_batches(model, seed=1)
    assert calibration_hash(a) == calibration_hash(b) != calibration_hash(c)
    assert calibration_hash(a).startswith("sha256:")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"calib_file": None, "calib_random": None}, "exactly one source"),
        ({"calib_file": "x.txt", "calib_random": 4}, "exactly one source"),
        ({"calib_file": "/nonexistent/calib.txt", "calib_random": None}, "does not exist"),
        ({"calib_file": None, "calib_random": 0}, "must be ≥ 1"),
    ],
)
def test_calibration_source_errors(kwargs, message):
    with pytest.raises(QuantizationError, match=message):
        calibration_batches(None, vocab_size=256, **kwargs)


def test_empty_file_and_missing_tokenizer_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(QuantizationError, match="no prompts"):
        calibration_batches(None, calib_file=empty, calib_random=None, vocab_size=256)
    full = tmp_path / "p.txt"
    full.write_text("a prompt\n")
    with pytest.raises(QuantizationError, match="needs a tokenizer"):
        calibration_batches(None, calib_file=full, calib_random=None, vocab_size=256)


# -- quantize_graph ---------------------------------------------------------------------------


def test_quantize_graph_end_to_end(exported, tmp_path, monkeypatch):
    ckpt, out, model = exported
    calls = []
    real = quantize_mod.calibrate
    monkeypatch.setattr(quantize_mod, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = QuantizeOptions(calib_random=8, seq_len=32)

    unified = onnx.load(str(out / "model.onnx"))  # the graphs with their weights in memory
    decode = onnx.load(str(out / "decode.onnx"))
    recipes = [quantize_graph(unified, model, ckpt, options), quantize_graph(decode, model, ckpt, options)]
    assert len(calls) == 1  # calibrated once, scales reused by the decode graph
    assert recipes[0]["activation_scales"] == recipes[1]["activation_scales"]
    recipe = recipes[0]
    assert recipe["scheme"] == "fp8" and recipe["format"] == "float8e4m3fn" and recipe["weight_scale"] == "tensor"
    assert recipe["calibration"]["sequences"] == 8 and recipe["calibration"]["hash"].startswith("sha256:")
    json.dumps(recipe)  # goes into hybridtrt.json as is

    for name, proto, decode_graph in (("model", unified, False), ("decode", decode, True)):
        path = tmp_path / f"{name}.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data")
        onnx.checker.check_model(str(path), full_check=True)
        inputs = example_inputs(model, batch=16, seq=1 if decode_graph else 8, past=6, seed=2)
        with torch.no_grad():
            expected = GraphModule(model, "last", decode_graph).eval()(*inputs)[0]
        session = OrtSession(path)
        got = session.run(dict(zip(session.input_names, inputs)))["logits"]
        c = compare(got, expected, top1=True)
        print(f"{name}: FP8 vs PyTorch fp32 cosine {c.cosine:.5f} top-1 {c.top1:.3f}")
        assert c.finite and c.cosine >= COSINE_MIN, (name, c)


def test_excluding_everything_is_refused(exported):
    ckpt, out, model = exported
    proto = onnx.load(str(out / "model.onnx"))
    options = QuantizeOptions(calib_random=4, seq_len=8, exclude=["."])
    with pytest.raises(QuantizationError, match="no linear layer is left"):
        quantize_graph(proto, model, ckpt, options)


def test_cached_calibration_is_tied_to_the_model(exported):
    ckpt, _, model = exported
    options = QuantizeOptions(calib_random=4, seq_len=8)
    first = quantize_mod.run_calibration(model, ckpt, options)
    assert quantize_mod.run_calibration(model, ckpt, options) is first  # same model: cached
    other = load_model(ckpt, "fp32")
    with torch.no_grad():
        other.layers[0].mixer.in_proj.weight.mul_(2)  # changes downstream activations
    second = quantize_mod.run_calibration(other, ckpt, options)
    assert second is not first and second != first
    manual = QuantizeOptions(act_amax={"/model/layers.0/mixer/in_proj/MatMul": 1.0})
    assert quantize_mod.run_calibration(model, ckpt, manual) == {"/model/layers.0/mixer/in_proj/MatMul": 1.0}


def test_sequential_calibration_on_the_lazy_model_gives_the_same_amax(exported, tmp_path):
    """Sequential onloading (each layer read once for all batches) = batch by batch, bit for bit."""
    ckpt, _, model = exported
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i} " + "abc" * i for i in range(10)))
    batches = calibration_batches(load_tokenizer(ckpt), calib_file=prompts, calib_random=None, vocab_size=model.config.vocab_size, seq_len=64, batch=4)
    assert len({ids.shape[1] for ids, _ in batches}) > 1, "batches of different (left-padded) lengths"
    lazy = load_model(ckpt, lazy=True)
    progress = []
    whole = calibrate(model, batches)
    sequential = calibrate(lazy, batches, progress=lambda done, total: progress.append(done))
    assert sequential == whole
    assert lazy.weights.loads == len(lazy.weights.groups)
    assert progress == list(range(1, len(lazy.weights.groups) + 1))
