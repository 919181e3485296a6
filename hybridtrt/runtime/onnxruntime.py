"""ONNX Runtime backend: runs an export directory with the same `generate` API as the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridtrt.errors import ArtefactError
from hybridtrt.exporter.io import ATTENTION_MASK, INPUT_IDS, LOGITS
from hybridtrt.exporter.manifest import Manifest, read_manifest
from hybridtrt.runtime.generation import GenerationResult, SamplingConfig, generate, iter_generate
from hybridtrt.runtime.states import StatePlan


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (bf16 included, via ml_dtypes) or array-like -> numpy."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


class OrtSession:
    """A CPU ``InferenceSession`` that takes and returns dicts by name."""

    def __init__(self, path: str | Path, *, threads: int | None = None, config: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise ArtefactError(f"{path} does not exist", fix="export first with `hybridtrt export`")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Idle ORT threads otherwise spin and starve PyTorch's OpenMP threads in the same process
        # (validation runs both side by side): measured 30x slower reference calls on 2 cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in (config or {}).items():  # further session config entries
            opts.add_session_config_entry(key, value)
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        arrays = {k: to_numpy(v) for k, v in feeds.items() if k in self.input_names}
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, arrays)))


class OrtModel:
    """An exported model on ONNX Runtime (CPU). Implements the `Stepper` protocol.

    Args:
        export_dir: Directory written by ``hybridtrt export``.
        use_decode_graph: Run one-token steps on ``decode.onnx`` when the export has one.
    """

    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, *, use_decode_graph: bool = True, threads: int | None = None) -> None:
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = read_manifest(self.export_dir)
        self.plan = StatePlan.from_manifest(self.manifest)
        self.unified = OrtSession(self.export_dir / self.manifest.graphs["unified"].file, threads=threads)
        self.decode = None
        if use_decode_graph and "decode" in self.manifest.graphs:
            self.decode = OrtSession(self.export_dir / self.manifest.graphs["decode"].file, threads=threads)

    # -- Stepper --------------------------------------------------------------------------------
    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        return self.plan.zeros(batch)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: dict, decode: bool):
        session = self.decode if (decode and self.decode is not None and input_ids.shape[1] == 1) else self.unified
        out = self.run(input_ids, attention_mask, state, session=session)
        logits = out[LOGITS]
        if logits.ndim == 3:
            logits = logits[:, -1]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)), self.plan.feed_back(out)

    def named_states(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{present_name: array}`` of a state returned by `step`."""
        return {b.present_name: state[b.past_name] for b in self.plan.buffers}

    # -- lower level ----------------------------------------------------------------------------
    def run(self, input_ids: Any, attention_mask: Any, state: dict[str, np.ndarray], session: OrtSession | None = None) -> dict[str, np.ndarray]:
        """One graph call: ``{output_name: array}``."""
        feeds = {INPUT_IDS: to_numpy(input_ids).astype(np.int64), ATTENTION_MASK: to_numpy(attention_mask).astype(np.int64), **state}
        return (session or self.unified).run(feeds)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> GenerationResult:
        """Same API as `HybridLM.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Yield ``[B]`` tokens step by step."""
        return iter_generate(self, input_ids, attention_mask, **kwargs)


__all__ = ["OrtModel", "OrtSession", "SamplingConfig"]
