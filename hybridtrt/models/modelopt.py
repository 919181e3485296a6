"""Checkpoints quantized by NVIDIA ModelOpt (its "unified HF" export), read as ModelOpt writes them.

NVIDIA publishes its quantized Nemotron checkpoints in this format (Nemotron-Nano-9B-v2-FP8,
Nemotron-3-Nano-30B-A3B-FP8 / -NVFP4, ...). The rules below are taken from the writer and its own
readers, nvidia-modelopt 0.47.0:

- ``modelopt/torch/export/unified_export_hf.py`` (``_write_hf_export_config``): the recipe goes to
  ``hf_quant_config.json`` as ``{"producer": {"name", "version"}, "quantization": {"quant_algo",
  "kv_cache_quant_algo", "exclude_modules", "group_size" (NVFP4)}}``, and into ``config.json`` as
  ``quantization_config`` (``convert_hf_config.py``: ``quant_method: "modelopt"``, ``quant_algo``,
  ``ignore`` = the exclusions, ``config_groups``). ``hf_quant_config.json`` is read first.
- Every quantized linear ``M`` keeps its name and gets companions: FP8 (per tensor) stores
  ``M.weight`` as F8_E4M3 ``[out, in]``, ``M.weight_scale`` F32 ``[]`` and ``M.input_scale`` F32
  ``[]``; NVFP4 stores ``M.weight`` as U8 ``[out, in/2]`` (two E2M1 codes a byte, the low nibble
  first), ``M.weight_scale`` F8_E4M3 ``[out, in/16]`` (one scale per block of 16 inputs),
  ``M.weight_scale_2`` F32 ``[]`` and ``M.input_scale`` F32 ``[]``. Excluded modules stay in the
  checkpoint's dtype.
- Dequantization (``modelopt/torch/quantization/qtensor/``): ``FP8QTensor.dequantize(dtype)`` is
  ``weight.to(dtype) * weight_scale.to(dtype)``, so the product is rounded in the target dtype;
  ``NVFP4QTensor.dequantize(dtype)`` looks the codes up in E2M1 (``0, .5, 1, 1.5, 2, 3, 4, 6`` and
  their negatives, codes 8-15), multiplies each block in fp32 by ``weight_scale.float() *
  weight_scale_2`` and converts the result to ``dtype``.

`dequantize` reproduces both bit for bit (tests/fixtures/modelopt holds checkpoints written by
ModelOpt itself and the hashes of ModelOpt's own dequantization). What this module does not read is
refused by name: other algorithms (``W4A16_AWQ``, ``MIXED_PRECISION``, ...), a quantized weight
without its scales. Routed experts (FP8 or NVFP4) are stored one tensor per expert
(``...mixer.experts.{e}.up_proj.weight`` with its own scales); the loader stacks them as it stacks
float experts, each dequantized on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hybridtrt.errors import CheckpointError
from hybridtrt.models.weights import WeightIndex

QUANT_CONFIG_FILE = "hf_quant_config.json"
#: The algorithms read here (``quantization.quant_algo``).
READ_ALGOS = ("FP8", "NVFP4")
#: E2M1 values of the 16 codes, as ``NVFP4QTensor``'s ``e2m1_values`` lists them (sign bit 3, then 2
#: exponent bits and 1 mantissa bit); code 8, E2M1's -0, is +0 there, and so here (bit-equal results).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_EXPERT = re.compile(r"\.experts\.\d+\.(up|down)_proj$")
_FIX_FILE = "re-download the checkpoint (hf_quant_config.json is written by ModelOpt's export_hf_checkpoint)"
_FIX_ALGO = "export from the BF16 checkpoint NVIDIA publishes beside it (hybridtrt export --quantize fp8 calibrates its own FP8)"


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's weight as ModelOpt stores it.

    Attributes:
        module: The checkpoint's module name (``backbone.layers.0.mixer.in_proj``).
        algo: ``"FP8"`` or ``"NVFP4"``.
        shape: The dequantized weight's shape, ``[out, in]``.
        group_size: Inputs per NVFP4 block scale (0 for FP8).
    """

    module: str
    algo: str
    shape: tuple[int, ...]
    group_size: int = 0

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def weight_scale(self) -> str:
        return self.module + ".weight_scale"

    @property
    def weight_scale_2(self) -> str:
        return self.module + ".weight_scale_2"

    @property
    def input_scale(self) -> str:
        return self.module + ".input_scale"

    @property
    def companions(self) -> tuple[str, ...]:
        """The scale tensors stored beside the weight."""
        names = (self.weight_scale, self.input_scale)
        return names + ((self.weight_scale_2,) if self.algo == "NVFP4" else ())

    def dequantize(self, read: Callable[[str], Tensor], dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``, as ModelOpt's own ``dequantize(dtype)`` computes it."""
        if self.algo == "FP8":
            return dequantize_fp8(read(self.weight), read(self.weight_scale), dtype)
        return dequantize_nvfp4(read(self.weight), read(self.weight_scale), read(self.weight_scale_2), self.group_size, dtype)


@dataclass(frozen=True)
class ModelOptQuantization:
    """What a ModelOpt checkpoint declares and holds.

    Attributes:
        algo: ``quant_algo`` (``"FP8"``, ``"NVFP4"``).
        source: Where the recipe was read (``hf_quant_config.json`` or ``config.json``).
        producer: ``"modelopt 0.47.0"`` (or ``"unknown"``).
        kv_cache_algo: ``kv_cache_quant_algo`` (None when the KV cache is not quantized).
        exclude_modules: The declared exclusions (patterns of module names), cleaned of ModelOpt's
            name-mapper sentinels (``"lm_head.\\x00backbone.pt_name_sentinel"`` reads ``"lm_head"``).
        weights: ``{checkpoint module name: QuantizedWeight}`` of every quantized linear found.
        kv_scales: The KV-cache scales written with ``kv_cache_quant_algo`` (``...k_proj.k_scale``,
            ``...v_proj.v_scale``, F32 scalars; ``quant_utils.py``'s ``k_bmm_quantizer._amax`` ->
            ``k_proj.k_scale``). Read, not used: the export's KV cache stays in the model dtype.
    """

    algo: str
    source: str
    producer: str
    kv_cache_algo: str | None
    exclude_modules: tuple[str, ...]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    kv_scales: tuple[str, ...] = ()

    @property
    def companions(self) -> set[str]:
        """Every scale tensor of the recipe (not model parameters): the weights' and the KV cache's."""
        return {name for w in self.weights.values() for name in w.companions} | set(self.kv_scales)

    def describe(self) -> str:
        """One line for the export summary and ``inspect``."""
        what = {"FP8": "FP8 per-tensor", "NVFP4": f"NVFP4 (blocks of {self._group_size()})"}.get(self.algo, self.algo)
        shown = _describe_exclusions(self.exclude_modules)
        routed = [m for m in self.weights if _EXPERT.search(m)]
        layers = {_EXPERT.sub("", m) for m in routed}
        counted = f"{len(self.weights) - len(routed)} linear layers" + (f" and the routed experts of {len(layers)} MoE layers" if routed else "")
        kv = ""
        if self.kv_cache_algo:
            kv = f"; KV cache {self.kv_cache_algo} in the checkpoint ({len(self.kv_scales)} scales), not used: the KV cache stays in the model dtype"
        return f"{what} from {self.source} ({self.producer}): {counted} quantized; {shown}{kv}"

    def _group_size(self) -> int:
        return next((w.group_size for w in self.weights.values() if w.group_size), 16)


def _describe_exclusions(patterns: Iterable[str]) -> str:
    """``"excluded: lm_head, embeddings, conv1d of 4 layers"``: one entry per kind of module."""
    kinds: dict[str, int] = {}
    for p in patterns:
        kind = re.sub(r"^(backbone|model)\.", "", p)
        kind = re.sub(r"^layers\.\d+\.(mixer\.)?", "", kind).rstrip(".*")
        kinds[kind or p] = kinds.get(kind or p, 0) + 1
    if not kinds:
        return "nothing excluded"
    return "excluded: " + ", ".join(k if n == 1 else f"{k} of {n} layers" for k, n in kinds.items())


def _clean_module_pattern(pattern: str) -> str:
    """ModelOpt 0.47 with transformers 5 writes exclusions as ``"<name>\\x00<prefix>.pt_name_sentinel"``
    (its name mapper's marker, ``unified_export_hf.py``'s ``revert_quant_config_names``); the name is
    the part before the NUL."""
    return pattern.split("\x00", 1)[0]


def read_recipe(root: Path) -> tuple[dict[str, Any], str] | None:
    """``(quantization dict, source)`` from hf_quant_config.json, else from config.json's
    ``quantization_config`` when it says ``quant_method: modelopt``; None for other checkpoints."""
    from hybridtrt.models.config import read_config_json
    from hybridtrt.reading import expect_object, read_json

    path = root / QUANT_CONFIG_FILE
    if path.is_file():
        fix = f"use the {QUANT_CONFIG_FILE} that came with the checkpoint"
        raw = expect_object(read_json(path, what=QUANT_CONFIG_FILE, error=CheckpointError, fix=fix, limit=1 << 20), source=str(path), error=CheckpointError, fix=fix)
        quant = raw.get("quantization")
        if not isinstance(quant, dict):
            raise CheckpointError(f'{path} has no "quantization" object', fix=fix)
        producer = raw.get("producer") if isinstance(raw.get("producer"), dict) else {}
        return {**quant, "_producer": producer}, QUANT_CONFIG_FILE
    config = read_config_json(root)
    q = config.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "modelopt":
        producer = q.get("producer") if isinstance(q.get("producer"), dict) else {}
        return {
            "quant_algo": q.get("quant_algo"),
            "kv_cache_quant_algo": q.get("kv_cache_scheme"),
            "exclude_modules": q.get("ignore") or [],
            "group_size": None,
            "_producer": producer,
        }, "config.json quantization_config"
    return None


def read_quantization(root: str | Path, index: WeightIndex) -> ModelOptQuantization | None:
    """The ModelOpt quantization of the checkpoint at ``root``, or None when it declares none.

    Raises:
        CheckpointError: An algorithm not read here; a quantized weight without its scales or with
            scales of the wrong shape or dtype.
    """
    found = read_recipe(Path(root))
    if found is None:
        return None
    quant, source = found
    algo = quant.get("quant_algo")
    if algo not in READ_ALGOS:
        raise CheckpointError(
            f"{source} declares ModelOpt quant_algo {algo!r}; hybridtrt reads {' and '.join(READ_ALGOS)} checkpoints",
            fix=_FIX_ALGO,
        )
    producer = quant["_producer"]
    group_size = quant.get("group_size") or 16
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise CheckpointError(f"{source} declares group_size {group_size!r}; NVFP4 blocks are a positive number of inputs (16)", fix=_FIX_FILE)
    excluded = quant.get("exclude_modules") or []
    if not isinstance(excluded, list):
        raise CheckpointError(f"{source} declares exclude_modules {excluded!r}, not a list of module names", fix=_FIX_FILE)
    weights: dict[str, QuantizedWeight] = {}
    problems: list[str] = []
    for name, info in index.tensors.items():
        if not name.endswith(".weight_scale"):
            continue
        module = name.removesuffix(".weight_scale")
        w = index.tensors.get(module + ".weight")
        if w is None:
            problems.append(f"{name} has no {module}.weight")
            continue
        if w.dtype == "F8_E4M3":
            q = QuantizedWeight(module, "FP8", tuple(w.shape))
            want = {q.weight_scale: ("F32", ()), q.input_scale: ("F32", ())}
        elif w.dtype == "U8" and len(w.shape) == 2 and (w.shape[1] * 2) % group_size == 0:
            q = QuantizedWeight(module, "NVFP4", (w.shape[0], w.shape[1] * 2), group_size)
            blocks = (w.shape[0], w.shape[1] * 2 // group_size)
            want = {q.weight_scale: ("F8_E4M3", blocks), q.weight_scale_2: ("F32", ()), q.input_scale: ("F32", ())}
        else:
            problems.append(f"{module}.weight is {w.dtype} {list(w.shape)} beside a weight_scale (ModelOpt writes F8_E4M3 or packed U8)")
            continue
        if q.algo != algo:
            problems.append(f"{module} is stored as {q.algo}, the recipe says {algo}")
        for companion, (dtype, shape) in want.items():
            got = index.tensors.get(companion)
            if got is None:
                problems.append(f"{companion} is missing")
            elif got.dtype != dtype or tuple(got.shape) != shape:
                problems.append(f"{companion} is {got.dtype} {list(got.shape)}, ModelOpt writes {dtype} {list(shape)}")
        weights[module] = q
    kv_scales: tuple[str, ...] = ()
    if quant.get("kv_cache_quant_algo"):
        kv_scales = tuple(sorted(n for n in index.tensors if n.endswith((".k_proj.k_scale", ".v_proj.v_scale"))))
        problems += [f"{n} is {index.tensors[n].dtype} {list(index.tensors[n].shape)}, ModelOpt writes F32 []" for n in kv_scales if (index.tensors[n].dtype, tuple(index.tensors[n].shape)) != ("F32", ())]
    stray = sorted(n for n, i in index.tensors.items() if i.dtype in ("F8_E4M3", "U8") and n.endswith(".weight") and n.removesuffix(".weight") not in weights)
    problems += [f"{n} is {index.tensors[n].dtype} without a weight_scale" for n in stray]
    if problems:
        shown = "; ".join(problems[:6]) + (f" … (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        raise CheckpointError(f"the ModelOpt {algo} checkpoint is incomplete: {shown}", fix="re-download the checkpoint (every quantized weight needs its scale tensors)")
    return ModelOptQuantization(
        algo=algo,
        source=source,
        producer=f"{producer.get('name', 'unknown')} {producer.get('version', '')}".strip(),
        kv_cache_algo=quant.get("kv_cache_quant_algo"),
        exclude_modules=tuple(_clean_module_pattern(str(p)) for p in excluded),
        weights=weights,
        kv_scales=kv_scales,
    )


def dequantize_fp8(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """ModelOpt's ``FP8QTensor.dequantize(dtype)``: ``weight.to(dtype) * scale.to(dtype)``."""
    return weight.to(dtype) * scale.to(dtype)


def dequantize_nvfp4(packed: Tensor, block_scale: Tensor, global_scale: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """ModelOpt's ``NVFP4QTensor.dequantize(dtype)``: E2M1 codes (low nibble first) times the fp32
    block scale ``block_scale.float() * global_scale``, converted to ``dtype``."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes.long()]
    scale = block_scale.to(torch.float32) * global_scale.to(torch.float32)
    blocks = values.reshape(*values.shape[:-1], -1, group_size) * scale.unsqueeze(-1)
    return blocks.reshape(values.shape).to(dtype)


__all__ = [
    "E2M1_VALUES",
    "QUANT_CONFIG_FILE",
    "ModelOptQuantization",
    "QuantizedWeight",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "read_quantization",
    "read_recipe",
]
