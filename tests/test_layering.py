"""The data walks one way (DESIGN.md §1, §2): checkpoint → reference → ONNX → runtime → judge. A
package never imports one that sits downstream of it, lazily or not (a lazy import is still a
dependency: the circle models → runtime → exporter → models was one)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridtrt"

#: package -> the hybridtrt packages it must not import.
FORBIDDEN: dict[str, set[str]] = {
    "judge": {"models", "ops", "exporter", "graphs", "runtime", "engine", "validation", "cli", "plugins"},
    "models": {"exporter", "graphs", "runtime", "engine", "validation", "judge", "cli"},
    "ops": {"models", "exporter", "graphs", "runtime", "engine", "validation", "judge", "cli"},
    "exporter": {"validation", "cli"},
    "graphs": {"models", "exporter", "runtime", "engine", "validation", "cli"},
    "runtime": {"validation", "cli"},
    "engine": {"validation", "cli"},
}


def violations(root: Path) -> list[str]:
    """``file:line: a -> b`` for each import of a forbidden package under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in FORBIDDEN:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "hybridtrt" and len(bits) > 1 and bits[1] in FORBIDDEN[parts[0]]:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: {parts[0]} -> {bits[1]}")
    return out


def test_no_package_imports_downstream():
    assert violations(PACKAGE) == []


def test_a_downstream_import_is_caught(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.py").write_text("def f():\n    from hybridtrt.runtime.generation import generate\n")
    assert violations(tmp_path) == ["models/model.py:2: models -> runtime"]
