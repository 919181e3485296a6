"""The FP8 reference (`hybridtrt.exporter.fp8_reference`): our model computing an FP8 export's
Q/DQ from the recipe, and the two FP8 judgements built on it (DESIGN.md §8).

- Its rounding is ONNX's: checked against ONNX Runtime's own QuantizeLinear → DequantizeLinear
  kernels (ties, saturation, subnormals), not against our exporter's code.
- It reproduces FP8 exports (dense and MoE, fp32 compute: to fp32 rounding).
- Each judgement fails on the error it guards: an export whose graph disagrees with its recipe fails
  the artefact gate (tests/cli/test_fp8_cli.py: a wrong scale initializer); a calibration error that
  the graph and the recipe share — which the FP8 reference therefore shares too — passes the artefact
  gate and fails the recipe gate, whose yardstick calibrates nothing.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hybridtrt.cli.main import main
from hybridtrt.errors import QuantizationError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.fp8_reference import emulate_fp8, fake_quantize
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.models import load_model
from hybridtrt.validation.artefact import validate_artefact

PROMPTS = dict(random_n=3, steps=2, prompt_length=24)


def _ort_qdq(x: np.ndarray, scale: float) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear (float8e4m3fn, saturate=1) → DequantizeLinear, fp32."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], saturate=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fake_quantize_rounds_as_onnx_runtime_quantize_linear():
    scale = 0.0371
    grid = np.array([1.0, 1.125, 1.0625, 1.1875, 2.0**-9, 1.5 * 2.0**-9, 2.0**-10, 447.0, 448.0, 464.0, 1e4, 0.0], np.float32)
    x = np.concatenate([grid, -grid]) * np.float32(scale)  # ties between fp8 neighbours, saturation, subnormals
    x = np.concatenate([x, np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 7]).astype(np.float32)
    ours = fake_quantize(torch.from_numpy(x), scale).numpy()
    np.testing.assert_array_equal(ours, _ort_qdq(x, scale))
    assert np.abs(ours).max() == np.float32(448 * np.float32(scale))  # saturated, never NaN
    assert len(np.unique(ours)) < len(np.unique(x))  # it does quantize


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``preset -> (checkpoint, FP8 export dir, the calibrated amax table)``: checkpoints as HF's
    ``save_pretrained`` writes them (bf16, sharded) at a trained-like weight scale
    (initializer_range 0.05, as every FP8 accuracy test), exported in fp32 around the Q/DQ."""
    from tests.models.hf import save_hf_checkpoint

    made = {}

    def make(preset: str):
        if preset not in made:
            root = tmp_path_factory.mktemp(preset.replace("-", "_"))
            save_hf_checkpoint(preset, root / "ckpt", dtype=torch.bfloat16, max_shard_size="200KB", initializer_range=0.05)
            options = QuantizeOptions(calib_random=8)
            export(root / "ckpt", root / "fp8", ExportOptions(split=False), quantize=options)
            made[preset] = (root / "ckpt", root / "fp8", options.act_amax)
        return made[preset]

    return make


def test_the_fp8_reference_reproduces_the_export(exports):
    """fp32 around the Q/DQ: the artefact is the FP8 reference but for the rare FP8 rounding that
    another fp32 kernel flips (one flip moves its element a whole FP8 step), far inside the gates,
    while the unquantized model is 1e-1 away (the recipe's cost, judged separately). The dense
    preset's end-to-end CLI case is tests/cli/test_fp8_cli.py."""
    _, out, _ = exports("tiny-nemotron3-moe")
    report = validate_artefact(out, **PROMPTS)
    assert report.passed and report.reference == "pytorch-fp8" and report.yardstick == "pytorch-fp8-fp32-dithered"
    assert all(c.comparison.rel_l2 <= c.allowed for c in report.checks)
    assert min(c.comparison.rel_l2 for c in report.checks if c.name == "logits") < 1e-5  # exact where nothing flipped
    quality = report.quality
    assert quality is not None and quality.passed and quality.yardstick == "pytorch-fp8-dynamic-fp32"
    logits = [c for c in quality.checks if c.name == "logits"]
    assert all(1e-2 < c.comparison.rel_l2 <= c.allowed for c in logits)


def test_a_calibration_error_the_recipe_shares_fails_the_recipe_gate(exports, tmp_path, capsys):
    """One layer's activation scale 10× too small in both the graph and hybridtrt.json (a calibration
    bug): the artefact still computes its recipe exactly, so only the recipe gate can catch it."""
    ckpt, _, amax = exports("tiny-nemotron3-moe")
    node = "/model/layers.0/mixer/in_proj/MatMul"
    bad = {**amax, node: amax[node] * 0.1}
    export(ckpt, tmp_path / "bad", ExportOptions(split=False), quantize=QuantizeOptions(calib_random=8, act_amax=bad))
    report = validate_artefact(tmp_path / "bad", **PROMPTS)
    assert not report.failures and not report.quality.passed  # the artefact is right; its recipe is not
    assert any(c.name == "logits" for c in report.quality.failures)

    rep = tmp_path / "report"
    assert main(["validate", str(tmp_path / "bad"), "--random", "3", "--steps", "2", "--prompt-length", "24", "--report", str(rep)]) == 1
    out = capsys.readouterr().out
    assert "FP8 recipe: beyond its gates" in out and "FAIL" in out
    page = (rep / "report.html").read_text()
    assert "BEYOND its gates" in page and "FP8 recipe: pytorch-fp8 vs the unquantized pytorch" in page


def test_an_unknown_layer_in_the_recipe_is_refused(exports):
    ckpt, _, _ = exports("tiny-nemotron3-moe")
    model = load_model(ckpt, "fp32")
    with pytest.raises(QuantizationError, match="does not have"):
        emulate_fp8(model, {"scheme": "fp8", "quantized": ["/model/layers.99/mixer/in_proj/MatMul"]}, torch.float32)


def test_emulation_is_undone(exports):
    ckpt, out, _ = exports("tiny-nemotron3-moe")
    from hybridtrt.exporter.manifest import read_manifest

    model = load_model(ckpt, "fp32")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(ids, mask).logits
        restore = emulate_fp8(model, read_manifest(out).quantization, torch.float32)
        quantized = model(ids, mask).logits
        restore()
        again = model(ids, mask).logits
    assert not torch.equal(plain, quantized) and torch.equal(plain, again)


def test_a_fault_in_one_fp8_expert_is_named_at_its_layer(exports, tmp_path):
    """The busiest expert's FP8 weight scale 1.5× off in the graph (the recipe says otherwise): the
    artefact no longer computes its FP8 model, and per layer the MoE layer is named first."""
    import shutil

    from hybridtrt.exporter.manifest import read_manifest
    from tests.validation.faults import edit_initializers

    _, out, _ = exports("tiny-nemotron3-moe")
    manifest = read_manifest(out)
    node, entry = next(iter(manifest.quantization["experts"].items()))
    layer = int(node.split("/")[2].split(".")[1])
    busiest = int(np.argmax(entry["tokens"]))

    def scale_one(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[busiest] *= a.dtype.type(1.5)
        return a

    bad = shutil.copytree(out, tmp_path / "bad")
    edit_initializers(bad, {f"model.layers.{layer}.mixer.experts.up_weight_scale": scale_one})
    report = validate_artefact(bad, per_layer=True, **PROMPTS)
    assert not report.passed and report.first_divergence["layer"] == layer, report.first_divergence
