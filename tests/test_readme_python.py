"""The README's Python blocks run as printed (the "From Python" one used ``input_ids`` without
defining them: a NameError traceback for anyone who pasted it)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs_on_the_tiny_preset(make_export, make_checkpoint, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "a new README Python block: run it here too"  # the tensor-parallel runtime's: tests/runtime/test_tp_runtime.py
    ckpt, out = make_export("tiny-nemotron-h")
    (tmp_path / "ckpt").symlink_to(ckpt)  # the block's own paths
    (tmp_path / "out").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0].replace("max_new_tokens=32", "max_new_tokens=4"), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["out"].logits.shape[:2] == scope["input_ids"].shape and scope["result"].tokens.shape[0] == 2
    # "Tensor parallelism": 4 ranks emulated and judged, on the preset's block kinds in 4 layers.
    (tmp_path / "tp").mkdir()
    (tmp_path / "tp" / "ckpt").symlink_to(make_checkpoint("tiny-nemotron-h", hybrid_override_pattern="M*-M", num_hidden_layers=4))
    monkeypatch.chdir(tmp_path / "tp")
    scope = {}
    exec(compile(blocks[2], "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["plan"].world == 4 and len(scope["graphs"]) == 4 and scope["report"].passed
