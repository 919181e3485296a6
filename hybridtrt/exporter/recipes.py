"""Quantization recipes as data: which linear layers a scheme leaves in the model dtype
(``hybridtrt export --recipe NAME|FILE.json``, ``hybridtrt validate --sensitivity --recipe``).

A recipe is a JSON object::

    {"name": "...", "scheme": "fp8" | "int4", "block_size": 128 (int4, optional),
     "keep": ["attention", "mamba-before-attention", ...], "source": "where the table comes from"}

``keep`` selects layers by their place in the model, so one recipe fits every size of a family:

- ``attention``: the q/k/v/o projections of every attention layer;
- ``mamba``, ``mlp``: every Mamba layer's in/out projections, every MLP's up/down;
- ``mamba-before-attention``: the Mamba layers directly followed by an attention layer;
- ``moe-shared``, ``moe-experts``: the shared experts, the routed experts (FP8: ``MoeExperts``);
- ``layers:4,11``: every linear of those decoder layers.

They become ``--exclude`` regexes on the exported node names (`exclusions`). The built-in recipes
write down NVIDIA's published layer tables; what each says and where it was read is its ``source``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hybridtrt.errors import InputError
from hybridtrt.models.config import ATTENTION, MAMBA, MLP, MOE

SELECTORS = ("attention", "mamba", "mlp", "mamba-before-attention", "moe-shared", "moe-experts")
SCHEMES = ("fp8", "int4")

#: NVIDIA's layer tables for its quantized checkpoints, as published (no hub access here: read through
#: the pages cited; hybridtrt's own sensitivity search is the check, `validate --sensitivity --recipe`).
BUILTIN: dict[str, dict[str, Any]] = {
    "nemotron-3-nano-nvfp4-layout": {
        "scheme": "int4",
        "block_size": 128,
        "keep": ["attention", "mamba-before-attention"],
        "source": (
            "NVIDIA's Nemotron-3-Nano-30B-A3B-NVFP4 layout with INT4 in place of NVFP4: \"The NVFP4 checkpoint keeps the attention "
            "layers and the Mamba layers that feed into them in BF16, quantizes remaining layers to NVFP4\" (the model card "
            "huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4, as quoted by f4u.in/?p=22548; Nemotron 3 Nano technical "
            "report §4 per chankhavu/Nemotron-Cascade-2-30B-A3B-NVFP4: Mamba layers 4, 11, 18, 25, 32, 41, the ones before "
            "attention); Mamba conv1d and the router are never quantized here. Routed experts stay bf16 in INT4 exports."
        ),
    },
    "nemotron-nano-9b-v2-fp8": {
        "scheme": "fp8",
        "keep": ["attention"],
        "source": (
            "NVIDIA's Nemotron-Nano-9B-v2-FP8 table as issue 25 states it from the published config: attention and conv1d stay "
            "BF16 (conv1d is never quantized here); not read from the checkpoint itself (no hub access)"
        ),
    },
}


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A built-in recipe by name, or a recipe JSON file; checked.

    Raises:
        InputError: Unknown name, unreadable file, or a recipe with an unknown scheme, selector or
            block size.
    """
    if name_or_path in BUILTIN:
        recipe = {"name": name_or_path, **BUILTIN[name_or_path]}
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"--recipe {name_or_path!r} is neither a built-in recipe nor a file", fix=f"use one of {', '.join(BUILTIN)}, or a recipe JSON file")
        try:
            recipe = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--recipe {path}: not a JSON recipe ({e})", fix="see hybridtrt/exporter/recipes.py for the format") from None
        if not isinstance(recipe, dict):
            raise InputError(f"--recipe {path}: a recipe is a JSON object", fix="see hybridtrt/exporter/recipes.py for the format")
        recipe.setdefault("name", path.stem)
    if recipe.get("scheme") not in SCHEMES:
        raise InputError(f"recipe {recipe.get('name')!r}: scheme {recipe.get('scheme')!r} is not one of {', '.join(SCHEMES)}", fix="set \"scheme\": \"fp8\" or \"int4\"")
    keep = recipe.get("keep", [])
    if not isinstance(keep, list):
        raise InputError(f"recipe {recipe['name']!r}: \"keep\" must be a list of selectors", fix=f"e.g. [\"attention\"]; selectors: {', '.join(SELECTORS)}, layers:N,M")
    for selector in keep:
        if selector not in SELECTORS and not re.fullmatch(r"layers:\d+(,\d+)*", str(selector)):
            raise InputError(f"recipe {recipe['name']!r}: unknown selector {selector!r}", fix=f"use {', '.join(SELECTORS)} or layers:N,M")
    if "block_size" in recipe and recipe["block_size"] not in (32, 64, 128):
        raise InputError(f"recipe {recipe['name']!r}: block_size {recipe['block_size']!r} is not 32, 64 or 128", fix="use 128")
    return recipe


def kept_layers(recipe: dict[str, Any], pattern: str) -> dict[int, str]:
    """``{decoder layer: selector}`` of the layers ``recipe`` keeps in the model dtype (``pattern``:
    the model's block letters, ``M*-E``). Shared and routed experts are parts of MoE layers, listed
    under their selector."""
    out: dict[int, str] = {}
    for selector in recipe.get("keep", []):
        if str(selector).startswith("layers:"):
            out.update({int(i): selector for i in str(selector).split(":", 1)[1].split(",") if int(i) < len(pattern)})
            continue
        for i, kind in enumerate(pattern):
            hit = (
                (selector == "attention" and kind == ATTENTION)
                or (selector == "mamba" and kind == MAMBA)
                or (selector == "mlp" and kind == MLP)
                or (selector in ("moe-shared", "moe-experts") and kind == MOE)
                or (selector == "mamba-before-attention" and kind == MAMBA and i + 1 < len(pattern) and pattern[i + 1] == ATTENTION)
            )
            if hit:
                out.setdefault(i, selector)
    return dict(sorted(out.items()))


def exclusions(recipe: dict[str, Any], pattern: str) -> list[str]:
    """The ``--exclude`` regexes of ``recipe`` for a model of ``pattern`` (``re.search`` on node names)."""
    out = []
    for layer, selector in kept_layers(recipe, pattern).items():
        scope = {"moe-shared": "mixer/shared_experts/", "moe-experts": "mixer/experts/"}.get(selector, "mixer/")
        out.append(rf"layers\.{layer}/{scope}")
    return out


def describe(recipe: dict[str, Any], pattern: str) -> dict[str, Any]:
    """What ``hybridtrt.json`` records of the recipe: its name, source, selectors and the layers kept."""
    return {"name": recipe["name"], "source": recipe.get("source", ""), "keep": list(recipe.get("keep", [])), "kept_layers": list(kept_layers(recipe, pattern))}


__all__ = ["BUILTIN", "SELECTORS", "describe", "exclusions", "kept_layers", "load_recipe"]
