"""ONNX Runtime backend: runs an export directory with the same `generate` API as the reference.

Both KV-cache flavours (DESIGN.md §6) run here. A dynamic-cache state is a value (a dict of
arrays; each call returns new ones). A static-cache state (`StaticState`) is one buffer per state,
bound to the graph as input *and* output through ONNX Runtime's I/O binding, so ``TensorScatter``
writes the new KV positions in place and the conv/SSM states are overwritten where they lie: a
state passed to `OrtModel.step` is consumed (take a `Snapshot` to keep one).
"""

from __future__ import annotations

import math
import mmap
import weakref
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.io import ATTENTION_MASK, CACHE_POSITION, HIDDEN_STATES, INPUT_IDS, LOGITS, MTP_HIDDEN_OUT, PADDING_LENGTH
from hybridtrt.exporter.manifest import Manifest, check_rank, read_manifest, refuse_alone
from hybridtrt.graphs.held_routing import ROUTED_EXPERTS, held_feeds, hold_routing, routed_ids
from hybridtrt.models.moe import RoutingHold
from hybridtrt.runtime.generation import GenerationResult, SamplingConfig, generate, iter_generate
from hybridtrt.runtime.speculative import growing_cache_positions, merge_rows
from hybridtrt.runtime.snapshot import Snapshot
from hybridtrt.runtime.states import StateBuffer, StatePlan, StaticState, physical_memory_bytes, static_positions

#: Bytes a prefill call holds per attention score: ONNX Runtime 1.32's CPU ``Attention`` kernel
#: materializes the ``[B, H, L, T]`` fp32 scores and a second buffer of the same size (measured:
#: 8.1 B per score at L = 2,048, T = 16,384 on small-nemotron-h; README "Long context").
SCORE_BYTES = 8
#: Default memory for the attention scores of one prefill call: calls are shortened to fit it.
DEFAULT_ATTENTION_BUDGET = 1 << 30


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (bf16 included, via ml_dtypes) or array-like -> numpy."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy (bf16 included) -> a CPU torch tensor that owns a copy."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


class SharedWeights:
    """The external initializers of one export directory, memory-mapped once per process and handed
    to every session over them.

    ONNX Runtime loads (or maps) an external-data file for each session and, on CPU, pre-packs every
    MatMul weight into a second buffer of its own; the unified and decode graphs of one export then
    held the weights 1.6× over after load (small-nemotron-h: +569 MiB for 353 MiB of fp32 weights).
    ``SessionOptions.add_initializer`` makes a session use the caller's buffer instead ("useful when
    you want to share the same initializer across sessions": onnxruntime_c_api.h, ``AddInitializer``),
    so both graphs read one read-only mapping of ``weights.data``, and pre-packing is off for such
    sessions (it would copy them again). Measured on small-nemotron-h (``benchmarks/runtime_memory.py``,
    README "Benchmarks (CPU)"): peak RSS 1.19× the weight file instead of 1.97×, prefill 1.14× slower.

    Tensors are shared when they are plain files in the directory, aligned for their dtype, and of a
    dtype numpy holds natively; anything else is left to ONNX Runtime (which refuses what is wrong).
    """

    #: ONNX element types numpy holds natively, by ``TensorProto`` name (bf16 and FP8 are ml_dtypes
    #: types, which ``OrtValue.ortvalue_from_numpy`` does not take).
    _NUMPY = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
    #: ``{export directory: SharedWeights}`` while a session over it lives.
    _open: weakref.WeakValueDictionary[Path, SharedWeights] = weakref.WeakValueDictionary()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[tuple, np.ndarray] = {}
        self._values: dict[tuple, Any] = {}
        self._widened: dict[tuple, np.ndarray] = {}

    @classmethod
    def of(cls, folder: str | Path) -> SharedWeights:
        """The process's `SharedWeights` of ``folder`` (one while any session over it lives)."""
        key = Path(folder).resolve()
        shared = cls._open.get(key)
        if shared is None:
            shared = cls._open[key] = cls(key)
        return shared

    def values(self, graph, widen: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """``{initializer name: OrtValue}`` over the mapped files for ``graph``'s external tensors.

        bf16 tensors named in ``widen`` are given as their exact fp32 widening, made once per
        process (`hybridtrt.graphs.bf16_emulation.fp32_reads`: what the bf16 rewrites read in
        fp32); other bf16 tensors as bf16 over the mapping (embedding tables, gathered in bf16).
        """
        import onnxruntime as ort
        from onnx import TensorProto
        from onnx.external_data_helper import uses_external_data

        from hybridtrt.graphs.external_data import external_info

        out: dict[str, Any] = {}
        for t in graph.graph.initializer:
            bf16 = t.data_type == TensorProto.BFLOAT16
            dtype = np.uint16 if bf16 else self._NUMPY.get(TensorProto.DataType.Name(t.data_type))
            if dtype is None or not uses_external_data(t):
                continue
            location, offset, length = external_info(t)
            file, mapped = self._map(location)
            itemsize = np.dtype(dtype).itemsize
            count = math.prod(t.dims)
            if mapped is None or length not in (-1, count * itemsize) or offset % itemsize or offset + count * itemsize > mapped.size:
                continue
            widened = bf16 and t.name in widen
            key = (file, offset, t.data_type, tuple(t.dims), widened)
            if key not in self._values:
                array = mapped[offset : offset + count * itemsize].view(dtype).reshape(tuple(t.dims))
                if widened:  # bf16 is the top half of an fp32: exact
                    array = self._widened[key] = (array.astype(np.uint32) << 16).view(np.float32)  # kept alive here
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                    self._drop_pages(file, offset, count * itemsize)  # read once: not beside its widening
                elif bf16:
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, TensorProto.BFLOAT16)
                else:
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            out[t.name] = self._values[key]
        return out

    def _drop_pages(self, file: tuple, offset: int, nbytes: int) -> None:
        """Let the kernel drop bytes ``offset:offset + nbytes`` of a mapping from this process (a
        read-only file mapping: pages read again from the page cache if touched again)."""
        mapping = getattr(self._maps[file], "_mmap", None)
        if mapping is None or not nbytes:
            return
        start = offset - offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, min(offset + nbytes, len(mapping)) - start)

    def _map(self, location: str) -> tuple[tuple, np.ndarray | None]:
        """``(file identity, read-only mapping)`` of ``location``; no mapping for anything but a
        plain file of this directory (ONNX Runtime then decides)."""
        path = self.folder / location
        if Path(location).name != location or not path.is_file():
            return (location,), None
        stat = path.stat()
        key = (location, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a republished file is another mapping
        if key not in self._maps:
            self._maps[key] = np.memmap(path, dtype=np.uint8, mode="r") if stat.st_size else np.zeros(0, np.uint8)
        return key, self._maps[key]


#: ONNX Runtime's session config key that turns its QDQ fusions off
#: (onnxruntime_session_options_config_keys.h, ``kOrtSessionOptionsDisableQuantQDQ``).
QDQ_FUSION = "session.disable_quant_qdq"


def graph_has_int4(graph) -> bool:
    """Does the graph hold int4 weights (`hybridtrt.graphs.weight_only`)?"""
    from onnx import TensorProto

    return any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in graph.graph.initializer)


#: How a CPU session runs a bf16 graph (ONNX Runtime's CPU provider has no bf16 kernels):
#: ``emulate``: as a bf16 executor computes it, every bf16 tensor rounded where it is produced
#: (`hybridtrt.graphs.bf16_emulation.emulate_bf16`; what validation and export verification judge);
#: ``fp32``: fp32 inference of the bf16 weights (`widen_bf16`), as fast as an fp32 export.
BF16_MODES = ("emulate", "fp32")


class OrtSession:
    """A CPU ``InferenceSession`` that takes and returns dicts by name.

    ONNX Runtime's CPU provider has no bf16 kernels: a bf16 graph runs through
    `hybridtrt.graphs.bf16_emulation`, by default emulated (fp32 compute, every bf16 tensor rounded to
    bf16 where it is produced; ``emulated_bf16`` is True), or with ``bf16="fp32"`` computed in fp32
    from the bf16 weights (``widened_bf16``). Feeds in bf16 are widened exactly.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        config: dict[str, str] | None = None,
        share_weights: bool = True,
        bf16: str = "emulate",
        arena: bool = True,
    ) -> None:
        import onnx

        if not Path(path).is_file():
            raise ArtefactError(f"{path} does not exist", fix="export first with `hybridtrt export`")
        graph = onnx.load(str(path), load_external_data=False)
        self._open(graph, Path(path).resolve().parent, threads=threads, config=config, path=Path(path), share_weights=share_weights, bf16=bf16, arena=arena)

    @classmethod
    def from_proto(
        cls,
        graph,
        folder: str | Path,
        *,
        threads: int | None = None,
        config: dict[str, str] | None = None,
        share_weights: bool = True,
        bf16: str = "emulate",
        arena: bool = True,
    ) -> OrtSession:
        """A session over an in-memory graph (no weights in it) whose external data is in ``folder``.

        ONNX Runtime refuses external data outside the model's own directory (symlinks included), so
        a modified copy of an export's graph is handed over as bytes with ``folder`` as the
        external-data directory instead of being written elsewhere.
        """
        session = cls.__new__(cls)
        session._open(graph, Path(folder), threads=threads, config=config, share_weights=share_weights, bf16=bf16, arena=arena)
        return session

    def variant(self, transform) -> OrtSession:
        """A session over ``transform(graph)`` of this session's graph, same weights and options."""
        return OrtSession.from_proto(
            transform(self.graph), self.folder, threads=self._threads, config=self._config, share_weights=self._share_weights, bf16=self._bf16, arena=self.arena
        )

    def _open(
        self,
        graph,
        folder: Path,
        *,
        threads: int | None,
        config: dict[str, str] | None,
        path: Path | None = None,
        share_weights: bool = True,
        bf16: str = "emulate",
        arena: bool = True,
    ) -> None:
        """Create the session over ``graph`` (weights not loaded) whose external data is in
        ``folder``: from ``path`` when it is that file unchanged, else as bytes (bf16 graphs are
        rewritten by the emulation pass, which reads no weights). ``share_weights``: read the
        external tensors from the process's one mapping of them (`SharedWeights`), not pre-packed,
        unless ``config`` turns pre-packing back on (then ONNX Runtime packs its own copies).
        ``arena``: ONNX Runtime's CPU memory arena (off, every tensor is allocated on its own:
        small-nemotron-h's prefill 1.03-1.08× slower, a decode step on the unified graph 1.34×)."""
        import onnxruntime as ort

        from hybridtrt.graphs.bf16_emulation import WEIGHT_SUFFIX, emulate_bf16, fp32_reads, graph_has_bf16, widen_bf16
        from hybridtrt.graphs.fp4_emulation import emulate_fp4, graph_has_fp4

        if bf16 not in BF16_MODES:
            raise InputError(f"bf16={bf16!r} is not a way to run bf16 graphs", fix=f"pass one of {', '.join(BF16_MODES)}")

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Idle ORT threads otherwise spin and starve PyTorch's OpenMP threads in the same process
        # (validation runs both side by side): measured 30x slower reference calls on 2 cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in (config or {}).items():  # further session config entries
            opts.add_session_config_entry(key, value)
        if threads:
            opts.intra_op_num_threads = threads
        self.arena = opts.enable_cpu_mem_arena = arena
        self.graph, self.folder, self._threads, self._config, self._share_weights, self._bf16 = graph, folder, threads, config, share_weights, bf16
        fp4 = graph_has_fp4(graph)
        if fp4:  # no float4e2m1 DequantizeLinear on the CPU provider: emulated bit for bit
            graph = emulate_fp4(graph)
        if QDQ_FUSION not in (config or {}) and graph_has_int4(graph):
            # ONNX Runtime fuses int4 DequantizeLinear + MatMul into MatMulNBits, which with pre-packed
            # weights rounds the activations to int8 (5.8e-3 rel L2 on a [3, 256] x [256, 64] product,
            # measured: tests/graphs/test_weight_only.py); the exact path computes what the graph says.
            opts.add_session_config_entry(QDQ_FUSION, "1")
        has_bf16 = graph_has_bf16(graph)
        self.emulated_bf16 = has_bf16 and bf16 == "emulate"
        self.widened_bf16 = has_bf16 and bf16 == "fp32"
        self.weights = SharedWeights.of(folder) if share_weights else None
        supplied: set[str] = set()
        if self.weights is not None:
            if "session.disable_prepacking" not in (config or {}):
                opts.add_session_config_entry("session.disable_prepacking", "1")
            # bf16 weights read in fp32 are shared widened (one fp32 copy for every session of the
            # process); ONNX Runtime would otherwise fold each session's widening Casts into its own.
            widen = fp32_reads(graph) if has_bf16 else set()
            # A DequantizeLinear's bf16 scale stays a Cast of the stored tensor: ONNX Runtime folds
            # constant DequantizeLinear nodes from the graph's own initializers, not supplied values.
            widen -= {name for node in graph.graph.node if node.op_type == "DequantizeLinear" for name in node.input[1:]}
            for name, value in self.weights.values(graph, widen).items():
                bf16_kept = has_bf16 and value.data_type() == "tensor(bfloat16)"
                if name in widen:
                    supplied.add(name)
                opts.add_initializer(name + WEIGHT_SUFFIX if bf16_kept else name, value)  # the rewrite renames kept bf16 weights
        if has_bf16 or fp4 or path is None:  # bytes have no directory of their own
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            if has_bf16:
                graph = (emulate_bf16 if self.emulated_bf16 else widen_bf16)(graph, supplied)
            source: str | bytes = graph.SerializeToString()
        else:
            source = str(path)
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._outputs = self.session.get_outputs()
        self.output_names = [o.name for o in self._outputs]

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None, *, shrink_arena: bool = False) -> dict[str, np.ndarray]:
        """One run. ``shrink_arena``: hand the memory of this run back afterwards (see `_run_options`)."""
        arrays = {k: to_numpy(v) for k, v in feeds.items() if k in self.input_names}
        if self.emulated_bf16 or self.widened_bf16:
            arrays = {k: a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a for k, a in arrays.items()}
        names = outputs or self.output_names
        if shrink_arena and self.arena:
            shapes = self._output_shapes(arrays, names)
            if shapes is not None:
                return self._run_into(arrays, shapes)
        return dict(zip(names, self.session.run(names, arrays, _run_options(shrink_arena and self.arena))))

    def _output_shapes(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
        """Each output's shape and dtype for these feeds, from the graph's named dims (``batch``,
        ``seq``, ``past``, ``past+seq``: `hybridtrt.exporter.io`); None when one cannot be known."""
        ids, mask = feeds.get(INPUT_IDS), feeds.get(ATTENTION_MASK)
        if ids is None:
            return None
        b, l = ids.shape
        dims = {"batch": b, "seq": l}
        if mask is not None:  # the dynamic cache's past (a static cache's outputs are its inputs)
            dims.update({"past": mask.shape[1] - l, "past+seq": mask.shape[1]})
        out = {}
        for meta in self._outputs:
            if meta.name not in names:
                continue
            dtype = _NUMPY_OF.get(meta.type)
            shape = tuple(d if isinstance(d, int) else dims.get(d) for d in meta.shape)
            if dtype is None or None in shape:
                return None
            out[meta.name] = (shape, dtype)
        return out

    def _run_into(self, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """Run with every output written into a numpy array of its own, then return the arena.

        Outputs ONNX Runtime allocates live in its arena, and a region holding one cannot be handed
        back: the previous call's KV (the next call's input) kept a score-sized region of the last
        call alive, and a long prompt's peak grew by it (16k tokens: 2.48 GiB against 1.93 at 8k).
        """
        binding = self.session.io_binding()
        inputs = {name: np.ascontiguousarray(array) for name, array in arrays.items()}  # alive until the run ends
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        return self._run_bound(binding, shapes)

    def _run_bound(self, binding, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """Run ``binding`` (inputs bound) with the ``shapes`` outputs written into new arrays of
        their own, then hand the arena back; returns those arrays."""
        got = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
        for name, array in got.items():
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding, _run_options(True))
        return got

    def run_in_place(self, feeds: dict[str, np.ndarray], aliases: dict[str, str], *, shrink_arena: bool = False) -> dict[str, np.ndarray]:
        """Run with every ``aliases`` output written into its input's buffer (I/O binding).

        Args:
            feeds: ``{input_name: contiguous array}``.
            aliases: ``{output_name: input_name}``; the output is bound to the input's memory.

        Returns:
            ``{output_name: array}`` of the other outputs (the aliased ones are the input arrays).
        """
        if self.emulated_bf16 or self.widened_bf16:  # the rewritten graph holds fp32 where the caller's buffers are bf16
            got = self.run(feeds, shrink_arena=shrink_arena)
            for out, inp in aliases.items():
                feeds[inp][...] = got.pop(out).astype(feeds[inp].dtype)
            return got
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for out, inp in aliases.items():
            a = feeds[inp]
            binding.bind_output(out, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        others = [n for n in self.output_names if n not in aliases]
        shapes = self._output_shapes(feeds, others) if shrink_arena and self.arena else None
        if shapes is not None:  # outside the arena, so that the run can hand all of it back (`_run_into`)
            return self._run_bound(binding, shapes)
        for name in others:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding, _run_options(shrink_arena and self.arena))
        got = binding.get_outputs()[len(aliases) :]
        return {name: value.numpy() for name, value in zip(others, got)}


class OrtModel:
    """An exported model on ONNX Runtime (CPU). Implements the `Stepper` protocol.

    Args:
        export_dir: Directory written by ``hybridtrt export``.
        use_decode_graph: Run one-token steps on ``decode.onnx`` when the export has one.
        threads: Intra-op threads (default: ONNX Runtime's).
        attention_budget: Bytes the attention scores of one prefill call may hold; longer calls are
            split (`max_prefill_tokens`), so a long prompt's peak memory is bounded by this, not by
            its length.
        prepack: ONNX Runtime's own loading: each session reads the weights and pre-packs its
            MatMul weights (prefill 1.14× faster, 1.66× the peak memory: README "Benchmarks (CPU)");
            by default both graphs read one memory-mapped copy (`SharedWeights`).
        bf16: How a bf16 export runs (`BF16_MODES`): ``"fp32"`` (default) computes in fp32 from its
            bf16 weights, as fast as an fp32 export; ``"emulate"`` rounds every bf16 tensor as a
            bf16 executor (TensorRT) does, 1.3-1.4× slower on CPU, which is what validation judges.
        communicator: This process's end of the collectives when ``export_dir`` is one rank of an
            ``export --tp N`` (`hybridtrt.runtime.communicators.GlooCommunicator`; the N processes are
            started by `hybridtrt.runtime.tensor_parallel.TensorParallelModel`): its graphs then run cut at
            their collectives (`hybridtrt.runtime.rank_emulator.CollectiveSession`). Without one, a rank
            directory is refused.

    Raises:
        ArtefactError: Not an export; a rank directory without a communicator, or with another rank's or
            world's.
        InputError: ``bf16`` is not one of `BF16_MODES`.
    """

    backend = "onnxruntime"
    #: Set by validation (`hybridtrt.validation.subjects.ort_subject`) after `use_routing_graphs`:
    #: every call records its MoE routing here and, when the hold has ids, is held to them.
    routing: RoutingHold | None = None

    def __init__(
        self,
        export_dir: str | Path,
        *,
        use_decode_graph: bool = True,
        threads: int | None = None,
        attention_budget: int = DEFAULT_ATTENTION_BUDGET,
        prepack: bool = False,
        bf16: str = "fp32",
        communicator: Any = None,
    ) -> None:
        self.export_dir = Path(export_dir)
        self._threads, self._bf16 = threads, bf16
        self.manifest: Manifest = read_manifest(self.export_dir)
        if communicator is None:
            refuse_alone(self.export_dir, self.manifest)
        else:
            check_rank(self.export_dir, self.manifest.tensor_parallel, communicator.rank, communicator.world)
        self.flavour = self.manifest.cache_flavour
        self.plan = StatePlan.from_manifest(self.manifest)
        self.attention_budget = attention_budget
        has_attention = any(b.is_kv for b in self.plan.buffers)
        self._heads = int(self.manifest.model.get("num_attention_heads") or 0) if has_attention else 0
        share = not prepack  # pre-packing copies every weight anyway: then ONNX Runtime loads its own
        if communicator is not None:
            from hybridtrt.runtime.rank_emulator import CollectiveSession

            def session(name: str) -> Any:
                return CollectiveSession(self.export_dir / self.manifest.graphs[name].file, communicator, threads=threads, bf16=bf16)
        else:

            def session(name: str) -> Any:
                return OrtSession(self.export_dir / self.manifest.graphs[name].file, threads=threads, share_weights=share, bf16=bf16)

        self.unified = session("unified")
        self.decode = session("decode") if use_decode_graph and "decode" in self.manifest.graphs else None
        self.moe_layers = [int(entry["index"]) for entry in self.manifest.layers if entry.get("kind") == "moe"]
        self.routing_graphs = False

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.model["vocab_size"])

    # -- Stepper --------------------------------------------------------------------------------
    def zero_state(self, batch: int) -> dict[str, np.ndarray] | StaticState:
        zeros = self.plan.zeros(batch)
        return StaticState(zeros) if self.flavour.static else zeros

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any, decode: bool):
        session = self.decode if (decode and self.decode is not None and input_ids.shape[1] == 1) else self.unified
        out = self.run(input_ids, attention_mask, state, session=session, shrink_arena=input_ids.shape[1] > 1)
        logits = out[LOGITS]
        if logits.ndim == 3:
            logits = logits[:, -1]
        logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if self.flavour.static:
            return logits, StaticState(self.plan.feed_back(out), int(attention_mask.shape[1]))
        return logits, self.plan.feed_back(out)

    # -- speculation (`hybridtrt.runtime.speculative.Verifier`) ------------------------------------
    def cannot_verify(self) -> str | None:
        """Why this export cannot verify drafts (None when it can)."""
        if self.manifest.logits != "all":
            return f"its unified graph returns the logits of the last position only (logits={self.manifest.logits!r}); a verify call needs every position's"
        return None

    def verify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, np.ndarray]]:
        """Every position's logits ``[B, L, V]``, the final hidden states ``[B, L, hidden]`` (None
        unless the export has them: ``--speculative``) and the new state, on the unified graph;
        ``state`` is left as it was."""
        why = self.cannot_verify()
        if why is not None:
            raise InputError(f"{self.export_dir}: {why}", fix="re-export with `hybridtrt export … --speculative` (or --logits all; dynamic KV cache) to speculate on ONNX Runtime")
        if self.flavour.static:
            # The call writes in place: give it copies of the conv/SSM states (O(1) in the context) so
            # that ``state`` stays what it was; both share the KV buffers, where the call writes only
            # past each row's position (no query of ``state`` reads there: DESIGN.md §11).
            fresh = {b.past_name: state.arrays[b.past_name] if b.is_kv else state.arrays[b.past_name].copy() for b in self.plan.buffers}
            state = StaticState(fresh, state.past)
        out = self.run(input_ids, attention_mask, state, session=self.unified, shrink_arena=input_ids.shape[1] > 1)
        hidden = to_torch(out[HIDDEN_STATES]) if HIDDEN_STATES in out else None
        logits = torch.from_numpy(np.asarray(out[LOGITS], dtype=np.float32))
        if self.flavour.static:
            return logits, hidden, StaticState(self.plan.feed_back(out), int(attention_mask.shape[1]))
        return logits, hidden, self.plan.feed_back(out)

    def mtp_head(self) -> OrtMtpHead:
        """The export's MTP head (``mtp.onnx``) as a `hybridtrt.runtime.speculative.MtpHead`.

        Raises:
            InputError: The export has no MTP graph (or no hidden-state output to feed it).
        """
        entry = self.manifest.graphs.get("mtp")
        if entry is None or not self.manifest.hidden_states:
            has = self.manifest.model.get("mtp_layers")
            raise InputError(
                f"{self.export_dir} has no MTP graph" + (" (the checkpoint has an MTP head: re-export it)" if has else " (its checkpoint has no MTP head)"),
                fix="export with `hybridtrt export CHECKPOINT --speculative` from a checkpoint with MTP layers, or use --speculative ngram",
            )
        return OrtMtpHead(OrtSession(self.export_dir / entry.file, threads=self._threads, bf16=self._bf16), entry)

    def select_rows(self, state: Any, rows: list[int]) -> Any:
        if isinstance(state, StaticState):
            return StaticState({name: np.ascontiguousarray(a[rows]) for name, a in state.arrays.items()}, state.past)
        return {name: np.ascontiguousarray(a[rows]) for name, a in state.items()}

    def state_arrays(self, state: Any) -> dict[str, np.ndarray]:
        return state.arrays if isinstance(state, StaticState) else state

    def merge_rows(self, target: Any, rows: list[int], replayed: Any, past: int, count: int) -> None:
        """Rows ``rows`` of ``target`` from ``replayed`` (`hybridtrt.runtime.speculative.rollback`): a
        static cache copies the rows whole (each row's replayed positions are where its own position
        was; the rest of the row is the state both came from)."""
        if not self.flavour.static:
            return merge_rows(self, target, rows, replayed, past, count)
        arrays = self.state_arrays(target)
        for name, value in self.state_arrays(replayed).items():
            arrays[name][rows] = value

    def speculation_positions(self, prompt: int, new_tokens: int, draft_len: int) -> int:
        """Cache positions a speculative generation may reach: a static cache's rows advance by their
        own counts (no holes), plus one verify call's drafts past the end; a dynamic cache keeps up to
        ``draft_len + 1`` positions per token."""
        if self.flavour.static:
            return prompt + new_tokens + draft_len
        return growing_cache_positions(prompt, new_tokens, draft_len)

    def named_states(self, state: Any) -> dict[str, np.ndarray]:
        """``{present_name: array}`` of a state returned by `step` (static KV trimmed to the
        positions written; copies, so later in-place steps do not change them)."""
        if isinstance(state, StaticState):
            return {b.present_name: state.arrays[b.past_name][:, :, : state.past].copy() if b.is_kv else state.arrays[b.past_name].copy() for b in self.plan.buffers}
        return {b.present_name: state[b.past_name] for b in self.plan.buffers}

    def check_request(self, batch: int, positions: int, prefill_chunk: int) -> None:
        """Refuse, before running, a generation this export cannot hold.

        Args:
            batch: Rows.
            positions: Cache positions the generation will reach (prompt with padding + new tokens).
            prefill_chunk: Longest prefill call.

        Raises:
            InputError: More positions than a static cache holds, or (dynamic cache) more memory
                than this machine has for the KV states and the attention scores ONNX Runtime
                materializes (``B × H × chunk × positions`` fp32 per attention call).
        """
        if self.flavour.static:
            if positions > self.flavour.max_cache_len:
                raise InputError(
                    f"the prompt and new tokens need {positions} cache positions, this export's --max-cache-len is {self.flavour.max_cache_len}",
                    fix=f"re-export with `--kv-cache static --max-cache-len {positions}` or more, or ask for fewer tokens",
                )
            return
        kv = positions * self.plan.kv_bytes_per_position(batch)
        need = kv + (self.attention_budget if self._heads else 0)
        have = physical_memory_bytes()
        if have is not None and need > have:
            raise InputError(
                f"{positions} positions × batch {batch} need about {need / 2**30:.1f} GiB (KV cache {kv / 2**30:.1f} GiB and "
                f"attention scores {self.attention_budget / 2**30:.1f} GiB), this machine has {have / 2**30:.1f} GiB",
                fix="lower the batch or the number of tokens (a dynamic KV cache grows by one position per token)",
            )
        if self._heads and self.max_prefill_tokens(batch, positions - 1) < 1:
            raise InputError(
                f"one token over {positions} positions needs {batch * self._heads * positions * SCORE_BYTES / 2**30:.1f} GiB of attention "
                f"scores, above the attention budget {self.attention_budget / 2**30:.1f} GiB",
                fix="raise OrtModel(attention_budget=...) or lower the batch",
            )

    def max_prefill_tokens(self, batch: int, past: int) -> int:
        """Longest prefill call on ``past`` positions whose attention scores fit `attention_budget`.

        ONNX Runtime materializes ``B × H × L × T`` scores, ``T = past + L`` (dynamic cache) or the
        capacity (static cache): the largest ``L`` with ``L · T · B · H · SCORE_BYTES ≤ budget``.
        """
        if not self._heads:
            return 1 << 62
        scores = self.attention_budget // (batch * self._heads * SCORE_BYTES)  # L · T may reach this
        if self.flavour.static:
            return scores // self.flavour.max_cache_len
        return (math.isqrt(past * past + 4 * scores) - past) // 2  # L (L + past) ≤ scores

    def snapshot(self, state: Any, attention_mask: torch.Tensor) -> Snapshot:
        """The backend-independent copy of ``state`` (see `hybridtrt.runtime.snapshot`)."""
        return Snapshot({name: to_torch(a) for name, a in self.named_states(state).items()}, attention_mask.long().cpu().clone())

    def restore(self, snapshot: Snapshot) -> Any:
        """A fresh state equal to ``snapshot`` (static KV copied into zero buffers)."""
        arrays = {b.past_name: np.ascontiguousarray(to_numpy(snapshot.states[b.present_name]), dtype=b.dtype) for b in self.plan.buffers}
        if not self.flavour.static:
            return arrays
        if snapshot.past > self.flavour.max_cache_len:
            raise InputError(f"the snapshot holds {snapshot.past} positions, this export's --max-cache-len is {self.flavour.max_cache_len}")
        state = self.zero_state(snapshot.batch)
        for b in self.plan.buffers:
            target = state.arrays[b.past_name]
            if b.is_kv:
                target[:, :, : snapshot.past] = arrays[b.past_name]
            else:
                target[...] = arrays[b.past_name]
        state.past = snapshot.past
        return state

    # -- lower level ----------------------------------------------------------------------------
    def run(self, input_ids: Any, attention_mask: Any, state: Any, session: OrtSession | None = None, *, shrink_arena: bool = False) -> dict[str, np.ndarray]:
        """One graph call: ``{output_name: array}`` (a static cache's states are updated in place).

        ``shrink_arena`` returns the call's memory to the system afterwards: prefill calls of growing
        lengths would otherwise leave ONNX Runtime's arena holding a block per size (measured 14.8 GB
        after half of a 65k-token prompt).
        """
        session = session or self.unified
        ids = to_numpy(input_ids).astype(np.int64)
        extra = self._routing_feeds(*ids.shape) if self.routing_graphs else {}
        if not self.flavour.static:
            out = session.run({INPUT_IDS: ids, ATTENTION_MASK: to_numpy(attention_mask).astype(np.int64), **state, **extra}, shrink_arena=shrink_arena)
        else:
            arrays = state.arrays if isinstance(state, StaticState) else state
            cache_position, padding = static_positions(torch.as_tensor(attention_mask), ids.shape[1], self.flavour.max_cache_len)
            feeds = {INPUT_IDS: np.ascontiguousarray(ids), CACHE_POSITION: cache_position, PADDING_LENGTH: padding, **extra}
            feeds.update({name: _contiguous(a) for name, a in arrays.items()})
            out = session.run_in_place(feeds, {b.present_name: b.past_name for b in self.plan.buffers}, shrink_arena=shrink_arena)
            out.update({b.present_name: feeds[b.past_name] for b in self.plan.buffers})
        if self.routing_graphs:
            for layer, routed in routed_ids(out, *ids.shape).items():
                del out[ROUTED_EXPERTS.format(layer)]
                if self.routing is not None:
                    self.routing.record(layer, torch.from_numpy(routed))
        return out

    def use_routing_graphs(self) -> None:
        """Run every graph as its held-routing copy (`hybridtrt.graphs.held_routing`), so that calls
        can record and hold their MoE routing (`routing`); free when nothing is held. Validation
        only: one session per graph still (the copies replace the sessions, weights are not doubled)."""
        if not self.moe_layers or self.routing_graphs:
            return
        self.unified = self.routing_session(self.unified)
        if self.decode is not None:
            self.decode = self.routing_session(self.decode)
        self.routing_graphs = True

    def routing_session(self, session: OrtSession) -> OrtSession:
        """``session``'s graph as its held-routing copy (the same session without MoE)."""
        return session.variant(lambda graph: hold_routing(graph).model) if self.moe_layers else session

    def _routing_feeds(self, batch: int, length: int) -> dict[str, np.ndarray]:
        """The routing copy's feeds for one call: held to `routing`'s ids, or free (`held_feeds`)."""
        held = None
        if self.routing is not None and self.routing.held is not None:
            held = {layer: self.routing.held_ids(layer, batch, length) for layer in self.moe_layers}
        return held_feeds(self.moe_layers, int(self.manifest.model["moe"]["top_k"]), held)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> GenerationResult:
        """Same API as `TorchStepper.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Yield ``[B]`` tokens step by step."""
        return iter_generate(self, input_ids, attention_mask, **kwargs)


class OrtMtpHead:
    """``mtp.onnx`` as a `hybridtrt.runtime.speculative.MtpHead`: states ``{past_name: array}`` of
    its KV inputs, zeroed and fed back as the main graphs' (`StatePlan`)."""

    def __init__(self, session: OrtSession, entry: Any) -> None:
        self.session = session
        kv = [i for i in entry.inputs if i["name"].startswith("past_key_values.")]
        self.plan = StatePlan(
            tuple(StateBuffer(i["name"], i["name"].replace("past_key_values.", "present."), tuple(i["shape"]), _np_dtype(i["dtype"]), i["name"].rsplit(".", 1)[1]) for i in kv)
        )
        self.hidden_dtype = next(_np_dtype(i["dtype"]) for i in entry.inputs if i["name"] == HIDDEN_STATES)

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        return self.plan.zeros(batch)

    def __call__(self, hidden: torch.Tensor, next_ids: torch.Tensor, attention_mask: torch.Tensor, state: dict[str, np.ndarray]):
        feeds = {HIDDEN_STATES: to_numpy(hidden).astype(self.hidden_dtype), INPUT_IDS: to_numpy(next_ids).astype(np.int64), ATTENTION_MASK: to_numpy(attention_mask).astype(np.int64), **state}
        out = self.session.run(feeds)
        return torch.from_numpy(np.asarray(out[LOGITS], dtype=np.float32)), to_torch(out[MTP_HIDDEN_OUT]), self.plan.feed_back(out)


def _np_dtype(name: str) -> np.dtype:
    """A manifest's dtype name (``float32``, ``bfloat16`` …) as a numpy dtype."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


#: numpy dtypes of the ONNX Runtime output types a prefill's outputs can be bound to.
_NUMPY_OF = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _run_options(shrink_arena: bool) -> Any:
    """RunOptions that shrink the CPU arena after the run (None: the defaults)."""
    if not shrink_arena:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")


__all__ = ["BF16_MODES", "OrtModel", "OrtSession", "SamplingConfig"]
