"""``export --tp N`` of FP8 models (DESIGN.md §12, "Quantized ranks"): every rank's FP8 weights and scales
are the slices of the one-device FP8 export's, byte for byte, because a rank's part of a weight is quantized
with the unsharded tensor's scale (its amax read once from the checkpoint) and its part of an activation with
the unsharded activation's (one calibration of the unsharded model); a ModelOpt FP8 checkpoint's own
per-tensor scales are the unsharded tensors' already. So the ranks' partial sums add up to the one-device
FP8 model's MatMuls, and the ranks are judged against the one FP8 reference of their one recipe.

Planted faults: a rank quantized with its slice's own scales (the recipe gate names the rank and the
scale), a rank's weight scale 1.5× (the judge names the rank and the layer)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hybridtrt.errors import ArtefactError, ExportError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import TP_MANIFEST, read_manifest
from hybridtrt.exporter.quantize import QuantizeOptions
from hybridtrt.exporter.tensor_parallel import RankExport, export_tp, judge_ranks, one_recipe
from hybridtrt.models.loading import open_checkpoint
from hybridtrt.models.tensor_parallel import TensorParallelPlan
from hybridtrt.validation.tensor_parallel import validate_export
from tests.cli.batch import run_batch

PATTERN = ["mlp", "attention", "moe", "mamba", "moe", "mamba"]
MAMBA_LAYER = 3
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=PATTERN)


def _quantized(path: Path) -> dict[str, np.ndarray]:
    """The FP8 initializers (as bytes), the weight scales and the activation scales of a graph."""
    proto = onnx.load(str(path))
    out = {}
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and not t.name.endswith("zero_point"):
            out[t.name] = numpy_helper.to_array(t, str(path.parent)).view(np.uint8)
        elif t.name.endswith(("weight_scale", "input_scale")):
            out[t.name] = numpy_helper.to_array(t).astype(np.float32)
    return out


def _slice(plan: TensorParallelPlan, rank: int, name: str, whole: np.ndarray) -> np.ndarray:
    """Rank ``rank``'s part of the one-device export's quantized initializer ``name``, by the plan's rule
    on the parameter it quantizes: a linear's FP8 weight ``[in, out]`` and its per-channel scale ``[out]``,
    a stack of experts ``[E, out, in]`` and its scales ``[E, 1 | out]``; activation scales are whole."""
    if name.endswith("input_scale"):
        return whole
    experts = re.fullmatch(r"model\.(layers\.\d+\.mixer\.experts)\.(up|down)_(proj_fp8|weight_scale)", name)
    if experts:
        param, kind = f"{experts[1]}.{experts[2]}_proj", experts[3]
        where = plan.part(param, rank)
        if kind == "proj_fp8":
            return plan.shard(param, torch.from_numpy(whole.copy()), rank).numpy()
        dim, idx = where
        return whole[:, list(idx)] if dim == 1 and whole.shape[1] > 1 else whole  # per channel: the rank's out rows
    param = re.sub(r"\.weight(_t_fp8|_scale)$", ".weight", name.removeprefix("model."))
    where = plan.part(param, rank)
    if where is None:
        return whole
    dim, idx = where
    if name.endswith("_t_fp8"):  # [in, out]: torch's dim 0 is out
        return plan.shard(param, torch.from_numpy(whole.T.copy()), rank).numpy().T
    return whole[list(idx)] if dim == 0 and whole.ndim == 1 else whole


def _assert_slices_of(one: Path, tp: Path, plan: TensorParallelPlan, graph: str = "model.onnx") -> int:
    whole = _quantized(one / graph)
    compared = 0
    for rank in range(plan.world):
        mine = _quantized(tp / f"rank{rank}" / graph)
        assert mine.keys() == whole.keys(), rank
        for name, got in mine.items():
            want = _slice(plan, rank, name, whole[name])
            assert got.shape == want.shape and np.array_equal(got, want), (rank, name)
            compared += 1
    return compared


@pytest.mark.parametrize(("weight_scale", "dtype"), [("tensor", "fp32"), ("channel", "bf16")])
def test_calibrated_fp8_ranks_are_slices_of_the_one_device_export(checkpoint, tmp_path, weight_scale, dtype):
    """``--quantize fp8`` at TP 2 (every block kind, MoE experts split inside): every rank's FP8 weights
    and scales are the slices of the one-device FP8 export's, and its recipe is the one-device recipe; the
    ranks pass their verification against the FP8 reference, and ``validate`` passes at the fp8 gates. A
    planted 1.5× weight scale in rank 1's Mamba in_proj fails the judge at that rank and layer; a rank
    whose recipe differs is named with the scale that differs."""
    options = ExportOptions(dtype=dtype)
    quantize = lambda: QuantizeOptions(calib_random=4, weight_scale=weight_scale)  # noqa: E731
    one = export(checkpoint, tmp_path / "one", dataclasses.replace(options, verify=False), quantize=quantize())
    result = export_tp(checkpoint, tmp_path / "tp", 2, options, quantize=quantize())
    plan = result.plan
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan) >= 2 * 3 * 5  # 5 linears and 1 experts node: weights and scales
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan, "decode.onnx")
    manifests = [r.manifest for r in result.ranks]
    assert all(m.quantization == one.manifest.quantization for m in manifests)  # the calibration, the scales, the layers: the one-device recipe
    v = result.verification
    assert v["truth"] == "FP8 reference (fp32), one device" and v["precision"] == "fp8", v
    assert v["yardstick"] == ("FP8 bf16 reference" if dtype == "bf16" else "FP8 fp32 reference, dithered (2^-16 before each quantizer)")
    top = json.loads((tmp_path / "tp" / TP_MANIFEST).read_text())
    assert top["quantization"] == {"scheme": "fp8", "format": "float8e4m3fn", "weight_scale": weight_scale, "source": "calibration"}

    if dtype == "fp32":  # the planted faults (once)
        full = open_checkpoint(checkpoint, dtype)
        graphs = lambda name: [onnx.load(str(tmp_path / "tp" / f"rank{r}" / name)) for r in range(2)]  # noqa: E731
        unified, decode = graphs("model.onnx"), graphs("decode.onnx")
        for proto in (unified[1], decode[1]):
            for t in proto.graph.initializer:
                if t.name == f"model.layers.{MAMBA_LAYER}.mixer.in_proj.weight_scale":
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name))
        with pytest.raises(ExportError, match=f"rank 1, layer {MAMBA_LAYER} "):
            judge_ranks(full, plan, unified, decode, manifests)
        node = f"/model/layers.{MAMBA_LAYER}/mixer/out_proj/MatMul"
        changed = dataclasses.replace(manifests[1], quantization={**manifests[1].quantization, "weight_scales": {**manifests[1].quantization["weight_scales"], node: 1.0}})
        with pytest.raises(ArtefactError, match=re.escape(f"rank 1's quantization recipe is not rank 0's (weight_scales[{node!r}]: ")):
            one_recipe([manifests[0], changed], ArtefactError)
    else:
        report = validate_export(tmp_path / "tp", random_n=2, prompt_length=9, steps=1)
        assert report.passed and report.precision == "fp8" and report.yardstick == "pytorch-fp8", [(c.name, c.failures) for c in report.failures]


def test_a_rank_quantized_with_its_slices_own_scales_is_refused(checkpoint, tmp_path, monkeypatch):
    """The fault the unsharded scales prevent: ranks that quantize their slices with the slices' own amax
    hold different scales for the same weight (different quantized functions, whose partial sums are no
    FP8 MatMul). The recipe gate refuses the export naming the rank and the first scale that differs, and
    nothing is published."""
    monkeypatch.setattr(RankExport, "fp8", lambda self, quantize: dataclasses.replace(quantize))  # no weight_amax: the slices' own
    out = tmp_path / "tp"
    with pytest.raises(ExportError, match=r"rank 1's quantization recipe is not rank 0's \((weight_scales|experts)\['/model/layers\.\d+/mixer/.*_scale") as e:
        export_tp(checkpoint, out, 2, ExportOptions(verify=False), quantize=QuantizeOptions(calib_random=2))
    assert "re-export" in e.value.fix
    assert not (out / TP_MANIFEST).exists() and not any(p.name.startswith("rank") for p in out.iterdir())


def test_a_modelopt_fp8_checkpoint_keeps_its_scales_on_every_rank(tmp_path):
    """``export FP8_CHECKPOINT --tp 2`` (the MoE fixture nvidia-modelopt wrote: routed and shared experts
    FP8): every rank's FP8 weights are the slices of the one-device export's, which are the checkpoint's
    bytes, with the checkpoint's per-tensor scales on every rank; verified against the FP8 reference.
    An NVFP4 checkpoint's 4-bit weights are refused with --tp (exit 2, the fix: --dequantize), and with
    --dequantize it splits in bf16, the manifests saying where the weights came from."""
    fp8, nvfp4 = FIXTURES / "fp8-moe", FIXTURES / "nvfp4"
    cases = [
        ["export", fp8, "-o", tmp_path / "tp", "--tp", 2, "--no-split"],
        ["export", nvfp4, "-o", tmp_path / "never", "--tp", 2],
        ["export", nvfp4, "-o", tmp_path / "dq", "--tp", 2, "--dequantize", "--no-verify", "--no-split"],
    ]
    got = run_batch(cases, columns=80)
    assert got[0].code == 0, got[0].output
    text = " ".join(re.sub(r"[│┃]", " ", got[0].stdout).split())
    assert "the checkpoint's own scales" in text and "the same scales on every rank" in text and "vs the FP8 reference (fp32), one device" in text, text
    assert all(len(line) <= 80 for line in got[0].stdout.splitlines() if str(tmp_path) not in line)
    o = " ".join(got[1].output.split())
    assert got[1].code == 2 and "--tp of a ModelOpt NVFP4 checkpoint's 4-bit weights is not built yet" in o and "fix: add --dequantize" in o, o
    assert "Traceback" not in got[1].output and not (tmp_path / "never").exists()
    assert got[2].code == 0, got[2].output
    assert json.loads((tmp_path / "dq" / TP_MANIFEST).read_text())["source"]["dequantized"].startswith("NVFP4 (blocks of 16)")
    assert read_manifest(tmp_path / "dq" / "rank1").source["dequantized"].startswith("NVFP4 (blocks of 16)")

    one = export(fp8, tmp_path / "one", ExportOptions(dtype="bf16", verify=False, split=False))
    plan = TensorParallelPlan(open_checkpoint(fp8).config, 2)
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan) > 0
    for rank in range(2):
        recipe = read_manifest(tmp_path / "tp" / f"rank{rank}").quantization
        assert recipe == one.manifest.quantization and recipe["source"].startswith("checkpoint: FP8 per-tensor")
