"""TensorRT version gates, from the rule table in `hybridtrt.engine.trt_rules` (pure; no TensorRT).

- `parse_version`: ``"11.1.0.106"`` -> ``(11, 1)``; a version that is not ``MAJOR.MINOR...`` is an error.
- `parser_release`: the `ParserRelease` row of a version.
- `check_runtime_version`: what every TensorRT path needs (IPluginV3, strongly typed networks: >= 10.0).

What building a given graph needs (opset coverage, plugins over function bodies, ...) is decided node by node
by `hybridtrt.engine.dispatch`, from the same table.
"""

from __future__ import annotations

import re

from hybridtrt.engine.trt_rules import LOCAL_FUNCTION_ALWAYS, MIN_TENSORRT, PARSER_RELEASES, ParserRelease, Version
from hybridtrt.errors import MissingDependencyError

_DEPLOY_DOC = "see README 'Deploying the engine' (docs/deploying.md)"

#: Oldest TensorRT whose ONNX parser uses a registered plugin over a model-local function.
MIN_PLUGIN_DISPATCH: Version = next(r.since for r in PARSER_RELEASES if r.dispatch != LOCAL_FUNCTION_ALWAYS)


def parse_version(version: str) -> Version:
    """``(major, minor)`` of a TensorRT version string.

    Raises:
        MissingDependencyError: Not of the form ``MAJOR.MINOR[...]``.
    """
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise MissingDependencyError(
            f"cannot read the TensorRT version {version!r} (expected MAJOR.MINOR...)",
            fix=f"install a released TensorRT 11 Python wheel; {_DEPLOY_DOC}",
        )
    return int(m.group(1)), int(m.group(2))


def fmt(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def parser_release(version: str | Version) -> ParserRelease:
    """The `ParserRelease` row that applies to ``version`` (the last one it reaches).

    Raises:
        MissingDependencyError: Older than every row (TensorRT < 10.0).
    """
    v = parse_version(version) if isinstance(version, str) else version
    rows = [r for r in PARSER_RELEASES if v >= r.since]
    if not rows:
        raise MissingDependencyError(
            f"TensorRT {fmt(v)} is too old: hybridtrt needs TensorRT >= {fmt(MIN_TENSORRT)} (IPluginV3, strongly typed "
            "networks), >= 10.15 recommended (11 best)",
            fix=f"install TensorRT 11; {_DEPLOY_DOC}",
        )
    return rows[-1]


def check_runtime_version(version: str) -> Version:
    """Refuse a TensorRT no hybridtrt engine can run on (< 10.0). Returns ``(major, minor)``."""
    v = parse_version(version)
    parser_release(v)
    return v


__all__ = [
    "MIN_PLUGIN_DISPATCH",
    "check_runtime_version",
    "fmt",
    "parse_version",
    "parser_release",
]
