"""Half precision against one truth, on scaled copies of the real architectures (issue 16).

Checkpoints are written by HF transformers' own ``save_pretrained`` in bf16 (as the hub ships them),
random weights with initializer_range 0.3. Every export is judged against the fp32 reference with
the precision's yardstick (tolerances.json): left-padded batches of 3 whose longest prompt is
2 · chunk + 5 tokens, so the scan carries state across chunk boundaries. A 10 % weight fault planted
in one Mamba layer must fail, named at that layer, in every dtype.
"""

from __future__ import annotations

import json
import shutil

import pytest

from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.models.architectures import scaled_config, write_hf_checkpoint
from hybridtrt.validation.artefact import validate_artefact
from tests.cli.test_bad_inputs import run_cli
from tests.conftest import made_once
from tests.validation.faults import perturb_weight

pytest.importorskip("transformers")

#: Scaled copies: Nemotron-H's structure (M/*/- blocks, GQA) as Nano-v2 has it (head_dim 80), Mamba-2
#: (residual in fp32). Every published architecture × bf16/fp16/FP8 through export and validate:
#: benchmarks/architectures.py (README "Architectures"); MoE: tests/validation/test_moe_routing.py.
ARCHS = {
    "nemotron-nano-9b-v2": dict(width=32, layers=5),
    "mamba-codestral-7b": dict(width=8, layers=3),
}
#: Nano-v2's pattern reaches its first attention block at layer 14 ("M-M-M-MM-M-M-M*"); its block
#: kinds, in the order they first appear, in 4 layers (2.3x less tracing and validation here; the
#: real patterns in full: benchmarks/architectures.py).
PATTERNS = {"nemotron-nano-9b-v2": "M-M*"}
DTYPES = ["fp16", "bf16"]  # the dtypes real checkpoints ship and serve in; fp32 exports: tests/validation/test_validate.py
#: (architecture, dtype) pairs run here: Nemotron-H's structure in its default bf16 (fp16 on that
#: structure: the Nemotron-3 copies in test_moe_routing.py) here and through the CLI
#: (`test_cli_export_and_validate_bf16`), Mamba-2 in fp16 (in bf16: benchmarks/architectures.py).
CASES = [("nemotron-nano-9b-v2", "bf16"), ("mamba-codestral-7b", "fp16")]
#: The scan's chunk and the longest prompt, 2 · chunk + 5: two whole chunks and a partial one, so the states
#: cross chunk boundaries (chunk 8 here; the real chunk sizes in benchmarks/architectures.py).
CHUNK = 8
PROMPT = 2 * CHUNK + 5


@pytest.fixture(scope="module")
def checkpoints():
    out = {}
    for name, size in ARCHS.items():
        cfg = scaled_config(name, vocab=256, **size)
        cfg["chunk_size"] = CHUNK  # 2 · chunk + 5 = 21 tokens: several chunks at CI cost
        if name in PATTERNS:
            assert set(PATTERNS[name]) == set(cfg["hybrid_override_pattern"]), cfg["hybrid_override_pattern"]
            cfg["hybrid_override_pattern"] = PATTERNS[name]
        with made_once("arch-checkpoint", json.dumps(cfg, sort_keys=True)) as (folder, done):  # one per run, shared by the workers
            out[name] = folder / name
            if not done:
                write_hf_checkpoint(cfg, out[name], dtype="bfloat16")
    return out


@pytest.fixture(scope="module")
def exports(checkpoints):
    def make(name: str, dtype: str):
        with made_once("arch-export", json.dumps([str(checkpoints[name]), dtype])) as (folder, done):
            if not done:
                export(checkpoints[name], folder / "out", ExportOptions(dtype=dtype))
        return folder / "out"

    return make


def _mamba_layer(checkpoint) -> int:
    from hybridtrt.models.config import MAMBA, load_config

    kinds = load_config(checkpoint).layer_types
    return max(i for i, k in enumerate(kinds) if k == MAMBA)


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_export_passes_against_the_fp32_truth(name, dtype, checkpoints, exports):
    out = exports(name, dtype)
    manifest = json.loads((out / "hybridtrt.json").read_text())
    assert manifest["dtype"] == dtype
    report = validate_artefact(out, random_n=3, prompt_length=PROMPT, steps=3)
    assert report.batch == 3 and max(report.prompt_lengths) == PROMPT and min(report.prompt_lengths) < PROMPT
    assert report.yardstick == {"fp32": "pytorch-fp64"}.get(dtype, f"pytorch-{dtype}")
    assert report.passed, [(c.phase, c.name, c.failures) for c in report.failures()]
    logits = next(c for c in report.checks if c.phase == "prefill" and c.name == "logits")
    assert logits.yardstick is not None and logits.allowed is not None and logits.comparison.rel_l2 <= logits.allowed


@pytest.mark.parametrize(("name", "dtype"), [("nemotron-nano-9b-v2", "bf16"), ("mamba-codestral-7b", "fp16")])
def test_a_planted_fault_fails_at_its_layer(name, dtype, checkpoints, exports, tmp_path):
    layer = _mamba_layer(checkpoints[name])
    bad = shutil.copytree(exports(name, dtype), tmp_path / "bad")
    perturb_weight(bad, f"model.layers.{layer}.mixer.in_proj.weight_t", 1.1)
    report = validate_artefact(bad, random_n=3, prompt_length=PROMPT, steps=2, per_layer=True)
    assert not report.passed
    assert report.first_divergence["layer"] == layer, report.first_divergence


def test_cli_export_and_validate_bf16(checkpoints, tmp_path):
    """As a user runs it, on the dtype real checkpoints ship in: `hybridtrt export` (bf16 by default,
    as the checkpoint declares), then `hybridtrt validate` (ONNX Runtime CPU through the bf16
    emulation), in fresh processes. Nemotron-H's structure in bf16, as `CASES` exports it in process:
    the CLI's trace is that export's, replayed from the run's trace cache (tests/conftest.py)."""
    dtype = "bf16"
    ckpt, out = checkpoints["nemotron-nano-9b-v2"], tmp_path / "out"
    done = run_cli("export", ckpt, "-o", out)  # no --dtype: the checkpoint declares bf16
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bf16 (the checkpoint's declared dtype" in done.stdout, done.stdout[-3000:]
    done = run_cli("validate", out, "--random", 3, "--prompt-length", PROMPT, "--steps", 2, "--json", tmp_path / "r.json")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-2000:])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["yardstick"] == f"pytorch-{dtype}" and report["precision"] == dtype
    assert "Traceback" not in done.stderr


# MoE in half precision: tests/validation/test_moe_routing.py (the published Nemotron-3 configs with
# their real expert counts, routing held to the truth's).
