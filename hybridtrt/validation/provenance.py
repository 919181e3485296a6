"""Is this checkpoint the one the export was made from? Checked before anything is loaded or run.

``hybridtrt.json`` records the source checkpoint's sha256 (config.json, weights, tokenizer) and its
parsed config. Validation compares the checkpoint it is given with both:

- same sha256: go;
- different graph I/O (another family, pattern or size): refused, even with ``--force`` — the two
  cannot be compared at all;
- same I/O, different config or weights (another seed, a fine-tune, files changed since the
  export): refused with both hashes named, unless ``--force`` (then the comparison runs and says
  so in the report's notes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridtrt.errors import CheckpointError
from hybridtrt.exporter.io import state_specs
from hybridtrt.exporter.manifest import Manifest, checkpoint_hash
from hybridtrt.models.config import HybridConfig, load_config

_SHOWN = 4  # differing config keys named in a message


_STORAGE_KEYS = {"checkpoint_dtype"}


def _config_diff(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``key: export value vs checkpoint value`` for keys both records have (a newer hybridtrt may
    record more keys than an older export holds). The declared storage dtype is not part of the
    model: a checkpoint re-saved by ``save_pretrained`` declares one where ours did not."""
    keys = sorted((recorded.keys() & actual.keys()) - _STORAGE_KEYS)
    return [f"{k} {recorded[k]!r} vs {actual[k]!r}" for k in keys if recorded[k] != actual[k]]


def _io_diff(manifest: Manifest, config: HybridConfig) -> list[str]:
    """How the graph I/O the checkpoint implies differs from the export's (empty: comparable)."""
    out = []
    recorded = {s["present_name"]: list(s["shape"]) for s in manifest.states}
    actual = {s.present_name: list(s.shape) for s in state_specs(config)}
    if recorded.keys() != actual.keys():
        only = sorted(recorded.keys() ^ actual.keys())
        out.append(f"states differ ({', '.join(only[:_SHOWN])}{' …' if len(only) > _SHOWN else ''})")
    else:
        out += [f"{k} shape {recorded[k]} vs {actual[k]}" for k in recorded if recorded[k] != actual[k]]
    vocab = manifest.model.get("vocab_size")
    if vocab != config.vocab_size:
        out.append(f"vocab_size {vocab} vs {config.vocab_size}")
    return out


def _short(items: list[str]) -> str:
    return "; ".join(items[:_SHOWN]) + (f"; … {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def check_checkpoint(manifest: Manifest, export_dir: str | Path, checkpoint: str | Path, *, force: bool = False) -> list[str]:
    """Refuse a checkpoint the export was not made from (see the module docstring).

    Args:
        manifest: The export's ``hybridtrt.json``.
        export_dir: The export directory (for messages).
        checkpoint: The checkpoint to compare against.
        force: Compare a checkpoint with the same graph I/O anyway.

    Returns:
        Notes for the report (empty when the checkpoint is the recorded one).

    Raises:
        CheckpointError: Another checkpoint (without ``force``), or one whose graph I/O differs.
    """
    recorded_path = manifest.source.get("checkpoint")
    recorded_sha = manifest.source.get("sha256")
    where = f"{Path(export_dir) / 'hybridtrt.json'}"
    config = load_config(checkpoint)
    io_diff = _io_diff(manifest, config)
    config_diff = _config_diff(manifest.model, config.to_dict())
    if io_diff:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not the one export {export_dir} was made from, and cannot be compared "
            f"with it: its graph I/O differs ({_short(io_diff)}); config export vs checkpoint: {_short(config_diff) or 'same'}",
            fix=f"pass the source checkpoint --checkpoint {recorded_path} (recorded in {where}), or re-export from {checkpoint}",
        )
    sha = checkpoint_hash(checkpoint)
    if sha == recorded_sha:
        return []
    what = f"its config differs ({_short(config_diff)})" if config_diff else "same config, different weights or files"
    same_path = recorded_path is not None and Path(checkpoint).resolve() == Path(recorded_path).resolve()
    claim = "changed since export {} was made" if same_path else "is not the one export {} was made from"
    message = (
        f"checkpoint {checkpoint} {claim.format(export_dir)}: {what}; "
        f"sha256 {sha[:12]}… vs {str(recorded_sha)[:12]}… recorded in {where} (made from {recorded_path})"
    )
    if not force:
        other = "" if same_path else f"pass --checkpoint {recorded_path}, "
        raise CheckpointError(message, fix=f"{other}re-export from {checkpoint}, or add --force to compare anyway (expect a FAIL)")
    return [f"--force: {message}"]


__all__ = ["check_checkpoint"]
