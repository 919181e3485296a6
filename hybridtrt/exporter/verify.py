"""Verification of a written export against the PyTorch reference, before it is published.

Each graph runs on ONNX Runtime (CPU; bf16 graphs through `hybridtrt.graphs.bf16_emulation`: fp32
compute with bf16 rounding casts) with example inputs (states from a real prefill) and is judged
against the **fp32 reference on the same inputs** (the truth, DESIGN.md §8). fp16/bf16 exports
have a **yardstick**: the same-dtype PyTorch reference on the same inputs, whose distance from the
truth is the rounding that dtype causes anyway; each output may be at most
``max(floor, ratio × yardstick rel L2)`` from the truth (`hybridtrt.judge.tolerances.Gate`:
``call`` for logits, ``layer`` for decoder-layer outputs, ``state`` for present states). fp32
exports are gated by the fp32 floors. An FP8 export is judged the same way against the **FP8
reference** (`hybridtrt.exporter.fp8_reference`: the reference computing the export's Q/DQ from the
recipe, in fp32), its yardstick the FP8 reference in the export's dtype (none for fp32 exports), at
the ``fp8`` gates; what the recipe costs against the unquantized model is `hybridtrt validate`'s.

Two methods, with the same inputs and gates (the one used is recorded in ``hybridtrt.json``):

- ``full-graph``: the whole graph in one session. ONNX Runtime holds all weights, so this is for
  models that fit (``auto`` picks it up to `FULL_GRAPH_MAX_BYTES` of parameters).
- ``layer-windows``: windows of consecutive decoder layers (`hybridtrt.graphs.layer_window`), each
  cut out of the written graph and run in its own session, fed with the same-dtype reference's
  hidden state at the window's start; every layer, the embedding and the head are covered, and
  one window's weights (about 1/32 of the model, at least one layer) are resident at a time. A head
  whose weight is larger than a window runs by vocabulary slices of a window's bytes (one session
  per slice, the logits concatenated: the same numbers as the whole head), and a routed-experts
  node whose weights are larger than a window by ranges of experts (one session per range on the
  tokens that chose its experts, their outputs added per token in fp32 and rounded once, as the
  node does). The references are usually lazy (`hybridtrt.models.lazy`), one layer resident at
  a time, so memory stays bounded on both sides.
"""

from __future__ import annotations

import contextlib
import math
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch

from hybridtrt.errors import ExportError
from hybridtrt.exporter.fp8_reference import FP32_DITHER, fp8_emulated, set_dither
from hybridtrt.exporter.io import BATCH, DYNAMIC_CACHE, HIDDEN_STATES, LOGITS, PAST, SEQ, CacheFlavour, present_shape, state_specs
from hybridtrt.exporter.manifest import Manifest
from hybridtrt.exporter.wrapper import GraphModule, example_inputs
from hybridtrt.graphs import layer_window
from hybridtrt.graphs.external_data import external_info, tensor_nbytes
from hybridtrt.graphs.held_routing import ROUTED_EXPERTS, held_feeds, hold_routing, routed_ids
from hybridtrt.models.loading import parse_dtype
from hybridtrt.judge.metrics import Comparison, compare
from hybridtrt.judge.routing import RoutingTally, flips, judge_tallies, routing_gate
from hybridtrt.judge.tolerances import gate, precision_of
from hybridtrt.models.config import MOE
from hybridtrt.models.model import HybridLM
from hybridtrt.models.moe import RoutingHold, held_routing

VERIFY_MODES = ("auto", "full", "layers")
#: ``auto`` verifies the whole graph at once up to this many bytes of parameters, by windows above.
FULL_GRAPH_MAX_BYTES = 256 << 20
#: A window holds about this fraction of the parameter bytes (at least one layer, or the head).
WINDOW_FRACTION = 1 / 32
#: A head weight, or a routed-experts node's weights, larger than a window (and than this) runs by
#: slices of at most a window's bytes: vocabulary slices of the head
#: (`hybridtrt.graphs.layer_window.vocab_slice`), expert ranges of the experts
#: (`~hybridtrt.graphs.layer_window.expert_range`); smaller ones run whole.
SLICE_MIN_BYTES = 16 << 20
#: The example inputs every graph is verified on: batch, new tokens (the unified graph's), past tokens.
VERIFY_BATCH, VERIFY_SEQ, VERIFY_PAST = 3, 7, 4
_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}
_NUMPY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16}

#: ``progress(label, total, unit) -> context manager yielding advance(n)``.
Progress = Callable[[str, int, str], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(label: str, total: int, unit: str = "B") -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _reference(fn: Callable[[], Any], dtype: str) -> Any:
    """Run the reference; PyTorch refusing the dtype on this machine becomes a user error."""
    try:
        with torch.no_grad():
            return fn()
    except (RuntimeError, NotImplementedError) as e:
        raise ExportError(
            f"dtype {dtype} is not supported by PyTorch on this machine: {str(e).splitlines()[0]}",
            fix="export in fp32 here, or export with --no-verify and validate on a machine whose PyTorch supports this dtype",
        ) from None


def temporary_bytes(parameter_bytes: int, held_bytes: int = 0) -> int:
    """The most disk space verification uses beside the export at a time: a head slice's weight,
    and by layer windows the states it holds on disk (``held_bytes``: `held_state_bytes`)."""
    return max(int(parameter_bytes * WINDOW_FRACTION), SLICE_MIN_BYTES) + held_bytes


def held_state_bytes(config, flavour: CacheFlavour = DYNAMIC_CACHE) -> int:
    """What the layer-windows method keeps on disk for one graph (`_HeldStates`): every past state
    it feeds and every present state of the truth, at most fp32, at the example's dims."""
    from hybridtrt.engine.profiles import resolve_shape

    dims = {BATCH: VERIFY_BATCH, SEQ: VERIFY_SEQ, PAST: VERIFY_PAST}
    shapes = [resolve_shape(shape, dims) for s in state_specs(config, flavour) for shape in (s.shape, present_shape(s))]
    return sum(4 * math.prod(shape) + _SAVED_OVERHEAD for shape in shapes)


#: Bytes ``torch.save`` adds to a tensor's own (its zip container: 1.3-1.4 KB measured, torch 2.13).
_SAVED_OVERHEAD = 4096


def window_plan(layer_bytes: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges ``(first, last)`` whose layers hold at most ``budget`` bytes (at
    least one layer per window)."""
    windows: list[tuple[int, int]] = []
    first, size = 0, 0
    for i, nbytes in enumerate(layer_bytes):
        if i > first and size + nbytes > budget:
            windows.append((first, i - 1))
            first, size = i, 0
        size += nbytes
    windows.append((first, len(layer_bytes) - 1))
    return windows


def _resident_bytes(t: onnx.TensorProto) -> int:
    """What ONNX Runtime holds of an initializer: its bytes, and for 4-bit and FP8 weights also their
    fp32 dequantization (the sessions fold constant DequantizeLinear nodes, and the Casts of the FP8
    experts' function body: a [4096, 4096] float8 weight behind a DequantizeLinear adds 73–89 MiB to a
    session, measured), so a window of quantized layers holds as much as one of fp32 layers."""
    from hybridtrt.graphs.quantized_types import FOUR_BIT

    folded = (*FOUR_BIT, onnx.TensorProto.FLOAT8E4M3FN)
    extra = 4 * math.prod(t.dims) if t.data_type in folded else 0
    return tensor_nbytes(t) + extra


def _layer_bytes(model: onnx.ModelProto, num_layers: int) -> list[int]:
    """Bytes each window member holds in ONNX Runtime (`_resident_bytes`): decoder layer ``i``'s
    nodes (the embedding counted in layer 0), and as member ``L`` everything else (final norm, head)."""
    sizes = {t.name: _resident_bytes(t) for t in model.graph.initializer}
    per_layer = [0] * (num_layers + 1)
    seen: set[str] = set()
    for node in model.graph.node:
        layer = layer_window._layer_of(node)
        if layer is None and node.name.startswith("/model/embeddings/"):
            layer = 0
        for name in node.input:
            if name in sizes and name not in seen and layer is not None:
                per_layer[layer] += sizes[name]
                seen.add(name)
    per_layer[-1] = sum(n for k, n in sizes.items() if k not in seen)
    return per_layer


_NO_COPY = {"session.disable_prepacking": "1"}


def _session(path: Path, *, held: bool = False):
    """An ONNX Runtime CPU session that does not copy weights: external data stays memory-mapped
    (pages read as the graph runs, dropped with the session) and MatMul weights are not
    pre-packed (pre-packing keeps a second copy of every weight). ``held``: the graph's held-routing
    copy (`hybridtrt.graphs.held_routing`): routing held to the ``held_experts.{i}`` feeds, its own
    choice exposed."""
    from hybridtrt.runtime.onnxruntime import OrtSession

    if not held:
        return OrtSession(path, config=_NO_COPY)
    graph = hold_routing(onnx.load(str(path), load_external_data=False)).model
    return OrtSession.from_proto(graph, path.parent, config=_NO_COPY)


def _kind(output: str) -> str:
    """The tolerance kind of an output: logits are a ``call``, decoder-layer outputs a ``layer``,
    the rest are states."""
    if output == LOGITS:
        return "call"
    if output.startswith("layer_output.") or output in (layer_window.HIDDEN_OUT, HIDDEN_STATES):
        return "layer"
    return "state"


class _Judge:
    """The pass/fail rule for one export: the artefact against the truth (fp32 reference; the FP8
    reference for an FP8 export; the 4-bit weights' reference for a W4A16 export), with the same-dtype run of the truth as the yardstick (fp16/bf16)."""

    def __init__(self, manifest: Manifest) -> None:
        self.fp8 = bool(manifest.quantization)
        fp4_activations = bool((manifest.weight_only or {}).get("activations"))
        #: Quantized activations (FP8, or FP4 for W4A4): an fp32 export's yardstick is the dithered run.
        self.dithered = self.fp8 or fp4_activations
        self.moe = any(entry.get("kind") == "moe" for entry in manifest.layers)
        self.precision = precision_of(manifest)
        four_bit = (f"{manifest.weight_only['scheme']} W4A4 " if fp4_activations else f"{manifest.weight_only['scheme']} weights' ") if manifest.weight_only else ""
        self.truth = "FP8 reference (fp32)" if self.fp8 else f"{four_bit}fp32 reference"
        if manifest.dtype != "fp32":
            self.yardstick: str | None = f"{'FP8 ' if self.fp8 else four_bit}{manifest.dtype} reference"
        else:
            self.yardstick = f"{'FP8 ' if self.fp8 else four_bit}fp32 reference, dithered (2^-16 before each quantizer)" if self.dithered else None
        # A half-precision SSM state is rounded on both sides (one fp16 ulp is 1e-3 relative): the
        # SSM states are gated at the coarser of the model and the state dtype.
        coarser = max((self.precision, manifest.state_dtype), key=lambda p: gate(p, "state").max_rel_l2 or 0.0)
        self.ssm_precision = coarser

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.precision}
        for kind in ("call", "layer", "state"):
            g = gate(self.precision, kind)
            out[kind] = {"max_rel_l2": g.max_rel_l2, **({"yardstick_ratio": g.yardstick_ratio} if self.yardstick else {})}
        if self.moe:
            r = routing_gate(self.precision)
            out["routing"] = {"held": "the truth's expert choices", "max_flips": r.max_flips, "min_flips": r.min_flips, **({"yardstick_ratio": r.ratio} if self.yardstick else {})}
        if self.ssm_precision != self.precision:
            out["ssm_state"] = {"precision": self.ssm_precision, "max_rel_l2": gate(self.ssm_precision, "state").max_rel_l2}
        return out

    def gate_of(self, output: str):
        if "ssm_state" in output and self.ssm_precision != self.precision:
            return gate(self.ssm_precision, "state")
        return gate(self.precision, _kind(output))

    def check_routing(self, where: str, routed: dict[int, torch.Tensor], truth: dict[int, torch.Tensor], yard: RoutingHold | None) -> dict[str, Any]:
        """Judge the artefact's own expert choices against the truth's, per MoE layer
        (`hybridtrt.judge.routing`); raise `ExportError` on failure. Returns ``{layer: {"flipped",
        "choices", "yardstick_flipped", "allowed"}}``."""
        tallies = {}
        for layer, ids in truth.items():
            tallies[layer] = RoutingTally()
            tallies[layer].add(flips(routed[layer], ids), flips(yard.ids(layer), ids) if yard is not None and self.yardstick else None)
        records, failed = judge_tallies(routing_gate(self.precision), tallies)
        out = {str(layer): {k: v for k, v in r.items() if k != "yardstick_choices"} for layer, r in records.items()}
        if failed:
            raise ExportError(
                f"{where} routes tokens to other experts than the {self.truth} beyond the {self.precision} routing gate: " + "; ".join(failed),
                fix="this is a bug in hybridtrt (or a corrupt weights file, e.g. a router weight); please report it with the checkpoint's config.json",
            )
        return out

    def check(self, where: str, got: dict[str, Any], truth: dict[str, Any], yard: dict[str, Comparison] | None) -> dict[str, Any]:
        """Judge every output of ``truth``; raise `ExportError` on failure. ``yard``: the yardstick's
        distance from the truth per output (`_yardstick`). Returns the worst: the output closest to
        its bound (``{"output", "rel_l2", "bound", "yardstick_rel_l2"}``)."""
        worst: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for name, want in truth.items():
            g = self.gate_of(name)
            c = compare(got[name], want)
            y = yard[name] if yard is not None else None
            why = g.failures(c, y)
            if why:
                failed[name] = "; ".join(why)
                continue
            bound = g.bound(y)
            score = c.rel_l2 / bound if bound else 0.0
            if not worst or score > worst["_score"]:
                worst = {"output": name, "rel_l2": c.rel_l2, "bound": bound, "yardstick_rel_l2": y.rel_l2 if y is not None else None, "_score": score}
        if failed:
            shown = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items())[:8])
            raise ExportError(
                f"{where} disagrees with the {self.truth} beyond the {self.precision} gate"
                + (f" (the {self.yardstick} is the yardstick)" if self.yardstick else "")
                + f": {shown}",
                fix="this is a bug in hybridtrt (or a corrupt weights file); please report it with the checkpoint's config.json",
            )
        worst.pop("_score", None)
        return worst


def verify_export(
    export_dir: Path,
    model: HybridLM,
    manifest: Manifest,
    *,
    truth: HybridLM | None = None,
    mode: str = "auto",
    parameter_bytes: int | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Run every graph of ``manifest`` in ``export_dir`` on ONNX Runtime and judge it against the
    fp32 reference on the same inputs (module docstring).

    Args:
        export_dir: Directory holding the written graphs (usually the export's partial directory).
        model: The reference in the export dtype (eager or lazy): it makes the example inputs and
            is the yardstick of fp16/bf16 exports.
        manifest: The export's manifest (graphs, dtypes, logits, quantization).
        truth: The fp32 reference (eager or lazy); required unless the export is fp32 (then
            ``model`` is the truth).
        mode: ``auto | full | layers`` (module docstring).
        parameter_bytes: Bytes of the model's parameters (``auto`` and the window budget).
        progress: Progress display for the windows.

    Returns:
        The record for ``hybridtrt.json``: ``{"method": "full-graph" | "layer-windows", "truth",
        "yardstick", "executor", "gate", "worst", "graphs": {file: {"worst": {"output", "rel_l2",
        "bound", "yardstick_rel_l2"}, "windows": [[first, last], ...], "head_slices": n (when the
        head ran by vocabulary slices), "expert_ranges": {node: n} (routed-experts nodes that ran
        by expert ranges)}}}``.

    Raises:
        ExportError: A graph disagrees with the truth beyond the gate, or a reference cannot run here.
    """
    if mode not in VERIFY_MODES:
        raise ExportError(f"verification mode {mode!r} is unknown", fix=f"use one of {', '.join(VERIFY_MODES)}")
    if truth is None:
        if manifest.dtype != "fp32":
            raise ValueError(f"verify_export of a {manifest.dtype} export needs the fp32 reference as truth=")
        truth = model
    if parameter_bytes is None:
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with contextlib.ExitStack() as emulated:
        if manifest.quantization:  # judged against the FP8 reference (module docstring)
            for reference in {id(model): model, id(truth): truth}.values():
                emulated.enter_context(fp8_emulated(reference, manifest.quantization, parse_dtype(manifest.dtype)))
        if manifest.weight_only:  # judged against the 4-bit weights' reference
            from hybridtrt.exporter.weight_only_reference import emulate_weight_only

            for reference in {id(model): model, id(truth): truth}.values():
                emulated.callback(emulate_weight_only(reference, manifest.weight_only, parse_dtype(manifest.dtype)))
        return _verify(export_dir, model, manifest, truth, mode, parameter_bytes, progress)


def _verify(export_dir: Path, model: HybridLM, manifest: Manifest, truth: HybridLM, mode: str, parameter_bytes: int, progress: Progress) -> dict[str, Any]:
    """`verify_export` once its references compute what the export computes."""
    chosen = mode if mode != "auto" else ("full" if parameter_bytes <= FULL_GRAPH_MAX_BYTES else "layers")
    judge = _Judge(manifest)
    record: dict[str, Any] = {
        "method": METHODS[chosen],
        "truth": judge.truth,
        "yardstick": judge.yardstick,
        "executor": EXECUTOR,
        "gate": judge.describe(),
        "graphs": {},
    }
    state_dtype = parse_dtype(manifest.state_dtype)
    flavour = manifest.cache_flavour
    specs = state_specs(model.config, flavour)
    same = truth is model
    moe = bool(model.config.layers_of(MOE))
    hidden = manifest.hidden_states

    def run(
        reference: HybridLM, hold: RoutingHold, args: tuple, dtype: str, decode: bool,
        held: _HeldStates | None = None, presents: Callable[[str, torch.Tensor], None] | None = None, wide: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """``reference``'s outputs with its routing recorded into, or held to, ``hold``; a lazy
        reference's last layer is released afterwards. ``held``: the past states are read off disk
        as their layers need them (widened to fp32 when ``wide``), and each present state is
        handed to ``presents(name, tensor)`` as its layer computes it, not kept (`_HeldStates`)."""
        hooks = held.hooks(reference, presents, wide) if held is not None else contextlib.nullcontext()
        with held_routing(reference, hold), hooks:
            result = _outputs(_reference(partial(GraphModule(reference, manifest.logits, decode, True, flavour, hidden).eval(), *args), dtype), specs, hidden)
        _release(reference)
        return result

    def verify_graph(entry, decode: bool, stack: contextlib.ExitStack) -> dict[str, Any]:
        """One graph's record (its references' tensors are dropped on return; ``stack`` removes the
        files of what it held on disk)."""
        inputs = _reference(partial(example_inputs, model, seq=1 if decode else VERIFY_SEQ, batch=VERIFY_BATCH, past=VERIFY_PAST, state_dtype=state_dtype, seed=1, flavour=flavour), manifest.dtype)
        names = [v["name"] for v in entry.inputs]
        # By layer windows no reference holds every layer's states (`_HeldStates`): the example's
        # past states and the truth's present states are on disk, each read back when a layer or
        # a window needs it; the yardstick's present states are measured against the truth's as
        # they come (the gates need no more of them).
        held = stack.enter_context(_HeldStates(export_dir, Path(entry.file).stem, specs)) if chosen == "layers" else None
        if held is not None:
            inputs = held.take_past(names, inputs)
        yard_states: dict[str, Comparison] = {}

        def measured(name: str, t: torch.Tensor) -> None:
            if judge.yardstick:
                yard_states[name] = compare(t, held.truth[name])

        # The truth chooses the experts; the yardstick and the artefact are held to its choice
        # (hybridtrt.judge.routing), so the gates judge the continuous math on equal routing.
        truth_hold = RoutingHold()
        keep = held.truth.put if held is not None else None
        if same:
            expected = mine = run(model, truth_hold, inputs, manifest.dtype, decode, held, keep)
            yard, yard_hold = None, None
            if judge.dithered:  # an fp32 FP8 / W4A4 export: the dithered run is the yardstick (fp8_reference.Dither)
                yard_hold = RoutingHold(truth_hold.all_ids())
                set_dither(model, FP32_DITHER)
                yard = mine = run(model, yard_hold, inputs, manifest.dtype, decode, held, measured)
                set_dither(model, None)
        else:
            wide = tuple(_fp32(t) for t in inputs)
            expected = run(truth, truth_hold, wide, "fp32", decode, held, keep, wide=True)
            del wide
            yard_hold = RoutingHold(truth_hold.all_ids())
            mine = run(model, yard_hold, inputs, manifest.dtype, decode, held, measured)
            yard = mine if judge.yardstick else None
        if held is not None:
            expected["present"] = held.truth
        # What the gates need of the yardstick is its distance from the truth: measured now, so
        # its tensors are not held while the artefact runs.
        yard = _yardstick(yard, expected, yard_states)
        if mine is not expected:  # the windows still feed its hidden states
            mine = {"hidden": mine["hidden"]}
        truth_ids = truth_hold.all_ids()
        feeds: Mapping[str, Any] = dict(zip(names, inputs))
        if held is not None:
            feeds = ChainMap({k: v for k, v in feeds.items() if k not in held.past}, held.past)
        if moe:
            feeds = ChainMap(held_feeds(truth_ids.keys(), model.config.moe.top_k, truth_ids), feeds)
        tokens = tuple(inputs[0].shape)
        del inputs
        if chosen == "full":
            names = manifest.per_layer_outputs
            def flat(o):
                return None if o is None else {LOGITS: o["logits"], **o["present"], **{n: o["hidden"][i] for i, n in enumerate(names)}, **o["final"]}
            session = _session(export_dir / entry.file, held=moe)
            got = session.run(feeds)
            if session.emulated_bf16:
                record["executor"] = EXECUTOR_BF16
            routing = judge.check_routing(entry.file, _routed(got, tokens), truth_ids, yard_hold) if moe else None  # names a router first
            out = {"worst": judge.check(entry.file, got, flat(expected), flat(yard))}
            if routing is not None:
                out["routing"] = routing
            return out
        graph = _verify_windows(
            export_dir, entry.file, model.config.num_layers, specs, feeds, mine["hidden"], expected, yard, judge, parameter_bytes, progress, record, hidden
        )
        routed = graph.pop("routed")
        if moe:
            graph["routing"] = judge.check_routing(entry.file, _routed(routed, tokens), truth_ids, yard_hold)
        return graph

    for role, entry in manifest.graphs.items():
        if role in ("unified", "decode"):  # the MTP graph has a verification of its own (exporter/mtp_graph.py)
            with contextlib.ExitStack() as stack:
                record["graphs"][entry.file] = verify_graph(entry, role == "decode", stack)
    worst = [(f, g["worst"]) for f, g in record["graphs"].items()]
    record["worst"] = max(({"graph": f, **w} for f, w in worst), key=lambda w: w.get("rel_l2", 0.0) / (w.get("bound") or 1.0), default=None)
    return record


class _OnDisk(Mapping):
    """Tensors saved beside the export and read back one at a time when asked for (`pop` also
    removes the file)."""

    def __init__(self, folder: Path, tag: str) -> None:
        self._folder, self._tag = folder, tag
        self._paths: dict[str, Path] = {}

    def put(self, name: str, value: torch.Tensor) -> None:
        path = self._paths[name] = self._folder / f"{self._tag}-{len(self._paths)}.pt"
        torch.save(value.clone(memory_format=torch.contiguous_format), path)  # its own bytes, not a view's whole storage

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.load(self._paths[name], weights_only=True)

    def __contains__(self, name: object) -> bool:  # not Mapping's, which reads the tensor
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def pop(self, name: str) -> torch.Tensor:
        value = self[name]
        self._paths.pop(name).unlink()
        return value

    def close(self) -> None:
        for path in self._paths.values():
            path.unlink(missing_ok=True)
        self._paths.clear()


class _HeldStates:
    """The states of one graph's layer-windows verification, on disk beside the export: the
    example's past states (``past``: read by each reference as its layers need them, and by the
    windows) and the truth's present states (``truth``: written as its layers compute them, read
    by the window that checks them). No reference then holds every layer's states: they are as
    large as the weights in a small model with many heads (a 0.95 B bf16 export held 0.29 GiB of
    them at once, 0.16x its parameter bytes; `held_state_bytes` is the disk they take)."""

    def __init__(self, folder: Path, stem: str, specs) -> None:
        self.past = _OnDisk(folder, f".verify-{stem}-past")
        self.truth = _OnDisk(folder, f".verify-{stem}-truth")
        self._specs = specs

    def take_past(self, names: list[str], inputs: tuple) -> tuple:
        """``inputs`` with each past state saved here and replaced by a stand-in of its shape that
        holds no memory (a stride-0 view of one zero: what a forward reads off the cache before
        the layers is shapes)."""
        pasts = {s.past_name for s in self._specs}
        out = []
        for name, t in zip(names, inputs, strict=True):
            if name in pasts:
                self.past.put(name, t)
                t = t.new_zeros(()).expand(t.shape)
            out.append(t)
        return tuple(out)

    @contextlib.contextmanager
    def hooks(self, model: HybridLM, sink: Callable[[str, torch.Tensor], None] | None, wide: bool) -> Iterator[None]:
        """While active, each Mamba and attention mixer of ``model`` reads its past states from
        here (fp32 when ``wide``), and hands its present states to ``sink(present name, tensor)``
        (if given), returning empty stand-ins in their place."""
        by_layer: dict[int, list] = {}
        for spec in self._specs:
            by_layer.setdefault(spec.layer, []).append(spec)

        def hooks_of(layer: int):
            specs = by_layer[layer]

            def read_past(module, args):  # mixer(x, mask or allowed, *this layer's states, last argument)
                x, where, *stand_ins, rest = args
                pasts = [self.past[s.past_name] for s in specs]
                if len(stand_ins) != len(pasts):
                    raise AssertionError(f"layer {layer}'s mixer takes {len(stand_ins)} states, its specs name {len(pasts)}")
                return (x, where, *(t.float() if wide and t.is_floating_point() else t for t in pasts), rest)

            def hand_on(module, args, output):
                out, *states = output
                if sink is None:
                    return None
                for spec, t in zip(specs, states, strict=True):
                    sink(spec.present_name, t)
                return (out, *(t.new_empty(0) for t in states))

            return read_past, hand_on

        handles = []
        try:
            for layer in by_layer:
                mixer = model.layers[layer].mixer
                read_past, hand_on = hooks_of(layer)
                handles += [mixer.register_forward_pre_hook(read_past), mixer.register_forward_hook(hand_on)]
            yield
        finally:
            for h in handles:
                h.remove()

    def __enter__(self) -> _HeldStates:
        return self

    def __exit__(self, *exc) -> None:
        self.past.close()
        self.truth.close()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` for the fp32 truth: floating tensors widened, a stand-in (`_HeldStates.take_past`) as
    a stand-in."""
    if not t.is_floating_point():
        return t
    if t.dim() and not any(t.stride()):
        return t.new_zeros((), dtype=torch.float32).expand(t.shape)
    return t.float()


def _yardstick(yard: dict[str, Any] | None, truth: dict[str, Any], states: dict[str, Comparison]) -> dict[str, Any] | None:
    """``yard``'s distance from ``truth``, output by output, in `_outputs`' layout; ``states``: the
    present states' when they were measured as they came (`_HeldStates.hooks`)."""
    if yard is None:
        return None
    parts = ("hidden", "final") if states else ("present", "hidden", "final")
    return {"logits": compare(yard["logits"], truth["logits"]), "present": states, **{part: {k: compare(v, truth[part][k]) for k, v in yard[part].items()} for part in parts}}


def _routed(got: dict[str, Any], tokens: tuple[int, int]) -> dict[int, torch.Tensor]:
    """``{MoE layer: [B, L, K]}`` the artefact's own routers chose (its ``routed_experts.{i}`` outputs)."""
    return {layer: torch.from_numpy(ids) for layer, ids in routed_ids(got, *tokens).items()}


METHODS = {"full": "full-graph", "layers": "layer-windows"}
EXECUTOR = "onnxruntime-cpu"
EXECUTOR_BF16 = "onnxruntime-cpu (bf16 emulated: fp32 compute, bf16 rounding casts)"


def _release(model: HybridLM) -> None:
    weights = getattr(model, "weights", None)
    if weights is not None and hasattr(weights, "release"):
        weights.release()


def _outputs(ran: tuple, specs, hidden: bool = False) -> dict[str, Any]:
    """A `GraphModule` (per_layer) run as ``{"logits", "present": {name: t}, "hidden": {layer: t},
    "final": {"last_hidden_state": t} or {}}``."""
    n = len(specs)
    layers = ran[1 + n : len(ran) - 1] if hidden else ran[1 + n :]
    final = {HIDDEN_STATES: ran[-1]} if hidden else {}
    return {"logits": ran[0], "present": {s.present_name: t for s, t in zip(specs, ran[1 : 1 + n])}, "hidden": dict(enumerate(layers)), "final": final}


def _label(first: int, last: int, num_layers: int) -> str:
    """``layers 3..5``, ``layers 30..31 + head``, ``head``."""
    if first == num_layers:
        return "head"
    return f"layers {first}..{min(last, num_layers - 1)}" + (" + head" if last == num_layers else "")


def _verify_windows(export_dir, file, num_layers, specs, feeds, inputs_hidden, truth, yard, judge, parameter_bytes, progress, record, hidden=False) -> dict[str, Any]:
    """``layers`` method for one graph. Each window is fed ``inputs_hidden`` (the export-dtype
    reference's hidden state) at its start. The head is the last window (member ``L``), on its own
    when it is large: by then the expected outputs of the layers already verified have been dropped
    (this function owns ``truth``, ``yard`` and ``inputs_hidden`` and empties them as it goes)."""
    full = onnx.load(str(export_dir / file), load_external_data=False)
    try:
        stream = layer_window.residual_stream(full, num_layers)
    except layer_window.WindowError as e:
        raise ExportError(f"{file}: cannot verify by layer windows ({e.message})", fix="verify the whole graph with --verify full, or skip with --no-verify") from None
    member_bytes = _layer_bytes(full, num_layers)
    windows = window_plan(member_bytes, max(int(parameter_bytes * WINDOW_FRACTION), 1))
    slice_bytes = temporary_bytes(parameter_bytes)  # larger heads and experts run by slices / ranges
    out: dict[str, Any] = {"windows": [list(w) for w in windows]}
    hidden_type = _ONNX_TYPES[inputs_hidden[0].dtype]
    worst: dict[str, Any] = {}
    worst_score = -1.0
    routed: dict[str, Any] = {}  # routed_experts.{i} of every window (held routing)

    def wanted(o: dict[str, Any] | None, first: int, last: int, mine: list) -> dict[str, Any] | None:
        if o is None:
            return None
        head = {LOGITS: o["logits"], **o["final"]} if last == num_layers else {layer_window.HIDDEN_OUT: o["hidden"][last]}
        return {**head, **{s.present_name: o["present"].pop(s.present_name) for s in mine}}

    with progress(f"verify {file} by layer windows", sum(member_bytes), "B") as advance:
        for first, last in windows:
            mine = [s for s in specs if first <= s.layer <= last]
            finals = (LOGITS, HIDDEN_STATES) if hidden else (LOGITS,)
            sub = hold_routing(layer_window.window(full, stream, first, last, [s.present_name for s in mine], hidden_type, finals)).model
            window_feeds = {i.name: feeds[i.name] for i in sub.graph.input if i.name in feeds}  # read off disk (`_OnDisk`)
            if first > 0:
                window_feeds[layer_window.HIDDEN_IN] = inputs_hidden[first - 1]
            tag = f".verify-{Path(file).stem}-{first}-{last}"
            head = layer_window.head_weight(sub) if first == num_layers else None
            if head is not None and tensor_nbytes(head) > slice_bytes:
                got, slices = _run_head_by_slices(export_dir, tag, sub, head, slice_bytes, window_feeds, record)
                out["head_slices"] = slices
            else:
                got, ranges = _run_window(export_dir, tag, sub, window_feeds, slice_bytes, record)
                if ranges:
                    out.setdefault("expert_ranges", {}).update(ranges)
            routed.update({k: v for k, v in got.items() if k.startswith(ROUTED_EXPERTS.format(""))})
            label = _label(first, last, num_layers)
            w = judge.check(f"{file} {label}", got, wanted(truth, first, last, mine), wanted(yard, first, last, mine))
            score = w.get("rel_l2", 0.0) / (w.get("bound") or 1.0)
            if score > worst_score:
                worst, worst_score = {**w, "output": f"{w['output']} ({label})"}, score
            for k in range(first - 1, last):  # what later windows do not need (past states stay:
                # a window may read another layer's past state for a dynamic dim)
                for o in (truth, yard):
                    if o is not None:
                        o["hidden"].pop(k, None)
                inputs_hidden.pop(k, None)
            del got
            advance(sum(member_bytes[first : last + 1]))
    return {"worst": worst, **out, "routed": routed}


def _run(export_dir: Path, tag: str, sub: onnx.ModelProto, feeds: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Run the window ``sub`` (saved beside the export as ``{tag}.onnx`` while it runs)."""
    path = export_dir / f"{tag}.onnx"
    onnx.save_model(sub, str(path))
    try:
        session = _session(path)
        if session.emulated_bf16:
            record["executor"] = EXECUTOR_BF16
        return session.run(feeds)
    finally:
        path.unlink(missing_ok=True)


def _run_window(export_dir: Path, tag: str, sub: onnx.ModelProto, feeds: dict[str, Any], max_bytes: int, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Run the window ``sub``; a routed-experts node whose per-expert weights are larger than
    ``max_bytes`` runs by expert ranges of at most that (`hybridtrt.graphs.layer_window.expert_range`):
    the graph before it, one session per range on the (token, k) pairs that chose an expert of the
    range, then the rest with the node's output as an input. Returns the outputs and ``{node
    name: ranges}`` of the nodes that ran by ranges."""
    split = [n for n in layer_window.expert_nodes(sub) if layer_window.expert_bytes(sub, n)[1] > max_bytes]
    if not split:
        return _run(export_dir, tag, sub, feeds, record), {}
    from hybridtrt.graphs.bf16_emulation import value_types

    types = value_types(sub)
    feeds = dict(feeds)
    ranges: dict[str, int] = {}
    for k, node in enumerate(split):
        before = layer_window.before_experts(sub, node, types, cuts=[n.output[0] for n in split[:k]])
        ran = _run(export_dir, f"{tag}-experts-{k}", before, feeds, record)
        x, experts, weights = (ran[v] if v in ran else feeds[v] for v in node.input[:3])  # held ids are a feed
        y, ranges[node.name] = _run_by_expert_ranges(export_dir, f"{tag}-experts-{k}", sub, node, types, x, experts, weights, max_bytes, record)
        feeds[node.output[0]] = y.astype(_NUMPY_TYPES[types[node.output[0]]])  # rounded once, as the node does
    return _run(export_dir, tag, layer_window.after_experts(sub, split, types), feeds, record), ranges


def _run_by_expert_ranges(export_dir, tag, sub, node, types, x, experts, weights, max_bytes, record) -> tuple[np.ndarray, int]:
    """``node``'s output in fp32 from one session per range of experts (`_run_window`); each pair
    ``(t, k)`` runs in the range of its expert and the pairs are added per token in fp32, as the
    node's body does (`_sum_over_k`)."""
    count_experts, nbytes = layer_window.expert_bytes(sub, node)
    count = min(math.ceil(nbytes / max_bytes), count_experts)
    pairs = np.zeros((*experts.shape, x.shape[-1]), np.float32)  # [T, K, D]
    for start, stop in _even_parts(count_experts, count):
        tokens, ks = np.nonzero((experts >= start) & (experts < stop))
        if not len(tokens):
            continue
        feeds = {
            layer_window.PAIR_X: x[tokens],
            layer_window.PAIR_EXPERT: (experts[tokens, ks] - start).astype(np.int64)[:, None],
            layer_window.PAIR_WEIGHT: weights[tokens, ks].astype(np.float32)[:, None],
        }
        got = _run(export_dir, f"{tag}-{start}", layer_window.expert_range(sub, node, start, stop, types), feeds, record)
        pairs[tokens, ks] = got[layer_window.PAIR_Y]
    return _sum_over_k(pairs), count


def _sum_over_k(pairs: np.ndarray) -> np.ndarray:
    """``pairs [T, K, D]`` summed over ``k`` by ONNX Runtime's ``ReduceSum``, the kernel the node's
    body sums with: the same order of additions, so the same fp32 sums bit for bit."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["pairs", "axes"], ["y"], keepdims=0)],
        "sum over k",
        [layer_window.typed("pairs", onnx.TensorProto.FLOAT)],
        [layer_window.typed("y", onnx.TensorProto.FLOAT)],
        [helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pairs": pairs})[0]


def _run_head_by_slices(export_dir, tag, sub, weight, max_bytes, feeds, record) -> tuple[dict[str, Any], int]:
    """Run the head window ``sub`` by vocabulary slices of at most ``max_bytes`` of its weight
    (`hybridtrt.graphs.layer_window.vocab_slice`); returns the whole logits and the slice count.
    Each slice's columns are copied row by row from ``weights.data`` into a file beside the export
    (one row in memory), which the slice's session reads and which is removed after it."""
    location, offset, _ = external_info(weight)
    rows, vocab = weight.dims
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type).itemsize
    count = math.ceil(tensor_nbytes(weight) / max_bytes)
    parts = []
    for start, stop in _even_parts(vocab, count):
        data = f"{tag}-vocab-{start}.data"
        try:
            _copy_columns(export_dir / location, offset, rows, vocab * itemsize, start * itemsize, stop * itemsize, export_dir / data)
            got = _run(export_dir, f"{tag}-vocab-{start}", layer_window.vocab_slice(sub, weight.name, start, stop, data), feeds, record)
        finally:
            (export_dir / data).unlink(missing_ok=True)
        parts.append(got.pop(LOGITS))
        final = got.pop(HIDDEN_STATES, None)  # the head's input: every slice computes it whole
        if got:
            raise AssertionError(f"a head slice has outputs besides logits: {sorted(got)}")
    return {LOGITS: np.concatenate(parts, axis=-1), **({HIDDEN_STATES: final} if final is not None else {})}, count


def _even_parts(total: int, count: int) -> list[tuple[int, int]]:
    """``[0, total)`` as ``count`` consecutive ``(start, stop)`` ranges of sizes differing by at most one."""
    bounds = [total * k // count for k in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def _copy_columns(source: Path, offset: int, rows: int, row_bytes: int, start: int, stop: int, target: Path) -> None:
    """Write bytes ``start:stop`` of each of ``rows`` rows of ``row_bytes`` (a row-major matrix at
    ``offset`` in ``source``) one after the other into ``target``."""
    buffer = bytearray(stop - start)
    with open(source, "rb") as src, open(target, "wb") as dst:
        for r in range(rows):
            src.seek(offset + r * row_bytes + start)
            if src.readinto(buffer) != len(buffer):
                raise ExportError(f"{source} ends inside the LM head weight", fix="the export is incomplete: export again")
            dst.write(buffer)


__all__ = ["FULL_GRAPH_MAX_BYTES", "VERIFY_MODES", "temporary_bytes", "verify_export", "window_plan"]
