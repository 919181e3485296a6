"""``mtp.onnx``: the checkpoint's MTP head as a graph of its own (`export --speculative`, DESIGN.md §11).

Inputs: ``last_hidden_state [B, L, hidden]`` (the main graph's output of that name: ``norm_f`` of
the last decoder layer), ``input_ids [B, L]`` (the token after each position), ``attention_mask
[B, past + L]`` (the main model's mask: head position ``t`` is main position ``t``), and the KV
states of the head's attention layers ``past_key_values.{i}.key|value`` (``i`` the MTP layer).
Outputs: ``logits [B, L, V]`` (fp32, predicting token ``t + 2``), ``mtp_hidden_state [B, L, hidden]``
(what a chained draft reads in place of the main model's hidden state) and ``present.{i}.key|value``.

The graph holds the head (``mtp.layers.*``, in ``mtp.data``) and the main model's embedding table
and LM head, read from the checkpoint; where their bytes equal the main graph's (an unquantized
table), they point into ``weights.data`` instead of being written twice (2 × vocab × hidden: 2 GiB in
bf16 for Nemotron-3 Super). It is traced with its weights loaded (the head is two decoder blocks)
and verified against the reference head (`hybridtrt.models.mtp.MTPHead`) before the export is
published, like every other graph.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from hybridtrt.errors import ExportError
from hybridtrt.exporter import io
from hybridtrt.models.cache import HybridCache
from hybridtrt.models.loading import Checkpoint
from hybridtrt.models.model import TokenEnds
from hybridtrt.models.mtp import MTPHead, load_mtp

MTP_FILE = "mtp.onnx"
MTP_WEIGHTS_FILE = "mtp.data"


class MainParts(TokenEnds):
    """The main model's embedding table and LM head, all the MTP head borrows from it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        config = checkpoint.config
        self.config = config
        self.embeddings = nn.Embedding.from_pretrained(checkpoint.read("embeddings.weight"), freeze=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight = nn.Parameter(checkpoint.read("lm_head.weight"), requires_grad=False)


def mtp_state_specs(head: MTPHead) -> list[io.StateSpec]:
    """The head's KV states (dynamic cache), by MTP layer index."""
    c = head.config
    kv = (io.BATCH, c.num_key_value_heads, io.PAST, c.attention_head_dim)
    specs = []
    for i in head.attention_layers:
        specs.append(io.StateSpec(i, "key", f"past_key_values.{i}.key", f"present.{i}.key", kv, "model"))
        specs.append(io.StateSpec(i, "value", f"past_key_values.{i}.value", f"present.{i}.value", kv, "model"))
    return specs


class MtpGraphModule(nn.Module):
    """What ``mtp.onnx`` computes, with its flat I/O (module docstring). The head is ``model`` so
    that node names read ``/model/layers.{i}/…`` as in the main graphs (held routing finds the
    routers by them)."""

    def __init__(self, parts: MainParts, head: MTPHead) -> None:
        super().__init__()
        self.parts = parts
        self.model = head
        self.specs = mtp_state_specs(head)

    def forward(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = HybridCache()
        for spec, t in zip(self.specs, past, strict=True):
            getattr(cache, spec.kind)[spec.layer] = t
        logits, out, new = self.model(self.parts, hidden, input_ids, attention_mask, cache)
        return (logits, out, *[getattr(new, s.kind)[s.layer] for s in self.specs])

    def names(self) -> tuple[list[str], list[str]]:
        inputs = [io.HIDDEN_STATES, io.INPUT_IDS, io.ATTENTION_MASK, *[s.past_name for s in self.specs]]
        return inputs, [io.LOGITS, io.MTP_HIDDEN_OUT, *[s.present_name for s in self.specs]]

    def shapes(self) -> dict[str, tuple[int | str, ...]]:
        c = self.model.config
        out: dict[str, tuple[int | str, ...]] = {
            io.HIDDEN_STATES: (io.BATCH, io.SEQ, c.hidden_size),
            io.INPUT_IDS: (io.BATCH, io.SEQ),
            io.ATTENTION_MASK: (io.BATCH, io.TOTAL),
            io.LOGITS: (io.BATCH, io.SEQ, c.vocab_size),
            io.MTP_HIDDEN_OUT: (io.BATCH, io.SEQ, c.hidden_size),
        }
        for s in self.specs:
            out[s.past_name] = s.shape
            out[s.present_name] = io.present_shape(s)
        return out

    def example_inputs(self, *, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0, padded: bool = False) -> tuple[Tensor, ...]:
        """Inputs with a KV cache from an actual head run over ``past`` positions (left padding in
        the last row's first position when ``padded``)."""
        c = self.model.config
        gen = torch.Generator().manual_seed(seed)
        dtype = self.parts.dtype
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        if padded:
            mask[-1, 0] = 0
        hidden = lambda n: torch.randn(batch, n, c.hidden_size, generator=gen).to(dtype)  # noqa: E731
        ids = lambda n: torch.randint(0, c.vocab_size, (batch, n), generator=gen)  # noqa: E731
        with torch.no_grad():
            cache = self.model.new_cache(batch, dtype)
            if past:
                _, _, cache = self.model(self.parts, hidden(past), ids(past), mask[:, :past], cache)
        return (hidden(seq), ids(seq), mask, *[getattr(cache, s.kind)[s.layer] for s in self.specs])

    def dynamic_shapes(self) -> tuple:
        auto = Dim.AUTO
        states = tuple({0: auto, 2: auto} for _ in self.specs)
        return ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, states)  # forward(hidden, input_ids, attention_mask, *past)


def mtp_graph_bytes(checkpoint: Checkpoint) -> int:
    """Bytes ``mtp.data`` may take, from the headers: the ``mtp.*`` tensors and the embedding table and
    LM head, in the export dtype (an upper bound: the two tables are shared with ``weights.data``
    when their bytes are the main graph's)."""
    itemsize = torch.empty((), dtype=checkpoint.dtype).element_size()
    head = sum(t.numel for name, t in checkpoint.index.tensors.items() if name.removeprefix("language_model.").startswith("mtp."))
    borrowed = sum(p.numel for name, p in checkpoint.parameters.items() if name in ("embeddings.weight", "lm_head.weight"))
    return (head + borrowed) * itemsize


def mtp_module(checkpoint: Checkpoint) -> MtpGraphModule:
    """The MTP graph's module with the checkpoint's weights in its dtype."""
    parts = MainParts(checkpoint)
    return MtpGraphModule(parts, load_mtp(checkpoint.root, parts)).eval()


def write_mtp_graph(checkpoint: Checkpoint, directory: Path, opset: int, main_graph: Path | None = None) -> onnx.ModelProto:
    """Trace ``mtp.onnx`` with its weights, run the graph passes, write it and ``mtp.data`` into
    ``directory``; with ``main_graph`` (the export's ``model.onnx``), tensors identical to its
    weights (the embedding table, the LM head) point into its data file instead; returns the graph
    (initializers external)."""
    import onnx_ir as ir

    from hybridtrt.exporter.export import _quiet_exporter
    from hybridtrt.graphs.external_data import share_external_data
    from hybridtrt.exporter.translation import translation_table
    from hybridtrt.graphs.cleanup import strip_metadata
    from hybridtrt.graphs.dims import name_io_dims
    from hybridtrt.graphs.naming import assign_node_names, name_matmul_weights
    from hybridtrt.ops.onnx_functions import attach_functions

    module = mtp_module(checkpoint)
    inputs, outputs = module.names()
    shapes = module.shapes()
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            module.example_inputs(),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=module.dynamic_shapes(),
            custom_translation_table=translation_table(opset),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    path = directory / MTP_FILE
    ir.save(program.model, path, external_data=MTP_WEIGHTS_FILE, size_threshold_bytes=1024)
    del program, module
    gc.collect()
    proto = onnx.load(str(path), load_external_data=False)
    assign_node_names(proto)
    name_matmul_weights(proto)
    strip_metadata(proto)
    attach_functions(proto)
    name_io_dims(proto, shapes)
    from hybridtrt import __version__

    proto.producer_name, proto.producer_version = "hybridtrt", __version__
    onnx.save_model(proto, str(path))
    if main_graph is not None:  # the embedding table and LM head: where the main graph keeps them
        share_external_data(path, main_graph, by_content=True)
        proto = onnx.load(str(path), load_external_data=False)
    return proto


def verify_mtp_graph(directory: Path, checkpoint: Checkpoint, manifest: Any) -> dict[str, Any]:
    """Run ``mtp.onnx`` on ONNX Runtime against the reference head: the truth in fp32, the export
    dtype's reference as the yardstick of a half-precision export (DESIGN.md §8), routing held to
    the truth's expert choices; ``{"worst": …}`` for the manifest, or `ExportError`.

    The inputs: batch 3 (one row with left padding), 7 new positions on a KV cache of 4 written by
    the head itself.
    """
    from hybridtrt.graphs.held_routing import held_feeds, hold_routing
    from hybridtrt.judge.metrics import compare
    from hybridtrt.judge.tolerances import gate, precision_of
    from hybridtrt.models.moe import RoutingHold, held_routing
    from hybridtrt.runtime.onnxruntime import OrtSession

    mine = mtp_module(checkpoint)
    truth = mine if checkpoint.dtype == torch.float32 else mtp_module(checkpoint.as_dtype(torch.float32))
    args = mine.example_inputs(batch=3, seq=7, past=4, seed=1, padded=True)
    inputs, outputs = mine.names()
    hold = RoutingHold()
    with torch.no_grad(), held_routing(truth.model, hold):
        want = truth(*[t.float() if t.is_floating_point() else t for t in args])
    yard = None
    if truth is not mine:
        with torch.no_grad(), held_routing(mine.model, RoutingHold(hold.all_ids())):
            yard = mine(*args)
    graph = hold_routing(onnx.load(str(directory / MTP_FILE), load_external_data=False)).model
    session = OrtSession.from_proto(graph, directory)
    feeds = dict(zip(inputs, args))
    moe = [i for i, layer in enumerate(mine.model.layers) if layer.kind == "E"]
    if moe:
        feeds.update(held_feeds(moe, mine.model.config.moe.top_k, hold.all_ids()))
    got = session.run(feeds)
    precision = precision_of(manifest)
    worst: dict[str, Any] = {}
    failed = []
    for i, name in enumerate(outputs):
        kind = "call" if name == io.LOGITS else "layer" if name == io.MTP_HIDDEN_OUT else "state"
        g = gate(precision, kind)
        c = compare(torch.from_numpy(np.asarray(got[name], dtype=np.float32)), want[i].float())
        y = compare(yard[i].float(), want[i].float()) if yard is not None else None
        why = g.failures(c, y)
        if why:
            failed.append(f"{name} ({'; '.join(why)})")
            continue
        bound = g.bound(y)
        if not worst or (c.rel_l2 / bound if bound else 0.0) > worst["_score"]:
            worst = {"output": name, "rel_l2": c.rel_l2, "bound": bound, "yardstick_rel_l2": y.rel_l2 if y is not None else None, "_score": c.rel_l2 / bound if bound else 0.0}
    if failed:
        raise ExportError(
            f"{MTP_FILE} disagrees with the reference MTP head beyond the {precision} gate: {', '.join(failed)}",
            fix="this is a bug in hybridtrt (or a corrupt weights file); please report it with the checkpoint's config.json",
        )
    worst.pop("_score", None)
    return {"worst": worst}
