"""Every bad input a user can give, through the real CLI in a fresh interpreter (DESIGN.md §10).

Each case asserts: exit code 2, the error's stage and the offending value in the message, no
``Traceback``, and the state of the output directory afterwards — absent, or byte-for-byte what it
was before (sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli.batch import Outcome, run_batch

#: What the output directory must look like after a refused command: absent (or an empty directory),
#: or exactly as before.
ABSENT, UNCHANGED = "absent", "unchanged"


def run_cli(*args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``hybridtrt ARGS`` in a fresh interpreter (as a user runs it)."""
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps long messages at the terminal width
    return subprocess.run(
        [sys.executable, "-m", "hybridtrt.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def tree_digest(path: Path) -> dict[str, str] | None:
    """``{relative file: sha256}`` of everything under ``path`` (None when it does not exist)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@dataclass
class Workspace:
    """Fixture dirs a case can name in its arguments as ``{ckpt}``, ``{out}``, ``{tmp}``..."""

    tmp: Path
    clean_ckpt: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def checkpoint(self, name: str = "ckpt", edit: Callable[[dict], None] | None = None, raw: bytes | None = None) -> Path:
        """A copy of the clean checkpoint, with its config.json edited (or replaced by ``raw`` bytes)."""
        ckpt = self.tmp / name
        shutil.copytree(self.clean_ckpt, ckpt)
        if raw is not None:
            (ckpt / "config.json").write_bytes(raw)
        elif edit is not None:
            cfg = json.loads((ckpt / "config.json").read_text())
            edit(cfg)
            (ckpt / "config.json").write_text(json.dumps(cfg))
        self.paths[name] = ckpt
        return ckpt


def _set(**fields) -> Callable[[dict], None]:
    return lambda cfg: cfg.update(fields)


@dataclass
class Case:
    """One refused command.

    Attributes:
        id: Test id.
        args: CLI arguments; ``{name}`` is replaced by the workspace path of that name.
        stage: Expected ``[stage]`` prefix of the error.
        needle: Text the message must contain (the offending value).
        setup: Prepares the workspace (checkpoints, existing outputs).
        output: The path name whose state is checked, and the expected state.
    """

    id: str
    args: tuple[str, ...]
    stage: str
    needle: str
    setup: Callable[[Workspace], None] = lambda ws: ws.checkpoint()
    output: tuple[str, str] = ("out", ABSENT)


def _existing_checkpoint_as_output(ws: Workspace) -> None:
    ws.checkpoint()
    ws.checkpoint("existing")


def _non_empty_dir(ws: Workspace) -> None:
    ws.checkpoint()
    (ws.tmp / "out").mkdir()
    (ws.tmp / "out" / "notes.txt").write_text("mine\n")


CASES = [
    # -- config.json, checked up front with typed errors --------------------------------------
    Case("config-hidden-not-int", ("export", "{ckpt}", "-o", "{out}"), "config", "hidden_size=64.5",
         lambda ws: ws.checkpoint(edit=_set(hidden_size=64.5))),
    Case("config-vocab-negative", ("export", "{ckpt}", "-o", "{out}"), "config", "vocab_size=-3",
         lambda ws: ws.checkpoint(edit=_set(vocab_size=-3))),
    Case("config-heads-string", ("inspect", "{ckpt}"), "config", "mamba_num_heads='8'",
         lambda ws: ws.checkpoint(edit=_set(mamba_num_heads="8"))),
    Case("config-n-groups-zero", ("export", "{ckpt}", "-o", "{out}"), "config", "n_groups=0",
         lambda ws: ws.checkpoint(edit=_set(n_groups=0))),
    Case("config-n-groups-not-dividing", ("export", "{ckpt}", "-o", "{out}"), "config", "n_groups=3",
         lambda ws: ws.checkpoint(edit=_set(n_groups=3))),
    Case("config-gqa-not-dividing", ("export", "{ckpt}", "-o", "{out}"), "config", "num_key_value_heads=3",
         lambda ws: ws.checkpoint(edit=_set(num_key_value_heads=3))),
    Case("config-eps-zero", ("export", "{ckpt}", "-o", "{out}"), "config", "layer_norm_epsilon=0",
         lambda ws: ws.checkpoint(edit=_set(layer_norm_epsilon=0))),
    Case("config-binary", ("export", "{ckpt}", "-o", "{out}"), "config", "not UTF-8",
         lambda ws: ws.checkpoint(raw=b"\x89PNG\r\n\x1a\n\x00\xff\xfe")),
    Case("config-not-json", ("inspect", "{ckpt}"), "config", "not valid JSON",
         lambda ws: ws.checkpoint(raw=b"{model_type: nemotron_h")),
    Case("config-unknown-model-type", ("export", "{ckpt}", "-o", "{out}"), "config", "model_type='llama'",
         lambda ws: ws.checkpoint(edit=_set(model_type="llama"))),
    Case("config-unknown-block-letter", ("export", "{ckpt}", "-o", "{out}"), "config", "'X' at layer 3",
         lambda ws: ws.checkpoint(edit=_set(hybrid_override_pattern="M*MX-M*-M"))),
    Case("config-bad-token-id", ("export", "{ckpt}", "-o", "{out}"), "config", "token id 'eos'",
         lambda ws: ws.checkpoint(edit=_set(eos_token_id="eos"))),
    # -- outputs that must not be clobbered ----------------------------------------------------
    Case("preset-into-existing-checkpoint", ("preset", "tiny-mamba2", "-o", "{existing}"), "input", "is not empty",
         _existing_checkpoint_as_output, ("existing", UNCHANGED)),
    Case("demo-into-non-empty-dir", ("demo", "-o", "{out}"), "input", "not an empty directory",
         _non_empty_dir, ("out", UNCHANGED)),
    # -- flags ----------------------------------------------------------------------------------
    Case("export-opset-out-of-range", ("export", "{ckpt}", "-o", "{out}", "--opset", "5"), "export", "--opset 5"),
    Case("export-dequantize-unquantized", ("export", "{ckpt}", "-o", "{out}", "--dequantize"), "export", "--dequantize: "),
    Case("export-fp4-activations-unquantized", ("export", "{ckpt}", "-o", "{out}", "--fp4-activations"), "export", "--fp4-activations pairs FP4 activations"),
    Case("export-dequantize-experts-unquantized", ("export", "{ckpt}", "-o", "{out}", "--dequantize-experts"), "export", "--dequantize-experts keeps an NVFP4"),
    Case("preset-shard-size-zero", ("preset", "tiny-nemotron-h", "-o", "{out}", "--max-shard-mb", "0"), "input", "--max-shard-mb 0",
         lambda ws: None),
    Case("fp8-flags-without-quantize", ("export", "{ckpt}", "-o", "{out}", "--calib-random", "4"), "input", "--quantize fp8"),
    Case("block-size-without-int4", ("export", "{ckpt}", "-o", "{out}", "--block-size", "64"), "input", "--block-size 64 only applies to --quantize int4"),
    Case("export-unknown-recipe", ("export", "{ckpt}", "-o", "{out}", "--recipe", "no-such-recipe"), "input", "--recipe 'no-such-recipe' is neither"),
    Case("validate-recipe-without-sensitivity", ("validate", "{ckpt}", "--recipe", "nemotron-3-nano-nvfp4-layout"), "input", "measured by the sensitivity search"),
    Case("int4-weight-scale", ("export", "{ckpt}", "-o", "{out}", "--quantize", "int4", "--weight-scale", "channel"), "input", "--weight-scale is FP8's"),
    # -- validate / generate: refused before anything loads -------------------------------------
    Case("validate-steps-negative", ("validate", "{ckpt}", "--steps", "-1"), "input", "--steps must be ≥ 0, got -1"),
    Case("validate-random-zero", ("validate", "{ckpt}", "--random", "0"), "input", "got 0"),
    Case("validate-prompt-length-zero", ("validate", "{ckpt}", "--prompt-length", "0"), "input", "--prompt-length must be ≥ 1, got 0"),
    Case("validate-json-in-missing-dir", ("validate", "{ckpt}", "--json", "{tmp}/missing/x.json"), "input", "missing"),
    Case("generate-negative-token-id", ("generate", "{ckpt}", "--ids", "-1 2 3"), "input", "token id -1"),
    Case("generate-token-id-past-vocab", ("generate", "{ckpt}", "--ids", "1 999999"), "input", "token id 999999"),
]


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory):
    from hybridtrt.models import create_checkpoint

    return create_checkpoint("tiny-nemotron-h", tmp_path_factory.mktemp("clean") / "ckpt")


@dataclass
class Ran:
    """One case's workspace, the watched directory's state before the command, and its outcome."""

    workspace: Workspace
    before: dict[str, str] | None
    outcome: Outcome


@pytest.fixture(scope="module")
def ran(clean_checkpoint, tmp_path_factory) -> dict[str, Ran]:
    """Every case run through the CLI, in one fresh interpreter (`tests.cli.batch`: one start-up
    instead of one per case), each in its own workspace."""
    prepared = []
    for case in CASES:
        tmp = tmp_path_factory.mktemp(case.id)
        ws = Workspace(tmp, clean_checkpoint)
        ws.paths["out"] = tmp / "out"
        ws.paths["tmp"] = tmp
        case.setup(ws)
        prepared.append((case, ws, tree_digest(ws.paths[case.output[0]])))
    outcomes = run_batch([[a.format(**ws.paths) for a in case.args] for case, ws, _ in prepared])
    return {case.id: Ran(ws, before, outcome) for (case, ws, before), outcome in zip(prepared, outcomes)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, ran):
    got = ran[case.id]
    watched_name, expected_state = case.output
    watched = got.workspace.paths[watched_name]
    message = got.outcome.output
    assert got.outcome.code == 2, message
    assert "Traceback" not in message, message
    assert f"[{case.stage}]" in message, message
    assert case.needle in message, message
    assert "fix:" in message, message
    if expected_state == ABSENT:
        assert not tree_digest(watched), f"{watched} was written: {sorted(watched.rglob('*'))}"
    else:
        assert tree_digest(watched) == got.before
