"""Many invocations of the real CLI in one fresh interpreter, for the refusal tables.

A fresh ``python -m hybridtrt.cli.main`` per case costs a second or more of imports; a table of fifty cases
would cost a minute of the suite. `run_batch` starts one interpreter (this file run as a script), which runs
each case's argv through `hybridtrt.cli.main.main` as the console script does — ``SystemExit`` (argparse) gives
its code, any other exception prints its traceback to the case's stderr and gives exit code 1, exactly what a
user would see — and hands back ``(code, stdout, stderr)`` per case. Cases run in order, in the same process:
a case must not rely on state another left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_batch(cases: list[list[str]], *, cwd: Path | None = None, columns: int = 200, timeout: float = 600, env: dict[str, str] | None = None) -> list[Outcome]:
    """Run every argv of ``cases`` through the CLI in one fresh interpreter (in order)."""
    environment = {**os.environ, "COLUMNS": str(columns), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps([[str(a) for a in argv] for argv in cases]),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(lines) == len(cases), proc.stdout[-2000:] + proc.stderr[-4000:]
    return [Outcome(**json.loads(line)) for line in lines]


def _serve() -> None:
    import contextlib
    import io
    import traceback

    from hybridtrt.cli.main import main

    real_stdout = sys.stdout
    for argv in json.loads(sys.stdin.read()):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
        real_stdout.write(json.dumps({"code": int(code or 0), "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
        real_stdout.flush()


if __name__ == "__main__":
    _serve()
