"""TensorRT engines: version gates, the parser dispatch emulator, profiles, the sidecar and the build.

Only the build needs TensorRT (imported lazily, with a typed error when missing); everything else is pure and
runs anywhere. Submodules are imported on first use, so that ``import hybridtrt.engine.limits`` (the CLI's
``--help``) stays light.

======================  =====================================================================
module                  what
======================  =====================================================================
``trt_rules``           the rule table: parser releases, native ops, our plugin creators (data)
``versions``            version parsing and the runtime gate
``dispatch``            how a TensorRT release's ONNX parser imports each node (emulated)
``network``             proof after parsing: plugin layers vs custom nodes
``profiles``            optimization profiles; ``limits`` their defaults
``sidecar``             ``model.engine.json``
``build``               planning and the polygraphy build
======================  =====================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> submodule that defines it.
_EXPORTS = {
    "BuildPlan": "build",
    "BuildResult": "build",
    "build_engine": "build",
    "import_tensorrt": "build",
    "plan_build": "build",
    "DEFAULT_MAX_BATCH": "limits",
    "DEFAULT_MAX_CACHE_LEN": "limits",
    "DEFAULT_MAX_INPUT_LEN": "limits",
    "DimRange": "profiles",
    "ProfileSpec": "profiles",
    "engine_profiles": "profiles",
    "make_sidecar": "sidecar",
    "read_sidecar": "sidecar",
    "sidecar_path": "sidecar",
    "write_sidecar": "sidecar",
    "emulate_dispatch": "dispatch",
    "require_dispatch": "dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hybridtrt.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
