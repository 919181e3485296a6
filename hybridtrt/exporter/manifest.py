"""``hybridtrt.json``: what an export directory holds and how to feed it (DESIGN.md §6).

Written last by the exporter, so its presence marks a complete export. Deterministic (sorted keys,
no timestamps): the same checkpoint and flags give the same bytes. It records the size and sha256 of every
file it publishes (``files``), and `read_manifest` checks them on every read (`hybridtrt.exporter.integrity`):
an export is what its manifest says, or it is refused. Every name it holds must stay inside the export
directory, and a ``.partial-*`` directory (an export being written) is never read as an export.
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
from hybridtrt.exporter.integrity import SAMPLED, IntegrityReport, check_external_data, check_files
from hybridtrt.reading import expect_object, inside, read_json

MANIFEST_FILE = "hybridtrt.json"
#: The top-level manifest of a tensor-parallel export (`hybridtrt.exporter.tensor_parallel`).
TP_MANIFEST = "hybridtrt-tp.json"
#: Largest manifest read (ours are kilobytes; a 9B model's is ~100 KiB).
MAX_MANIFEST_BYTES = 16 * 2**20
#: Name prefix of the directory an export is written into before it is published (`hybridtrt.exporter.target`).
PARTIAL_DIR_PREFIX = ".partial-"

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
    #: The unified and decode graphs also output ``last_hidden_state`` (`export --speculative`).
    hidden_states: bool = False
    quantization: dict[str, Any] | None = None
    #: 4-bit weights, activations in ``dtype`` (`hybridtrt.graphs.weight_only.WeightOnlyRecipe`).
    weight_only: dict[str, Any] | None = None
    #: How the export was checked before publishing (`hybridtrt.exporter.verify`): mode
    #: ``full`` / ``layers`` (windows) / ``skipped`` (with the reason), gate, worst error per graph.
    verification: dict[str, Any] | None = None
    tools: dict[str, str] = field(default_factory=tool_versions)
    contract_version: int = CONTRACT_VERSION
    kv_cache: str = "dynamic"
    max_cache_len: int | None = None
    #: ``{file name: {"bytes", "sha256", "sample_sha256"}}`` of every published file but the manifest itself.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: One rank of a tensor-parallel export (`hybridtrt.exporter.tensor_parallel`): ``rank``, ``world``,
    #: ``vocab``, what it ``holds``, its ``norm_group`` and the unsharded ``model``; ``model`` above is the
    #: rank's (its graphs and states). None for a one-device export (and then not written).
    tensor_parallel: dict[str, Any] | None = None

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
            "hidden_states": self.hidden_states,
            "quantization": self.quantization,
            "weight_only": self.weight_only,
            "verification": self.verification,
            "tools": self.tools,
            "kv_cache": self.kv_cache,
            "max_cache_len": self.max_cache_len,
            "files": self.files,
        }
        if self.tensor_parallel is not None:
            d["tensor_parallel"] = self.tensor_parallel
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


def pattern_of(layers: list[dict[str, Any]]) -> str:
    """The block letters (``M*-E``) of a `layer_map`: its inverse."""
    letters = {kind: letter for letter, kind in _KIND_NAMES.items()}
    return "".join(letters[entry["kind"]] for entry in layers)


_FIX = "re-export the model (`hybridtrt export CHECKPOINT -o DIR`) and point at DIR"


def read_manifest(export_dir: str | Path, *, integrity: str | None = SAMPLED) -> Manifest:
    """Load ``hybridtrt.json`` from an export directory and check that the directory is what it says.

    Args:
        export_dir: The export directory.
        integrity: `hybridtrt.exporter.integrity.SAMPLED` (default: sizes, the graphs' sha256, the weights'
            sampled sha256), ``FULL`` (every byte; ``--check-integrity``) or None (the manifest alone: only for
            code that checks the files itself).

    Raises:
        ArtefactError: No manifest (or a ``.partial-*`` directory), a manifest that is not a JSON object of this
            contract version, a file name outside the directory, or files that are not the ones recorded.
    """
    root = Path(export_dir)
    if root.name.startswith(PARTIAL_DIR_PREFIX):
        raise ArtefactError(
            f"{root} is an export still being written (or left by an interrupted one), not an export",
            fix="point at the export directory itself (the parent of this folder); re-export if it has no hybridtrt.json",
        )
    path = root / MANIFEST_FILE
    if not path.is_file() and (root / TP_MANIFEST).is_file():
        raise ArtefactError(
            f"{export_dir} is a tensor-parallel export (rank0/ … and {TP_MANIFEST}): its ranks' graphs compute together",
            fix=f"`hybridtrt generate {export_dir}` runs its ranks as N processes (Python: hybridtrt.runtime.tensor_parallel.TensorParallelModel), "
            f"`hybridtrt validate {export_dir}` checks them, `hybridtrt build {export_dir}` builds every rank's engine",
        )
    if not path.is_file():
        raise ArtefactError(f"{export_dir} has no {MANIFEST_FILE}: not a (complete) hybridtrt export", fix="run `hybridtrt export CHECKPOINT -o DIR` and point at DIR")
    d = expect_object(
        read_json(path, what="the export manifest", error=ArtefactError, fix=_FIX, limit=MAX_MANIFEST_BYTES),
        source=str(path), error=ArtefactError, fix=_FIX,
    )  # fmt: skip
    version = d.get("contract_version")
    if version != CONTRACT_VERSION:
        raise ArtefactError(
            f"{path} has contract_version {version!r}, this hybridtrt reads {CONTRACT_VERSION}"
            + (" (version 2 records the size and sha256 of every file)" if version == 1 else ""),
            fix="re-export with this version of hybridtrt",
        )
    try:
        manifest = Manifest.from_dict(d)
        graph_files = {name: (g.file, list(g.data)) for name, g in manifest.graphs.items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ArtefactError(f"{path} is missing or has malformed fields ({e})", fix=_FIX) from None
    for name, (file, data) in graph_files.items():
        for entry in (file, *data):
            inside(root, entry, what=f"{path} (graph {name!r})", error=ArtefactError, fix=_FIX)
            if entry not in manifest.files:
                raise ArtefactError(f"{path} names {entry!r} for graph {name!r} but records no size or sha256 for it", fix=_FIX)
    if integrity is not None:
        check_export(root, manifest, level=integrity)
    return manifest


def check_export(export_dir: str | Path, manifest: Manifest, *, level: str = SAMPLED) -> IntegrityReport:
    """Check the export's files against ``manifest.files`` and its graphs' external-data entries.

    Raises:
        ArtefactError: See `hybridtrt.exporter.integrity.check_files` / ``check_external_data``.
    """
    import onnx

    report = check_files(export_dir, manifest.files, level=level)
    for entry in manifest.graphs.values():
        try:
            proto = onnx.load(str(Path(export_dir) / entry.file), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
            raise ArtefactError(f"{Path(export_dir) / entry.file} is not an ONNX model ({type(e).__name__}: {e})", fix=_FIX) from None
        check_external_data(export_dir, entry.file, proto, manifest.files)
    return report


def refuse_alone(export_dir: str | Path, manifest: Manifest) -> None:
    """Refuse to run one rank of a tensor-parallel export by itself (its collectives need the others).

    Raises:
        ArtefactError: ``manifest`` is a rank's, naming its rank and world, with the fix.
    """
    tp = manifest.tensor_parallel
    if tp is None:
        return
    parent = Path(export_dir).resolve().parent
    raise ArtefactError(
        f"{export_dir} is rank {tp.get('rank')} of a {tp.get('world')}-rank tensor-parallel export: its graph computes only with the other ranks'",
        fix=f"`hybridtrt generate {parent}` runs every rank together ({tp.get('world')} processes), `hybridtrt validate {parent}` checks them, "
        f"`hybridtrt build {parent}` builds one engine per rank for {tp.get('world')} GPUs",
    )


def is_tp_export(path: str | Path) -> bool:
    """``path`` is the top directory of ``export --tp N`` (`TP_MANIFEST` there, no one-device manifest)."""
    return (Path(path) / TP_MANIFEST).is_file() and not (Path(path) / MANIFEST_FILE).exists()


def check_rank(artefact: str | Path, tp: dict | None, rank: int, world: int) -> None:
    """Refuse to load ``artefact`` (a rank's export or engine, ``tp`` its ``tensor_parallel`` record) as rank
    ``rank`` of ``world`` processes unless it is that rank of that world: a rank's graph holds only its
    slices, and the wrong rank's would compute a wrong model, not fail.

    Raises:
        ArtefactError: Not a rank's artefact, or another rank's or world's.
    """
    if tp is None:
        raise ArtefactError(
            f"{artefact} is a one-device artefact, loaded as rank {rank} of {world} tensor-parallel processes",
            fix="export with `hybridtrt export CKPT -o OUT --tp N` and run OUT's ranks",
        )
    if (int(tp.get("rank", -1)), int(tp.get("world", -1))) != (rank, world):
        raise ArtefactError(
            f"{artefact} is rank {tp.get('rank')} of a {tp.get('world')}-rank tensor-parallel model, loaded as rank {rank} of {world}",
            fix=f"load rank{rank}'s artefact in rank {rank}'s process, with a world of {tp.get('world')}",
        )
