"""The README's "From Python" block runs as printed (it used ``input_ids`` without defining them:
a NameError traceback for anyone who pasted it)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs_on_the_tiny_preset(make_export, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "a new README Python block: run it here too"
    ckpt, out = make_export("tiny-nemotron-h")
    (tmp_path / "ckpt").symlink_to(ckpt)  # the block's own paths
    (tmp_path / "out").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0].replace("max_new_tokens=32", "max_new_tokens=4"), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["out"].logits.shape[:2] == scope["input_ids"].shape and scope["result"].tokens.shape[0] == 2
