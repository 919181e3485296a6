"""What the CLI prints is readable at 80 columns and in a pipe: tables fit without folding a cell
into a stack of fragments, cells are never parsed as markup, and printed commands are one line each
(so pasting them runs what was printed)."""

from __future__ import annotations

import io
import re
import shutil

import pytest
from rich.console import Console

from hybridtrt.cli.common import table
from hybridtrt.exporter.export import ExportOptions
from tests.cli.batch import run_batch
from tests.validation.faults import perturb_weight

BORDERS = "┃│┏┡┗└┌┍┝┠┨┯┷┼╇╈┳┻━─"
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?$")


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in BORDERS]


def cell_tokens(lines: list[str]) -> set[str]:
    """Whitespace-separated words inside the cells of ``lines`` (border characters removed)."""
    return {w for line in lines for w in re.split(r"[\s┃│]+", line) if w and not set(w) <= set(BORDERS)}


def assert_readable(text: str, headers: list[str], width: int = 80) -> None:
    """Every table line fits ``width``; every header word is printed whole; every number-like word in
    a cell is a whole number (a folded cell leaves fragments such as ``1.``, ``e-`` or ``45e``)."""
    lines = table_lines(text)
    assert lines, text
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    words = cell_tokens(lines)
    for header in headers:
        for word in header.split():
            assert word in words, f"header word {word!r} broken:\n{text}"
    for w in words:
        if re.fullmatch(r"[\d.e+-]+", w) and re.search(r"\d", w):
            assert NUMBER.match(w), f"number fragment {w!r}:\n{text}"


def _render(renderable, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def test_table_never_folds_words_and_falls_back_to_vertical():
    """The same table at 200, 80 and 40 columns prints the same words (wrapping only at spaces);
    at 40 it cannot fit horizontally and is printed vertically, with every header beside its value."""
    rows = [
        ["prefill states\nworst of 12: present_ssm_state.7", "4.02e-06", "3.43e-06", "1.00e-04", "1.000000", "ok"],
        ["decode logits\nworst of 8: logits @5", "1.21e-01", "—", "1.00e-04", "0.992638", "FAIL non-finite values (NaN/Inf)"],
    ]
    t = table("onnxruntime vs pytorch (fp32, batch 4, 8 steps)", ["", "rel L2", "yardstick", "allowed", "cosine", "gate"], rows)
    wide = _render(t, 200)
    for width in (80, 60, 40):
        text = _render(t, width)
        assert all(len(line) <= width for line in text.splitlines())
        got = set(text.split()) - set(BORDERS)
        assert {w for w in got if not set(w) <= set(BORDERS)} <= set(wide.split()) | {"rel", "L2", "yardstick", "allowed", "cosine", "gate"}
    narrow = _render(t, 40)
    assert not table_lines(narrow) and "  yardstick  3.43e-06" in narrow  # vertical: header beside value


@pytest.fixture(scope="module")
def exports(make_export, tmp_path_factory):
    """A per-layer tiny export, a copy with a planted fault, and its checkpoint."""
    ckpt, out = make_export("tiny-nemotron-h", ExportOptions(per_layer=True, verify=False))
    faulty = shutil.copytree(out, tmp_path_factory.mktemp("narrow") / "faulty")
    perturb_weight(faulty, "model.layers.2.mixer.out_proj.weight_t", 1.2)
    return ckpt, out, faulty


VALIDATE_HEADERS = ["rel L2", "yardstick", "allowed", "cosine", "gate"]
CHEAP = ["--random", "2", "--steps", "1", "--no-yardstick"]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_output_in_a_pipe_at_80_columns(exports, tmp_path):
    """validate (passing, failing, --context), compare, inspect and build in a pipe (no terminal on
    any stream and no COLUMNS, as in a log or CI: rich's default width, 80), in one interpreter.
    compare writes beside the export by default (OUT_DIR.polygraphy: an export directory holds only
    the export's files, so a re-export into it is not refused) and refuses -o inside the export."""
    ckpt, out, faulty = exports
    export = shutil.copytree(out, tmp_path / "out")
    before = sorted(p.name for p in export.iterdir())
    cases = [
        ["validate", out, *CHEAP, "--per-layer"],
        ["validate", faulty, *CHEAP],
        ["validate", out, "--context", "32", "--prefill-chunk", "16"],
        ["compare", export, "-o", export / "pg"],
        ["compare", export],
        ["inspect", out],
        ["inspect", ckpt],
        ["build", out, "--check-tensorrt", "10.15"],
    ]
    ok, bad, context, inside, compare, inspect_export, inspect_ckpt, build = run_batch(cases, env={"COLUMNS": ""})

    assert ok.code == 0, ok.output
    assert_readable(ok.stdout, VALIDATE_HEADERS)
    assert "worst of 12:" in ok.stdout and "present_ssm_state." in ok.stdout and "yardstick: none ran" in _flat(ok.stdout)
    assert bad.code == 1, bad.output
    assert_readable(bad.stdout, VALIDATE_HEADERS)
    assert bad.stdout.count("FAIL") >= 4  # each failing row says so, then the verdict

    assert context.code == 0, context.output
    assert_readable(context.stdout, ["position", "logits rel L2", "logits cosine", "gate"])
    assert "[green]" not in context.stdout and "[/]" not in context.stdout and " ok " in context.stdout

    assert inside.code == 2 and "inside the export directory" in inside.stderr and "fix:" in inside.stderr, inside.output
    assert compare.code == 0, compare.output
    assert sorted(p.name for p in export.iterdir()) == before
    assert (tmp_path / "out.polygraphy" / "reference.json").is_file()
    assert_readable(compare.stdout, ["runner", "tolerance", "result"])
    block = compare.stdout.split("reproduce with:\n", 1)[1].splitlines()
    assert len(block) == 16 and all(line.startswith(("  # ", "  polygraphy run ", "  hybridtrt validate ")) for line in block), block
    assert all(len(line) > 80 for line in block if line.startswith("  polygraphy run "))  # long, yet one line each

    for result, headers in ((inspect_export, ["tensor", "dtype", "shape"]), (inspect_ckpt, []), (build, ["input", "min", "opt", "max", "op", "imported as"])):
        assert result.code == 0, result.output
        assert_readable(result.stdout, headers)
