"""Typed user errors.

A user error names the stage it happened in, the offending value and the fix. The CLI prints it
without a traceback and exits non-zero. Anything that is not a `HybridTrtError` is an internal bug
and keeps its traceback.
"""

from __future__ import annotations


class HybridTrtError(Exception):
    """Root of every error a user can cause and fix.

    Args:
        message: What is wrong, with the offending value.
        fix: How to fix it. Optional but strongly preferred.
    """

    #: Short stage name shown before the message ("config", "checkpoint", "export", ...).
    stage: str = "hybridtrt"
    #: Process exit code used by the CLI.
    exit_code: int = 2

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"[{self.stage}] {self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class ConfigError(HybridTrtError):
    """The model's config.json is missing, malformed or describes something unsupported."""

    stage = "config"


class CheckpointError(HybridTrtError):
    """Weights are missing, misshapen, or in a format we refuse to read (e.g. pickle)."""

    stage = "checkpoint"


class InputError(HybridTrtError):
    """Bad call-time input: shapes, dtypes, masks, prompts."""

    stage = "input"


class ExportError(HybridTrtError):
    """ONNX export cannot proceed (unwritable output, unsupported dtype, ...)."""

    stage = "export"


class ArtefactError(HybridTrtError):
    """An exported artefact (model.onnx, hybridtrt.json, .engine) is missing or inconsistent."""

    stage = "artefact"


class QuantizationError(HybridTrtError):
    """FP8 calibration or Q/DQ insertion cannot proceed."""

    stage = "quantize"


class MissingDependencyError(HybridTrtError):
    """An optional dependency (TensorRT, CUDA, transformers, matplotlib, ...) is not installed."""

    stage = "dependency"


class EngineError(HybridTrtError):
    """TensorRT engine build or load failed for a reason the user can fix."""

    stage = "engine"


class PluginBuildError(HybridTrtError):
    """Building or locating the CUDA/TensorRT plugin libraries failed."""

    stage = "plugins"


class ValidationFailed(HybridTrtError):
    """A numerical gate failed. Exit code 1, distinct from usage errors (2)."""

    stage = "validate"
    exit_code = 1
