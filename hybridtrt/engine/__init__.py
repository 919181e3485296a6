"""TensorRT engines: optimization profiles, the engine sidecar, and the polygraphy-based build.

Only `build_engine` needs TensorRT (imported lazily, with a typed error when missing); profiles,
sidecar and build planning are pure and run anywhere.
"""

from hybridtrt.engine.build import BuildPlan, BuildResult, build_engine, import_tensorrt, plan_build
from hybridtrt.engine.profiles import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CACHE_LEN,
    DEFAULT_MAX_INPUT_LEN,
    DimRange,
    ProfileSpec,
    engine_profiles,
)
from hybridtrt.engine.sidecar import make_sidecar, read_sidecar, sidecar_path, write_sidecar

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CACHE_LEN",
    "DEFAULT_MAX_INPUT_LEN",
    "BuildPlan",
    "BuildResult",
    "DimRange",
    "ProfileSpec",
    "build_engine",
    "engine_profiles",
    "import_tensorrt",
    "make_sidecar",
    "plan_build",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]
