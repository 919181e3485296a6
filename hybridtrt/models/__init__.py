"""The PyTorch reference of Nemotron-H hybrids and plain Mamba-2 (validation oracle #1).

Names are imported on first use (PEP 562), so that ``hybridtrt.models.config`` and other torch-free
modules can be imported without importing torch (``hybridtrt --help`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module that defines it
_EXPORTS = {
    "HybridCache": "hybridtrt.models.cache",
    "HybridConfig": "hybridtrt.models.config",
    "config_from_dict": "hybridtrt.models.config",
    "load_config": "hybridtrt.models.config",
    "load_model": "hybridtrt.models.loading",
    "parse_dtype": "hybridtrt.models.loading",
    "CausalLMOutput": "hybridtrt.models.model",
    "HybridLM": "hybridtrt.models.model",
    "PRESETS": "hybridtrt.models.presets",
    "create_checkpoint": "hybridtrt.models.presets",
    "random_model": "hybridtrt.models.presets",
    "save_checkpoint": "hybridtrt.models.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
