"""Verification of a written export against the PyTorch reference, before it is published.

Each graph runs on ONNX Runtime (CPU) with example inputs (states from a real prefill) and is
compared with the reference's outputs: rel L2 ≤ 1e-4 in fp32, 1e-2 in fp16; FP8 exports get a
sanity gate (cosine ≥ 0.5: a broken scale gives ~0.1; `hybridtrt validate` measures accuracy).

Two modes, with the same inputs and gates (the one used is recorded in ``hybridtrt.json``):

- ``full``: the whole graph in one session. ONNX Runtime holds all weights, so this is for models
  that fit (``auto`` picks it up to `FULL_GRAPH_MAX_BYTES` of parameters).
- ``layers``: windows of consecutive decoder layers (`hybridtrt.graphs.layer_window`), each cut out
  of the written graph and run in its own session, fed with the reference's hidden state at the
  window's start; every layer, the embedding and the head are covered, and one window's weights
  (about 1/16 of the model, at least one layer) are resident at a time. The reference is usually
  the lazy model (`hybridtrt.models.lazy`), one layer resident at a time, so memory stays bounded
  on both sides.

bf16 exports cannot be verified on CPU (ONNX Runtime's CPU provider has no bf16 kernels): the
record says so, and `hybridtrt validate` on TensorRT is the check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import onnx
import torch

from hybridtrt.errors import ExportError
from hybridtrt.exporter.io import LOGITS, state_specs
from hybridtrt.exporter.manifest import Manifest
from hybridtrt.exporter.wrapper import GraphModule, example_inputs
from hybridtrt.graphs import layer_window
from hybridtrt.models.loading import parse_dtype
from hybridtrt.models.model import HybridLM

VERIFY_MODES = ("auto", "full", "layers")
#: ``auto`` verifies the whole graph at once up to this many bytes of parameters, by windows above.
FULL_GRAPH_MAX_BYTES = 256 << 20
#: A window holds about this fraction of the parameter bytes (at least one layer, or the head).
WINDOW_FRACTION = 1 / 32
_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}

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


def _layer_bytes(model: onnx.ModelProto, num_layers: int) -> list[int]:
    """Initializer bytes each window member reads: decoder layer ``i``'s nodes (the embedding
    counted in layer 0), and as member ``L`` everything else (final norm, head)."""
    from hybridtrt.graphs.external_data import tensor_nbytes

    sizes = {t.name: tensor_nbytes(t) for t in model.graph.initializer}
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


def _session(path: Path):
    """An ONNX Runtime CPU session that does not copy weights: external data stays memory-mapped
    (pages read as the graph runs, dropped with the session) and MatMul weights are not
    pre-packed (pre-packing keeps a second copy of every weight)."""
    from hybridtrt.runtime.onnxruntime import OrtSession

    return OrtSession(path, config={"session.disable_prepacking": "1"})


class _Gate:
    """The pass/fail rule for one export (fp32/fp16 rel L2, or the FP8 cosine sanity gate)."""

    def __init__(self, manifest: Manifest) -> None:
        self.fp8 = bool(manifest.quantization)
        self.tol = 1e-4 if manifest.dtype == "fp32" else 1e-2
        # A half-precision SSM state is rounded on both sides: one fp16 ulp is 1e-3 relative.
        self.half_state = manifest.state_dtype != "fp32"

    def check(self, where: str, got: dict[str, Any], expected: dict[str, Any]) -> tuple[str, float]:
        """Compare; raise `ExportError` on failure. Returns the worst (output, rel L2)."""
        from hybridtrt.validation.metrics import compare, rel_l2

        if self.fp8:
            name = next(iter(expected))
            cosine = compare(got[name], expected[name]).cosine
            if not cosine >= 0.5:  # catastrophic only (a broken scale gives ~0.1)
                raise ExportError(f"{where}: FP8 {name} has cosine {cosine:.4f} < 0.5 against the reference", fix="check the calibration set; try --weight-scale channel or --exclude")
            return name, rel_l2(got[name], expected[name])
        errors = {k: rel_l2(got[k], v) for k, v in expected.items()}
        limit = {k: 1e-2 if self.half_state and "ssm_state" in k else self.tol for k in errors}
        bad = {k: v for k, v in errors.items() if not v <= limit[k]}
        if bad:
            raise ExportError(
                f"{where} disagrees with the PyTorch reference on {sorted(bad)} (rel L2 {max(bad.values()):.2e} > {self.tol})",
                fix="this is a bug in hybridtrt; please report it with the checkpoint's config.json",
            )
        worst = max(errors, key=lambda k: errors[k])
        return worst, errors[worst]


def verify_export(
    export_dir: Path,
    model: HybridLM,
    manifest: Manifest,
    *,
    mode: str = "auto",
    parameter_bytes: int | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Run every graph of ``manifest`` in ``export_dir`` on ONNX Runtime against ``model``.

    Args:
        export_dir: Directory holding the written graphs (usually the export's partial directory).
        model: The reference in the export dtype (eager or lazy).
        manifest: The export's manifest (graphs, dtypes, logits, quantization).
        mode: ``auto | full | layers`` (module docstring).
        parameter_bytes: Bytes of the model's parameters (``auto`` and the window budget).
        progress: Progress display for the windows.

    Returns:
        The record for ``hybridtrt.json``: ``{"mode", "tolerance"|"gate", "graphs": {file: {"worst":
        {"output", "rel_l2"}, "windows": [[first, last], ...]}}}`` (or ``{"mode": "skipped",
        "reason"}``).

    Raises:
        ExportError: A graph disagrees with the reference, or the reference cannot run here.
    """
    if mode not in VERIFY_MODES:
        raise ExportError(f"verification mode {mode!r} is unknown", fix=f"use one of {', '.join(VERIFY_MODES)}")
    if manifest.dtype == "bf16":
        return {"mode": "skipped", "reason": "bf16: ONNX Runtime's CPU provider has no bf16 kernels; validate on TensorRT (hybridtrt validate)"}
    if parameter_bytes is None:
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    chosen = mode if mode != "auto" else ("full" if parameter_bytes <= FULL_GRAPH_MAX_BYTES else "layers")
    gate = _Gate(manifest)
    record: dict[str, Any] = {"mode": chosen, "graphs": {}}
    record["gate"] = "FP8 logits cosine ≥ 0.5" if gate.fp8 else f"rel L2 ≤ {gate.tol:g}"
    state_dtype = parse_dtype(manifest.state_dtype)
    flavour = manifest.cache_flavour
    specs = state_specs(model.config, flavour)
    for role, entry in manifest.graphs.items():
        decode = role == "decode"
        inputs = _reference(partial(example_inputs, model, seq=1 if decode else 7, batch=3, past=4, state_dtype=state_dtype, seed=1, flavour=flavour), manifest.dtype)
        graph = GraphModule(model, manifest.logits, decode, True, flavour).eval()
        expected = _reference(partial(graph, *inputs), manifest.dtype)
        weights = getattr(model, "weights", None)
        if weights is not None and hasattr(weights, "release"):
            weights.release()  # a lazy reference's last layer is not needed while ORT runs
        n_states = len(specs)
        logits, states, hidden = expected[0], expected[1 : 1 + n_states], expected[1 + n_states :]
        feeds = dict(zip([v["name"] for v in entry.inputs], inputs))
        if chosen == "full":
            want = {LOGITS: logits, **{s.present_name: t for s, t in zip(specs, states)}}
            want.update({name: hidden[i] for i, name in enumerate(manifest.per_layer_outputs)})
            got = _session(export_dir / entry.file).run(feeds)
            worst = gate.check(entry.file, got, want)
            record["graphs"][entry.file] = {"worst": {"output": worst[0], "rel_l2": worst[1]}}
            continue
        present = {s.present_name: t for s, t in zip(specs, states)}
        hidden = dict(enumerate(hidden))
        del inputs, expected, states  # the windows drop what they have checked
        record["graphs"][entry.file] = _verify_windows(export_dir, entry.file, model, specs, feeds, logits, present, hidden, gate, parameter_bytes, progress)
    return record


def _label(first: int, last: int, num_layers: int) -> str:
    """``layers 3..5``, ``layers 30..31 + head``, ``head``."""
    if first == num_layers:
        return "head"
    return f"layers {first}..{min(last, num_layers - 1)}" + (" + head" if last == num_layers else "")


def _verify_windows(export_dir, file, model, specs, feeds, logits, present, hidden, gate, parameter_bytes, progress) -> dict[str, Any]:
    """``layers`` mode for one graph. The head is the last window (member ``L``), on its own when
    it is large: by then the expected states of the layers already verified have been dropped
    (this function owns ``present`` and ``hidden`` and empties them as it goes)."""
    full = onnx.load(str(export_dir / file), load_external_data=False)
    num_layers = model.config.num_layers
    try:
        stream = layer_window.residual_stream(full, num_layers)
    except layer_window.WindowError as e:
        raise ExportError(f"{file}: cannot verify by layer windows ({e.message})", fix="verify the whole graph with --verify full, or skip with --no-verify") from None
    member_bytes = _layer_bytes(full, num_layers)
    windows = window_plan(member_bytes, max(int(parameter_bytes * WINDOW_FRACTION), 1))
    hidden_type = _ONNX_TYPES[hidden[0].dtype]
    worst = ("", -1.0)
    with progress(f"verify {file} by layer windows", sum(member_bytes), "B") as advance:
        for first, last in windows:
            mine = [s for s in specs if first <= s.layer <= last]
            sub = layer_window.window(full, stream, first, last, [s.present_name for s in mine], hidden_type)
            path = export_dir / f".verify-{Path(file).stem}-{first}-{last}.onnx"
            onnx.save_model(sub, str(path))
            try:
                window_feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sub.graph.input}}
                if first > 0:
                    window_feeds[layer_window.HIDDEN_IN] = hidden[first - 1]
                got = _session(path).run(window_feeds)
            finally:
                path.unlink(missing_ok=True)
            head = {LOGITS: logits} if last == num_layers else {layer_window.HIDDEN_OUT: hidden[last]}
            want = {**head, **{s.present_name: present.pop(s.present_name) for s in mine}}
            label = _label(first, last, num_layers)
            name, err = gate.check(f"{file} {label}", got, want)
            if err > worst[1]:
                worst = (f"{name} ({label})", err)
            for k in range(first - 1, last):  # what later windows do not need (past states stay:
                # a window may read another layer's past state for a dynamic dim)
                hidden.pop(k, None)
            del got, want
            advance(sum(member_bytes[first : last + 1]))
    return {"worst": {"output": worst[0], "rel_l2": worst[1]}, "windows": [list(w) for w in windows]}


__all__ = ["FULL_GRAPH_MAX_BYTES", "VERIFY_MODES", "verify_export", "window_plan"]
