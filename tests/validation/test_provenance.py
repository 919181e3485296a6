"""The checkpoint named for validation must be the one the export was made from (sha256 and config in
``hybridtrt.json``), checked before anything runs; ``--force`` compares another one anyway."""

from __future__ import annotations

import shutil

import pytest

from hybridtrt.cli.main import main
from hybridtrt.errors import CheckpointError
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.validation.provenance import check_checkpoint


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_recorded_checkpoint_passes_silently(exported):
    ckpt, out = exported
    assert check_checkpoint(read_manifest(out), out, ckpt) == []


def test_another_seed_is_refused_naming_both_hashes_and_force_compares_anyway(exported, make_checkpoint, capsys):
    _, out = exported
    other = make_checkpoint("tiny-nemotron-h", seed=1)
    recorded = read_manifest(out).source["sha256"]
    code, _, err = _run(capsys, "validate", str(out), "--checkpoint", str(other), "--random", "1", "--steps", "1")
    assert code == 2 and "Traceback" not in err
    assert "[checkpoint]" in err and "is not the one export" in err and "same config, different weights" in err
    assert recorded[:12] in err and "--force" in err
    code, text, _ = _run(capsys, "validate", str(out), "--checkpoint", str(other), "--random", "1", "--steps", "1", "--force")
    assert code == 1 and "FAIL" in text and "--force:" in text  # compared, failed, and the report says why


def test_another_family_cannot_be_compared_even_with_force(exported, make_checkpoint, capsys):
    _, out = exported
    other = make_checkpoint("tiny-mamba2")
    for extra in ([], ["--force"]):
        code, _, err = _run(capsys, "validate", str(out), "--checkpoint", str(other), *extra)
        assert code == 2 and "Traceback" not in err
        assert "cannot be compared" in err and "graph I/O differs" in err and "family 'nemotron_h' vs 'mamba2'" in err


def test_a_different_config_with_the_same_io_is_named(exported, make_checkpoint):
    ckpt, out = exported
    other = make_checkpoint("tiny-nemotron-h", time_step_limit=[0.01, 10.0])
    with pytest.raises(CheckpointError, match=r"its config differs \(time_step_limit"):
        check_checkpoint(read_manifest(out), out, other)
    notes = check_checkpoint(read_manifest(out), out, other, force=True)
    assert len(notes) == 1 and notes[0].startswith("--force:")


def test_a_checkpoint_changed_after_the_export_is_said_so(make_checkpoint, tmp_path, capsys):
    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models.presets import create_checkpoint

    ckpt = create_checkpoint("tiny-mamba2", tmp_path / "ckpt")
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(verify=False))
    shutil.copy(make_checkpoint("tiny-mamba2", seed=3) / "model.safetensors", ckpt / "model.safetensors")
    code, _, err = _run(capsys, "validate", str(out))  # the recorded path, new bytes
    assert code == 2 and "changed since export" in err and "--force" in err


def test_an_hf_saved_copy_of_the_same_model_needs_force(exported, tmp_path, capsys):
    """Re-saved by HF transformers' own save_pretrained: same weights and config, other files."""
    pytest.importorskip("transformers")
    from hybridtrt.validation.hf import load_hf

    ckpt, out = exported
    load_hf(ckpt).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="same config, different weights or files"):
        check_checkpoint(read_manifest(out), out, tmp_path / "hf")
    code, text, _ = _run(capsys, "validate", str(out), "--checkpoint", str(tmp_path / "hf"), "--force", "--random", "2", "--steps", "2")
    assert code == 0 and "PASS" in text  # the same numbers, so the comparison passes


def test_compare_checks_the_checkpoint_too(exported, make_checkpoint, tmp_path, capsys):
    _, out = exported
    code, _, err = _run(capsys, "compare", str(out), "--checkpoint", str(make_checkpoint("tiny-nemotron-h", seed=1)), "-o", str(tmp_path / "pg"))
    assert code == 2 and "[checkpoint]" in err and not (tmp_path / "pg").exists()
