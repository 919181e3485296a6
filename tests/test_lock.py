"""requirements.lock is what `make setup` installs: every dependency of the package and its `test`
extra pinned to one exact version that satisfies pyproject.toml's range, and nothing of torch's
platform build in it (torch is pinned by the Makefile and installed on its own)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{n}: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(match[1])
        assert name not in pins, f"requirements.lock:{n}: {name} pinned twice"
        pins[name] = match[2]
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req} is declared in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`"
        )


def test_torch_and_its_platform_packages_stay_out_of_the_lock():
    pins = _lock()
    assert "torch" not in pins
    platform = [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-"))]
    assert not platform, f"the lock names torch's CUDA packages {platform}: `make lock TORCH_INDEX=<cpu index>`"


def test_the_makefile_installs_the_lock_without_resolving():
    """`--no-deps` on the lock, torch at the Makefile's exact version, the package itself without
    dependencies: nothing unpinned can enter, and `pip check` proves the set is consistent."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"install --no-deps -r \$\(LOCK\)", makefile)
    assert re.search(r"^TORCH_VERSION := \d+\.\d+\.\d+$", makefile, re.M)
    assert "install torch==$(TORCH_VERSION)" in makefile
    assert "install --no-deps --no-build-isolation -e ." in makefile
    assert "pip check" in makefile


def test_a_lock_that_misses_a_dependency_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a lock without onnx, and one with onnx outside its range."""
    import pytest

    text = (REPO / "requirements.lock").read_text()
    for broken in (re.sub(r"(?m)^onnx==.*$", "", text), re.sub(r"(?m)^onnx==.*$", "onnx==1.0.0", text)):
        (tmp_path / "requirements.lock").write_text(broken)
        (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
        monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
        with pytest.raises(AssertionError, match="onnx"):
            test_every_declared_dependency_is_pinned_within_its_range()
