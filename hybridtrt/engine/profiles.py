"""TensorRT optimization profiles of an export (DESIGN.md §9), as plain data.

The unified graph (``model.onnx``) gets two profiles, in this order, so that profile index 0 is
always the prefill one:

===========  ==========================  ==================================================
profile      dims                        meaning
===========  ==========================  ==================================================
0 prefill    batch 1..B, seq 1..L,        a prompt chunk: from zero states (past 0) or on
             past 0..S-L                  the states of earlier chunks / a snapshot
1 decode     batch 1..B, seq 1, past 0..S-1  one new token on top of ``past`` cached positions
===========  ==========================  ==================================================

``B = max_batch``, ``L = max_input_len`` (longest prompt), ``S = max_cache_len``: the most
positions a KV cache ever holds, prompt plus generated tokens. The attention mask spans
``past + seq`` positions, so it is at most ``S`` wide in both profiles, and a ``present.{i}.key``
output is at most ``[B, H_kv, S, D]``: that is what runtimes preallocate.

The decode-only graph (``decode.onnx``) gets the decode profile alone.

Every function here is pure (no TensorRT): the CLI prints the profiles before it imports
TensorRT, and the runtime reuses them from the engine's sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridtrt.engine.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_INPUT_LEN, DEFAULT_OPT_INPUT_LEN
from hybridtrt.errors import EngineError
from hybridtrt.exporter.io import BATCH, PAST, SEQ, TOTAL
from hybridtrt.exporter.manifest import Manifest

PREFILL, DECODE = "prefill", "decode"
#: The MTP head's graph of a ``--speculative`` export (DESIGN.md §11).
MTP = "mtp"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DimRange:
    """``min ≤ opt ≤ max`` of one symbolic dimension."""

    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile.

    Attributes:
        name: ``"prefill"`` or ``"decode"``.
        dims: Ranges of the symbolic dims ``batch``, ``seq`` and ``past``.
        shapes: ``{input_name: (min_shape, opt_shape, max_shape)}`` for every graph input.
    """

    name: str
    dims: dict[str, DimRange]
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for the sidecar): lists instead of tuples."""
        return {
            "name": self.name,
            "dims": {k: v.as_list() for k, v in sorted(self.dims.items())},
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileSpec:
        return cls(
            name=str(d["name"]),
            dims={k: DimRange(*map(int, v)) for k, v in d["dims"].items()},
            shapes={k: tuple(tuple(int(x) for x in s) for s in v) for k, v in d["shapes"].items()},  # type: ignore[misc]
        )


def validate_limits(max_batch: int, max_input_len: int, max_cache_len: int) -> None:
    """Refuse limits that cannot make a working engine.

    Raises:
        EngineError: A limit is < 1, or ``max_input_len > max_cache_len`` (the prompt alone would
            overflow the cache).
    """
    for name, value in (("max_batch", max_batch), ("max_input_len", max_input_len), ("max_cache_len", max_cache_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise EngineError(f"{name} must be an integer ≥ 1, got {value!r}", fix=f"pass {flag} N with N ≥ 1")
    if max_input_len > max_cache_len:
        raise EngineError(
            f"max_input_len {max_input_len} > max_cache_len {max_cache_len}: a prompt that long overflows the KV cache",
            fix=f"raise --max-cache-len to at least {max_input_len} (prompt + new tokens) or lower --max-input-len",
        )


def resolve_shape(shape: list[int | str] | tuple[int | str, ...], dims: dict[str, int], *, name: str = "?") -> Shape:
    """Concrete shape of a manifest shape template.

    Args:
        shape: Dims as ints or the symbolic names ``batch``, ``seq``, ``past``, ``past+seq``.
        dims: Values of ``batch``, ``seq`` and ``past``.
        name: Tensor name, for the error message.

    Raises:
        EngineError: An unknown symbolic dim.
    """
    out: list[int] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d == TOTAL:
            out.append(dims[PAST] + dims[SEQ])
        elif d in (BATCH, SEQ, PAST):
            out.append(dims[d])
        elif isinstance(d, str) and d.isdigit():
            out.append(int(d))
        else:
            raise EngineError(
                f"input {name} has symbolic dim {d!r}; the TensorRT profiles know batch, seq, past and past+seq",
                fix="re-export with this version of hybridtrt",
            )
    return tuple(out)


def _profile(name: str, inputs: list[dict[str, Any]], dims: dict[str, DimRange]) -> ProfileSpec:
    points = [{k: getattr(v, which) for k, v in dims.items()} for which in ("min", "opt", "max")]
    shapes = {
        i["name"]: tuple(resolve_shape(i["shape"], p, name=i["name"]) for p in points)  # type: ignore[misc]
        for i in inputs
    }
    return ProfileSpec(name, dims, shapes)  # type: ignore[arg-type]


def _graph_inputs(manifest: Manifest, graph: str) -> list[dict[str, Any]]:
    if graph not in manifest.graphs:
        fix = {DECODE: "re-export with `hybridtrt export --split`", MTP: "export with `hybridtrt export --speculative` from a checkpoint with an MTP head"}.get(graph, "re-export the model")
        raise EngineError(f"the export has no {graph!r} graph (it has {sorted(manifest.graphs)})", fix=fix)
    return manifest.graphs[graph].inputs


def prefill_dims(
    max_batch: int, max_input_len: int, max_cache_len: int | None = None, *, opt_batch: int = 1, opt_input_len: int | None = None
) -> dict[str, DimRange]:
    """``batch 1..B, seq 1..L, past 0..S-L`` (chunked prefill and snapshot continuations call the
    prefill profile on a non-empty cache; ``opt`` past stays 0)."""
    opt_len = min(opt_input_len or DEFAULT_OPT_INPUT_LEN, max_input_len)
    past_max = max_cache_len - max_input_len if max_cache_len is not None else 0
    return {BATCH: DimRange(1, min(opt_batch, max_batch), max_batch), SEQ: DimRange(1, opt_len, max_input_len), PAST: DimRange(0, 0, past_max)}


def decode_dims(max_batch: int, max_cache_len: int, *, opt_batch: int = 1, opt_past: int | None = None) -> dict[str, DimRange]:
    """``batch 1..B, seq 1, past 0..S-1`` (``opt`` past: half the cache unless given)."""
    past_max = max_cache_len - 1
    opt = min(opt_past if opt_past is not None else max_cache_len // 2, past_max)
    return {BATCH: DimRange(1, min(opt_batch, max_batch), max_batch), SEQ: DimRange(1, 1, 1), PAST: DimRange(0, opt, past_max)}


def engine_profiles(
    manifest: Manifest,
    *,
    graph: str = "unified",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_input_len: int = DEFAULT_MAX_INPUT_LEN,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    opt_batch: int = 1,
) -> list[ProfileSpec]:
    """The optimization profiles of ``graph`` (``"unified"``: prefill then decode; ``"decode"``: decode;
    ``"mtp"``, the MTP head of a ``--speculative`` export: prefill (the prompt's positions, then a
    verify call's K + 1) then decode (a chained draft), over the same dims).

    Args:
        manifest: The export's ``hybridtrt.json``.
        graph: Which graph of the export the engine is built from.
        max_batch: Largest batch.
        max_input_len: Longest prompt (prefill ``seq``).
        max_cache_len: Most KV positions after a call (``past + seq``).
        opt_batch: Batch TensorRT tunes for.

    Returns:
        Profiles in engine order (index 0 first).

    Raises:
        EngineError: Bad limits, an unknown graph, or a graph whose fixed ``seq`` contradicts its role.
    """
    validate_limits(max_batch, max_input_len, max_cache_len)
    if graph not in ("unified", DECODE, MTP):
        raise EngineError(f"unknown graph {graph!r}", fix="use --graph unified or --graph decode")
    inputs = _graph_inputs(manifest, graph)
    decode = _profile(DECODE, inputs, decode_dims(max_batch, max_cache_len, opt_batch=opt_batch))
    if graph == DECODE:
        return [decode]
    prefill = _profile(PREFILL, inputs, prefill_dims(max_batch, max_input_len, max_cache_len, opt_batch=opt_batch))
    return [prefill, decode]


def profile_rows(profiles: list[ProfileSpec]) -> list[list[str]]:
    """Table rows ``[profile, input, min, opt, max]`` for the CLI."""
    rows = []
    for i, p in enumerate(profiles):
        for name, (lo, opt, hi) in p.shapes.items():
            rows.append([f"{i} {p.name}", name, "×".join(map(str, lo)), "×".join(map(str, opt)), "×".join(map(str, hi))])
    return rows
