"""A deep model traced as a shallow one (`hybridtrt.exporter.stitch`): the stitched export is the
whole-model export byte for byte, a prototype that breaks a copying rule falls back to the whole
trace, and a stitch with a planted fault is caught by the same comparison."""

from __future__ import annotations

import hashlib

import onnx
import pytest
from onnx import TensorProto, helper

import hybridtrt.exporter.export as export_mod
from hybridtrt.exporter import stitch, trace_cache
from hybridtrt.exporter.export import ExportOptions, export
from hybridtrt.models.config import config_from_dict
from hybridtrt.models.presets import preset_config


def _config(cfg: dict):
    return config_from_dict(cfg)


def _files(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != "hybridtrt.json"}


@pytest.fixture
def no_finished_graphs(monkeypatch):
    """Both exports run the optimizer and the passes: no replayed finished graph (its key cannot see
    `export.STITCH`). Unoptimized traces may be replayed: stitched and whole ones have other keys."""
    monkeypatch.setattr(trace_cache, "load", lambda *a: None)
    monkeypatch.setattr(trace_cache, "store", lambda *a: None)


def _stitched_and_whole(ckpt, tmp_path, options, monkeypatch):
    export(ckpt, tmp_path / "stitched", options)
    monkeypatch.setattr(export_mod, "STITCH", False)
    export(ckpt, tmp_path / "whole", options)
    monkeypatch.setattr(export_mod, "STITCH", True)
    return _files(tmp_path / "stitched"), _files(tmp_path / "whole")


def test_prototype_is_one_layer_per_kind_after_the_first():
    nano = _config(preset_config("small-nemotron-h"))  # M-M-M*-M-M-M*-M-
    proto = stitch.prototype(nano)
    assert proto.config.pattern == "M-M*" and proto.source == (0, 1, 2, 5)
    assert [proto.config.layer_types[p] for p in proto.copies] == list(nano.layer_types)
    assert proto.copies[:4] == (0, 1, 2, 1)  # layer 2 (M) copies prototype layer 2, not layer 0
    super_ = _config(preset_config("tiny-nemotron3-super"))  # MEMEM*EME
    assert stitch.prototype(super_).config.pattern == "MEM*"
    # Nothing to gain: the prototype would be the model.
    assert stitch.prototype(_config(preset_config("tiny-nemotron-h", hybrid_override_pattern="M*M-", num_hidden_layers=4))) is None


@pytest.mark.parametrize(
    ("preset", "overrides", "options"),
    [
        # M*M-M-: prototype M*M-, layers 4 and 5 copies of 2 and 3 (the whole trace is 6 layers, not the preset's 8).
        ("tiny-nemotron-h", {"hybrid_override_pattern": "M*M-M-", "num_hidden_layers": 6}, ExportOptions(split=True, verify=False, per_layer=True)),
    ],
    # The MoE prototype's copies are proven the same way on tensor-parallel rank graphs (an MoE layer copied,
    # tests/exporter/test_tp_export.py); static-cache and bf16 stitched graphs are judged against the
    # reference by their own tests (tests/exporter/test_static_cache.py, the bf16 exports' verification).
    ids=["dense-both-graphs-per-layer"],
)
def test_stitched_export_is_the_whole_model_export(make_checkpoint, tmp_path, preset, overrides, options, monkeypatch, no_finished_graphs):
    """Every file (both graphs, weights.data, mtp.onnx) byte-identical to tracing every layer: dense
    and MoE, dynamic and static KV cache, the unified and the decode graph, per-layer outputs, the
    speculative graph's hidden-state output, fp32 and bf16 (its casts)."""
    stitched, whole = _stitched_and_whole(make_checkpoint(preset, **overrides), tmp_path, options, monkeypatch)
    assert stitched == whole and "model.onnx" in stitched


def test_a_planted_fault_in_the_copies_is_caught(make_checkpoint, tmp_path, monkeypatch, no_finished_graphs):
    """The comparison above is not vacuous: copies that keep the prototype layer's module scope
    (their node names then say ``layers.1`` for layers 2 and 3) differ from the whole trace."""
    monkeypatch.setattr(stitch, "_rename_layer", lambda text, old, new: text)
    stitched, whole = _stitched_and_whole(make_checkpoint("tiny-mamba2"), tmp_path, ExportOptions(split=False, verify=False), monkeypatch)
    assert stitched["model.onnx"] != whole["model.onnx"]


def _chain(layer_1_reads: list[str], norm_reads: list[str] = ["r1"]) -> tuple[onnx.ModelProto, stitch.Prototype]:
    """A hand-made prototype trace of two layers ``M-`` (scopes as torch.onnx writes them): the
    residual ``input_ids → r0 → r1 → logits``, layer 0's states passed through; layer 1 reads
    ``layer_1_reads`` and norm_f ``norm_reads``."""

    def node(op, inputs, output, scope):
        n = helper.make_node(op, inputs, [output], name=f"node_{output}")
        n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", *scope, output]))
        return n

    nodes = [
        node("Relu", ["input_ids"], "a0", ["model.layers.0"]),
        node("Neg", ["a0"], "r0", ["model.layers.0"]),
        node("Identity", ["past_conv_state.0"], "present_conv_state.0", ["model.layers.0"]),
        node("Identity", ["past_ssm_state.0"], "present_ssm_state.0", ["model.layers.0"]),
        node("Sum", layer_1_reads, "r1", ["model.layers.1"]),
        node("Sum", norm_reads, "logits", ["model.norm_f"]),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "g",
        [value(n) for n in ("input_ids", "attention_mask", "past_conv_state.0", "past_ssm_state.0")],
        [value(n) for n in ("logits", "present_conv_state.0", "present_ssm_state.0")],
    )
    proto = stitch.Prototype(_config(preset_config("tiny-nemotron-h", hybrid_override_pattern="M-", num_hidden_layers=2)), (0, 1), (0, 1, 1, 1))
    return helper.make_model(graph), proto


class _Spec:
    flavour = export_mod.io.DYNAMIC_CACHE
    per_layer = False
    hidden = False


def test_copies_read_the_previous_copy():
    model, proto = _chain(["r0"])
    out = stitch.stitch(model, proto, _config(preset_config("tiny-nemotron-h", hybrid_override_pattern="M---", num_hidden_layers=4)), _Spec())
    assert [list(n.input) for n in out.graph.node if n.name.startswith("node_r1")] == [["r0_L0"], ["r1_L1"], ["r1_L2"]]
    assert [list(n.input) for n in out.graph.node if n.name == "node_logits"] == [["r1_L3"]]
    assert [o.name for o in out.graph.output] == ["logits", "present_conv_state.0", "present_ssm_state.0"]


@pytest.mark.parametrize(
    ("layer_1_reads", "norm_reads", "why"),
    [(["r0", "a0"], ["r1"], "layer 1 reads"), (["r0"], ["r1", "a0"], "nodes outside the layers read")],
    ids=["layer-1-reads-two-values-of-layer-0", "norm-reads-layer-0"],
)
def test_a_prototype_that_breaks_a_rule_cannot_be_stitched(layer_1_reads, norm_reads, why):
    model, proto = _chain(layer_1_reads, norm_reads)
    with pytest.raises(stitch.CannotStitch, match=why):
        stitch.stitch(model, proto, _config(preset_config("tiny-nemotron-h", hybrid_override_pattern="M---", num_hidden_layers=4)), _Spec())


def test_the_export_traces_every_layer_when_the_prototype_cannot_be_stitched(make_checkpoint, tmp_path, monkeypatch, no_finished_graphs, caplog):
    def refuse(*a, **k):
        raise stitch.CannotStitch("planted")

    monkeypatch.setattr(stitch, "stitch", refuse)
    ckpt = make_checkpoint("tiny-mamba2")
    export(ckpt, tmp_path / "fallback", ExportOptions(split=False, verify=False))
    monkeypatch.setattr(export_mod, "STITCH", False)
    export(ckpt, tmp_path / "whole", ExportOptions(split=False, verify=False))
    assert _files(tmp_path / "fallback") == _files(tmp_path / "whole")
    assert "tracing every layer: planted" in caplog.text


def test_a_layer_with_other_parameters_than_its_prototype_is_not_copied(make_checkpoint):
    """A layer whose parameters differ (here: one MLP layer's dtype, as a quantized checkpoint that
    excludes some layers has them) is not a copy of its kind's prototype layer."""
    from dataclasses import replace

    import torch

    from hybridtrt.models.loading import open_checkpoint

    checkpoint = open_checkpoint(make_checkpoint("tiny-nemotron-h"))  # M*M-M*-M
    proto = stitch.prototype(checkpoint.config)
    assert stitch.prototype_structure(checkpoint, proto).config.pattern == "M*M-"
    name = "layers.6.mixer.up_proj.weight"
    checkpoint.parameters[name] = replace(checkpoint.parameters[name], dtype=torch.float16)
    with pytest.raises(stitch.CannotStitch, match="layer 6's parameters differ from layer 3's"):
        stitch.prototype_structure(checkpoint, proto)
