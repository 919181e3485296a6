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
from onnx import numpy_helper

from hybridtrt.errors import ArtefactError, ExportError
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.exporter.manifest import TP_MANIFEST, read_manifest
from hybridtrt.exporter.quantize import QuantizeOptions, WeightOnlyOptions
from hybridtrt.exporter.tensor_parallel import RankExport, export_tp, int4_blocks, judge_ranks, one_recipe
from hybridtrt.models.loading import open_checkpoint
from hybridtrt.models.tensor_parallel import TensorParallelPlan, _runs
from hybridtrt.validation.tensor_parallel import validate_export
from tests.cli.batch import run_batch

PATTERN = ["mlp", "attention", "moe", "mamba", "moe", "mamba"]
MAMBA_LAYER = 3
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=PATTERN)


#: A quantized initializer's suffix -> the suffix of the parameter it comes from, and its layout: ``t`` a
#: linear's, transposed (``[in, out]``; a per-channel scale ``[out]``), ``in`` one value per input, ``stack``
#: a stack of experts' (``[E, out, in]``).
_QUANTIZED = {
    ".weight_t_fp8": (".weight", "t"), ".weight_scale": (".weight", "t"), ".weight_zero_point": (".weight", "t"),  # FP8 (INT4's scale too)
    ".weight_t_int4": (".weight", "t"), ".pre_quant_scale": (".weight", "in"),  # INT4, AWQ
    ".weight_t_fp4": (".weight", "t"), ".weight_block_scale": (".weight", "t"),  # NVFP4 linear
    "_proj_fp8": ("_proj", "stack"), "_weight_scale": ("_proj", "stack"),  # MoeExpertsFp8
    "_codes": ("_proj", "stack"), "_block_scale": ("_proj", "stack"),  # MoeExpertsNvfp4
}  # fmt: skip
_WHOLE = ("input_scale", "input_zero_point", "weight_scale_2", "global_scale")


def _quantized(path: Path) -> dict[str, np.ndarray]:
    """The quantized initializers of a graph as bytes (FP8 and FP4 weights, block scales) or values
    (per-tensor, per-channel and global scales)."""
    proto = onnx.load(str(path))
    low = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.UINT8)
    out = {}
    for t in proto.graph.initializer:
        if t.name.endswith(tuple(_QUANTIZED)) or t.name.endswith(_WHOLE):
            a = numpy_helper.to_array(t, str(path.parent))
            out[t.name] = a.view(np.uint8) if t.data_type in low else a.astype(np.float32)
    return out


def _slice(plan: TensorParallelPlan, rank: int, name: str, whole: np.ndarray) -> np.ndarray:
    """Rank ``rank``'s part of the one-device export's quantized initializer ``name``, by the plan's part of
    the parameter it quantizes: along the array's axis of that dim, scaled to the stored form (an axis of
    packed codes or block scales holds 2 or 16 inputs per element); a per-tensor, per-expert or global scale
    and an activation scale are whole."""
    suffix = next((k for k in _QUANTIZED if name.endswith(k)), None)
    if suffix is None:
        return whole
    tail, layout = _QUANTIZED[suffix]
    param = name.removeprefix("model.").removesuffix(suffix) + tail
    where = plan.part(param, rank)
    if where is None:
        return whole
    dim, idx = where
    axis = {"t": whole.ndim - 1 - dim, "in": dim - 1, "stack": dim}[layout]
    if axis < 0 or axis >= whole.ndim or whole.shape[axis] == 1:
        return whole  # a per-tensor or per-expert scale, or a per-channel one along the split inputs
    per = _SHAPES[param][dim] // whole.shape[axis]
    cols = [i // per for r in _runs(idx) for i in range(r.start, r.stop, per)]
    return np.take(whole, cols, axis=axis)


#: The unsharded parameters' shapes (`_assert_slices_of` fills it from the checkpoint).
_SHAPES: dict[str, tuple[int, ...]] = {}


def _assert_slices_of(one: Path, tp: Path, plan: TensorParallelPlan, checkpoint: Path, graph: str = "model.onnx") -> int:
    _SHAPES.clear()
    _SHAPES.update({n: tuple(p.shape) for n, p in open_checkpoint(checkpoint).parameters.items()})
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
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan, checkpoint) >= 2 * 4 * 5  # 5 linears and 1 experts node: weights and scales
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan, checkpoint, "decode.onnx")
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
        with pytest.raises(ArtefactError, match=re.escape(f"rank 1's quantization recipe is not rank 0's (quantization: weight_scales[{node!r}]: ")):
            one_recipe([manifests[0], changed], ArtefactError)
    else:
        report = validate_export(tmp_path / "tp", random_n=2, prompt_length=9, steps=1)
        assert report.passed and report.precision == "fp8" and report.yardstick == "pytorch-fp8", [(c.name, c.failures) for c in report.failures]


def test_int4_ranks_are_slices_of_the_one_device_export_of_their_blocks(checkpoint, tmp_path):
    """``--quantize int4 --calib-random 4 --tp 2`` (AWQ): the AWQ search runs once on the unsharded model; a
    layer whose inputs the ranks split takes the largest block that every rank's part is whole blocks of (the
    MLP's 32 inputs: 16 per rank, so block 16 where one device takes 32). Every rank's INT4 weights, scales
    and AWQ pre-scales are the slices of the one-device export's with those blocks, its recipe is that
    export's, and the ranks pass at the fp32 gates against the 4-bit weights' reference. Ranks whose blocks
    differ are refused by the recipe gate, naming the layer."""
    cases = [["export", checkpoint, "-o", tmp_path / "tp", "--tp", 2, "--quantize", "int4", "--block-size", 32, "--calib-random", 4, "--no-split"]]
    got = run_batch(cases, columns=80)
    assert got[0].code == 0, got[0].output
    text = " ".join(re.sub(r"[│┃]", " ", got[0].stdout).split())
    assert "int4 W4A16 (AWQ), blocks of 32 (1 layer(s) smaller: 16)" in text and "the same scales on every rank" in text, text
    assert "vs the int4 weights' fp32 reference, one device" in text, text
    full = open_checkpoint(checkpoint)
    plan = TensorParallelPlan(full.config, 2)
    blocks = int4_blocks(full, plan, 32)
    assert {n: b for n, b in blocks.items() if b != 32} == {"/model/layers.0/mixer/down_proj/MatMul": 16}
    options = WeightOnlyOptions("int4", block_size=32, calib_random=4)
    options.blocks = blocks  # the one-device export of the ranks' blocks
    one = export(checkpoint, tmp_path / "one", ExportOptions(verify=False, split=False), weight_only=options)
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan, checkpoint) >= 2 * 5 * 3  # weights, scales, pre-scales
    manifests = [read_manifest(tmp_path / "tp" / f"rank{r}") for r in range(2)]
    assert all(m.weight_only == one.manifest.weight_only for m in manifests) and manifests[0].weight_only["awq"]
    other = dataclasses.replace(manifests[1], weight_only={**manifests[1].weight_only, "blocks": {}})
    with pytest.raises(ArtefactError, match=re.escape("rank 1's quantization recipe is not rank 0's (weight_only: blocks['/model/layers.0/mixer/down_proj/MatMul']: 16 vs None)")):
        one_recipe([manifests[0], other], ArtefactError)


def test_a_rank_quantized_with_its_slices_own_scales_is_refused(checkpoint, tmp_path, monkeypatch):
    """The fault the unsharded scales prevent: ranks that quantize their slices with the slices' own amax
    hold different scales for the same weight (different quantized functions, whose partial sums are no
    FP8 MatMul). The recipe gate refuses the export naming the rank and the first scale that differs, and
    nothing is published."""
    monkeypatch.setattr(RankExport, "fp8", lambda self, quantize: dataclasses.replace(quantize))  # no weight_amax: the slices' own
    out = tmp_path / "tp"
    with pytest.raises(ExportError, match=r"rank 1's quantization recipe is not rank 0's \(quantization: (weight_scales|experts)\['/model/layers\.\d+/mixer/.*_scale") as e:
        export_tp(checkpoint, out, 2, ExportOptions(verify=False), quantize=QuantizeOptions(calib_random=2))
    assert "re-export" in e.value.fix
    assert not (out / TP_MANIFEST).exists() and not any(p.name.startswith("rank") for p in out.iterdir())


@pytest.mark.parametrize("fixture", ["fp8-moe", "nvfp4-moe"])
def test_a_modelopt_checkpoint_keeps_its_scales_on_every_rank(fixture, tmp_path):
    """``export CHECKPOINT --tp 2`` of the MoE fixtures nvidia-modelopt wrote (routed and shared experts
    quantized): FP8, and NVFP4's 4-bit weights (each rank its part of the codes and block scales as stored;
    the routed experts as MoeExpertsNvfp4). Every rank's quantized weights and scales are the slices of the
    one-device export's, which are the checkpoint's bytes, and its recipe is the one-device recipe; verified
    against the quantized reference by layer windows (the quantized experts' function bodies cut with them). NVFP4 with FP4 activations (W4A4) and with --dequantize split too, the
    manifests saying where the weights came from."""
    checkpoint = FIXTURES / fixture
    cases = [["export", checkpoint, "-o", tmp_path / "tp", "--tp", 2, "--no-split", "--verify", "layers"]]
    if fixture == "nvfp4-moe":  # one trace of the rank model serves all three (quantization comes after the trace)
        cases += [
            ["export", checkpoint, "-o", tmp_path / "w4a4", "--tp", 2, "--no-split", "--fp4-activations"],
            ["export", checkpoint, "-o", tmp_path / "dq", "--tp", 2, "--no-split", "--dequantize", "--no-verify"],
        ]
    got = run_batch(cases, columns=80)
    assert all(o.code == 0 for o in got), [o.output for o in got]
    text = " ".join(re.sub(r"[│┃]", " ", got[0].stdout).split())
    truth = "FP8 reference (fp32)" if fixture == "fp8-moe" else "nvfp4 weights' fp32 reference"
    assert "the checkpoint's own scales" in text and "the same scales on every rank" in text and f"by 5 layer windows, vs the {truth}, one device" in text, text
    assert all(len(line) <= 80 for line in got[0].stdout.splitlines() if str(tmp_path) not in line)

    one = export(checkpoint, tmp_path / "one", ExportOptions(dtype="bf16", verify=False, split=False))
    plan = TensorParallelPlan(open_checkpoint(checkpoint).config, 2)
    assert _assert_slices_of(tmp_path / "one", tmp_path / "tp", plan, checkpoint) >= 2 * 3 * 4
    for rank in range(2):
        m = read_manifest(tmp_path / "tp" / f"rank{rank}")
        assert (m.quantization, m.weight_only) == (one.manifest.quantization, one.manifest.weight_only)
        assert (m.quantization or m.weight_only)["source"].startswith("checkpoint: " + fixture.split("-")[0].upper())
    if fixture == "nvfp4-moe":
        w4a4 = json.loads((tmp_path / "w4a4" / TP_MANIFEST).read_text())
        assert w4a4["verification"]["precision"] == "nvfp4-w4a4" and read_manifest(tmp_path / "w4a4" / "rank1").weight_only["activations"]
        assert json.loads((tmp_path / "dq" / TP_MANIFEST).read_text())["source"]["dequantized"].startswith("NVFP4 (blocks of 16)")
        assert read_manifest(tmp_path / "dq" / "rank1").source["dequantized"].startswith("NVFP4 (blocks of 16)")


def test_a_split_that_cuts_a_4bit_block_is_refused(tmp_path, monkeypatch):
    """A rank holds its part of an NVFP4 weight's codes and block scales as stored, so its inputs must be
    whole blocks of 16. The plan splits widths in 16-row blocks where it can, and row by row where it cannot
    (a width that is no multiple of 16); an MLP split of 56 + 72 rows stands for that and cuts a block of
    down_proj's inputs: refused before anything is written, naming the rank, the inputs and the weight, with
    --dequantize as the fix."""
    monkeypatch.setattr(TensorParallelPlan, "mlp_rows", lambda self, rank: range(0, 56) if rank == 0 else range(56, 128))
    with pytest.raises(ExportError, match=r"--tp 2 of a ModelOpt NVFP4 checkpoint's 4-bit weights: rank 0 holds inputs 0–55 of layers\.\d+\.mixer\.down_proj\.weight, which cuts its 16-input blocks") as e:
        export_tp(FIXTURES / "nvfp4", tmp_path / "out", 2, ExportOptions(dtype="bf16"))
    assert "add --dequantize" in e.value.fix and not (tmp_path / "out").exists()
