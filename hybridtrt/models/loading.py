"""Loading a checkpoint directory: config.json + safetensors (single, sharded, or the HF hub cache).

Strict: every parameter of the model must be in the checkpoint with the right shape and a float
dtype, and every tensor in the checkpoint must be used (except names a family declares
ignorable). All of that is decided from the safetensors headers (`hybridtrt.models.weights`)
before a module is built or a tensor is read, so a checkpoint that does not match its config is
refused in milliseconds whatever its size. Tensors are then read one at a time, converted to the
model dtype and checked for NaN/Inf on the way (`Checkpoint.read`): the eager model holds the
weights once, the lazy one (`load_model(..., lazy=True)`) one decoder layer at a time. Pickle files
are never opened and checkpoint code is never run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from hybridtrt.errors import CheckpointError, ConfigError, InputError
from hybridtrt.models.config import HybridConfig, load_config
from hybridtrt.models.model import Block, HybridLM, meta_modules
from hybridtrt.models.modelopt import ModelOptQuantization, QuantizedWeight, read_quantization
from hybridtrt.models.moe import FP32_PARAMETERS
from hybridtrt.models.weights import FLOAT_CODES, SAFETENSORS_DTYPES, WeightIndex

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: Largest shard index read (a 1,000-layer MoE checkpoint's index is a few MiB).
MAX_INDEX_BYTES = 64 * 2**20
#: Elements per slice of the NaN/Inf scan (bounds its temporary to 16 MiB of bools).
_FINITE_CHUNK = 1 << 24


@dataclass(frozen=True)
class WeightNames:
    """How a family names its tensors in HF checkpoints.

    Attributes:
        prefixes: Accepted prefixes of the backbone (first match wins; e.g. HF's ``model.`` and
            NVIDIA's original ``backbone.`` for Nemotron-H).
        ignore: Regexes of checkpoint tensors that are not part of the model (e.g. MTP heads).
        keep_fp32: Regexes of our parameter names loaded in fp32 whatever the model dtype.
    """

    prefixes: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    keep_fp32: tuple[str, ...] = ()


#: model family -> checkpoint naming (registry; add a family here and in config.CONFIG_PARSERS).
WEIGHT_NAMES: dict[str, WeightNames] = {
    "nemotron_h": WeightNames(prefixes=("model.", "backbone."), ignore=(r"^mtp\.",), keep_fp32=FP32_PARAMETERS),
    "mamba2": WeightNames(prefixes=("backbone.",)),
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` or a torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InputError(f"dtype {dtype} is not supported", fix="use fp32, fp16 or bf16")
    key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
    if key not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported", fix="use fp32, fp16 or bf16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"``."""
    return _DTYPE_NAMES[dtype]


def _hub_blobs(root: Path) -> Path | None:
    """``<repo>/blobs`` when ``root`` is an HF hub cache snapshot ``<repo>/snapshots/<revision>``."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent / "blobs"
    return None


def _shard_path(root: Path, name: object, index: Path) -> Path:
    """A shard named in the index, refused unless it stays inside the checkpoint.

    The name itself must lie inside the checkpoint directory; a shard that is a symlink must
    resolve inside it too, or — the HF hub cache layout — into the ``blobs/`` of the same cache
    repo (``snapshots/<rev>/x.safetensors -> ../../blobs/<sha>``).
    """
    if not isinstance(name, str) or not name.endswith(".safetensors") or "\x00" in name:
        raise CheckpointError(f"{index} names shard {name!r}, not a .safetensors file name", fix="re-download the checkpoint's index file")
    real_root = root.resolve()
    base = Path(os.path.normpath(root.absolute()))
    lexical = Path(os.path.normpath(base / name))
    if base not in lexical.parents:
        raise CheckpointError(f"{index} names shard {name!r} outside the checkpoint", fix="shard names are file names inside the checkpoint directory")
    target = lexical.resolve()
    blobs = _hub_blobs(real_root)
    if real_root not in target.parents and not (blobs is not None and blobs.resolve() in target.parents):
        raise CheckpointError(
            f"shard {name!r} named in {INDEX_FILE} is a link to {target}, outside the checkpoint"
            + (" and its hub cache repo" if blobs is not None else ""),
            fix="copy the shards into the checkpoint directory",
        )
    if not target.is_file():
        raise CheckpointError(f"shard {name} named in {INDEX_FILE} is missing", fix="re-download the checkpoint")
    return lexical


def weight_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards of ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors``.

    Raises:
        CheckpointError: A malformed index (``weight_map`` must map tensor names to file names),
            shards outside the checkpoint, only pickle files, or no weights at all.
    """
    index = root / INDEX_FILE
    if index.exists() or index.is_symlink():  # a FIFO or a dangling link is refused by name, not skipped
        from hybridtrt.reading import read_json

        data = read_json(index, what="the shard index", error=CheckpointError, fix="re-download the checkpoint's index file", limit=MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            shown = type(weight_map).__name__ if not isinstance(weight_map, dict) else next(
                f"{k!r}: {v!r}" for k, v in weight_map.items() if not (isinstance(k, str) and isinstance(v, str))
            )
            raise CheckpointError(
                f"{index} is not a valid safetensors index: 'weight_map' must map tensor names to shard file names (found {shown})",
                fix="re-download the checkpoint's index file",
            )
        return [_shard_path(root, name, index) for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root} has only pickle weight files {pickles}; hybridtrt never unpickles",
            fix="convert to safetensors, e.g. transformers' save_pretrained(..., safe_serialization=True)",
        )
    raise CheckpointError(f"no *.safetensors weights in {root}", fix="point at an HF checkpoint directory")


def backbone_prefix(config: HybridConfig, keys: set[str] | dict) -> str:
    """The first of the family's accepted prefixes that the checkpoint uses."""
    prefixes = WEIGHT_NAMES[config.family].prefixes
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), prefixes[0])


def to_checkpoint_name(name: str, prefix: str) -> str:
    """Our parameter name (``layers.0.mixer.D``) -> checkpoint name (``model.layers.0.mixer.D``)."""
    return name if name.startswith("lm_head.") else prefix + name


def expected_parameters(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of `HybridLM` ``(config)`` in module order, without building it:
    the top-level modules of a layerless model plus one meta `Block` per block kind."""
    with meta_modules():
        top = HybridLM(dataclasses.replace(config, layer_types=())).state_dict()
        blocks = {kind: Block(config, kind).state_dict() for kind in set(config.layer_types)}
    shapes = {k: tuple(v.shape) for k, v in top.items() if k.startswith("embeddings.")}
    for i, kind in enumerate(config.layer_types):
        shapes.update({f"layers.{i}.{k}": tuple(v.shape) for k, v in blocks[kind].items()})
    shapes.update({k: tuple(v.shape) for k, v in top.items() if not k.startswith("embeddings.")})
    return shapes


#: The hub's per-expert MoE tensors (``…mixer.experts.3.up_proj.weight [I, D]``, what HF's
#: ``save_pretrained`` writes); HF's in-memory model — and ours — stacks them into
#: ``…mixer.experts.up_proj [E, I, D]`` (transformers' ``conversion_mapping``: MergeModulelist).
_PER_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


def per_expert_groups(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``{stacked name: per-expert tensor names in expert order}`` for the per-expert MoE tensors
    among ``names`` (checkpoints may ship either form; expert ``e`` becomes row ``e``).

    Raises:
        CheckpointError: A layer's expert numbers have gaps, or a layer has both forms.
    """
    names = set(names)
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        m = _PER_EXPERT.match(name)
        if m:
            groups.setdefault(f"{m['stem']}.{m['proj']}", {})[int(m["expert"])] = name
    out: dict[str, tuple[str, ...]] = {}
    for stacked, by_expert in sorted(groups.items()):
        gaps = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
        if gaps:
            raise CheckpointError(
                f"{stacked}: per-expert tensors for experts {gaps[:8]} are missing",
                fix="the checkpoint is incomplete; re-download it",
            )
        if stacked in names:
            raise CheckpointError(f"{stacked} is stored both stacked and per expert", fix="keep one of the two forms")
        out[stacked] = tuple(by_expert[e] for e in range(len(by_expert)))
    return out


@dataclass(frozen=True)
class ParameterSource:
    """Where one model parameter comes from.

    Attributes:
        name: Our parameter name (``layers.0.mixer.in_proj.weight``).
        tensor: The checkpoint tensor (``model.layers.0.mixer.in_proj.weight``), or the stacked
            name of per-expert tensors (``model.layers.1.mixer.experts.up_proj``).
        shape: Its shape.
        dtype: Its dtype in the model (fp32 for the family's ``keep_fp32`` parameters).
        parts: The per-expert tensors stacked along a new first axis into this parameter, in
            expert order; empty when ``tensor`` is stored as such.
        quantized: How ``tensor`` is quantized in a ModelOpt checkpoint (read dequantized, as
            ModelOpt's own ``dequantize`` computes it); None for a float tensor.
    """

    name: str
    tensor: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[str, ...] = ()
    quantized: QuantizedWeight | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _layer_count_check(config: HybridConfig, names: list[str], prefix: str) -> None:
    """Refuse a layer pattern whose length disagrees with the weights before anything is built."""
    rx = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    found = sorted({int(m.group(1)) for n in names if (m := rx.match(n))})
    if found == list(range(config.num_layers)) or not found:
        return
    shown = f"layers.{found[0]} … layers.{found[-1]}" if len(found) > 1 else f"layers.{found[0]}"
    raise CheckpointError(
        f"config.json describes {config.num_layers:,} decoder layers (pattern {config.pattern[:40]}{'…' if config.num_layers > 40 else ''}), "
        f"the weights have {len(found):,} ({shown})",
        fix="check that config.json belongs to these weights (hybrid_override_pattern / num_hidden_layers)",
    )


def _quantization_note(root: Path) -> str:
    from hybridtrt.models.config import read_config_json

    try:
        raw = read_config_json(root)
    except ConfigError:
        return ""
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    if isinstance(q, dict):
        return f"; config.json declares quantization_config (quant_method={q.get('quant_method')!r}), which hybridtrt does not read"
    return ""


def match_parameters(
    config: HybridConfig,
    index: WeightIndex,
    dtype: torch.dtype,
    root: Path | None = None,
    quantization: ModelOptQuantization | None = None,
) -> dict[str, ParameterSource]:
    """Match the checkpoint's tensors (headers only) to the model's parameters, strictly.

    Args:
        config: The model config.
        index: The checkpoint's tensors.
        dtype: The model dtype every parameter is converted to.
        root: Checkpoint directory (to name a declared quantization format in the error).
        quantization: The checkpoint's ModelOpt quantization: its quantized weights match in their
            dequantized shape, their scale tensors are theirs (not unexpected).

    Returns:
        ``{parameter name: ParameterSource}`` in module order.

    Raises:
        CheckpointError: A layer count that disagrees with the pattern; every missing,
            unexpected and misshapen tensor by name; integer or fp8 tensors where the model
            expects floats.
    """
    naming = WEIGHT_NAMES[config.family]
    quantized = {w.weight: w for w in quantization.weights.values()} if quantization is not None else {}
    companions = quantization.companions if quantization is not None else set()
    names = [n for n in index.tensors if n not in companions]
    prefix = backbone_prefix(config, names)
    _layer_count_check(config, names, prefix)
    expected = expected_parameters(config)
    stacks = per_expert_groups(names)
    in_stack = {part for parts in stacks.values() for part in parts}
    # What each name the model can use holds: a stored tensor, or a stack of per-expert ones.
    shapes = {c: tuple(quantized[c].shape) if c in quantized else index[c].shape for c in names if c not in in_stack}
    codes = {c: index[c].dtype for c in names if c not in in_stack}
    # A stack of per-expert tensors is quantized when all its parts are (FP8 or NVFP4, each expert its own scales).
    quantized_stacks = {c for c, parts in stacks.items() if parts and all(q in quantized for q in parts)}
    for c, parts in stacks.items():
        part_shapes = {tuple(quantized[q].shape) if q in quantized else index[q].shape for q in parts}
        shapes[c] = (len(parts), *next(iter(part_shapes))) if len(part_shapes) == 1 else ("per-expert shapes differ: " + ", ".join(map(str, sorted(part_shapes))),)
        codes[c] = next((index[q].dtype for q in parts if not index[q].is_float), index[parts[0]].dtype)
    ours_to_ckpt = {k: to_checkpoint_name(k, prefix) for k in expected}
    used = set(ours_to_ckpt.values())
    missing = sorted(c for c in used if c not in shapes)
    ignorable = [re.compile(p) for p in naming.ignore]
    if config.tie_word_embeddings:
        ignorable.append(re.compile(r"^lm_head\.weight$"))
    unexpected = sorted(k for k in shapes if k not in used and not any(p.search(k) for p in ignorable))
    misshapen = sorted(
        f"{c}: checkpoint {shapes[c]} vs model {expected[k]}"
        for k, c in ours_to_ckpt.items()
        if c in shapes and shapes[c] != expected[k]
    )
    if missing or unexpected or misshapen:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                shown = ", ".join(items[:20]) + (f" … (+{len(items) - 20} more)" if len(items) > 20 else "")
                lines.append(f"{title} ({len(items)}): {shown}")
        raise CheckpointError(
            "checkpoint does not match the config: " + "; ".join(lines),
            fix="check that config.json belongs to these weights (layer pattern, sizes, tie_word_embeddings)",
        )
    not_float = [f"{c} ({codes[c]})" for c in ours_to_ckpt.values() if codes[c] not in FLOAT_CODES and c not in quantized and c not in quantized_stacks]
    if not_float:
        shown = ", ".join(not_float[:8]) + (f" … (+{len(not_float) - 8} more)" if len(not_float) > 8 else "")
        raise CheckpointError(
            f"{len(not_float)} weight tensor(s) are not floating point: {shown}; the model expects "
            f"{'/'.join(FLOAT_CODES)} weights{_quantization_note(root) if root is not None else ''}",
            fix="export from the unquantized (bf16/fp16/fp32) checkpoint; hybridtrt quantizes to FP8 itself (--quantize fp8)",
        )
    fp32 = [re.compile(p) for p in naming.keep_fp32]
    return {
        k: ParameterSource(k, c, expected[k], torch.float32 if any(p.search("." + k) for p in fp32) else dtype, stacks.get(c, ()), quantized.get(c))
        for k, c in ours_to_ckpt.items()
    }


def count_non_finite(t: Tensor) -> int:
    """Number of NaN/Inf entries. A finite sum proves there are none (any NaN/Inf makes the sum
    NaN/Inf) at ~50× the speed of an element-wise test; otherwise the entries are counted, in
    slices (bounded temporary memory)."""
    flat = t.reshape(-1)
    if not t.is_floating_point() or bool(torch.isfinite(flat.sum())):
        return 0
    return sum(int((~torch.isfinite(flat[i : i + _FINITE_CHUNK])).sum()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def check_finite(t: Tensor, tensor: str, stored: Tensor | None = None) -> None:
    """Raise `CheckpointError` naming ``tensor`` when ``t`` has NaN/Inf.

    Args:
        t: The tensor as the model will use it (converted).
        tensor: Its checkpoint name.
        stored: The tensor as stored, when ``t`` is a conversion of it (tells a corrupt
            checkpoint from a value that overflows the target dtype).
    """
    bad = count_non_finite(t)
    if not bad:
        return
    if stored is not None and stored.dtype != t.dtype and not count_non_finite(stored):
        raise CheckpointError(
            f"tensor {tensor} overflows {dtype_name(t.dtype) if t.dtype in _DTYPE_NAMES else t.dtype}: {bad} value(s) become Inf "
            f"(largest magnitude {float(stored.abs().max()):.4g})",
            fix="export in a dtype with more range (bf16 or fp32)",
        )
    raise CheckpointError(
        f"tensor {tensor} has {bad} NaN/Inf value(s) of {t.numel()}",
        fix="the checkpoint is corrupt (or was saved from a diverged run); re-download or re-save it",
    )


@dataclass
class Checkpoint:
    """An opened checkpoint: its config, the index of its tensors and the parameter mapping.

    Nothing but headers has been read. `read` reads, converts and checks one parameter.

    Attributes:
        root: The checkpoint directory.
        config: Parsed config.json.
        index: Its tensors (safetensors headers).
        dtype: Model dtype.
        parameters: ``{parameter name: ParameterSource}`` in module order.
        quantization: What a ModelOpt-quantized checkpoint declares and holds (None otherwise).
    """

    root: Path
    config: HybridConfig
    index: WeightIndex
    dtype: torch.dtype
    parameters: dict[str, ParameterSource]
    quantization: ModelOptQuantization | None = None

    @cached_property
    def num_parameters(self) -> int:
        return sum(p.numel for p in self.parameters.values())

    @cached_property
    def parameter_bytes(self) -> int:
        """Bytes of all parameters in the model dtype."""
        return sum(p.nbytes for p in self.parameters.values())

    def as_dtype(self, dtype: str | torch.dtype) -> Checkpoint:
        """The same checkpoint read in another model dtype (headers are not parsed again)."""
        torch_dtype = parse_dtype(dtype)
        parameters = match_parameters(self.config, self.index, torch_dtype, self.root, self.quantization)
        return Checkpoint(self.root, self.config, self.index, torch_dtype, parameters, self.quantization)

    def read_stored(self, name: str) -> Tensor:
        """Parameter ``name`` as stored in the checkpoint (its stored dtype; per-expert tensors
        stacked, expert ``e`` as row ``e``); a ModelOpt-quantized weight dequantized to the model
        dtype, as ModelOpt computes it."""
        source = self.parameters[name]
        if source.parts:
            return torch.stack([self.read_tensor(q, source.dtype) for q in source.parts])
        return self.read_tensor(source.tensor, source.dtype)

    def read_tensor(self, tensor: str, dtype: torch.dtype) -> Tensor:
        """One checkpoint tensor as stored; a weight quantized by ModelOpt dequantized to ``dtype``, as
        ModelOpt's own ``dequantize(dtype)`` computes it (`hybridtrt.models.modelopt`)."""
        quantized = self.quantization.weights.get(tensor.removesuffix(".weight")) if self.quantization is not None else None
        if quantized is not None and quantized.weight == tensor:
            return quantized.dequantize(self.index.read, dtype)
        return self.index.read(tensor)

    def read(self, name: str) -> Tensor:
        """Parameter ``name`` in the model dtype, checked for NaN/Inf. A parameter stored in a wider
        dtype (an fp32 checkpoint read in bf16) is read and converted a block of rows at a time
        into the result: memory for the result, not for the stored tensor beside it.

        Raises:
            CheckpointError: NaN/Inf in the tensor, or values that overflow the model dtype.
        """
        source = self.parameters[name]
        if self.narrows(name):
            out = torch.empty(source.shape, dtype=source.dtype)
            rows = source.shape[0]
            step = max(1, NARROW_BLOCK_BYTES // (self.index[source.tensor].nbytes // rows or 1))
            for start in range(0, rows, step):
                out[start : start + step] = self.index.read_rows(source.tensor, start, min(start + step, rows))
            if not count_non_finite(out):
                return out
            del out  # read again whole: the error tells a corrupt tensor from one the dtype overflows
        return _converted(self.read_stored(name), source.dtype, source.tensor)

    def narrows(self, name: str) -> bool:
        """Is parameter ``name`` a plain tensor stored in a wider dtype than the model's (with rows)?"""
        source = self.parameters[name]
        if source.parts or source.quantized is not None or not source.shape:
            return False
        return SAFETENSORS_DTYPES[self.index[source.tensor].dtype].itemsize > source.dtype.itemsize

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of parameter ``name`` in the model dtype, checked for NaN/Inf: the
        values `read` gives for those rows, without reading the rest (experts ``start:stop`` of a
        stack of per-expert tensors)."""
        source = self.parameters[name]
        if source.quantized is not None:  # dequantization is row by row: read those rows of the weight and its block scales
            rows = lambda tensor: self.index.read_rows(tensor, start, stop) if self.index[tensor].shape else self.index.read(tensor)  # noqa: E731
            return _converted(source.quantized.dequantize(rows, source.dtype), source.dtype, f"{source.tensor} (rows {start}:{stop})")
        if source.parts:
            parts = source.parts[start:stop]
            return torch.stack([_converted(self.read_tensor(q, source.dtype), source.dtype, q) for q in parts])
        return _converted(self.index.read_rows(source.tensor, start, stop), source.dtype, f"{source.tensor} (rows {start}:{stop})")


#: Stored bytes `Checkpoint.read` converts at a time when it narrows a parameter's dtype.
NARROW_BLOCK_BYTES = 16 << 20


def _converted(stored: Tensor, dtype: torch.dtype, tensor: str) -> Tensor:
    """``stored`` in ``dtype``, checked for NaN/Inf (named ``tensor``)."""
    t = stored.to(dtype)
    check_finite(t, tensor, stored)
    return t


def open_checkpoint(path: str | Path, dtype: str | torch.dtype = "fp32") -> Checkpoint:
    """Parse config.json and every safetensors header, and match them (no tensor is read).

    Raises:
        ConfigError, CheckpointError: see `load_config`, `weight_files`, `match_parameters`.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    torch_dtype = parse_dtype(dtype)
    config = load_config(root)
    index = WeightIndex(weight_files(root))
    quantization = read_quantization(root, index)
    return Checkpoint(root, config, index, torch_dtype, match_parameters(config, index, torch_dtype, root, quantization), quantization)


def load_model(
    path: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu", *, lazy: bool = False
) -> HybridLM:
    """Load a Nemotron-H / Mamba-2 checkpoint directory into the reference model.

    Args:
        path: Directory with ``config.json`` and safetensors weights (single or sharded).
        dtype: ``"fp32" | "fp16" | "bf16"`` (or a torch dtype).
        device: Where to put the weights.
        lazy: Read each decoder layer's weights when the forward pass reaches it and drop them
            after (one layer resident at a time; see `hybridtrt.models.lazy`). Same numbers as
            the eager model, for checkpoints larger than memory.

    Returns:
        The model in eval mode.
    """
    checkpoint = open_checkpoint(path, dtype)
    if lazy:
        from hybridtrt.models.lazy import lazy_model

        return lazy_model(checkpoint, device)
    with meta_modules():
        model = HybridLM(checkpoint.config)
    state = {name: checkpoint.read(name).to(device) for name in checkpoint.parameters}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
