"""ModelOpt-quantized checkpoints are read as ModelOpt writes and dequantizes them.

The fixtures (tests/fixtures/modelopt, `make_fixtures.py`) were written by nvidia-modelopt 0.47.0 itself
(``mtq.quantize`` + ``export_hf_checkpoint`` on the CPU), with the sha256 of ModelOpt's own
``FP8QTensor.dequantize`` / ``NVFP4QTensor.dequantize`` of every quantized weight: the yardstick is the
producing tool, not our reading of its format.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridtrt.errors import CheckpointError
from hybridtrt.models.loading import load_model, open_checkpoint
from hybridtrt.models.modelopt import E2M1_VALUES, read_quantization
from hybridtrt.models.weights import WeightIndex
from tests.cli.batch import run_batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _hashes(recipe: str, dequantize=None) -> tuple[dict, dict]:
    """(ours, ModelOpt's) sha256 per quantized weight and dtype."""
    root = FIXTURES / recipe
    index = WeightIndex([root / "model.safetensors"])
    quantization = read_quantization(root, index)
    dequantize = dequantize or (lambda w, read, dtype: w.dequantize(read, dtype))
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    ours = {w.weight: {name: _sha(dequantize(w, index.read, dtype)) for name, dtype in dtypes.items()} for w in quantization.weights.values()}
    return ours, json.loads((root / "dequantized.json").read_text())["sha256"]


@pytest.mark.parametrize(("recipe", "weights"), [("fp8", 8), ("nvfp4", 8), ("fp8-moe", 42), ("nvfp4-moe", 42)])
def test_dequantization_is_modelopts_own_bit_for_bit(recipe, weights):
    """Every quantized weight (the MoE fixture's routed experts one by one), in bf16 and fp32,
    dequantizes to exactly what ModelOpt's dequantize gives."""
    ours, theirs = _hashes(recipe)
    assert len(ours) == weights and ours == theirs


def test_a_dequantization_rounded_another_way_fails_the_hashes():
    """The yardstick can fail: FP8 dequantized in fp32 and then rounded to bf16 (not ModelOpt's rule of
    multiplying in the target dtype) differs from ModelOpt's in at least one bf16 weight, and NVFP4 with
    E2M1 code 8 read as -0 (the format's own value, not ModelOpt's table) differs in its bytes."""

    def fp32_then_round(w, read, dtype):
        return (read(w.weight).float() * read(w.weight_scale).float()).to(dtype)

    ours, theirs = _hashes("fp8", fp32_then_round)
    assert any(ours[k]["bfloat16"] != theirs[k]["bfloat16"] for k in ours)
    assert all(ours[k]["float32"] == theirs[k]["float32"] for k in ours)  # in fp32 both rules agree

    import hybridtrt.models.modelopt as modelopt

    def negative_zero(w, read, dtype):
        table = modelopt.E2M1_VALUES
        try:
            modelopt.E2M1_VALUES = table[:8] + (-0.0,) + table[9:]
            return w.dequantize(read, dtype)
        finally:
            modelopt.E2M1_VALUES = table

    ours, theirs = _hashes("nvfp4", negative_zero)
    assert any(ours[k] != theirs[k] for k in ours)


def test_e2m1_values_follow_the_bit_layout():
    """The codebook from the format's definition (sign bit 3, two exponent bits with bias 1, one mantissa
    bit, subnormal at exponent 0; OCP MX spec, E2M1) equals the table, code 8 (-0) compared by value."""
    decoded = []
    for code in range(16):
        sign = -1.0 if code & 8 else 1.0
        exponent, mantissa = (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa * 0.5) * 2.0 ** (exponent - 1)
        decoded.append(sign * magnitude)
    assert decoded == list(E2M1_VALUES)


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4", "fp8-moe", "nvfp4-moe"])
def test_reference_model_is_hf_with_modelopts_weights(recipe):
    """Our model of a ModelOpt checkpoint computes what HF transformers' NemotronH computes with the
    dequantized weights (loaded by name into the HF model: the quantized weights land where they belong)."""
    import transformers

    root = FIXTURES / recipe
    config = transformers.AutoConfig.from_pretrained(root)
    del config.quantization_config  # the HF model with ModelOpt's dequantized weights, unquantized
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    checkpoint = open_checkpoint(root, "fp32")
    # HF 5 keeps Nemotron-H's modules under `model.` and renames the checkpoint's `backbone.` when it loads.
    state = {re.sub(r"^backbone\.", "model.", source.tensor): checkpoint.read(name) for name, source in checkpoint.parameters.items()}
    missing, unexpected = hf.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ours = load_model(root, "fp32")
    ids = torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, ours(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-5
    dequantized = sum(1 if s.quantized is not None else len(s.parts) for s in checkpoint.parameters.values() if s.quantized is not None or s.parts)
    assert checkpoint.quantization is not None and dequantized == len(checkpoint.quantization.weights)


def _copy(recipe: str, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / recipe, out)
    return out


def test_what_is_not_read_is_refused_by_name(tmp_path):
    """Through the CLI: another algorithm, a weight without its scale, a scale of the wrong shape, an
    NVFP4 export, --quantize on an FP8 checkpoint and the HF oracle on a quantized checkpoint (transformers
    has no loader for one) exit 2 with the offending value and a fix."""
    awq = _copy("fp8", tmp_path, "awq")
    recipe = json.loads((awq / "hf_quant_config.json").read_text())
    recipe["quantization"]["quant_algo"] = "W4A16_AWQ"
    (awq / "hf_quant_config.json").write_text(json.dumps(recipe))
    no_scale = _copy("fp8", tmp_path, "no_scale")
    tensors = load_file(no_scale / "model.safetensors")
    del tensors["backbone.layers.2.mixer.up_proj.input_scale"]
    save_file(tensors, no_scale / "model.safetensors")
    bad_shape = _copy("nvfp4", tmp_path, "bad_shape")
    tensors = load_file(bad_shape / "model.safetensors")
    tensors["backbone.layers.0.mixer.out_proj.weight_scale"] = tensors["backbone.layers.0.mixer.out_proj.weight_scale"][:, :4].contiguous()
    save_file(tensors, bad_shape / "model.safetensors")
    bad_kv = _copy("fp8", tmp_path, "bad_kv")
    tensors = load_file(bad_kv / "model.safetensors")
    tensors["backbone.layers.1.mixer.k_proj.k_scale"] = tensors["backbone.layers.1.mixer.k_proj.k_scale"].repeat(2)
    save_file(tensors, bad_kv / "model.safetensors")
    bad_group = _copy("nvfp4", tmp_path, "bad_group")
    recipe = json.loads((bad_group / "hf_quant_config.json").read_text())
    recipe["quantization"]["group_size"] = "16"
    (bad_group / "hf_quant_config.json").write_text(json.dumps(recipe))
    cases = {
        "awq": (["inspect", awq], "'W4A16_AWQ'"),
        "bad_group": (["inspect", bad_group], "group_size '16'"),
        "bad_kv": (["inspect", bad_kv], "backbone.layers.1.mixer.k_proj.k_scale is F32 [2], ModelOpt writes F32 []"),
        "no_scale": (["inspect", no_scale], "backbone.layers.2.mixer.up_proj.input_scale is missing"),
        "bad_shape": (["inspect", bad_shape], "out_proj.weight_scale is F8_E4M3 [64, 4], ModelOpt writes F8_E4M3 [64, 8]"),
        "nvfp4_quantize_again": (["export", FIXTURES / "nvfp4", "-o", tmp_path / "o1", "--quantize", "int4"], "quantized to NVFP4 by ModelOpt already"),
        "double_quantize": (["export", FIXTURES / "fp8", "-o", tmp_path / "o2", "--quantize", "fp8", "--calib-random", "2"], "quantized to FP8 by ModelOpt already"),
        "hf_oracle": (["validate", "--checkpoint", FIXTURES / "fp8", "--reference", "hf", "--random", "2"], "HF transformers has no loader for ModelOpt's quantized weights"),
    }
    outcomes = run_batch([[str(a) for a in argv] for argv, _ in cases.values()], cwd=tmp_path)
    for (name, (_, needle)), outcome in zip(cases.items(), outcomes):
        assert outcome.code == 2, (name, outcome.output[-2000:])
        assert needle in outcome.output and "fix:" in outcome.output and "Traceback" not in outcome.output, (name, outcome.output[-2000:])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_fp8_weights_without_a_recipe_are_refused(tmp_path):
    """FP8 tensors in a checkpoint that declares no ModelOpt recipe are not guessed at."""
    bare = _copy("fp8", tmp_path, "bare")
    (bare / "hf_quant_config.json").unlink()
    config = json.loads((bare / "config.json").read_text())
    config.pop("quantization_config")
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not floating point|unexpected"):
        open_checkpoint(bare)


def test_kv_cache_scales_are_read_and_said_unused():
    """The FP8 fixture's KV-cache scales (``mtq.FP8_KV_CFG``) are the recipe's, not unexpected tensors, and
    what is read says they are not used (the export keeps the KV cache in the model dtype)."""
    checkpoint = open_checkpoint(FIXTURES / "fp8", "bf16")
    quantization = checkpoint.quantization
    assert quantization.kv_cache_algo == "FP8"
    assert quantization.kv_scales == ("backbone.layers.1.mixer.k_proj.k_scale", "backbone.layers.1.mixer.v_proj.v_scale")
    assert quantization.describe().endswith("KV cache FP8 in the checkpoint (2 scales), not used: the KV cache stays in the model dtype")


def test_a_sharded_checkpoint_reads_the_same(tmp_path):
    """NVIDIA's checkpoints are sharded: a weight in one shard and its scales in another read the same."""
    sharded = _copy("fp8-moe", tmp_path, "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)  # alphabetical: each weight lands away from some of its scales
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: file for file, part in halves.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    one, two = open_checkpoint(FIXTURES / "fp8-moe", "bf16"), open_checkpoint(sharded, "bf16")
    assert len(two.index.files) == 2 and two.quantization.weights == one.quantization.weights
    for name in one.parameters:
        assert torch.equal(one.read(name), two.read(name)), name


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_rows_of_a_quantized_weight_are_read_alone(recipe, monkeypatch):
    """`read_rows` (the lazy model's LM head and embedding slices) of a quantized weight reads those rows of
    the weight and of its block scales, never the whole tensor, and gives exactly the rows of `read`."""
    checkpoint = open_checkpoint(FIXTURES / recipe, "bf16")
    name = "layers.0.mixer.in_proj.weight"
    whole = checkpoint.read(name)
    read = []
    monkeypatch.setattr(checkpoint.index, "read", lambda tensor: read.append(tensor) or WeightIndex.read(checkpoint.index, tensor))
    rows = checkpoint.read_rows(name, 5, 21)
    assert torch.equal(rows, whole[5:21])
    assert read and all(checkpoint.index[t].shape == () for t in read)  # only scalar scales read whole
