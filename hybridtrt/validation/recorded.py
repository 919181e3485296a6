"""Outputs recorded elsewhere: validate a polygraphy ``RunResults`` JSON against the reference here.

The GPU machine needs neither PyTorch nor the checkpoint: it runs the inputs that
``hybridtrt compare`` wrote through ``polygraphy run … --load-inputs inputs.json --save-outputs
trt.json``; this machine recomputes the PyTorch reference on the very same inputs and applies the
usual gates, table, report and exit codes.

Every iteration of the inputs is one graph call whose past states are the *reference's*, so no
error is fed back: each iteration's logits get the single-call gate (``call``), its states the
``state`` gate. Iteration 0 is the prefill, later ones are decode steps. Layer outputs recorded with
``--onnx-outputs`` (the located tensors, or ``layer_output.{i}`` of a ``--per-layer`` export) are
compared per layer when asked, naming the first divergence in layer order. For MoE exports the
commands `hybridtrt compare` prints also record each router's ``TopK`` indices: the reference is then
held to the recording's expert choices, and those choices are judged against the ones the reference
would have made (DESIGN.md §8, `hybridtrt.judge.routing`); a recording without them is judged with
free routing, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridtrt.errors import InputError
from hybridtrt.exporter.io import ATTENTION_MASK, INPUT_IDS, LOGITS
from hybridtrt.exporter.manifest import Manifest
from hybridtrt.exporter.wrapper import GraphModule
from hybridtrt.judge.routing import RoutingTally, flips
from hybridtrt.models.moe import RoutingHold, held_routing
from hybridtrt.validation.layers import LayerTaps
from hybridtrt.validation.polygraphy_bridge import REFERENCE_RUNNER
from hybridtrt.validation.runner import Report, check, compare_layers, is_state

Feed = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


def _existing(paths: Sequence[str | Path], flag: str) -> list[str]:
    """``paths`` as strings, each an existing regular file or a directory of them, small enough to
    parse in the memory there is (polygraphy holds the JSON text and the decoded arrays: ~3× the file).

    Raises:
        InputError: A missing path, a FIFO or device (``/dev/zero``) where a file belongs, or files too
            large for the memory available.
    """
    from hybridtrt.memory import check_memory
    from hybridtrt.reading import regular_file_size

    fix = "give the file (or directory of per-iteration files) that polygraphy wrote"
    total = 0
    for p in map(Path, paths):
        if not p.exists() and not p.is_symlink():
            raise InputError(f"{flag} {p} does not exist", fix=fix)
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            total += regular_file_size(f, what=flag, error=InputError, fix=fix)
    check_memory(3 * total, what=f"reading {flag} {' '.join(map(str, paths))}", fix="validate fewer iterations at a time, or on a machine with more memory")
    return [str(p) for p in paths]


def _integer(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_


def check_feeds(feeds: list[Feed], paths: Sequence[str | Path]) -> None:
    """Each iteration's feeds are what a hybridtrt graph takes (before anything runs on them):
    ``input_ids`` integer ``[B, L]`` with ids ≥ 0, ``attention_mask`` integer ``[B, past + L]`` of 0/1
    with left padding only, every other feed (the states) floating point and finite.

    Raises:
        InputError: naming the iteration, the feed and what is wrong.
    """
    where = f"--load-inputs {' '.join(map(str, paths))}"
    fix = "pass the inputs.json that `hybridtrt compare` wrote"
    for k, feed in enumerate(feeds):
        arrays = {name: np.asarray(value) for name, value in feed.items()}
        ids, mask = arrays[INPUT_IDS], arrays[ATTENTION_MASK]
        if not _integer(ids) or ids.ndim != 2 or 0 in ids.shape:
            raise InputError(f"{where}: iteration {k}: {INPUT_IDS} is {ids.dtype} {list(ids.shape)}, not integer [batch, seq ≥ 1]", fix=fix)
        if not _integer(mask) or mask.ndim != 2 or mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
            raise InputError(f"{where}: iteration {k}: {ATTENTION_MASK} is {mask.dtype} {list(mask.shape)}, not integer [{ids.shape[0]}, past + {ids.shape[1]}]", fix=fix)
        if not np.isin(mask, (0, 1)).all() or not (mask[:, -1] == 1).all() or (np.diff(mask.astype(np.int64), axis=1) < 0).any():
            raise InputError(f"{where}: iteration {k}: {ATTENTION_MASK} is not 0/1 with left padding only", fix=fix)
        if int(ids.min()) < 0:
            raise InputError(f"{where}: iteration {k}: token id {int(ids.min())} in {INPUT_IDS} is negative", fix=fix)
        for name, a in arrays.items():
            if name in (INPUT_IDS, ATTENTION_MASK):
                continue
            if not np.issubdtype(a.dtype, np.floating):
                raise InputError(f"{where}: iteration {k}: state {name} is {a.dtype}, not floating point", fix=fix)
            bad = int(a.size - np.isfinite(a).sum())
            if bad:
                raise InputError(f"{where}: iteration {k}: state {name} has {bad} NaN/Inf value(s)", fix=fix)


def load_feeds(paths: Sequence[str | Path]) -> list[Feed]:
    """Polygraphy input data (``--load-inputs`` files or directories, chained in order)."""
    from polygraphy.comparator import StreamingDataLoader
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    checked = _existing(paths, "--load-inputs")
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            feeds = list(StreamingDataLoader(checked))
    except RecursionError:
        raise InputError(f"--load-inputs {list(map(str, paths))} nests deeper than Python's JSON parser can follow", fix="pass the inputs.json that `hybridtrt compare` wrote") from None
    except (PolygraphyException, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"--load-inputs {list(map(str, paths))} is not polygraphy input data ({e})", fix="pass the inputs.json that `hybridtrt compare` wrote") from None
    bad = [i for i, f in enumerate(feeds) if not isinstance(f, dict) or INPUT_IDS not in f or ATTENTION_MASK not in f]
    if not feeds or bad:
        raise InputError(
            f"--load-inputs {list(map(str, paths))}: iteration {bad[0] if bad else 0} has no {INPUT_IDS}/{ATTENTION_MASK} feed",
            fix="pass the inputs.json that `hybridtrt compare` wrote",
        )
    check_feeds(feeds, paths)
    return feeds


def load_results(paths: Sequence[str | Path], runner: str | None = None) -> tuple[str, list[Outputs]]:
    """One runner's iterations from polygraphy ``RunResults`` (``--save-outputs`` files or directories).

    Args:
        paths: Files or directories, one recorded run each; their iterations are chained in order
            (e.g. an engine's prefill profile, then its decode profile), as ``--load-inputs`` chains
            the inputs.
        runner: The runner to take from each; default: the only one that is not ``hybridtrt
            compare``'s reference.

    Returns:
        ``(runner name(s), [{output: array} per iteration])``.
    """
    names, iterations = [], []
    for path in paths:
        results = _load_run(path)
        name = _pick_runner(results, runner, path)
        names.append(name)
        iterations += [{k: np.asarray(v) for k, v in it.items()} for it in results[name]]
    return " + ".join(dict.fromkeys(names)), iterations


def _load_run(path: str | Path):
    from polygraphy.comparator import RunResults
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    _existing([path], "--load-outputs")
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            return RunResults.concat(RunResults.load_streaming(str(path)))
    except RecursionError:
        raise InputError(f"--load-outputs {path} nests deeper than Python's JSON parser can follow", fix="pass what `polygraphy run … --save-outputs FILE` wrote") from None
    except (PolygraphyException, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"--load-outputs {path} is not a polygraphy RunResults JSON ({e})", fix="pass what `polygraphy run … --save-outputs FILE` wrote") from None


def _pick_runner(results, runner: str | None, path: str | Path) -> str:
    names = list(results.keys())
    if runner is not None:
        if runner not in names:
            raise InputError(f"--runner {runner!r} is not in {path}; it holds {names}", fix=f"use one of {names}")
        return runner
    candidates = [n for n in names if n != REFERENCE_RUNNER]
    if len(candidates) != 1:
        raise InputError(
            f"--load-outputs {path} holds runners {names}: "
            + ("only hybridtrt compare's reference, no backend's outputs" if not candidates else "pick one"),
            fix="pass --runner NAME" if candidates else "pass the file `polygraphy run … --save-outputs` wrote on the backend machine",
        )
    return candidates[0]


def recorded_routing(recorded: list[Outputs], routers: dict[int, str], feeds: list[Feed]) -> list[dict[int, torch.Tensor]] | None:
    """Per iteration ``{MoE layer: [B, L, K]}`` the recording's own routers chose: the router ``TopK``
    indices tensors (``routers``: layer -> tensor name, `hybridtrt.graphs.held_routing.router_topks`)
    that `hybridtrt compare` has polygraphy record with ``--onnx-outputs``. None when the recording
    lacks any of them (or the model has no MoE layer)."""
    if not routers or not all(name in it for it in recorded for name in routers.values()):
        return None
    out = []
    for it, feed in zip(recorded, feeds):
        batch, length = np.asarray(feed[INPUT_IDS]).shape
        out.append({layer: torch.from_numpy(np.asarray(it[name]).astype(np.int64)).reshape(batch, length, -1) for layer, name in routers.items()})
    return out


def reference_outputs(
    model: Any, manifest: Manifest, feeds: list[Feed], routing: list[dict[int, torch.Tensor]] | None = None
) -> tuple[list[Outputs], list[dict[int, torch.Tensor]]]:
    """The PyTorch reference on each feed (fp32), with every layer's output: ``({name: array}`` per
    iteration, the reference's own MoE choices per iteration ``{layer: [B, L, K]}``). With ``routing``
    (the recording's choices per iteration) the reference is held to them (`RoutingHold`), so the
    gates judge the continuous math on the routing the recording made."""
    from hybridtrt.exporter.io import output_names, state_specs

    graph = GraphModule(model, manifest.logits, decode=False, per_layer=True, hidden=manifest.hidden_states).eval()
    specs = state_specs(model.config)
    check_feed_shapes(feeds, model.config)
    names = output_names(model.config) + [f"layer_output.{i}" for i in range(model.config.num_layers)]
    out, chosen = [], []
    for k, feed in enumerate(feeds):
        ids = torch.from_numpy(np.asarray(feed[INPUT_IDS], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(feed[ATTENTION_MASK], dtype=np.int64))
        missing = [s.past_name for s in specs if s.past_name not in feed]
        if missing:
            raise InputError(f"the inputs have no {missing[:3]}", fix="pass the inputs.json that `hybridtrt compare` wrote for this export")
        states = [torch.from_numpy(np.asarray(feed[s.past_name], dtype=np.float32)) for s in specs]
        hold = RoutingHold(None if routing is None else routing[k])
        with torch.no_grad(), held_routing(model, hold):
            result = graph(ids, mask, *states)
        out.append({name: t.detach().float().numpy() for name, t in zip(names, result)})
        chosen.append(hold.all_ids())
    return out, chosen


def check_feed_shapes(feeds: list[Feed], config: Any) -> None:
    """Every iteration's ids inside the vocabulary and every state of the shape the model's graph takes
    (batch and past from the iteration's ids and mask), before the reference runs on them.

    Raises:
        InputError: naming the iteration, the feed, its shape and the expected one.
    """
    from hybridtrt.exporter.io import BATCH, PAST, state_specs

    fix = "pass the inputs.json that `hybridtrt compare` wrote for this export"
    for k, feed in enumerate(feeds):
        ids, mask = np.asarray(feed[INPUT_IDS]), np.asarray(feed[ATTENTION_MASK])
        if int(ids.max()) >= config.vocab_size:
            raise InputError(f"iteration {k} of the inputs: token id {int(ids.max())} is outside the model's vocabulary [0, {config.vocab_size})", fix=fix)
        batch, past = ids.shape[0], mask.shape[1] - ids.shape[1]
        for s in state_specs(config):
            if s.past_name not in feed:
                continue  # named by reference_outputs
            want = [batch if d == BATCH else past if d == PAST else int(d) for d in s.shape]
            got = list(np.asarray(feed[s.past_name]).shape)
            if got != want:
                raise InputError(f"iteration {k} of the inputs: {s.past_name} is {got}, the model takes {want}", fix=fix)


def _same_shape(k: int, name: str, got: np.ndarray, ref: np.ndarray) -> None:
    if tuple(np.shape(got)) != tuple(np.shape(ref)):
        raise InputError(
            f"iteration {k} of the recorded results: {name} is {list(np.shape(got))}, the reference's is {list(np.shape(ref))}",
            fix="pass the outputs recorded from these --load-inputs on this export",
        )


def check_matching(feeds: list[Feed], recorded: list[Outputs]) -> None:
    """One recorded iteration per input iteration (checked before the reference runs)."""
    if len(recorded) != len(feeds):
        raise InputError(
            f"the recorded results have {len(recorded)} iteration(s), the inputs {len(feeds)}",
            fix="pass the --load-inputs the outputs were recorded from (`polygraphy run … --load-inputs`)",
        )


def validate_recorded(
    feeds: list[Feed],
    runner: str,
    recorded: list[Outputs],
    reference: list[Outputs],
    taps: LayerTaps,
    *,
    precision: str,
    per_layer: bool = False,
    routing: list[dict[int, torch.Tensor]] | None = None,
    reference_routing: list[dict[int, torch.Tensor]] | None = None,
) -> Report:
    """Compare recorded iterations with the reference's (see the module docstring).

    Args:
        feeds: The inputs, one per iteration.
        runner: Name of the recorded runner (shown as the backend).
        recorded: ``load_results``'s iterations.
        reference: ``reference_outputs`` on ``feeds``.
        taps: Where the export's layer outputs are (maps recorded tensor names to ``layer_output.{i}``).
        precision: Key of the tolerance table.
        per_layer: Compare each layer's states and (recorded) output; name the first divergence.
        routing: The recording's own MoE choices per iteration (`recorded_routing`), to which the
            reference was held; judged against ``reference_routing`` (the reference's own choices
            in the same held runs) by the precision's routing gate (`hybridtrt.judge.routing`).
    """
    check_matching(feeds, recorded)
    mask0 = np.asarray(feeds[0][ATTENTION_MASK])
    report = Report(
        backend=runner,
        reference="pytorch",
        precision=precision,
        batch=int(mask0.shape[0]),
        prompt_lengths=[int(x) for x in mask0.sum(1)],
        steps=len(feeds) - 1,
    )
    rename = taps.by_tensor
    top1 = []
    for k, (got_raw, ref) in enumerate(zip(recorded, reference)):
        got = {rename.get(name, name): arr for name, arr in got_raw.items()}
        if LOGITS not in got:
            raise InputError(f"iteration {k} of the recorded results has no {LOGITS!r} output (it has {sorted(got)[:6]})", fix="record the export's graph outputs (with --onnx-outputs, list them too)")
        phase, step = ("prefill", None) if k == 0 else ("decode", k)
        for name in ref:
            if name in got:
                _same_shape(k, name, got[name], ref[name])
        top1.append(check(report, phase, LOGITS, got[LOGITS], ref[LOGITS], "call", step=step).comparison.top1 or 0.0)
        states = [n for n in ref if is_state(n)]
        lacking = [n for n in states if n not in got]
        if lacking:
            report.notes.append(f"iteration {k}: the recorded results lack {len(lacking)} state(s), e.g. {lacking[0]}")
        mask = feeds[k][ATTENTION_MASK]
        for name in states:
            if name in got:
                check(report, phase, name, got[name], ref[name], "call", mask=mask, step=step)
        if per_layer:
            layers = [n for n in ref if n.startswith("layer_output.")]
            absent = [n for n in layers if n not in got]
            if absent and k == 0:
                report.notes.append(
                    f"per-layer: {len(absent)} layer output(s) not recorded (e.g. {absent[0]}); those layers are compared by "
                    "their states only — record them with the `--onnx-outputs` command `hybridtrt compare --per-layer` prints"
                )
            compare_layers(report, [(n, got[n], ref[n]) for n in [*states, *layers] if n in got], step=k, mask=mask)
    if routing is not None and reference_routing is not None:
        _judge_routing(report, feeds, routing, reference_routing)
    report.notes.extend(f"{name}: {why}" for name, why in taps.missing.items() if per_layer)
    report.teacher_forced_top1 = float(np.mean(top1)) if top1 else None
    report.notes.append("greedy token agreement: not measured (recorded outputs cannot generate)")
    return report


def _judge_routing(report: Report, feeds: list[Feed], routing: list[dict[int, torch.Tensor]], truth: list[dict[int, torch.Tensor]]) -> None:
    """Tally the recording's choices against the reference's own over real tokens, per MoE layer,
    and gate them (no yardstick runs for recorded outputs: the precision's floors)."""
    tallies: dict[int, RoutingTally] = {}
    for feed, got, want in zip(feeds, routing, truth):
        length = np.asarray(feed[INPUT_IDS]).shape[1]
        real = torch.from_numpy(np.asarray(feed[ATTENTION_MASK])[:, -length:] != 0)
        for layer, ids in want.items():
            tallies.setdefault(layer, RoutingTally()).add(flips(got[layer], ids, real))
    report.judge_routing(tallies, held_to="backend")


__all__ = ["check_matching", "load_feeds", "load_results", "recorded_routing", "reference_outputs", "validate_recorded"]
