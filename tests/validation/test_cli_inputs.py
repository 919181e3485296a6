"""``hybridtrt validate`` / ``compare``: bad values and unwritable outputs are typed errors in the first
second (before the validation machinery is even imported), every flag has help, and user-derived
text printed through rich is shown literally."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from hybridtrt.cli import compare as compare_cli
from hybridtrt.cli import validate as validate_cli
from hybridtrt.cli.main import main

#: Imported only once validation really starts (other commands' parsers may import more: issue 10).
HEAVY = ("hybridtrt.validation.artefact", "hybridtrt.validation.runner", "hybridtrt.validation.polygraphy_bridge")


def _refused_up_front(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in a fresh interpreter; return (exit code, stderr) and check that nothing heavy
    (the validation machinery) was imported before the refusal."""
    code = (
        "import sys\n"
        "from hybridtrt.cli.main import main\n"
        f"rc = main({argv!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert "HEAVY []" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--steps", "-1"], "--steps must be ≥ 0, got -1"),
        (["--random", "0"], "--random needs N ≥ 1, got 0"),
        (["--target-cosine", "1.5"], "--target-cosine must be in (0, 1], got 1.5"),
        (["--json", "/missing/dir/x.json"], "directory /missing/dir does not exist"),
        (["--load-outputs", "r.json", "--reference", "hf"], "takes no --backend/--reference"),
    ],
)
def test_bad_values_are_refused_before_loading_anything(args, needle):
    # The export directory does not exist either: the flag is refused first.
    code, err = _refused_up_front(["validate", "/no/such/export", *args])
    assert code == 2 and "[input]" in err and needle in err


def test_report_and_json_into_unusable_places(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _refused_up_front(["validate", "/no/such/export", "--report", str(blocker / "rep")])
    assert code == 2 and "is a file, so the directory cannot be created" in err
    code, err = _refused_up_front(["validate", "/no/such/export", "--report", str(blocker)])
    assert code == 2 and "is a file, not a directory" in err
    code, err = _refused_up_front(["validate", "/no/such/export", "--json", str(tmp_path)])
    assert code == 2 and "is a directory" in err
    code, err = _refused_up_front(["compare", "/no/such/export", "-o", str(blocker / "pg")])
    assert code == 2 and "-o/--output" in err


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    """Permission bits cannot stop root (CI), so the permission answer is simulated."""
    from hybridtrt.errors import InputError
    from hybridtrt.validation import preflight

    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match=f"directory {tmp_path} is not writable"):
        preflight.check_output_file(tmp_path / "x.json", "--json")
    with pytest.raises(InputError, match=f"--report {tmp_path / 'a' / 'b'}: {tmp_path} is not writable"):
        preflight.check_output_dir(tmp_path / "a" / "b", "--report")


@pytest.mark.parametrize("module", [validate_cli, compare_cli])
def test_every_flag_has_help(module):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{module.__name__}: {action.option_strings or action.dest} has no help"


def test_compare_output_flag_and_old_spelling(make_export, tmp_path, capsys):
    _, out = make_export("tiny-nemotron-h")
    assert main(["compare", str(out), "-o", str(tmp_path / "new")]) == 0
    assert main(["compare", str(out), "--out", str(tmp_path / "old")]) == 0  # hidden alias
    assert (tmp_path / "new" / "inputs.json").is_file() and (tmp_path / "old" / "reference.json").is_file()
    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    assert "--out " not in parser.format_help() and "--output" in parser.format_help()
    capsys.readouterr()


def test_user_text_is_printed_literally_not_as_rich_markup(make_export, tmp_path, capsys):
    """A path with [brackets] (rich markup syntax) and tensor names in notes reach the terminal as is."""
    import shutil

    _, out = make_export("tiny-nemotron-h")
    odd = shutil.copytree(out, tmp_path / "run[red]1[/red]")
    rep = tmp_path / "rep[bold]"
    assert main(["validate", str(odd), "--random", "1", "--steps", "1", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert f"report: {rep / 'report.html'}" in text.replace("\n", "")
    assert main(["compare", str(odd), "-o", str(tmp_path / "pg[x]")]) == 0
    text = capsys.readouterr().out.replace("\n", "")
    assert "run[red]1[/red]/model.onnx" in text and "'input_ids:[" in text
    assert json.loads((rep / "report.json").read_text())["passed"]
