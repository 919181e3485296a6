"""``hybridtrt export --tp N`` (DESIGN.md §12): one export directory per rank, each streamed from the
checkpoint as the rank's slices (`hybridtrt.models.tensor_parallel.RankCheckpoint`), verified together by
the rank emulator against the unsharded fp32 reference before anything is published; ``hybridtrt
validate`` on the result; a fault in one rank's stream named with its rank and layer, nothing published.

The model has every block kind (MLP, attention, MoE, Mamba) and repeats two of them, so at 4 ranks its 2
Mamba groups are shared by 2 ranks each, its 2 KV heads replicated, and a rank's graph is traced as a
prototype of 4 layers copied out to 6 (`hybridtrt.exporter.stitch`)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hybridtrt.errors import ArtefactError, ExportError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import MANIFEST_FILE, TP_MANIFEST
from hybridtrt.exporter.tensor_parallel import export_tp, judge_ranks, read_tp_manifest
from hybridtrt.models.loading import open_checkpoint
from hybridtrt.models.tensor_parallel import BLOCK_BYTES, RankCheckpoint, TensorParallelPlan, rank_checkpoint
from tests.cli.batch import run_batch

PATTERN = ["mlp", "attention", "moe", "mamba", "moe", "mamba"]
MAMBA_LAYER = 3


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=PATTERN)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_a_rank_reads_its_slices_in_blocks(make_checkpoint, stored, monkeypatch):
    """Every parameter of every rank (4 ranks; MoE experts split inside, uneven splits, a checkpoint
    stored in bf16 read in fp32) is `TensorParallelPlan.shard` of the whole tensor, read without the whole
    tensor: rows by runs, columns a block of rows at a time, experts one at a time."""
    ckpt = make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=PATTERN, **({"torch_dtype": "bfloat16"} if stored == "bf16" else {}))
    full = open_checkpoint(ckpt, "fp32")
    plan = TensorParallelPlan(full.config, 4)
    whole = {name: full.read(name) for name in full.parameters}
    widest = []
    original = type(full).read_rows
    monkeypatch.setattr(type(full), "read_rows", lambda self, name, a, b: widest.append((name, b - a)) or original(self, name, a, b))
    for rank in range(4):
        view = rank_checkpoint(full, plan, rank)
        assert isinstance(view, RankCheckpoint) and view.config == plan.rank_config(rank)
        for name, source in full.parameters.items():
            got = view.read(name)
            want = plan.shard(name, whole[name], rank)
            assert got.shape == view.parameters[name].shape and torch.equal(got, want), (rank, name)
            assert torch.equal(view.read_stored(name).to(want.dtype), want), (rank, name)  # as stored: what the streaming exporter converts
            if len(source.shape) == 3:  # a stack of experts: row by row (expert by expert) too
                assert torch.equal(view.read_rows(name, 1, 3), want[1:3]), name
        assert int(view.read("vocab_start")) == plan.vocab_rows(rank).start
        assert view.num_parameters == sum(view.parameters[n].numel for n in full.parameters)
    for name, rows in widest:  # never a whole sharded tensor at once but for small ones
        source = full.parameters[name]
        assert rows * source.nbytes // source.shape[0] <= max(BLOCK_BYTES, source.nbytes // 2), (name, rows)
    assert {n for n, _ in widest} >= {f"layers.{MAMBA_LAYER}.mixer.out_proj.weight", "layers.2.mixer.experts.down_proj"}


def test_export_tp_through_the_cli(checkpoint, tmp_path):
    """``export --tp 4 --verify layers`` writes rank0/ … rank3/ and hybridtrt-tp.json after the rank emulator
    passed by layer windows (one layer each here, the head the seventh);
    each rank's graph (a stitched trace) and weights are the in-memory rank graph's (`rank_graphs`: the
    whole rank model traced, its weights sliced from the loaded model) exactly; ``validate`` runs the ranks together and passes per layer; a rank alone and the top
    directory are refused by the one-device runtimes, with the fix; ``inspect`` summarizes the ranks; swapped
    rank directories are refused; flag refusals exit 2 with the value and a fix."""
    from hybridtrt.exporter.export import GraphSpec
    from hybridtrt.exporter.tensor_parallel import rank_graphs
    from hybridtrt.models.loading import load_model

    out = tmp_path / "tp4"
    cases = [
        ["export", checkpoint, "-o", out, "--tp", 4, "--per-layer", "--no-split", "--verify", "layers"],
        ["validate", out, "--random", 2, "--prompt-length", 13, "--steps", 1, "--json", tmp_path / "r.json"],
        ["validate", out / "rank1"],
        ["generate", out / "rank0", "--ids", "1 2"],
        ["export", checkpoint, "-o", tmp_path / "never", "--tp", 3],
        ["export", checkpoint, "-o", tmp_path / "never", "--tp", 2, "--speculative"],
        ["export", checkpoint, "-o", tmp_path / "never", "--tp-vocab", "replicated"],
        ["export", checkpoint, "-o", tmp_path / "never", "--tp", 2, "--kv-cache", "static", "--max-cache-len", 64],
        ["inspect", out],
    ]
    got = run_batch(cases, columns=80)
    assert got[0].code == 0 and "tracing every layer" not in got[0].output, got[0].output
    text = " ".join(re.sub(r"[│┃]", " ", got[0].stdout).split())  # the tables' cells, unwrapped
    assert "4 ranks emulated (collectives in NumPy), by 7 layer windows, vs the fp32 reference" in text and "rank3/" in text, text
    assert all(len(line) <= 80 for line in got[0].stdout.splitlines() if str(tmp_path) not in line)  # paths are never wrapped
    assert got[1].code == 0 and "PASS" in got[1].stdout, got[1].output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["backend"].startswith("onnxruntime × 4 ranks")
    assert sorted(report["routing"]) == ["2", "4"] and not report["routing_failures"]  # routing held to the reference's, the ranks' own choices judged
    assert any(c["name"] == f"layer_output.{MAMBA_LAYER} (rank 3)" for c in report["checks"])  # per layer, every rank
    for i, (what, fix) in {
        2: ("is rank 1 of a 4-rank tensor-parallel export", f"hybridtrt validate {out}"),
        3: ("is rank 0 of a 4-rank tensor-parallel export", f"hybridtrt generate {out}"),
        4: ("--tp 3: a rank holds whole Mamba heads", "--tp 2 or 4 or 8"),
        5: ("--speculative with --tp is not built yet", "drop --speculative"),
        6: ("--tp-vocab replicated only applies to --tp exports", "add --tp N"),
        7: ("--kv-cache static with --tp is not built yet", "drop --kv-cache static"),
    }.items():
        o = got[i]
        assert o.code == 2 and what in " ".join(o.output.split()) and "fix:" in o.output and fix in " ".join(o.output.split()), (cases[i], o.output)
        assert "Traceback" not in o.output
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())
    inspected = " ".join(re.sub(r"[│┃]", " ", got[8].stdout).split())  # the top directory: ranks, recipe, verdict
    assert got[8].code == 0 and "4 (parallel vocabulary)" in inspected and "4 ranks emulated (collectives in NumPy), by 7 layer windows, vs the fp32 reference" in inspected, got[8].output
    assert "rank3/" in inspected and all(len(line) <= 80 for line in got[8].stdout.splitlines() if str(tmp_path) not in line)
    from hybridtrt.runtime import load

    with pytest.raises(ArtefactError, match="is a tensor-parallel export") as e:  # the top directory, to a one-device runtime
        load(out)
    assert f"hybridtrt generate {out}" in e.value.fix and f"hybridtrt build {out}" in e.value.fix

    top = json.loads((out / TP_MANIFEST).read_text())
    assert top["tensor_parallel"] == {"world": 4, "vocab": "parallel", "ranks": ["rank0", "rank1", "rank2", "rank3"]}
    assert top["verification"]["method"] == "rank-emulator" and top["verification"]["graphs"] == "layer windows"
    assert top["verification"]["worst"]["rel_l2"] <= top["verification"]["worst"]["bound"]
    model = load_model(checkpoint)
    plan = TensorParallelPlan(model.config, 4)
    memory = rank_graphs(model, plan, GraphSpec(per_layer=True))
    for rank in range(4):
        manifest = json.loads((out / f"rank{rank}" / MANIFEST_FILE).read_text())
        assert manifest["tensor_parallel"]["rank"] == rank and manifest["tensor_parallel"]["holds"] == plan.holds(rank)
        assert manifest["model"] == plan.rank_config(rank).to_dict()
        streamed = onnx.load(str(out / f"rank{rank}" / "model.onnx"))
        assert [n.SerializeToString() for n in streamed.graph.node] == [n.SerializeToString() for n in memory[rank].graph.node]  # attributes (groups) too
        a, b = _initializers(streamed), _initializers(memory[rank])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), rank

    (out / "rank1").rename(out / "tmp")  # swapped rank directories
    (out / "rank2").rename(out / "rank1")
    (out / "tmp").rename(out / "rank2")
    with pytest.raises(ArtefactError, match="is not the manifest the tensor-parallel export recorded for rank 1"):
        read_tp_manifest(out)  # what `validate DIR` reads first


def _plant(monkeypatch, *, rank: int, name: str, scale: float) -> None:
    """Rank ``rank`` reads parameter ``name`` ``scale`` times too large, by every path the exporter reads
    a rank's part (in the model dtype for the optimizer's values, as stored for the streamed bytes)."""
    for method in ("read", "read_stored"):
        original = getattr(RankCheckpoint, method)

        def faulty(self, parameter, original=original):
            t = original(self, parameter)
            return (t.float() * scale).to(t.dtype) if self.rank == rank and parameter == name else t

        monkeypatch.setattr(RankCheckpoint, method, faulty)


@pytest.mark.parametrize("verify", ["full", "layers"])
def test_a_fault_in_one_ranks_stream_fails_the_export_at_its_rank_and_layer(checkpoint, tmp_path, monkeypatch, verify):
    """The verification is a gate, whole graphs or by layer windows: rank 2's in_proj of the Mamba layer read
    10 % too large fails it, named with that rank and layer; nothing is published."""
    _plant(monkeypatch, rank=2, name=f"layers.{MAMBA_LAYER}.mixer.in_proj.weight", scale=1.1)
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=f"rank 2, layer {MAMBA_LAYER} "):
        export_tp(checkpoint, out, 4, ExportOptions(per_layer=True, split=False, verify_mode=verify))
    assert not (out / TP_MANIFEST).exists() and not any(p.name.startswith("rank") for p in out.iterdir())


def test_a_bf16_export_is_judged_with_the_bf16_yardstick(checkpoint, tmp_path, monkeypatch):
    """bf16 ranks (2, with the decode graph running the steps) against the fp32 truth, each gate scaled by
    the one-device bf16 model's error as a one-device export's verification is; the same judge on the
    written graphs with a 5 % fault in rank 1's Mamba in_proj fails there. An engine of one rank is
    refused by the one-process runtime."""
    result = export_tp(checkpoint, tmp_path / "bf16", 2, ExportOptions(dtype="bf16"))
    v = result.verification
    assert v["yardstick"] == "bf16 reference" and v["precision"] == "bf16" and v["worst"]["rel_l2"] <= v["worst"]["bound"], v
    assert {p.name for p in (tmp_path / "bf16" / "rank1").iterdir()} >= {"model.onnx", "decode.onnx", "weights.data", MANIFEST_FILE}
    _a_rank_engine_is_refused_by_a_one_process_runtime(tmp_path / "bf16" / "rank1", tmp_path, monkeypatch)
    from hybridtrt.exporter.manifest import read_manifest

    def graphs(name: str, bad_rank: int | None = None) -> list[onnx.ModelProto]:
        protos = [onnx.load(str(tmp_path / "bf16" / f"rank{r}" / name)) for r in range(2)]
        if bad_rank is not None:  # 5 % on that rank's in_proj of the Mamba layer
            for t in protos[bad_rank].graph.initializer:
                if t.name.startswith(f"model.layers.{MAMBA_LAYER}.mixer.in_proj.weight"):
                    a = numpy_helper.to_array(t)
                    t.CopyFrom(numpy_helper.from_array((a.astype(np.float32) * 1.05).astype(a.dtype), t.name))
        return protos

    full, manifests = open_checkpoint(checkpoint, "bf16"), [read_manifest(tmp_path / "bf16" / f"rank{r}") for r in range(2)]
    plan = TensorParallelPlan(full.config, 2)
    assert judge_ranks(full, plan, graphs("model.onnx"), graphs("decode.onnx"), manifests)["worst"] == v["worst"]  # the export's own verdict, again
    with pytest.raises(ExportError, match=f"rank 1, layer {MAMBA_LAYER} "):
        judge_ranks(full, plan, graphs("model.onnx", bad_rank=1), graphs("decode.onnx", bad_rank=1), manifests)
    _ranks_by_layer_windows(full, plan, tmp_path / "bf16", manifests, monkeypatch)


def _ranks_by_layer_windows(full, plan: TensorParallelPlan, out, manifests, monkeypatch) -> None:
    """By layer windows of one layer each (the budget of a model beyond memory, scaled down): every rank's
    graphs cut at the same layers and run window by window, each fed the bf16 reference's hidden state,
    pass the same gates, every window's output judged too; ``validate`` by windows passes."""
    from hybridtrt.exporter import verify
    from hybridtrt.exporter.tensor_parallel import WindowedRanks, rank_runners
    from hybridtrt.validation.tensor_parallel import validate_export

    monkeypatch.setattr(verify, "WINDOW_FRACTION", 1e-9)  # a window of one layer
    unified, decode = rank_runners(out, plan, full.parameter_bytes, manifests[0], ("model.onnx", "decode.onnx"), "layers")
    assert isinstance(unified, WindowedRanks) and unified.windows == [(i, i) for i in range(len(PATTERN) + 1)]
    v = judge_ranks(full, plan, unified, decode, manifests)
    assert v["graphs"] == "layer windows" and v["worst"]["rel_l2"] <= v["worst"]["bound"], v
    assert v["checks"] > 2 * 3 * (len(PATTERN) - 1)  # every window's hidden state on every rank, beside the states
    report = validate_export(out, random_n=2, prompt_length=9, steps=1, mode="layers")
    assert report.passed and any(c.name == f"layer_output.{MAMBA_LAYER} (rank 1)" for c in report.checks), [(c.name, c.failures) for c in report.failures]


def _a_rank_engine_is_refused_by_a_one_process_runtime(rank_dir, tmp_path, monkeypatch) -> None:
    """An engine built from a rank directory records the rank and world in its sidecar; `TrtModel` (one
    process, TensorRT faked) refuses it with the reason and the fix instead of running rank 1 alone."""
    import sys

    from hybridtrt.engine.profiles import engine_profiles
    from hybridtrt.engine.sidecar import make_sidecar, write_sidecar
    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.runtime import tensorrt as trt_runtime
    from tests.runtime.fake_trt import fake_tensorrt

    manifest = read_manifest(rank_dir)
    profiles = engine_profiles(manifest, max_batch=2, max_input_len=8, max_cache_len=16)
    sidecar = make_sidecar(manifest, rank_dir, profiles, tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={})
    assert sidecar["tensor_parallel"] == {"rank": 1, "world": 2, "vocab": "parallel"}
    engine = tmp_path / "rank1.engine"
    engine.write_bytes(b"fake")
    write_sidecar(sidecar, engine)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None, sidecar, []))
    monkeypatch.setattr(trt_runtime.TrtModel, "_select_device", lambda self, index: torch.device("cpu"))
    with pytest.raises(ArtefactError, match="is rank 1 of a 2-rank tensor-parallel model") as e:
        trt_runtime.TrtModel(engine)
    assert "hybridtrt generate" in e.value.fix and "TensorParallelModel" in e.value.fix


def test_verification_that_cannot_fit_is_refused_before_anything_is_written(checkpoint, tmp_path, monkeypatch):
    """Whole graphs hold every rank's weights at once: with less memory than that (here: a limit of 1 KiB),
    ``--verify full`` (and ``auto`` on a model this small, which picks it) is refused up front naming the
    need and the fix (layer windows), and writes nothing."""
    from hybridtrt import memory

    monkeypatch.setattr(memory, "available_memory", lambda: memory.Available(1024, "a test's limit"))
    with pytest.raises(ExportError, match="by whole graphs runs every rank's graph at once") as e:
        export_tp(checkpoint, tmp_path / "out", 2, ExportOptions())
    assert "--verify layers" in e.value.fix and "--no-verify" in e.value.fix and not (tmp_path / "out").exists()


def test_a_process_that_traced_nothing_checks_the_collectives_by_their_schema():
    """A process that replays a cached trace has traced nothing that registered ``trt::DistCollective``:
    `attach_dist_collective` registers it, so onnx's checker infers an all-gather's output (first dim × N)
    from the schema, not from the single-rank body (identity), which disagreed with the recorded shape
    (a fresh interpreter: the schema registry is per process)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import onnx
        from onnx import TensorProto, helper
        from hybridtrt.exporter.tensor_parallel import attach_dist_collective
        from hybridtrt.ops.collectives import node_attributes
        assert not onnx.defs.has("DistCollective", "trt")
        node = helper.make_node("DistCollective", ["x"], ["y"], domain="trt", **node_attributes("all_gather", [0, 1, 2, 3], 4))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
        onnx.checker.check_model(attach_dist_collective(model, 24), full_check=True)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
