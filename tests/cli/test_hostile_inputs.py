"""Hostile inputs to the readers of `generate` and `validate`, through the real CLI (issue 24, items 4-6).

Each table runs in one fresh interpreter (`tests.cli.batch.run_batch`, one case after another). Every
case asserts what `tests/cli/test_bad_inputs.py` asserts: exit code 2, no ``Traceback``, the error's
``[stage]``, the offending value in the message, a ``fix:``, and the sha256 of every watched file
unchanged (or the file absent). The cases are what an attacker hands a parser: safetensors headers
with string offsets, JSON nested a million levels deep, ``/dev/zero`` or a FIFO where a file belongs,
a 65 MiB config, ids past 2^63, NaN flags, snapshots from another model, NaN or edited states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli.batch import Outcome, run_batch

#: Nesting that makes Python's JSON parser raise RecursionError (it recurses once per level).
DEEP = 100_000


@dataclass
class Case:
    """One refused command.

    Attributes:
        id: Test id.
        args: CLI arguments; ``{name}`` is replaced by the path of that name in the workspace.
        stage: Expected ``[stage]`` of the error.
        needle: Text the message must contain (the offending value).
        watched: Workspace names of files that must be byte-for-byte unchanged (or still absent).
        code: Expected exit code (a control case, which must get past every check, expects 0 or 1).
    """

    id: str
    args: tuple[str, ...]
    stage: str
    needle: str
    watched: tuple[str, ...] = ()
    code: int = 2


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _checkpoint_copy(ws: Path, clean: Path, name: str) -> Path:
    dst = ws / name
    shutil.copytree(clean, dst)
    return dst


def _safetensors(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk (a hole)."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _deep_json(levels: int = DEEP) -> str:
    return '{"model_type": "nemotron_h", "x": ' + "[" * levels + "]" * levels + "}"


# -- the checkpoint's parsers: config.json, safetensors headers, the shard index ---------------


def checkpoint_cases(ws: Path, clean: Path) -> list[Case]:
    """Broken copies of the clean checkpoint, each run through ``generate CKPT --ids``."""
    cases: list[Case] = []
    gen = ("generate", "{%s}", "--ids", "1 2 3")

    def add(id: str, stage: str, needle: str, edit: Callable[[Path], None]) -> None:
        edit(_checkpoint_copy(ws, clean, id))
        cases.append(Case(id, tuple(a % id if "%s" in a else a for a in gen), stage, needle))

    # config.json
    add("config-deeply-nested", "config", "nests deeper", lambda c: (c / "config.json").write_text(_deep_json()))
    add("config-nested-65-levels", "config", "nests 66 levels deep", lambda c: (c / "config.json").write_text(_deep_json(65)))
    add("config-65-MiB", "config", "65.0 MiB", lambda c: _sparse(c / "config.json", 65 * 2**20))
    add("config-is-dev-zero", "config", "not a regular file", lambda c: ((c / "config.json").unlink(), (c / "config.json").symlink_to("/dev/zero")))
    add("config-is-fifo", "config", "not a regular file", lambda c: ((c / "config.json").unlink(), os.mkfifo(c / "config.json")))
    add("config-top-level-list", "config", "must be a JSON object, it is a list", lambda c: (c / "config.json").write_text("[1, 2]"))
    add("config-5000-digit-int", "config", "not valid JSON", lambda c: (c / "config.json").write_text('{"model_type": "nemotron_h", "vocab_size": ' + "9" * 5000 + "}"))
    # safetensors headers
    weights = lambda c: c / "model.safetensors"  # noqa: E731
    add("safetensors-string-offsets", "checkpoint", "data_offsets", lambda c: weights(c).write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4)))
    add("safetensors-bool-offsets", "checkpoint", "data_offsets", lambda c: weights(c).write_bytes(_safetensors({"w": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, b"\0")))
    add("safetensors-float-shape", "checkpoint", "shape", lambda c: weights(c).write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, b"\0" * 8)))
    add("safetensors-dtype-list", "checkpoint", "dtype", lambda c: weights(c).write_bytes(_safetensors({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)))
    add("safetensors-deeply-nested", "checkpoint", "nests deeper", lambda c: weights(c).write_bytes(_safetensors(None, raw_header=("[" * DEEP + "]" * DEEP).encode())))
    add("safetensors-header-is-list", "checkpoint", "must be a JSON object", lambda c: weights(c).write_bytes(_safetensors([1, 2])))
    add("safetensors-metadata-not-strings", "checkpoint", "__metadata__", lambda c: weights(c).write_bytes(_safetensors({"__metadata__": {"format": [1]}})))
    add("safetensors-is-fifo", "checkpoint", "not a regular file", lambda c: (weights(c).unlink(), os.mkfifo(weights(c))))
    add("safetensors-is-dev-zero", "checkpoint", "not a regular file", lambda c: (weights(c).unlink(), weights(c).symlink_to("/dev/zero")))

    # the shard index
    def index(body: str | bytes) -> Callable[[Path], None]:
        def edit(c: Path) -> None:
            (c / "model.safetensors.index.json").write_bytes(body if isinstance(body, bytes) else body.encode())

        return edit

    add("index-deeply-nested", "checkpoint", "nests deeper", index('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}"))
    add("index-5000-digit-int", "checkpoint", "not valid JSON", index('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}'))
    add("index-nul-in-shard-name", "checkpoint", "a\\x00.safetensors", index(json.dumps({"weight_map": {"w": "a\x00.safetensors"}})))
    add("index-absolute-shard", "checkpoint", "/etc/passwd.safetensors", index(json.dumps({"weight_map": {"w": "/etc/passwd.safetensors"}})))
    add("index-dotdot-shard", "checkpoint", "../x.safetensors", index(json.dumps({"weight_map": {"w": "../x.safetensors"}})))
    add("index-65-MiB", "checkpoint", "65.0 MiB", lambda c: _sparse(c / "model.safetensors.index.json", 65 * 2**20))
    add("index-binary", "checkpoint", "not UTF-8", index(b"\xff\xfe\x00\x01"))
    return cases


# -- generate's flags -----------------------------------------------------------------------


def flag_cases() -> list[Case]:
    g = lambda *extra: ("generate", "{ckpt}", "--ids", "1 2 3", *extra)  # noqa: E731
    return [
        Case("temperature-nan", g("--temperature", "nan"), "input", "--temperature nan"),
        Case("temperature-inf", g("--temperature", "inf"), "input", "--temperature inf"),
        Case("temperature-negative", g("--temperature", "-1"), "input", "--temperature -1"),
        Case("top-p-zero", g("--top-p", "0"), "input", "--top-p 0"),
        Case("top-p-above-one", g("--top-p", "1.5"), "input", "--top-p 1.5"),
        Case("top-p-nan", g("--top-p", "nan"), "input", "--top-p nan"),
        Case("top-k-negative", g("--top-k", "-1"), "input", "--top-k -1"),
        Case("seed-negative", g("--seed", "-1", "--temperature", "1"), "input", "--seed -1"),
        Case("seed-2-to-64", g("--seed", str(2**64), "--temperature", "1"), "input", f"--seed {2**64}"),
        Case("max-new-tokens-negative", g("--max-new-tokens", "-1"), "input", "--max-new-tokens -1"),
        Case("max-new-tokens-zero", g("--max-new-tokens", "0"), "input", "--max-new-tokens 0"),
        Case("prefill-chunk-zero", g("--prefill-chunk", "0"), "input", "--prefill-chunk 0"),
        Case("prefill-chunk-negative", g("--prefill-chunk", "-5"), "input", "--prefill-chunk -5"),
        Case("ids-2-to-63", ("generate", "{ckpt}", "--ids", f"1 {2**63}"), "input", f"token id {2**63}"),
        Case("ids-minus-2-to-64", ("generate", "{ckpt}", "--ids", f"{-(2**64)} 1"), "input", f"token id {-(2**64)}"),
        Case("ids-float", ("generate", "{ckpt}", "--ids", "1 2.5"), "input", "'1 2.5'"),
        Case("ids-only-separators", ("generate", "{ckpt}", "--ids", " , ,"), "input", "the prompt is empty"),
    ]


# -- snapshots -------------------------------------------------------------------------------


def _resave(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[dict, torch.Tensor]]) -> None:
    """``src`` loaded, its states/mask changed by ``edit``, saved as a well-formed snapshot with the
    same identity (so only the gate under test can see the change)."""
    from hybridtrt.runtime.snapshot import Snapshot

    snap = Snapshot.load(src)
    states, mask = edit(dict(snap.states), snap.attention_mask.clone())
    dataclasses.replace(snap, states=states, attention_mask=mask).save(dst)


def snapshot_cases(ws: Path, ckpt: Path, other_weights: Path, other_model: Path) -> list[Case]:
    from hybridtrt.cli.main import main

    good, foreign_weights, foreign_model = ws / "good.snap", ws / "other-weights.snap", ws / "other-model.snap"
    for artefact, path in ((ckpt, good), (other_weights, foreign_weights), (other_model, foreign_model)):
        assert main(["generate", str(artefact), "--ids", "5 6 7 8", "--save-snapshot", str(path)]) == 0

    def nan_state(states, mask):
        name = next(k for k in states if "ssm" in k)
        states[name] = states[name].clone()
        states[name].view(-1)[0] = float("nan")
        return states, mask

    def shape(states, mask):
        name = next(k for k in states if "conv" in k)
        states[name] = states[name][:, :-1].contiguous()
        return states, mask

    def dtype(states, mask):
        name = next(k for k in states if "ssm" in k)
        states[name] = states[name].double()
        return states, mask

    def drop(states, mask):
        states.pop(next(k for k in states if ".key" in k))
        return states, mask

    def kv_length(states, mask):
        name = next(k for k in states if ".key" in k)
        states[name] = torch.cat([states[name], states[name][:, :, :1]], 2)
        return states, mask

    _resave(good, ws / "nan.snap", nan_state)
    _resave(good, ws / "shape.snap", shape)
    _resave(good, ws / "dtype.snap", dtype)
    _resave(good, ws / "missing-state.snap", drop)
    _resave(good, ws / "kv-length.snap", kv_length)
    _resave(good, ws / "mask-values.snap", lambda s, m: (s, m * 2))
    _resave(good, ws / "mask-float.snap", lambda s, m: (s, m.float()))
    _resave(good, ws / "mask-right-padding.snap", lambda s, m: (s, torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)))
    # tampered: one finite value of a state changed in the file, the header left as it was
    data = bytearray(good.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if "ssm" in k)
    data[8 + n + header[name]["data_offsets"][0] : 8 + n + header[name]["data_offsets"][0] + 4] = struct.pack("<f", 0.25)
    (ws / "tampered.snap").write_bytes(bytes(data))
    # a snapshot without the record (an older hybridtrt, or someone's own file)
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(good)), str(ws / "unrecorded.snap"))
    (ws / "garbage.snap").write_bytes(os.urandom(4096))
    (ws / "zero.snap").symlink_to("/dev/zero")
    os.mkfifo(ws / "fifo.snap")
    (ws / "existing.snap").write_bytes(b"mine\n")
    (ws / "a-directory.snap").mkdir()

    g = lambda *extra: ("generate", "{ckpt}", "--ids", "9 10", *extra)  # noqa: E731
    return [
        Case("snapshot-of-other-model", g("--snapshot", str(foreign_model)), "input", "another model"),
        Case("snapshot-of-other-weights", g("--snapshot", str(foreign_weights)), "input", "another checkpoint"),
        Case("snapshot-nan-state", g("--snapshot", str(ws / "nan.snap")), "input", "NaN/Inf"),
        Case("snapshot-tampered", g("--snapshot", str(ws / "tampered.snap")), "input", "checksum"),
        Case("snapshot-state-shape", g("--snapshot", str(ws / "shape.snap")), "input", "present_conv_state.0"),
        Case("snapshot-state-dtype", g("--snapshot", str(ws / "dtype.snap")), "input", "float64"),
        Case("snapshot-missing-state", g("--snapshot", str(ws / "missing-state.snap")), "input", "present.1.key"),
        Case("snapshot-kv-longer-than-mask", g("--snapshot", str(ws / "kv-length.snap")), "input", "present.1.key"),
        Case("snapshot-mask-values", g("--snapshot", str(ws / "mask-values.snap")), "input", "attention mask"),
        Case("snapshot-mask-float", g("--snapshot", str(ws / "mask-float.snap")), "input", "attention mask"),
        Case("snapshot-mask-right-padding", g("--snapshot", str(ws / "mask-right-padding.snap")), "input", "right"),
        Case("snapshot-unrecorded", g("--snapshot", str(ws / "unrecorded.snap")), "input", "no hybridtrt snapshot record"),
        Case("snapshot-garbage", g("--snapshot", str(ws / "garbage.snap")), "input", "garbage.snap"),
        Case("snapshot-weights-file", g("--snapshot", str(ckpt / "model.safetensors")), "input", "no hybridtrt snapshot record"),
        Case("snapshot-missing", g("--snapshot", str(ws / "missing.snap")), "input", "missing.snap"),
        Case("snapshot-dev-zero", g("--snapshot", str(ws / "zero.snap")), "input", "not a regular file"),
        Case("snapshot-fifo", g("--snapshot", str(ws / "fifo.snap")), "input", "not a regular file"),
        Case("save-snapshot-existing", g("--save-snapshot", str(ws / "existing.snap")), "input", "existing.snap exists", ("existing.snap",)),
        Case("save-snapshot-missing-dir", g("--save-snapshot", str(ws / "nowhere" / "x.snap")), "input", "does not exist"),
        Case("save-snapshot-directory", g("--save-snapshot", str(ws / "a-directory.snap")), "input", "is a directory"),
        Case("save-snapshot-onto-own-snapshot", g("--snapshot", str(good), "--save-snapshot", str(good)), "input", "good.snap exists", ("good.snap",)),
        Case("save-snapshot-bad-chunk-first", g("--save-snapshot", str(ws / "new.snap"), "--prefill-chunk", "0"), "input", "--prefill-chunk 0", ("new.snap",)),
        Case("control-snapshot", g("--snapshot", str(good), "--max-new-tokens", "2"), "", "new tokens", code=0),
    ]


# -- validate's inputs: --prompts, --load-inputs, --load-outputs, flags ------------------------


def _feeds(manifest: dict, batch: int = 2, length: int = 5, vocab: int | None = None) -> dict[str, np.ndarray]:
    vocab = vocab or manifest["model"]["vocab_size"]
    feed = {"input_ids": np.random.default_rng(0).integers(3, vocab, (batch, length)), "attention_mask": np.ones((batch, length), np.int64)}
    for s in manifest["states"]:
        shape = [batch if d == "batch" else 0 if d == "past" else int(d) for d in s["shape"]]
        feed[s["past_name"]] = np.zeros(shape, np.float32)
    return feed


def validate_cases(ws: Path, export: Path) -> list[Case]:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    manifest = json.loads((export / "hybridtrt.json").read_text())
    vocab = manifest["model"]["vocab_size"]

    def inputs(name: str, edit: Callable[[dict], None] | None = None) -> Path:
        feed = _feeds(manifest)
        if edit:
            edit(feed)
        save_json([feed], str(ws / name))
        return ws / name

    def outputs(name: str, logits: np.ndarray) -> Path:
        results = RunResults()
        results.append(("onnxrt", [IterationResult({"logits": logits}, runner_name="onnxrt")]))
        results.save(str(ws / name))
        return ws / name

    ssm = next(s["past_name"] for s in manifest["states"] if "ssm" in s["past_name"])
    conv = next(s["past_name"] for s in manifest["states"] if "conv" in s["past_name"])
    good_in = inputs("good.inputs.json")
    good_out = outputs("good.outputs.json", np.zeros((2, vocab), np.float32))

    def set_(key, value):
        return lambda f: f.__setitem__(key, value)

    def nan(f):
        f[ssm] = f[ssm].copy()
        f[ssm].flat[0] = np.nan

    def oov(f):
        f["input_ids"] = f["input_ids"].copy()
        f["input_ids"][0, 0] = vocab

    bad_inputs = {
        "ids-1d": (set_("input_ids", np.arange(5)), "input_ids"),
        "ids-float": (set_("input_ids", np.ones((2, 5), np.float32)), "input_ids"),
        "ids-out-of-vocab": (oov, f"token id {vocab}"),
        "ids-negative": (set_("input_ids", -np.ones((2, 5), np.int64)), "token id -1"),
        "mask-shape": (set_("attention_mask", np.ones((2, 4), np.int64)), "attention_mask"),
        "mask-values": (set_("attention_mask", np.full((2, 5), 7, np.int64)), "attention_mask"),
        "state-nan": (nan, ssm),
        "state-shape": (lambda f: f.__setitem__(conv, np.zeros((2, 3, 3), np.float32)), conv),
        "state-missing": (lambda f: f.pop(ssm), ssm),
    }
    cases = [
        Case(f"load-inputs-{key}", ("validate", "{export}", "--load-outputs", str(good_out), "--load-inputs", str(inputs(f"{key}.json", edit))), "input", needle)
        for key, (edit, needle) in bad_inputs.items()
    ]
    (ws / "deep.json").write_text("[" * DEEP + "]" * DEEP)
    (ws / "binary.json").write_bytes(b"\x89PNG\x00\xff\xfe" * 10)
    (ws / "zero.json").symlink_to("/dev/zero")
    _sparse(ws / "huge.json", 65 * 2**20)
    os.mkfifo(ws / "fifo.json")
    for kind, needle in (("deep", "nests deeper"), ("binary", "binary.json"), ("zero", "not a regular file"), ("fifo", "not a regular file")):
        cases.append(Case(f"load-inputs-{kind}", ("validate", "{export}", "--load-outputs", str(good_out), "--load-inputs", str(ws / f"{kind}.json")), "input", needle))
        cases.append(Case(f"load-outputs-{kind}", ("validate", "{export}", "--load-outputs", str(ws / f"{kind}.json"), "--load-inputs", str(good_in)), "input", needle))
    wide = outputs("wide.outputs.json", np.zeros((2, vocab + 1), np.float32))
    cases.append(Case("load-outputs-logits-shape", ("validate", "{export}", "--load-outputs", str(wide), "--load-inputs", str(good_in)), "input", f"[2, {vocab + 1}]"))

    # --prompts and flags (refused before anything loads)
    (ws / "prompts.bin").write_bytes(b"\x00\x01\xff\xfe\x89PNG")
    (ws / "prompts-zero.txt").symlink_to("/dev/zero")
    _sparse(ws / "prompts-huge.txt", 65 * 2**20)
    os.mkfifo(ws / "prompts-fifo.txt")
    (ws / "prompts-blank.txt").write_text("\n  \n\t\n")
    v = lambda *extra: ("validate", "{export}", *extra)  # noqa: E731
    cases += [
        Case("prompts-binary", v("--prompts", str(ws / "prompts.bin")), "input", "not UTF-8"),
        Case("prompts-dev-zero", v("--prompts", str(ws / "prompts-zero.txt")), "input", "not a regular file"),
        Case("prompts-fifo", v("--prompts", str(ws / "prompts-fifo.txt")), "input", "not a regular file"),
        Case("prompts-65-MiB", v("--prompts", str(ws / "prompts-huge.txt")), "input", "65.0 MiB"),
        Case("prompts-blank-lines-only", v("--prompts", str(ws / "prompts-blank.txt")), "input", "has no prompts"),
        Case("validate-prefill-chunk-zero", v("--context", "64", "--prefill-chunk", "0"), "input", "--prefill-chunk 0"),
        Case("validate-context-zero", v("--context", "0"), "input", "--context 0"),
        Case("validate-target-cosine-nan", v("--target-cosine", "nan"), "input", "nan"),
        Case("validate-seed-negative", v("--seed", "-1"), "input", "--seed -1"),
        # controls: well-formed files get past every check (FAIL: the planted logits are zeros; the snapshot continues)
        Case("control-recorded", ("validate", "{export}", "--load-outputs", str(good_out), "--load-inputs", str(good_in)), "", "FAIL", code=1),
    ]
    return cases


# -- the tables ------------------------------------------------------------------------------


@dataclass
class Table:
    cases: list[Case]
    outcomes: dict[str, Outcome]
    paths: dict[str, Path]
    before: dict[str, dict[str, str | None]]


def _run(cases: list[Case], paths: dict[str, Path], ws: Path) -> Table:
    """One table in its own interpreter (the before/after count script runs the tables this way)."""
    before = {c.id: {w: sha(ws / w) for w in c.watched} for c in cases}
    outcomes = run_batch([[a.format(**paths) for a in c.args] for c in cases], cwd=ws, timeout=300)
    return Table(cases, dict(zip([c.id for c in cases], outcomes)), paths, before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def tables(workspace, make_checkpoint, make_export) -> dict[str, Table]:
    """The three tables, run in one interpreter (one startup instead of three)."""
    ckpt = make_checkpoint()
    export = make_export("tiny-nemotron-h")[1]
    built: dict[str, tuple[list[Case], Path]] = {}
    paths: dict[str, Path] = {"ckpt": ckpt, "export": export}
    for name, build in (
        ("checkpoints", lambda ws: checkpoint_cases(ws, ckpt) + flag_cases()),
        ("snapshots", lambda ws: snapshot_cases(ws, ckpt, make_checkpoint(seed=1), make_checkpoint("tiny-mamba2"))),
        ("validate", lambda ws: validate_cases(ws, export)),
    ):
        ws = workspace / name
        ws.mkdir()
        built[name] = (build(ws), ws)
        paths.update({c.id: ws / c.id for c in built[name][0] if (ws / c.id).exists()})
    everything = [c for cases, _ in built.values() for c in cases]
    assert len({c.id for c in everything}) == len(everything)
    before = {c.id: {w: sha(ws / w) for w in c.watched} for cases, ws in built.values() for c in cases}
    outcomes = run_batch([[a.format(**paths) for a in c.args] for c in everything], cwd=workspace, timeout=300)
    by_id = dict(zip([c.id for c in everything], outcomes))
    return {name: Table(cases, {c.id: by_id[c.id] for c in cases}, paths, {c.id: before[c.id] for c in cases}) for name, (cases, _) in built.items()}


def _check(table: Table, case: Case, ws: Path) -> None:
    out = table.outcomes[case.id]
    message = out.output
    assert out.code == case.code, f"exit {out.code}: {message[-3000:]}"
    assert "Traceback" not in message, message[-3000:]
    if case.code != 2:
        assert case.needle in message, message[-3000:]
        return
    assert f"[{case.stage}]" in message, message
    assert case.needle in message, message
    assert "fix:" in message, message
    for name in case.watched:
        assert sha(ws / name) == table.before[case.id][name], f"{name} changed or appeared"


def _ids(cases):
    return [c.id for c in cases]


CHECKPOINT_IDS = [
    "config-deeply-nested", "config-nested-65-levels", "config-65-MiB", "config-is-dev-zero", "config-is-fifo",
    "config-top-level-list", "config-5000-digit-int", "safetensors-string-offsets", "safetensors-bool-offsets",
    "safetensors-float-shape", "safetensors-dtype-list", "safetensors-deeply-nested", "safetensors-header-is-list",
    "safetensors-metadata-not-strings", "safetensors-is-fifo", "safetensors-is-dev-zero", "index-deeply-nested",
    "index-5000-digit-int", "index-nul-in-shard-name", "index-absolute-shard", "index-dotdot-shard", "index-65-MiB",
    "index-binary",
] + _ids(flag_cases())  # fmt: skip
SNAPSHOT_IDS = [
    "snapshot-of-other-model", "snapshot-of-other-weights", "snapshot-nan-state", "snapshot-tampered",
    "snapshot-state-shape", "snapshot-state-dtype", "snapshot-missing-state", "snapshot-kv-longer-than-mask",
    "snapshot-mask-values", "snapshot-mask-float", "snapshot-mask-right-padding", "snapshot-unrecorded",
    "snapshot-garbage", "snapshot-weights-file", "snapshot-missing", "snapshot-dev-zero", "snapshot-fifo",
    "save-snapshot-existing", "save-snapshot-missing-dir", "save-snapshot-directory", "save-snapshot-onto-own-snapshot",
    "save-snapshot-bad-chunk-first", "control-snapshot",
]  # fmt: skip
VALIDATE_IDS = (
    [f"load-inputs-{k}" for k in ("ids-1d", "ids-float", "ids-out-of-vocab", "ids-negative", "mask-shape", "mask-values", "state-nan", "state-shape", "state-missing")]
    + [f"load-{io}-{k}" for k in ("deep", "binary", "zero", "fifo") for io in ("inputs", "outputs")]
    + ["load-outputs-logits-shape", "prompts-binary", "prompts-dev-zero", "prompts-fifo", "prompts-65-MiB", "prompts-blank-lines-only",
       "validate-prefill-chunk-zero", "validate-context-zero", "validate-target-cosine-nan", "validate-seed-negative", "control-recorded"]
)  # fmt: skip


@pytest.mark.parametrize("case_id", CHECKPOINT_IDS)
def test_checkpoint_parsers_and_generate_flags_refuse(tables, workspace, case_id):
    table = tables["checkpoints"]
    assert set(table.outcomes) == set(CHECKPOINT_IDS)
    _check(table, next(c for c in table.cases if c.id == case_id), workspace / "checkpoints")


@pytest.mark.parametrize("case_id", SNAPSHOT_IDS)
def test_snapshots_are_checked(tables, workspace, case_id):
    table = tables["snapshots"]
    assert set(table.outcomes) == set(SNAPSHOT_IDS)
    _check(table, next(c for c in table.cases if c.id == case_id), workspace / "snapshots")


@pytest.mark.parametrize("case_id", VALIDATE_IDS)
def test_validate_inputs_refuse(tables, workspace, case_id):
    table = tables["validate"]
    assert set(table.outcomes) == set(VALIDATE_IDS)
    _check(table, next(c for c in table.cases if c.id == case_id), workspace / "validate")


def test_generate_refuses_a_reference_larger_than_memory_before_loading(make_checkpoint, monkeypatch, capsys):
    """Item 4: the reference's size comes from the headers and config; with a planted 1 MiB limit the
    command is refused naming needed vs available and how to proceed, and no tensor is ever read."""
    from hybridtrt.cli.main import main
    from hybridtrt.memory import ENV
    from hybridtrt.models import weights

    def never(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(weights.WeightIndex, "read", never)
    monkeypatch.setenv(ENV, "1M")
    assert main(["generate", str(make_checkpoint()), "--ids", "1 2 3"]) == 2
    err = capsys.readouterr().err
    assert "[input]" in err and "needs" in err and "1.0 MiB is available (HYBRIDTRT_MEMORY_LIMIT)" in err
    assert "hybridtrt export" in err and "fix:" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["generate", str(make_checkpoint()), "--ids", "1 2 3", "--max-new-tokens", "1"]) == 0
