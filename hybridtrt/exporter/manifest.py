"""``hybridtrt.json``: what an export directory holds and how to feed it (DESIGN.md §6).

Written last by the exporter, so its presence marks a complete export. Deterministic (sorted keys,
no timestamps): the same checkpoint and flags give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hybridtrt import CONTRACT_VERSION, __version__
from hybridtrt.errors import ArtefactError

MANIFEST_FILE = "hybridtrt.json"

_KIND_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """sha256 over config.json and every weight/tokenizer file (names and bytes), sorted."""
    root = Path(checkpoint_dir)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors") or p.name == "tokenizer.json")
    )
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape the artefact."""
    out = {"hybridtrt": __version__, "python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime", "onnx-ir"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class GraphEntry:
    """One ONNX file of the export.

    Attributes:
        file: Model file name in the export dir.
        data: External weight file name(s) it references.
        role: ``"unified"`` (prefill + decode) or ``"decode"`` (one token, Mamba2StateUpdate).
        inputs / outputs: ``[{"name", "dtype", "shape"}]`` with symbolic dims as strings.
        custom_ops: ``{op_type: count}``.
    """

    file: str
    data: list[str]
    role: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    custom_ops: dict[str, int]


@dataclass
class Manifest:
    """Contents of ``hybridtrt.json``."""

    source: dict[str, Any]
    model: dict[str, Any]
    layers: list[dict[str, Any]]
    dtype: str
    state_dtype: str
    logits: str
    opset: int
    graphs: dict[str, GraphEntry]
    states: list[dict[str, Any]]
    per_layer_outputs: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    #: How the export was checked before publishing (`hybridtrt.exporter.verify`): mode
    #: ``full`` / ``layers`` (windows) / ``skipped`` (with the reason), gate, worst error per graph.
    verification: dict[str, Any] | None = None
    tools: dict[str, str] = field(default_factory=tool_versions)
    contract_version: int = CONTRACT_VERSION
    kv_cache: str = "dynamic"
    max_cache_len: int | None = None

    @property
    def cache_flavour(self):
        """The graphs' KV-cache flavour (`hybridtrt.exporter.io.CacheFlavour`)."""
        from hybridtrt.exporter.io import CacheFlavour

        return CacheFlavour(self.kv_cache, self.max_cache_len)

    def to_json(self) -> str:
        d = {
            "contract_version": self.contract_version,
            "source": self.source,
            "model": self.model,
            "layers": self.layers,
            "dtype": self.dtype,
            "state_dtype": self.state_dtype,
            "logits": self.logits,
            "opset": self.opset,
            "graphs": {k: vars(v) for k, v in self.graphs.items()},
            "states": self.states,
            "per_layer_outputs": self.per_layer_outputs,
            "quantization": self.quantization,
            "verification": self.verification,
            "tools": self.tools,
            "kv_cache": self.kv_cache,
            "max_cache_len": self.max_cache_len,
        }
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        graphs = {k: GraphEntry(**v) for k, v in d["graphs"].items()}
        fields = {k: v for k, v in d.items() if k != "graphs"}
        return cls(graphs=graphs, **fields)

    def write(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / MANIFEST_FILE
        path.write_text(self.to_json())
        return path


def layer_map(pattern: str) -> list[dict[str, Any]]:
    """``[{"index": i, "kind": "mamba"|"attention"|"mlp"}]`` for the pattern."""
    return [{"index": i, "kind": _KIND_NAMES[k]} for i, k in enumerate(pattern)]


def read_manifest(export_dir: str | Path) -> Manifest:
    """Load ``hybridtrt.json`` from an export directory, with a clear error when absent or stale."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtefactError(
            f"{export_dir} has no {MANIFEST_FILE}: not a (complete) hybridtrt export",
            fix="run `hybridtrt export CHECKPOINT -o DIR` and point at DIR",
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{path} is not valid JSON: {e}") from None
    version = d.get("contract_version")
    if version != CONTRACT_VERSION:
        raise ArtefactError(
            f"{path} has contract_version {version}, this hybridtrt reads {CONTRACT_VERSION}",
            fix="re-export with this version of hybridtrt",
        )
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError) as e:
        raise ArtefactError(f"{path} is missing or has malformed fields ({e})", fix="re-export") from None
