"""``hybridtrt preset``: usual file permissions, no writing over a checkpoint without --force."""

from __future__ import annotations

import os
import stat

import torch

from hybridtrt.cli.main import main
from hybridtrt.cli.preset import PRESET_NAMES
from hybridtrt.models import PRESETS, load_model


def test_preset_names_match_the_presets():
    assert sorted(PRESET_NAMES) == sorted(PRESETS)


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        assert main(["preset", "tiny-nemotron-h", "-o", str(tmp_path / "c"), "--max-shard-mb", "0.2"]) == 0
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o644}, modes


def test_force_replaces_an_older_checkpoint_cleanly(tmp_path):
    out = tmp_path / "c"
    assert main(["preset", "tiny-nemotron-h", "-o", str(out), "--max-shard-mb", "0.2"]) == 0  # sharded, with index
    (out / "notes.txt").write_text("mine\n")
    assert main(["preset", "tiny-mamba2", "-o", str(out)]) == 2  # refused: not empty
    assert main(["preset", "tiny-mamba2", "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    fresh = tmp_path / "fresh"
    assert main(["preset", "tiny-mamba2", "-o", str(fresh)]) == 0
    for a, b in zip(load_model(out).state_dict().values(), load_model(fresh).state_dict().values()):
        assert torch.equal(a, b)
