"""Loading a checkpoint directory: config.json + safetensors (single or sharded).

Strict: every parameter of the model must be in the checkpoint with the right shape, and every
tensor in the checkpoint must be used (except names a family declares ignorable). Pickle files are
never opened and checkpoint code is never run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hybridtrt.errors import CheckpointError, InputError
from hybridtrt.models.config import HybridConfig, load_config
from hybridtrt.models.model import HybridLM
from hybridtrt.models.moe import FP32_PARAMETERS

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            path = (root / name).resolve()
            if root.resolve() not in path.parents or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index} names shard {name!r} outside the checkpoint or not .safetensors")
            if not path.is_file():
                raise CheckpointError(f"shard {name} named in {INDEX_FILE} is missing", fix="re-download the checkpoint")
        return [root / f for f in files]
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


def read_safetensors(root: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, by name, as stored (no dtype change)."""
    tensors: dict[str, Tensor] = {}
    for path in _weight_files(Path(root)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path.name})")
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path.name} is not a readable safetensors file: {e}") from None
    return tensors


def backbone_prefix(config: HybridConfig, keys: set[str]) -> str:
    """The first of the family's accepted prefixes that the checkpoint uses."""
    prefixes = WEIGHT_NAMES[config.family].prefixes
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), prefixes[0])


def to_checkpoint_name(name: str, prefix: str) -> str:
    """Our parameter name (``layers.0.mixer.D``) -> checkpoint name (``model.layers.0.mixer.D``)."""
    return name if name.startswith("lm_head.") else prefix + name


#: The hub's per-expert MoE tensors (``…mixer.experts.3.up_proj.weight [I, D]``, what HF's
#: ``save_pretrained`` writes); HF's in-memory model — and ours — stacks them into
#: ``…mixer.experts.up_proj [E, I, D]`` (transformers' ``conversion_mapping``: MergeModulelist).
_PER_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


def stack_per_expert(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace per-expert MoE tensors by the stacked tensor of each layer and projection.

    Checkpoints may ship either form (stacked tensors pass through unchanged); expert ``e`` becomes
    row ``e``. Raises `CheckpointError` when a layer's expert numbers have gaps or a layer has both.
    """
    groups: dict[str, dict[int, str]] = {}
    for name in tensors:
        m = _PER_EXPERT.match(name)
        if m:
            groups.setdefault(f"{m['stem']}.{m['proj']}", {})[int(m["expert"])] = name
    if not groups:
        return tensors
    out = {k: v for k, v in tensors.items() if not _PER_EXPERT.match(k)}
    for stacked, by_expert in sorted(groups.items()):
        gaps = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
        if gaps:
            raise CheckpointError(
                f"{stacked}: per-expert tensors for experts {gaps[:8]} are missing",
                fix="the checkpoint is incomplete; re-download it",
            )
        if stacked in out:
            raise CheckpointError(f"{stacked} is stored both stacked and per expert", fix="keep one of the two forms")
        out[stacked] = torch.stack([tensors[by_expert[e]] for e in range(len(by_expert))])
    return out


def load_state_dict(config: HybridConfig, tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Match checkpoint tensors to the model's parameters, strictly.

    Raises:
        CheckpointError: listing every missing, unexpected and misshapen tensor.
    """
    naming = WEIGHT_NAMES[config.family]
    tensors = stack_per_expert(tensors)
    prefix = backbone_prefix(config, set(tensors))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in HybridLM(config).state_dict().items()}
    ours_to_ckpt = {k: to_checkpoint_name(k, prefix) for k in expected}
    used = set(ours_to_ckpt.values())
    missing = sorted(c for c in used if c not in tensors)
    ignorable = [re.compile(p) for p in naming.ignore]
    if config.tie_word_embeddings:
        ignorable.append(re.compile(r"^lm_head\.weight$"))
    unexpected = sorted(k for k in tensors if k not in used and not any(p.search(k) for p in ignorable))
    misshapen = sorted(
        f"{c}: checkpoint {tuple(tensors[c].shape)} vs model {tuple(expected[k])}"
        for k, c in ours_to_ckpt.items()
        if c in tensors and tuple(tensors[c].shape) != tuple(expected[k])
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
    fp32 = [re.compile(p) for p in naming.keep_fp32]
    return {k: tensors[c].to(torch.float32 if any(p.search("." + k) for p in fp32) else dtype) for k, c in ours_to_ckpt.items()}


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> HybridLM:
    """Load a Nemotron-H / Mamba-2 checkpoint directory into the reference model.

    Args:
        path: Directory with ``config.json`` and safetensors weights (single or sharded).
        dtype: ``"fp32" | "fp16" | "bf16"`` (or a torch dtype).
        device: Where to put the weights.

    Returns:
        The model in eval mode.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    torch_dtype = parse_dtype(dtype)
    config = load_config(root)
    state = load_state_dict(config, read_safetensors(root), torch_dtype)
    with torch.device("meta"):
        model = HybridLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).to(device).eval()
