"""``hybridtrt generate`` on an export dir, a model.onnx and a checkpoint dir (byte tokenizer)."""

from __future__ import annotations

import importlib.util

import pytest

from hybridtrt.cli.generate import IncrementalText
from hybridtrt.cli.main import main
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def exported(make_export):
    return make_export("tiny-nemotron-h", ExportOptions(split=True))


def _run(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_export_dir_and_checkpoint_agree(exported, capsys):
    ckpt, out = exported
    args = ("--prompt", "Hello", "--max-new-tokens", "6", "--ignore-eos")
    rc, ort_out, err = _run(capsys, out, *args)
    assert rc == 0, err
    assert "prefill" in ort_out and "tokens/s" in ort_out and "backend onnxruntime" in ort_out
    rc, ref_out, err = _run(capsys, ckpt, *args)
    assert rc == 0, err
    assert "backend pytorch" in ref_out
    assert ort_out.splitlines()[0] == ref_out.splitlines()[0]  # same greedy text
    assert "6 new tokens" in ort_out


def test_onnx_file_with_ids(exported, capsys):
    rc, out, err = _run(capsys, exported[1] / "model.onnx", "--ids", "5 6 7", "--max-new-tokens", "3", "--ignore-eos")
    assert rc == 0, err
    assert len(out.splitlines()[0].split()) == 3  # ids printed
    assert "backend onnxruntime" in out


def test_bad_inputs_exit_2(exported, tmp_path, capsys):
    rc, _, err = _run(capsys, exported[1], "--prompt", "x", "--tokenizer", tmp_path)
    assert rc == 2 and "tokenizer" in err
    rc, _, err = _run(capsys, exported[1], "--ids", "1 two")
    assert rc == 2 and "--ids" in err
    rc, _, err = _run(capsys, tmp_path / "m.xyz", "--ids", "1")
    assert rc == 2 and "does not exist" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engine_without_sidecar_or_tensorrt(tmp_path, capsys):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    rc, _, err = _run(capsys, engine, "--ids", "1 2")
    assert rc == 2 and "sidecar" in err


def test_incremental_text_holds_partial_utf8(exported):
    tok = load_tokenizer(exported[0])
    ids = tok.encode("aé").ids  # 'é' is two bytes → two tokens
    assert len(ids) == 3
    inc = IncrementalText(tok)
    pieces = [inc.push(i) for i in ids]
    assert pieces == ["a", "", "é"]
    assert inc.flush() == ""


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engine_with_sidecar_without_tensorrt(exported, tmp_path, capsys):
    from hybridtrt.engine.profiles import engine_profiles
    from hybridtrt.engine.sidecar import make_sidecar, write_sidecar
    from hybridtrt.exporter.manifest import read_manifest

    manifest = read_manifest(exported[1])
    sidecar = make_sidecar(
        manifest, exported[1], engine_profiles(manifest, max_batch=1, max_input_len=8, max_cache_len=16),
        tensorrt_version="11.1.0", gpu_name=None, compute_capability=None, plugin_library=None, build_flags={},
    )  # fmt: skip
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    write_sidecar(sidecar, engine)
    rc, _, err = _run(capsys, engine, "--prompt", "Hi")
    assert rc == 2 and "TensorRT" in err and "fix:" in err


def test_snapshot_files_continue_a_prompt(exported, tmp_path, capsys):
    """--save-snapshot FILE then --snapshot FILE gives the text of the whole prompt at once, also
    across runtimes (snapshot on the reference, continued on ONNX Runtime); chunks change nothing."""
    ckpt, out = exported
    gen = ("--max-new-tokens", "5", "--ignore-eos")
    rc, whole, err = _run(capsys, out, "--ids", "5 6 7 8 9 10 11", *gen, "--prefill-chunk", "3")
    assert rc == 0, err
    rc, saved, err = _run(capsys, ckpt, "--ids", "5 6 7 8", "--save-snapshot", tmp_path / "p.safetensors")
    assert rc == 0 and "snapshot of 4 positions" in saved, err
    rc, resumed, err = _run(capsys, out, "--ids", "9 10 11", "--snapshot", tmp_path / "p.safetensors", *gen)
    assert rc == 0, err
    assert resumed.splitlines()[0] == whole.splitlines()[0]


def test_out_of_vocabulary_ids_exit_2(exported, capsys):
    rc, _, err = _run(capsys, exported[1], "--ids", "5 -3 7")
    assert rc == 2 and "token id -3 is outside" in err


@pytest.mark.parametrize(("flag", "says"), [((), "(bf16 weights, fp32 compute)"), (("--bf16", "emulate"), "(bf16 emulated)")])
def test_a_bf16_export_says_how_it_computes(make_export, capsys, flag, says):
    """A bf16 export on ONNX Runtime CPU: fp32 compute from its bf16 weights by default, the
    emulation of TensorRT's bf16 arithmetic on request; the summary line names which ran."""
    _, out = make_export("tiny-nemotron-h", ExportOptions(dtype="bf16", verify=False))
    rc, text, err = _run(capsys, out, "--ids", "5 6 7", "--max-new-tokens", "3", "--ignore-eos", *flag)
    assert rc == 0, err
    assert f"backend onnxruntime {says}" in text, text
