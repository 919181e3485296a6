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


def test_speculative_generation_through_the_cli(make_checkpoint, make_export):
    """``generate --speculative`` in a fresh interpreter: the tokens of plain greedy generation and
    a statistics line on the reference (n-gram and the MTP head of a Super-shaped checkpoint) and on
    ONNX Runtime (an export with every position's logits; a speculative export with mtp.onnx);
    refusals exit 2 with the value and a fix."""
    from tests.cli.batch import run_batch

    super_ckpt = make_checkpoint("tiny-nemotron3-super")
    plain_ckpt, last = make_export()
    _, every = make_export(options=ExportOptions(speculative=True))  # test_speculative's: no MTP head
    _, super_export = make_export("tiny-nemotron3-super", ExportOptions(speculative=True))  # test_speculative_export's
    ids = ("--ids", "5 6 7 8 5 6 7", "--max-new-tokens", "12", "--ignore-eos")
    cases = [
        ["generate", super_ckpt, *ids],
        ["generate", super_ckpt, *ids, "--speculative", "mtp"],
        ["generate", super_ckpt, *ids, "--speculative", "ngram", "--draft-len", "5"],
        ["generate", every, *ids],
        ["generate", every, *ids, "--speculative", "ngram"],
        ["generate", last, *ids, "--speculative", "ngram"],
        ["generate", every, *ids, "--speculative", "mtp"],
        ["generate", plain_ckpt, *ids, "--speculative", "mtp"],
        ["generate", super_ckpt, *ids, "--speculative", "ngram", "--temperature", "0.7"],
        ["generate", super_ckpt, *ids, "--draft-len", "2"],
        ["generate", super_ckpt, *ids, "--speculative", "ngram", "--draft-len", "0"],
        ["generate", super_export, *ids, "--speculative", "mtp"],
        ["export", super_ckpt, "-o", super_ckpt.parent / "never", "--speculative", "--logits", "last"],
    ]
    out = run_batch(cases)
    for o in out[:5]:
        assert o.code == 0, o.output
    tokens = lambda o: o.stdout.splitlines()[0]  # noqa: E731
    assert tokens(out[0]) == tokens(out[1]) == tokens(out[2]) and tokens(out[3]) == tokens(out[4])
    assert "speculative mtp, draft length 3 · acceptance" in out[1].stdout and "tokens per verify call" in out[1].stdout
    assert "speculative ngram, draft length 5" in out[2].stdout and "backend onnxruntime" in out[4].stdout
    assert out[11].code == 0 and tokens(out[11]) == tokens(out[0]) and "speculative mtp" in out[11].stdout, out[11].output
    assert not (super_ckpt.parent / "never").exists()
    refusals = {
        5: ("last position only", "export CHECKPOINT --speculative"),
        6: ("has no MTP graph (its checkpoint has no MTP head)", "--speculative"),
        7: ("no MTP layers", "--speculative ngram"),
        8: ("decodes greedily", "drop --temperature"),
        9: ("--draft-len 2 needs --speculative", "add --speculative"),
        10: ("--draft-len 0 must be in 1..16", "draft 3"),
        12: ("--logits last contradicts it", "drop --logits last"),
    }
    for i, (what, fix) in refusals.items():
        o = out[i]
        assert o.code == 2 and what in o.output and "fix:" in o.output and fix in o.output and "Traceback" not in o.output, (cases[i], o.output)
