"""The streamed export (fake-weight tracing, weights written from the checkpoint) is byte-identical
to the weight-loaded export (`hybridtrt.exporter.eager`, the code path before streaming), and its
recipes are what the exporter's optimizer made of the parameters. FP8 and MoE streaming:
tests/exporter/test_streaming_quantized.py (its own module, so the two halves run in parallel)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridtrt.errors import CheckpointError
from hybridtrt.exporter.eager import write_graphs
from hybridtrt.exporter.export import ExportOptions, export, trace_streamed
from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
from hybridtrt.exporter.streaming import FOLD_LIMIT, Deferred, DeferredTable
from hybridtrt.graphs.external_data import is_deferred
from hybridtrt.models.loading import open_checkpoint
from tests.exporter.streaming_checks import assert_identical, optimize_for_real  # noqa: F401 (autouse fixture)
from tests.models.hf import save_hf_checkpoint

#: Two session exports: both graphs of the default split export, and the unified graph with all logits
#: and fp16 states.
SHARED = {
    "nemotron-fp32-split": ("tiny-nemotron-h", ExportOptions(split=True)),
    "mamba2-logits-all-fp16-state": ("tiny-mamba2", ExportOptions(logits="all", state_dtype="fp16", split=False)),
}


@pytest.mark.parametrize("case", list(SHARED))
def test_streamed_export_is_byte_identical_to_loaded_export(case, make_export, tmp_path):
    preset, options = SHARED[case]
    ckpt, streamed = make_export(preset, options)
    names = write_graphs(ckpt, tmp_path / "eager", options)
    assert_identical(streamed, tmp_path / "eager", names)


def test_hf_saved_sharded_bf16_checkpoint(tmp_path):
    """A checkpoint written by HF's save_pretrained (bf16, 5 shards, ``backbone.`` names)."""
    ckpt = save_hf_checkpoint("tiny-nemotron-h", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="100KB")
    assert len(list(ckpt.glob("model-*.safetensors"))) > 2
    options = ExportOptions(dtype="bf16", split=False)  # the layout is the point; both graphs: the SHARED cases
    result = export(ckpt, tmp_path / "streamed", options)
    names = write_graphs(ckpt, tmp_path / "eager", options)
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)
    # Verified on ONNX Runtime CPU through the bf16 emulation, against the fp32 reference.
    v = result.manifest.verification
    assert v["method"] == "full-graph" and v["truth"] == "fp32 reference" and v["yardstick"] == "bf16 reference"
    assert v["executor"].startswith("onnxruntime-cpu (bf16 emulated")


def test_large_initializers_are_recipes_of_parameters(make_checkpoint):
    checkpoint = open_checkpoint(make_checkpoint("tiny-nemotron-h"))
    table = DeferredTable(checkpoint)
    proto = trace_streamed(checkpoint, table)
    deferred = {t.name: table.recipe(t) for t in proto.graph.initializer if is_deferred(t)}
    inline = [t for t in proto.graph.initializer if not is_deferred(t)]
    # Every parameter above the optimizer's folding limit is streamed, nothing below it.
    large = {n for n, p in checkpoint.parameters.items() if p.numel > FOLD_LIMIT}
    assert {r.parameter for r in deferred.values()} == large
    assert all(t.raw_data or t.data_location != onnx.TensorProto.EXTERNAL for t in inline)
    # MatMul weights are transposes of the Linear weights; the embedding is the parameter itself.
    in_proj = deferred["model.layers.0.mixer.in_proj.weight_t"]
    rows, cols = checkpoint.parameters[in_proj.parameter].shape
    assert isinstance(in_proj, Deferred) and in_proj.parameter == "layers.0.mixer.in_proj.weight"
    assert (in_proj.shape, in_proj.strides, in_proj.offset) == ((cols, rows), (1, cols), 0)
    emb = deferred["model.embeddings.weight"]
    assert emb.shape == checkpoint.parameters["embeddings.weight"].shape and emb.strides == (emb.shape[1], 1)
    # The recipe reproduces the loaded model's bytes.
    weight = checkpoint.read("layers.0.mixer.in_proj.weight")
    assert torch.equal(in_proj.tensor(checkpoint), weight.t().contiguous())


def test_stand_ins_cost_no_memory_and_reads_are_seen():
    """A 2 GiB stand-in adds nothing to RSS, its views are recipes, and reading it is detected."""
    code = (
        "import torch\n"
        "from hybridtrt.exporter.streaming import StandIns\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = rss(); s = StandIns(); t = s.make('w', (1 << 19, 1 << 10), torch.float32)\n"
        "r = s.recipe(t.t().numpy())\n"
        "print(rss() - before, r.shape, r.strides, sorted(s.read()), end=' ')\n"
        "t[1000:1001].sum()\n"
        "print(sorted(s.read()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    grown, rest = proc.stdout.split(maxsplit=1)
    assert int(grown) < 64 << 20
    assert rest.strip() == "(1024, 524288) (1, 1024) [] ['w']"


def test_optimizer_reading_a_stand_in_gets_the_real_value(make_checkpoint, tmp_path, monkeypatch):
    """Stand-ins for every parameter above 100 elements, vectors included (while the optimizer folds
    up to 8192): it reads some of them (folds, and the rule that drops an all-zero Conv bias reads
    the conv1d biases); it is rerun with their real values and the export is still byte-identical."""
    from hybridtrt.exporter import streaming

    monkeypatch.setattr(streaming, "FOLD_LIMIT", 100)
    monkeypatch.setattr(streaming, "REAL_MAX_DIMS", 0)
    attempts = []
    attach = streaming.attach_weights
    monkeypatch.setattr(streaming, "attach_weights", lambda program, ckpt, s, real=frozenset(): attempts.append(set(real)) or attach(program, ckpt, s, real))
    ckpt = make_checkpoint("tiny-mamba2")
    options = ExportOptions(verify=False, split=False)  # the decode graph takes the same retry (test_fp8_...: both graphs)
    export(ckpt, tmp_path / "streamed", options)
    assert attempts[0] == set() and len(attempts) > 1
    assert {f"layers.{i}.mixer.conv1d.bias" for i in range(4)} <= attempts[-1]
    names = write_graphs(ckpt, tmp_path / "eager", options)
    assert_identical(tmp_path / "streamed", tmp_path / "eager", names)


def test_non_finite_weight_is_named_and_nothing_is_published(make_checkpoint, tmp_path):
    """NaN in a streamed parameter: refused while writing, naming the tensor (small ones are read
    by `Checkpoint.read`, tested in tests/models/test_loading.py)."""
    tensor = "model.layers.2.mixer.in_proj.weight"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("tiny-nemotron-h"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.") + " has 1 NaN/Inf"):
        export(ckpt, tmp_path / "out", ExportOptions(verify=False))
    assert list((tmp_path / "out").iterdir()) == []


def test_manifest_records_streaming_and_verification(make_export):
    _, out = make_export("tiny-nemotron-h", ExportOptions(split=True))
    manifest = read_manifest(out)
    v = manifest.verification
    assert (v["method"], v["truth"], v["yardstick"], v["executor"]) == ("full-graph", "fp32 reference", None, "onnxruntime-cpu")
    assert v["worst"]["graph"] in v["graphs"] and 0 < v["worst"]["rel_l2"] <= v["worst"]["bound"] == 1e-5
    assert set(manifest.verification["graphs"]) == {"model.onnx", "decode.onnx"}
    assert json.loads((out / MANIFEST_FILE).read_text())["verification"] == manifest.verification
