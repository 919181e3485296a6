"""Verification before publishing: the whole graph, or windows of decoder layers in bounded memory."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

from hybridtrt.errors import ExportError
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.io import DYNAMIC_CACHE, CacheFlavour
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.exporter.verify import verify_export, window_plan
from hybridtrt.graphs.external_data import external_index
from hybridtrt.models import load_model
from tests.validation.faults import reseal

SPLIT = ExportOptions(split=True)


def test_window_plan():
    assert window_plan([10, 10, 10, 10], 25) == [(0, 1), (2, 3)]
    assert window_plan([10, 30, 10], 25) == [(0, 0), (1, 1), (2, 2)]  # a layer above budget is its own window
    assert window_plan([1] * 5, 100) == [(0, 4)]
    assert window_plan([7], 1) == [(0, 0)]


@pytest.fixture(scope="module", params=["tiny-nemotron-h", "tiny-mamba2"])
def exported(request, make_export):
    ckpt, out = make_export(request.param, SPLIT)
    return ckpt, out, read_manifest(out)


@pytest.mark.parametrize("lazy", [False, True])
def test_layer_windows_cover_every_layer_and_agree_with_the_whole_graph(exported, lazy):
    ckpt, out, manifest = exported
    model = load_model(ckpt, lazy=lazy)
    full = verify_export(out, model, manifest, mode="full")
    layers = verify_export(out, model, manifest, mode="layers", parameter_bytes=1)  # 1 byte: one layer per window
    n = model.config.num_layers
    for file, graph in layers["graphs"].items():
        assert graph["windows"] == [[i, i] for i in range(n + 1)]  # member n: the head alone
        assert set(graph) == {"worst", "windows"}  # a dense model: no routing record
        # Both pass the fp32 floors; windows start from the reference's hidden state, so their
        # error is at most the whole graph's (which accumulates through every layer).
        assert 0 < graph["worst"]["rel_l2"] <= full["graphs"][file]["worst"]["rel_l2"] * 10
        assert full["graphs"][file]["worst"]["rel_l2"] <= full["graphs"][file]["worst"]["bound"] <= 1e-4
    assert layers["method"] == "layer-windows" and full["method"] == "full-graph"
    assert full["truth"] == "fp32 reference" and full["yardstick"] is None and full["executor"] == "onnxruntime-cpu"
    # Bigger windows, same verdict.
    wide = verify_export(out, model, manifest, mode="layers", parameter_bytes=32 * 400_000)  # 400 KB windows
    assert all(len(g["windows"]) < n for g in wide["graphs"].values())


def _plant_fault(out, tmp_path, tensor: str, factor: float = 1.5, dtype=np.float32, part: tuple[int, int] = (0, 1)):
    """A copy of the export with one weight (or its part ``k`` of ``n`` equal parts along its
    first dim: ``part=(k, n)``) scaled by ``factor`` in weights.data."""
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    location, offset, length = external_index(bad / "model.onnx")[tensor]
    k, n = part
    offset, length = offset + k * length // n, length // n
    with open(bad / location, "r+b") as f:
        f.seek(offset)
        w = np.frombuffer(f.read(length), dtype=dtype) * dtype(factor)
        f.seek(offset)
        f.write(w.astype(dtype).tobytes())
    reseal(bad)  # the planted weights are recorded: only verification can catch them
    return bad


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_planted_weight_fault_is_caught(make_export, tmp_path, mode):
    ckpt, out = make_export("tiny-nemotron-h", SPLIT)
    bad = _plant_fault(out, tmp_path, "model.layers.4.mixer.in_proj.weight_t")
    model = load_model(ckpt, lazy=True)
    with pytest.raises(ExportError, match="layers 4..4" if mode == "layers" else "disagrees with the fp32 reference") as e:
        verify_export(bad, model, read_manifest(bad), mode=mode, parameter_bytes=1)
    assert "present_ssm_state.4" in str(e.value)
    assert not [p.name for p in bad.iterdir() if p.name.startswith(".verify")]  # what windows held on disk is gone


@pytest.mark.parametrize("flavour", [DYNAMIC_CACHE, CacheFlavour("static", 16)])
@pytest.mark.parametrize("decode", [False, True])
def test_held_states_feed_and_take_the_same_numbers(make_checkpoint, tmp_path, flavour, decode):
    """By layer windows the references read their past states off disk layer by layer and hand on
    their present states as they come (`_HeldStates`): the same numbers, bit for bit, as the
    reference with every state in memory; the forward itself returns no state (nothing held)."""
    import torch

    from hybridtrt.exporter.io import state_specs
    from hybridtrt.exporter.verify import _fp32, _HeldStates, _outputs
    from hybridtrt.exporter.wrapper import GraphModule, example_inputs

    model = load_model(make_checkpoint("tiny-nemotron-h"))
    specs = state_specs(model.config, flavour)
    inputs = example_inputs(model, batch=3, seq=1 if decode else 7, past=4, seed=1, flavour=flavour)
    names = [f"in{k}" for k in range(len(inputs) - len(specs))] + [s.past_name for s in specs]
    module = GraphModule(model, "all", decode, True, flavour).eval()
    with torch.no_grad():
        want = _outputs(module(*inputs), specs)
        with _HeldStates(tmp_path, "g", specs) as held:
            stand_ins = held.take_past(names, inputs)
            assert all(t.untyped_storage().nbytes() <= 8 for n, t in zip(names, stand_ins) if n in held.past)
            got: dict = {}
            with held.hooks(model, got.__setitem__, wide=False):
                ran = _outputs(module(*stand_ins), specs)
            wide = tuple(_fp32(t) for t in stand_ins)
            assert all(t.dtype == torch.float32 and not any(t.stride()) for n, t in zip(names, wide) if n in held.past)
        assert not list(tmp_path.iterdir())
    assert torch.equal(ran["logits"], want["logits"]) and all(torch.equal(ran["hidden"][i], h) for i, h in want["hidden"].items())
    assert got.keys() == want["present"].keys() and all(torch.equal(got[k], t) for k, t in want["present"].items())
    assert all(t.numel() == 0 for t in ran["present"].values())


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_fp16_export_judged_against_fp32_with_fp16_yardstick(make_export, tmp_path, mode):
    """A correct fp16 export passes (each output within max(floor, 2× the fp16 reference's own
    distance from the fp32 reference)); the same export with one layer's weight 10% off fails."""
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16", split=False, verify=False))
    half, truth = load_model(ckpt, "fp16", lazy=True), load_model(ckpt, lazy=True)
    record = verify_export(out, half, read_manifest(out), truth=truth, mode=mode, parameter_bytes=1)
    assert record["truth"] == "fp32 reference" and record["yardstick"] == "fp16 reference"
    worst = record["worst"]
    assert worst["yardstick_rel_l2"] > 0 and worst["rel_l2"] <= worst["bound"] == max(record["gate"][_kind(worst["output"])]["max_rel_l2"], 2 * worst["yardstick_rel_l2"])
    bad = _plant_fault(out, tmp_path, "model.layers.4.mixer.in_proj.weight_t", 1.1, np.float16)
    with pytest.raises(ExportError, match=r"beyond the fp16 gate \(the fp16 reference is the yardstick\)") as e:
        verify_export(bad, half, read_manifest(bad), truth=truth, mode=mode, parameter_bytes=1)
    assert "present_ssm_state.4" in str(e.value) and ("layers 4..4" in str(e.value)) == (mode == "layers")


def _kind(output: str) -> str:
    from hybridtrt.exporter.verify import _kind as kind

    return kind(output.split(" (")[0])


def test_half_precision_needs_the_fp32_truth(make_export):
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype="fp16", split=False, verify=False))
    with pytest.raises(ValueError, match="needs the fp32 reference"):
        verify_export(out, load_model(ckpt, "fp16"), read_manifest(out))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_head_by_vocabulary_slices_computes_the_whole_head(make_export, dtype):
    """The head window run by three vocabulary slices (each slice's weight columns copied to a
    file of its own) gives the whole head's logits, bit for bit, and leaves no file behind."""
    import onnx

    from hybridtrt.exporter.verify import _run, _run_head_by_slices
    from hybridtrt.graphs import layer_window
    from hybridtrt.graphs.bf16_emulation import round_to_bf16
    from hybridtrt.graphs.external_data import tensor_nbytes

    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype=dtype, split=False, verify=False))
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    n = len(read_manifest(out).layers)
    hidden_type = onnx.TensorProto.BFLOAT16 if dtype == "bf16" else onnx.TensorProto.FLOAT
    sub = layer_window.window(full, layer_window.residual_stream(full, n), n, n, [], hidden_type)
    weight = layer_window.head_weight(sub)
    assert weight is not None and weight.name == "model.lm_head.weight_t"
    hidden_in = round_to_bf16(np.random.default_rng(0).standard_normal((3, 7, weight.dims[0]), dtype=np.float32))
    feeds = {i.name: hidden_in if i.name == layer_window.HIDDEN_IN else np.ones((3, 7), np.int64) for i in sub.graph.input}
    before = sorted(p.name for p in out.iterdir())
    whole = _run(out, ".test-head", sub, feeds, {})["logits"]
    sliced, count = _run_head_by_slices(out, ".test-head", sub, weight, tensor_nbytes(weight) // 3 + 1, feeds, {})
    assert count == 3 and sliced["logits"].shape == whole.shape == (3, weight.dims[1])
    np.testing.assert_array_equal(sliced["logits"], whole)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_head_that_is_not_matmul_then_casts_runs_whole(make_export):
    import onnx
    from onnx import helper

    from hybridtrt.graphs import layer_window

    ckpt, out = make_export("tiny-nemotron-h", SPLIT)
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    n = len(read_manifest(out).layers)
    sub = layer_window.window(full, layer_window.residual_stream(full, n), n, n, [], onnx.TensorProto.FLOAT)
    assert layer_window.head_weight(sub) is not None
    # A softcap (logits = tanh(x)) between the MatMul and the output: not a column-wise copy of
    # the head any more by this rule's reading, so it is not sliced.
    last = next(node for node in sub.graph.node if "logits" in node.output)
    last.output[0] = "pre_cap"
    sub.graph.node.append(helper.make_node("Tanh", ["pre_cap"], ["logits"], name="/model/softcap"))
    assert layer_window.head_weight(sub) is None


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_verification_runs_a_large_head_by_slices_and_catches_a_fault_in_it(make_export, tmp_path, monkeypatch, dtype):
    from hybridtrt.exporter import verify

    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(dtype=dtype, split=False, verify=False))
    head = external_index(out / "model.onnx")["model.lm_head.weight_t"][2]
    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", head // 4 + 1)  # four slices
    model, truth = load_model(ckpt, dtype, lazy=True), load_model(ckpt, lazy=True)
    kw = {"truth": truth, "mode": "layers", "parameter_bytes": 1}
    record = verify_export(out, model, read_manifest(out), **kw)
    graph = record["graphs"]["model.onnx"]
    assert graph["head_slices"] == 4
    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", 16 << 20)  # the tiny head whole
    whole = verify_export(out, model, read_manifest(out), **kw)["graphs"]["model.onnx"]
    assert "head_slices" not in whole and graph["worst"] == whole["worst"]
    # The head weight 1.5× off: the sliced head's logits fail the gate.
    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", head // 4 + 1)
    bad = _plant_fault(out, tmp_path, "model.lm_head.weight_t", 1.5, np.float32 if dtype == "fp32" else np.float16)
    with pytest.raises(ExportError, match=r"model.onnx head disagrees .*logits"):
        verify_export(bad, model, read_manifest(bad), **kw)


MOE = "tiny-nemotron3-moe"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_experts_by_ranges_compute_the_whole_layer(make_export, make_checkpoint, tmp_path, dtype):
    """An MoE layer's window run with its routed experts in ranges (3 and 16 sessions over a byte
    range of each stack) gives the outputs of the whole window: fp32 to rounding (a range's matmuls
    have other shapes), bf16 bit for bit here (fp16 stacks are cut into ranges by the same byte rule);
    the windows' files are removed."""
    import onnx
    import torch

    from hybridtrt.exporter.export import export
    from hybridtrt.exporter.quantize import QuantizeOptions
    from hybridtrt.exporter.verify import _run, _run_window
    from hybridtrt.exporter.wrapper import example_inputs
    from hybridtrt.graphs import layer_window

    if dtype == "fp8":
        ckpt, out = make_checkpoint(MOE), tmp_path / "fp8"
        export(ckpt, out, ExportOptions(split=False, verify=False), quantize=QuantizeOptions(calib_random=4))
    else:
        ckpt, out = make_export(MOE, ExportOptions(dtype=dtype, split=False, verify=False))
    manifest = read_manifest(out)
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    n = len(manifest.layers)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    hidden_type = {torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float16: onnx.TensorProto.FLOAT16}.get(half, onnx.TensorProto.FLOAT)
    sub = layer_window.window(full, layer_window.residual_stream(full, n), 3, 3, [], hidden_type)
    (node,) = layer_window.expert_nodes(sub)
    assert node.op_type == ("MoeExpertsFp8" if dtype == "fp8" else "MoeExperts")
    experts, nbytes = layer_window.expert_bytes(sub, node)
    assert experts == 16
    inputs = example_inputs(load_model(ckpt), seq=7, batch=3, past=4, seed=1)
    feeds = {k: v.to(half) if v.is_floating_point() else v for k, v in zip([v["name"] for v in next(iter(manifest.graphs.values())).inputs], inputs)}
    feeds[layer_window.HIDDEN_IN] = (torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * 3).to(half)
    before = sorted(p.name for p in out.iterdir())
    whole = _run(out, ".test-moe", sub, feeds, {})
    for count in (3, 16):
        got, ranges = _run_window(out, ".test-moe", sub, feeds, nbytes // count + 1, {})
        assert ranges == {node.name: count} and sorted(got) == sorted(whole) == ["hidden_out"]
        want = whole["hidden_out"]
        if dtype in ("fp32", "fp8"):
            np.testing.assert_allclose(got["hidden_out"], want, rtol=0, atol=1e-6 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got["hidden_out"], want)
    assert sorted(p.name for p in out.iterdir()) == before
    # The rest of the layer has no router and no experts node: what they computed is an input.
    types = __import__("hybridtrt.graphs.bf16_emulation", fromlist=["value_types"]).value_types(sub)
    rest = layer_window.after_experts(sub, [node], types)
    assert node.output[0] in [i.name for i in rest.graph.input]
    assert not any(n.op_type in layer_window.EXPERT_OPS or "/gate/" in n.name for n in rest.graph.node)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verification_runs_large_experts_by_ranges_and_catches_a_fault_in_one_expert(make_export, tmp_path, monkeypatch, dtype):
    """With a window smaller than an MoE layer's experts, every MoE layer runs in four expert
    ranges, with the verdict of the whole layers; one expert's weights 1.5× off (a fourth of
    one range) fails that layer's window."""
    from hybridtrt.exporter import verify

    ckpt, out = make_export(MOE, ExportOptions(dtype=dtype, split=False, verify=False))
    index = external_index(out / "model.onnx")
    stack = index["model.layers.3.mixer.experts.up_proj"][2]
    model, truth = load_model(ckpt, dtype, lazy=True), (load_model(ckpt, lazy=True) if dtype != "fp32" else None)
    kw = {"truth": truth, "mode": "layers", "parameter_bytes": 1}
    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", 16 << 20)
    whole = verify_export(out, model, read_manifest(out), **kw)["graphs"]["model.onnx"]
    assert "expert_ranges" not in whole
    monkeypatch.setattr(verify, "SLICE_MIN_BYTES", 2 * stack // 4 + 1)  # up + down stacks: four ranges
    graph = verify_export(out, model, read_manifest(out), **kw)["graphs"]["model.onnx"]
    assert graph["expert_ranges"] == {f"/model/layers.{i}/mixer/experts/MoeExperts": 4 for i in (1, 3, 6)}
    assert graph["windows"] == whole["windows"]
    assert graph["worst"]["output"] == whole["worst"]["output"]
    assert graph["worst"]["rel_l2"] == pytest.approx(whole["worst"]["rel_l2"], rel=1e-3)
    assert sorted(graph["routing"]) == ["1", "3", "6"] and graph["routing"] == whole["routing"]  # held routing, by ranges too
    bad = _plant_fault(out, tmp_path, "model.layers.3.mixer.experts.up_proj", 1.5, np.float32 if dtype == "fp32" else ml_dtypes.bfloat16, part=(5, 16))
    with pytest.raises(ExportError, match=r"model.onnx layers 3..3 disagrees .*hidden_out"):
        verify_export(bad, model, read_manifest(bad), **kw)


def test_held_state_bytes_bounds_what_windows_hold_on_disk(make_export, monkeypatch):
    """The disk the preflight reserves for verification's held states (`held_state_bytes`) covers
    what a layer-windows verification holds there at most, and is not a gross overestimate."""
    from hybridtrt.exporter import verify

    ckpt, out = make_export("tiny-nemotron-h", SPLIT)
    most = [0]
    put = verify._OnDisk.put

    def counted_put(self, name, value):
        put(self, name, value)
        most[0] = max(most[0], sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(".verify-") and p.suffix == ".pt"))

    monkeypatch.setattr(verify._OnDisk, "put", counted_put)
    model = load_model(ckpt, lazy=True)
    verify_export(out, model, read_manifest(out), mode="layers", parameter_bytes=1)
    bound = verify.held_state_bytes(model.config)
    assert 0.5 * bound <= most[0] <= bound, (most[0], bound)
