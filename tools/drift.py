"""Drift check: the oracle and export tests against the newest releases of what the proofs rest on.

`make test` runs against requirements.lock, so a new transformers (or onnxruntime, onnx,
onnxscript, torch) cannot break CI; it breaks users who install the newest. This command finds out
first, for whoever bumps the lock (README "Dependencies"):

1. a throw-away venv from the lock (as `make setup` builds it), and the tests below run there: the
   baseline (a test that fails here already is not drift);
2. for each package whose newest release differs from the lock: that release alone on top of the
   lock, the tests again, and the tests that newly fail are charged to it; the lock is restored;
3. every newest release at once (interactions);

then one table: package, locked, newest, what else pip changed, the tests it broke. Exit 1 when any
release broke a test. Not part of `make test` (it installs, and runs the oracle tests 2 + N times).

    python tools/drift.py [--packages transformers onnxruntime] [--versions transformers==5.24.0]
                          [--tests tests/models] [--venv DIR] [--json FILE]

``--versions`` tries the given releases instead of the newest (to see what a known release breaks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("transformers", "onnxruntime", "onnx", "onnxscript", "torch")
#: The oracles (HF parity, dt rule, HF oracle, op twins) and the export path (export, verification,
#: graph passes, ORT runtime): what a new release of those packages can break.
TESTS = ("tests/models", "tests/ops", "tests/exporter", "tests/graphs", "tests/validation/test_hf_oracle.py",
         "tests/validation/test_validate.py", "tests/runtime/test_generation.py")


@dataclass
class Trial:
    """One package (or all) at a release other than the lock's."""

    package: str
    locked: str
    tried: str
    also_changed: dict[str, str] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    error: str | None = None


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)


def _makefile_var(name: str) -> str:
    for line in (REPO / "Makefile").read_text().splitlines():
        if re.match(rf"^{name}\s*[:?]?=", line):
            return line.split("=", 1)[1].strip()
    raise SystemExit(f"the Makefile sets no {name}")


class Venv:
    """The throw-away environment, built and restored from the lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.python = str(path / "bin" / "python")
        self.torch = f"torch=={_makefile_var('TORCH_VERSION')}"

    def pip(self, *args: str) -> subprocess.CompletedProcess:
        return _run([self.python, "-m", "pip", "--disable-pip-version-check", "-q", *args])

    def build(self) -> None:
        if not Path(self.python).exists():
            _run([sys.executable, "-m", "venv", str(self.path)]).check_returncode()
        self.restore()
        self.pip("install", "--no-deps", "--no-build-isolation", "-e", str(REPO)).check_returncode()

    def restore(self) -> None:
        """Back to exactly the lock (torch at the Makefile's pin)."""
        self.pip("install", "--no-deps", "-r", str(REPO / "requirements.lock")).check_returncode()
        self.pip("install", self.torch).check_returncode()  # with its own exact nvidia-* pins where it has them

    def versions(self) -> dict[str, str]:
        out = _run([self.python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"])
        return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}

    def newest(self, package: str) -> str | None:
        out = _run([self.python, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"])
        match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out.stdout, re.M | re.I)
        return match[1] if match else None

    def failing(self, tests: list[str], jobs: int) -> set[str]:
        """Node ids of the tests that fail or error (collection errors included)."""
        with tempfile.NamedTemporaryFile(suffix=".xml") as report:
            cmd = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report.name}", *tests]
            if jobs:
                cmd[3:3] = ["-n", str(jobs)]
            _run(cmd, cwd=REPO)
            root = ET.parse(report.name).getroot()
        out = set()
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out.add(f"{case.get('classname')}::{case.get('name')}")
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packages", nargs="+", default=list(PACKAGES))
    p.add_argument("--versions", nargs="+", default=[], metavar="PKG==VER", help="try these releases instead of the newest")
    p.add_argument("--tests", nargs="+", default=list(TESTS))
    p.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "hybridtrt-drift-venv")
    p.add_argument("--jobs", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    venv = Venv(args.venv)
    print(f"building {args.venv} from requirements.lock …", flush=True)
    venv.build()
    locked = venv.versions()
    asked = dict(v.split("==", 1) for v in args.versions)
    wanted = {pkg: asked.get(pkg) or venv.newest(pkg) for pkg in (asked or args.packages)}
    print(f"baseline: {len(args.tests)} test paths at the locked versions …", flush=True)
    baseline = venv.failing(args.tests, args.jobs)
    trials = []
    for pkg, release in wanted.items():
        if release is None or release == locked.get(pkg, "").split("+")[0]:
            continue
        trials.append(_trial(venv, pkg, release, locked, args, baseline))
    if len(trials) > 1:
        together = [f"{t.package}=={t.tried}" for t in trials]
        trials.append(_trial(venv, "all of the above", " ".join(together), locked, args, baseline, specs=together))
    _print(baseline, wanted, locked, trials)
    if args.json:
        args.json.write_text(json.dumps({"baseline_failures": sorted(baseline), "trials": [asdict(t) for t in trials]}, indent=2))
    return 1 if any(t.broken or t.error for t in trials) else 0


def _trial(venv: Venv, pkg: str, release: str, locked: dict[str, str], args, baseline: set[str], specs: list[str] | None = None) -> Trial:
    trial = Trial(pkg, locked.get(pkg, "-"), release)
    print(f"trying {pkg} {release} …", flush=True)
    done = venv.pip("install", *(specs or [f"{pkg}=={release}"]))
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and "Location" not in line]
        why = [line for line in lines if "requested" in line or "conflict" in line.lower() or "No matching" in line]
        trial.error = "; ".join(why[:2] or lines[-1:] or ["pip failed"])
    else:
        now = venv.versions()
        trial.also_changed = {k: f"{locked.get(k, '-')} → {v}" for k, v in now.items() if locked.get(k) != v and k != pkg}
        trial.broken = sorted(venv.failing(args.tests, args.jobs) - baseline)
    venv.restore()
    return trial


def _print(baseline: set[str], wanted: dict, locked: dict[str, str], trials: list[Trial]) -> None:
    print()
    if baseline:
        print(f"{len(baseline)} tests fail at the locked versions already (not drift): {', '.join(sorted(baseline)[:5])}")
    same = [f"{p} {locked.get(p, '?')}" for p, r in wanted.items() if r and r == locked.get(p, "").split("+")[0]]
    if same:
        print("newest = locked: " + ", ".join(same))
    for t in trials:
        verdict = f"ERROR {t.error}" if t.error else (f"{len(t.broken)} tests broken" if t.broken else "no test broken")
        print(f"\n{t.package} {t.locked} → {t.tried}: {verdict}")
        for k, v in sorted(t.also_changed.items()):
            print(f"    pip also changed {k} {v}")
        for test in t.broken:
            print(f"    {test}")


if __name__ == "__main__":
    sys.exit(main())
