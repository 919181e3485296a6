"""Tracing without weights, writing weights from the checkpoint (DESIGN.md §6, export at scale).

How an initializer of the exported graph is derived from the checkpoint is read off the graph the
exporter itself produces, never from a hand-written per-layer table:

1. The reference module is built on fake tensors (no storage) and traced by
   ``torch.onnx.export(dynamo=True, optimize=False)``.
2. Every parameter gets a value for the exporter's optimizer (`ONNXProgram.apply_weights`):
   vectors and parameters of at most `FOLD_LIMIT` elements (the optimizer's constant-folding input
   limit) get their real values from the checkpoint — the optimizer folds them (``A =
   -exp(A_log)``, casts of norm weights …), deduplicates them by value, and its rewrite rules read
   some whatever their size (onnxscript removes a Conv bias that is all zeros), so they must be
   real. Larger ones get a stand-in: a tensor over an untouched anonymous mapping of the right
   size, which costs no memory. The optimizer folds large constants only into views (``Transpose``
   is the one op it folds whatever the size).
3. The optimizer runs, as ``optimize=True`` runs it, on a copy of the traced graph. If it read any
   stand-in (``mincore`` shows the pages it touched) its decisions may depend on the placeholder
   values: the read parameters get their real values and the optimizer runs again on a fresh copy.
   Each large initializer of the optimized graph is then a strided view of one stand-in: its
   offset, shape and strides (from the numpy array the optimizer built) are the recipe
   (`Deferred`) that reproduces it from the real parameter — the ``*.weight_t`` MatMul weights are
   transposes, the embedding is the parameter itself, and a stacked MoE expert weight would be
   whatever view the optimizer made of it.
4. Those initializers become placeholders (`hybridtrt.graphs.external_data.DEFERRED`), the usual
   graph passes run on the weight-less graph, and `DeferredTable.chunks` produces each recipe's
   bytes from the checkpoint (one parameter in memory, converted in slices, checked for NaN/Inf)
   when `write_external_data` writes it.

Steps 1 and 2 depend on the checkpoint's structure only (config, dtype, parameter names, shapes
and dtypes), never on its values: `FrozenTrace` keeps the traced program without values, and each
attempt of step 3 starts from a thawed copy of it instead of tracing again.

The result is byte-identical to tracing the loaded model (tests/exporter/test_streaming.py proves
it against `hybridtrt.exporter.eager`, the former code path, for every dtype and flag).
"""

from __future__ import annotations

import inspect
import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from hybridtrt.exporter.io import BATCH, DYNAMIC_CACHE, PAST, CacheFlavour, state_specs
from hybridtrt.graphs.external_data import (
    DEFERRED,
    deferred_key,
    deferred_tensor,
    is_deferred,
    same_as_file,
)
from hybridtrt.graphs.fp8_qdq import Quantize
from hybridtrt.graphs.quantized_types import onnx_type, packed_bytes
from hybridtrt.models.loading import Checkpoint, check_finite
from hybridtrt.models.model import HybridLM, meta_modules

#: Largest initializer (elements) the exporter's optimizer folds by value; larger ones are streamed.
FOLD_LIMIT: int = inspect.signature(onnxscript.optimizer.optimize_ir).parameters["input_size_limit"].default
#: Parameters with at most this many dims (biases, norm weights: small by nature) are always real,
#: as the optimizer's rewrite rules inspect some of them whatever their size.
REAL_MAX_DIMS = 1
#: Bytes converted at a time when a parameter is written (bounds the temporary copies).
CHUNK_BYTES = 16 << 20
#: Initializer names of parameters carry the wrapper's prefix (`GraphModule.model`).
PARAM_PREFIX = "model."
_FOLDED_FROM = onnxscript.optimizer.FOLDED_FROM_KEY


@dataclass(frozen=True)
class Deferred:
    """An initializer whose bytes are a strided view of one parameter, in the model dtype.

    Attributes:
        parameter: Our parameter name (``layers.0.mixer.in_proj.weight``).
        dtype: The initializer's dtype (the parameter's dtype in the model).
        shape / strides / offset: The view, in elements of the parameter (C-contiguous).
    """

    parameter: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    def view(self, stored: Tensor) -> Tensor:
        return stored.as_strided(self.shape, self.strides, self.offset)

    def tensor(self, checkpoint: Checkpoint) -> Tensor:
        """The whole initializer (contiguous, model dtype)."""
        return self.view(checkpoint.read(self.parameter)).contiguous()

    def strided(self, checkpoint: Checkpoint) -> Tensor:
        """The initializer's values as a view of the parameter read once (model dtype), not made
        contiguous: a transposed weight costs one copy of the parameter, not two. The 4-bit
        quantizers copy it a few rows at a time (`hybridtrt.graphs.weight_only.CHUNK_ELEMENTS`)."""
        return self.view(checkpoint.read(self.parameter))

    def chunks(self, checkpoint: Checkpoint) -> Iterator[np.ndarray]:
        """The initializer's bytes in slices along its first dim: the parameter is read once, each
        slice is converted, checked for NaN/Inf and made contiguous on its own. A
        stack of per-expert tensors whose view keeps the expert axis first is read one expert at a
        time (one layer's experts are several GB in the largest MoE models)."""
        source = checkpoint.parameters[self.parameter]
        if source.parts and self._per_expert(len(source.parts)):
            for part in source.parts:
                stored = checkpoint.read_tensor(part, source.dtype)
                yield from self._slices(stored.reshape(-1).as_strided(self.shape[1:], self.strides[1:], self.offset), part)
                del stored
            return
        # Read once: converted as it is read when that makes it smaller (`Checkpoint.read`), else as
        # stored and converted slice by slice (a bf16 checkpoint exported in fp32).
        narrows = checkpoint.narrows(self.parameter)
        yield from self._slices(self.view(checkpoint.read(self.parameter) if narrows else checkpoint.read_stored(self.parameter)), source.tensor)

    def is_whole_parameter(self, checkpoint: Checkpoint) -> bool:
        """Is the view the parameter itself, as stored (no transpose, slice or offset)?"""
        shape = tuple(checkpoint.parameters[self.parameter].shape)
        contiguous = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return self.offset == 0 and self.shape == shape and self.strides == contiguous

    def rows(self, checkpoint: Checkpoint) -> Iterator[Tensor]:
        """A whole-parameter view one row at a time (``[1, …]``, model dtype, checked): one expert
        of a stack at a time, never the whole stack (`Checkpoint.read_rows`)."""
        for row in range(self.shape[0]):
            yield checkpoint.read_rows(self.parameter, row, row + 1)

    def _per_expert(self, experts: int) -> bool:
        """Is expert ``e``'s part of the view the same view of expert ``e``'s own tensor?"""
        if len(self.shape) < 2 or self.shape[0] != experts:
            return False
        per = self.strides[0]
        reach = self.offset + sum((n - 1) * st for n, st in zip(self.shape[1:], self.strides[1:]))
        return per * experts == math.prod(self.shape) and 0 <= self.offset and reach < per

    def _slices(self, view: Tensor, name: str) -> Iterator[np.ndarray]:
        if view.dim() == 0:
            view = view.reshape(1)
        row_bytes = max(1, view[0].numel() * torch.empty((), dtype=self.dtype).element_size())
        step = max(1, CHUNK_BYTES // row_bytes)
        for i in range(0, view.shape[0], step):
            part = view[i : i + step]
            out = part.to(self.dtype).contiguous()
            check_finite(out, name, part)
            yield out.reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True, eq=False)
class DeferredFP8:
    """The quantized initializer of a weight (FP8, or 4-bit packed two a byte: `hybridtrt.graphs.
    weight_only`): ``quantize`` (`hybridtrt.graphs.fp8_qdq.Quantize`) of a `Deferred` weight's values. Equal when the weight and the quantization (function and bound
    arguments of the ``functools.partial``) are."""

    weight: Deferred
    quantize: Quantize

    def _identity(self) -> tuple:
        q = self.quantize
        if isinstance(q, partial):
            return (self.weight, q.func, q.args, tuple(sorted(q.keywords.items())))
        return (self.weight, q)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeferredFP8) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def chunks(self, checkpoint: Checkpoint) -> Iterator[np.ndarray]:
        """The FP8 bytes; a stack of experts ``[E, out, in]`` one expert at a time (each expert's
        scales are its own, so quantizing expert by expert gives the same bytes)."""
        if per_expert(self.weight, checkpoint):
            for e, expert in enumerate(self.weight.rows(checkpoint)):
                yield self.quantize(_numpy(expert), first=e)[0].view(np.uint8).reshape(-1)
            return
        w_q, _ = self.quantize(_numpy(self.weight.strided(checkpoint)))
        yield packed_bytes(w_q)


def per_expert(weight: Deferred, checkpoint: Checkpoint) -> bool:
    """Is ``weight`` a stack of routed experts ``[E, out, in]`` as stored, quantized expert by expert?"""
    return len(weight.shape) == 3 and weight.is_whole_parameter(checkpoint)


def _numpy(t: Tensor) -> np.ndarray:
    """A numpy view with ml_dtypes for bf16 (as the exporter's tensors have)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class DeferredTable:
    """The recipes of one export's placeholders, keyed by the placeholder's location.

    Equal recipes get the same key, so the unified and the decode graph's placeholders for the same
    bytes carry the same key.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._keys: dict[Deferred | DeferredFP8, str] = {}
        self._recipes: dict[str, Deferred | DeferredFP8] = {}

    def key(self, recipe: Deferred | DeferredFP8) -> str:
        if recipe not in self._keys:
            key = str(len(self._keys))
            self._keys[recipe] = key
            self._recipes[key] = recipe
        return self._keys[recipe]

    def recipe(self, t: onnx.TensorProto) -> Deferred | DeferredFP8:
        return self._recipes[deferred_key(t)]

    def chunks(self, t: onnx.TensorProto) -> Iterator[np.ndarray]:
        """`hybridtrt.graphs.external_data.Chunks` for this table's placeholders."""
        return self.recipe(t).chunks(self.checkpoint)

    def same(self, t: onnx.TensorProto, path: Path, offset: int, length: int, written: dict[str, str]) -> bool:
        """Whether ``t`` (inline or placeholder) equals ``length`` bytes of ``path`` at ``offset``.

        ``written`` maps the tensors written there from placeholders to their keys: an equal key
        means equal bytes without reading anything.
        """
        if is_deferred(t):
            if written.get(t.name) == deferred_key(t):
                return True
            return same_as_file(self.chunks(t), path, offset, length)
        return same_as_file([t.raw_data], path, offset, length)

    def quantizer(self):
        """`hybridtrt.graphs.fp8_qdq.WeightQuantizer` for placeholders: the scale is computed now
        (one weight read), the FP8 bytes when the file is written (read again); a stack of routed
        experts is read one expert at a time both times."""
        from hybridtrt.graphs.fp8_qdq import in_memory_quantizer

        in_memory = in_memory_quantizer()

        def quantizer(w: onnx.TensorProto, fp8_name: str, quantize: Quantize) -> tuple[onnx.TensorProto, np.ndarray]:
            if not is_deferred(w):
                return in_memory(w, fp8_name, quantize)
            recipe = self.recipe(w)
            if not isinstance(recipe, Deferred):
                raise RuntimeError(f"{w.name} is already quantized ({recipe})")
            dims = list(w.dims)
            if per_expert(recipe, self.checkpoint):  # one expert at a time, never the whole stack
                scales = []
                for e, expert in enumerate(recipe.rows(self.checkpoint)):
                    w_q, s = quantize(_numpy(expert), first=e)
                    scales.append(s)
                    elem_type, dims = onnx_type(w_q.dtype), [w.dims[0], *w_q.shape[1:]]  # FP8 [E, out, in]; NVFP4 codes [E, out, in/2]
                    del w_q
                scale = np.concatenate(scales)
            else:
                w_q, scale = quantize(_numpy(recipe.strided(self.checkpoint)))
                elem_type = onnx_type(w_q.dtype)
                del w_q
            key = self.key(DeferredFP8(recipe, quantize))
            return deferred_tensor(fp8_name, elem_type, dims, key), scale

        return quantizer


def fake_model(checkpoint: Checkpoint) -> HybridLM:
    """The reference module with fake parameters (shapes and dtypes, no storage)."""
    with meta_modules():
        model = HybridLM(checkpoint.config).to(checkpoint.dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = {name: torch.empty(p.shape, dtype=p.dtype) for name, p in checkpoint.parameters.items()}
    model.load_state_dict(fake, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def trace_inputs(
    model: HybridLM, *, seq: int, state_dtype: torch.dtype, batch: int = 2, past: int = 3, seed: int = 0, flavour: CacheFlavour = DYNAMIC_CACHE
) -> tuple[Tensor, ...]:
    """Example inputs for tracing, without running the model: the ids and position inputs of
    `hybridtrt.exporter.wrapper.example_inputs` and zero states of its shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if past:
        torch.randint(0, vocab, (batch, past), generator=gen)  # consumed by example_inputs' prefill
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if flavour.static:
        positions: tuple[Tensor, ...] = (torch.full((batch,), past, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))
    else:
        positions = (torch.ones(batch, past + seq, dtype=torch.int64),)
    states = []
    for spec in state_specs(model.config, flavour):
        shape = tuple(batch if d == BATCH else past if d == PAST else d for d in spec.shape)
        states.append(torch.zeros(shape, dtype=state_dtype if spec.dtype == "state" else model.dtype))
    return (ids, *positions, *states)


class StandIns:
    """Stand-ins for large parameters (untouched anonymous memory: no RSS until read), which of
    them were read, and the views the optimizer made of them."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []
        self._ranges: list[tuple[int, int, str, torch.dtype]] = []  # (start, end, parameter, dtype)

    def make(self, parameter: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * itemsize)
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        self._maps.append(mm)
        self._ranges.append((t.data_ptr(), t.data_ptr() + nbytes, parameter, dtype))
        return t.view(dtype).reshape(shape)

    def read(self) -> set[str]:
        """Parameters whose stand-in has a page mapped in, i.e. that something has read."""
        return {parameter for start, end, parameter, _ in self._ranges if _pages_in(start, end - start)}

    def recipe(self, array: np.ndarray) -> Deferred | None:
        """The `Deferred` view that ``array`` is of a stand-in, or None when it is not one."""
        ptr = array.__array_interface__["data"][0]
        for start, end, parameter, dtype in self._ranges:
            if start <= ptr < end:
                itemsize = array.dtype.itemsize
                if any(s % itemsize for s in array.strides) or (ptr - start) % itemsize:
                    raise RuntimeError(f"{parameter}: the optimizer made a view that is not element-aligned")
                return Deferred(parameter, dtype, tuple(array.shape), tuple(s // itemsize for s in array.strides), (ptr - start) // itemsize)
        return None


def _pages_in(address: int, length: int) -> bool:
    """Whether any page of ``[address, address + length)`` is mapped in (``mincore``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed on a stand-in")
    return any(v & 1 for v in vec)


def attach_weights(program, checkpoint: Checkpoint, stand_ins: StandIns, real: set[str] = frozenset()) -> set[str]:
    """Give the traced program's parameters values for the optimizer: real for vectors, up to
    `FOLD_LIMIT` elements and for ``real``; stand-ins otherwise. Returns the initializer names that
    got stand-ins."""
    values: dict[str, Tensor] = {}
    large: set[str] = set()
    for name in list(program.model.graph.initializers):
        parameter = name.removeprefix(PARAM_PREFIX)
        if not name.startswith(PARAM_PREFIX) or parameter not in checkpoint.parameters:
            raise RuntimeError(f"traced initializer {name!r} is not a parameter of the model")
        source = checkpoint.parameters[parameter]
        if source.numel <= FOLD_LIMIT or len(source.shape) <= REAL_MAX_DIMS or parameter in real:
            values[name] = checkpoint.read(parameter)
        else:
            values[name] = stand_ins.make(parameter, source.shape, source.dtype)
            large.add(name)
    program.apply_weights(values)
    return large


class FrozenTrace:
    """A traced, unoptimized program without its parameter values, to thaw as often as needed.

    The graph is kept serialized, each initializer a shape-only placeholder (the fake tensors of
    the trace have no values; `attach_weights` gives every one of them a value). With it are kept
    the main graph's name counters and the names they have handed out, which the optimizer draws
    the names of the constants it creates from: a thawed program is in the state the traced one
    was, and optimizes to the same bytes (tests/exporter/test_trace_cache.py).
    """

    _UNBOUND = "hybridtrt-unbound-parameter"

    def __init__(self, program: Any) -> None:
        graph = program.model.graph
        values = {name: v.const_value for name, v in graph.initializers.items()}
        try:
            for name, v in graph.initializers.items():
                t = values[name]
                v.const_value = ir.ExternalTensor(self._UNBOUND, None, None, dtype=t.dtype, shape=t.shape, name=name)
            self.data = ir.serde.serialize_model(program.model).SerializeToString()
        finally:
            for name, v in graph.initializers.items():
                v.const_value = values[name]
        authority = graph._name_authority
        self.names = (authority._value_counter, authority._node_counter, frozenset(authority._value_names), frozenset(authority._node_names))

    def stitched(self, proto: Any, target: Any, spec: Any) -> FrozenTrace:
        """This trace of a prototype (`hybridtrt.exporter.stitch`) copied out to the whole model
        ``target``: the graph of `hybridtrt.exporter.stitch.stitch`, the name counters of this
        trace, and every name the copies use.

        Raises:
            hybridtrt.exporter.stitch.CannotStitch: The prototype's graph cannot be copied.
        """
        from hybridtrt.exporter.stitch import stitch

        model = stitch(onnx.ModelProto.FromString(self.data), proto, target, spec)
        g = model.graph
        values = {v.name for v in (*g.input, *g.output, *g.value_info)} | {t.name for t in g.initializer}
        values |= {o for node in g.node for o in node.output if o}
        out = object.__new__(FrozenTrace)
        out.data = model.SerializeToString()
        out.names = (self.names[0], self.names[1], frozenset(values), frozenset(node.name for node in g.node))
        return out

    def thaw(self) -> Any:
        """A fresh ``ONNXProgram`` (no exported program behind it) equal to the traced one."""
        from torch.onnx._internal.exporter._onnx_program import ONNXProgram

        model = ir.serde.deserialize_model(onnx.ModelProto.FromString(self.data))
        authority = model.graph._name_authority
        authority._value_counter, authority._node_counter = self.names[0], self.names[1]
        authority._value_names |= self.names[2]
        authority._node_names |= self.names[3]
        return ONNXProgram(model, None)


def trace_and_optimize(frozen: FrozenTrace, checkpoint: Checkpoint, optimize_fn: Callable[[Any], None]):
    """Attach values to a thawed copy of the unoptimized trace and run ``optimize_fn(program)``; if
    the optimizer read a stand-in, thaw another copy and give the parameters it read their real
    values, until it reads none.

    Returns:
        ``(program, stand_ins, large)``: the optimized program, its stand-ins, and the initializer
        names that got them (for `defer_large_initializers`).
    """
    real: set[str] = set()
    while True:
        program = frozen.thaw()
        stand_ins = StandIns()
        large = attach_weights(program, checkpoint, stand_ins, real)
        optimize_fn(program)
        read = stand_ins.read()
        if not read:
            return program, stand_ins, large
        real |= read


def defer_large_initializers(program, table: DeferredTable, stand_ins: StandIns, large: set[str]) -> None:
    """Replace every initializer that is a view of a stand-in by a placeholder carrying its recipe.

    Raises:
        RuntimeError: An initializer was computed (not viewed) from a large parameter — the
            optimizer did something this module does not know how to stream.
    """
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        recipe = stand_ins.recipe(tensor.numpy()) if tensor.size > FOLD_LIMIT or value.name in large else None
        if recipe is None:
            folded = set(value.meta.get(_FOLDED_FROM, set()))
            if folded & large:
                raise RuntimeError(f"initializer {value.name} was computed from streamed parameter(s) {sorted(folded & large)}")
            continue
        # As onnx_ir.save externalizes a tensor (name kept, tensor metadata dropped).
        value.const_value = ir.ExternalTensor(DEFERRED + table.key(recipe), None, None, tensor.dtype, shape=tensor.shape, name=tensor.name)


__all__ = [
    "CHUNK_BYTES",
    "FOLD_LIMIT",
    "Deferred",
    "DeferredFP8",
    "DeferredTable",
    "FrozenTrace",
    "StandIns",
    "attach_weights",
    "defer_large_initializers",
    "trace_and_optimize",
    "fake_model",
    "trace_inputs",
]
