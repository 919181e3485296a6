"""Shared fixtures: random checkpoints of the built-in presets, created once per session."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from hybridtrt.models import create_checkpoint


# Checkpoints and exports made by `make_checkpoint` / `make_export` are shared by the xdist workers through one
# directory per run (the controller makes it, the workers inherit its path): a worker that needs one another
# worker is making waits for it (a file lock per key) instead of making it again. With tests of one module
# spread over both workers (`--dist worksteal`), every common export was made twice.
_SHARED_ENV = "HYBRIDTRT_TEST_SHARED"
_OWN_SHARED = None if os.environ.get(_SHARED_ENV) else tempfile.mkdtemp(prefix="hybridtrt-test-shared-")
if _OWN_SHARED:
    os.environ[_SHARED_ENV] = _OWN_SHARED


@contextlib.contextmanager
def made_once(kind: str, key: str):
    """``(folder, done)`` for ``key``, this process holding its lock: ``done`` when a process made it already;
    else make it in ``folder`` and it is marked done when the block ends without an error."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = Path(os.environ[_SHARED_ENV]) / f"{kind}-{digest}"
    with open(folder.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = (folder / ".done").is_file()
            if not done:
                shutil.rmtree(folder, ignore_errors=True)  # a failed attempt's leftovers
                folder.mkdir()
            yield folder, done
            (folder / ".done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def make_checkpoint():
    """``make_checkpoint(preset="tiny-nemotron-h", seed=0, **config_overrides) -> Path``, made once per run."""

    def make(preset: str = "tiny-nemotron-h", seed: int = 0, **overrides) -> Path:
        key = json.dumps([preset, seed, overrides], sort_keys=True)
        with made_once("ckpt", key) as (folder, done):
            out = folder / preset.replace("-", "_")
            if not done:
                create_checkpoint(preset, out, seed=seed, **overrides)
        return out

    return make


# One trace cache for the whole run, shared by the xdist workers (they inherit the controller's
# environment): the suite exports the same few checkpoints with the same flags in many tests, and
# tracing is 95 % of a tiny export (`hybridtrt.exporter.trace_cache`; keyed on checkpoint bytes,
# graph spec, source and library versions; a fresh directory per run, so nothing is ever stale).
from hybridtrt.exporter import trace_cache  # noqa: E402

# Exports trace the decode graph in this process: a second process per export (`TracedBeside`)
# imports torch again, and the workers already use every CPU (tests/exporter/test_traced_beside.py).
os.environ.setdefault("HYBRIDTRT_TRACE_BESIDE", "0")
_OWN_TRACE_CACHE = None if os.environ.get(trace_cache.ENV) else tempfile.mkdtemp(prefix="hybridtrt-trace-cache-")
if _OWN_TRACE_CACHE:
    os.environ[trace_cache.ENV] = _OWN_TRACE_CACHE


def pytest_unconfigure(config):
    for own in (_OWN_TRACE_CACHE, _OWN_SHARED):  # the process that made it (the xdist controller) removes it
        if own:
            shutil.rmtree(own, ignore_errors=True)


# Test models are tiny: one intra-op thread avoids OpenMP contention on a 2-core CI machine
# (a 64-wide linear took 32 ms with 2 contended threads vs 0.4 ms with 1). The CLI tests' child
# interpreters (subprocesses, `tests/cli/batch.py`) inherit the same through the environment: each
# xdist worker already keeps one CPU busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def load_script(name: str, path: Path):
    """A script outside the package (benchmarks/) imported as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded to the longest: ``(ids, mask)``."""
    from hybridtrt.runtime.generation import left_pad

    gen = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths], pad_id)



@pytest.fixture(scope="session")
def make_export(make_checkpoint):
    """``make_export(preset, options=ExportOptions(...), **overrides) -> (checkpoint, export_dir)``,
    exported once per run per (preset, options, overrides)."""
    from hybridtrt.exporter.export import ExportOptions, export

    def make(preset: str = "tiny-nemotron-h", options: ExportOptions | None = None, **overrides):
        options = options or ExportOptions()
        # split=None means "decode.onnx when the model has a Mamba layer", which every preset has:
        # share one export with split=True.
        key = json.dumps([preset, {**vars(options), "split": options.split is not False}, overrides], sort_keys=True, default=str)
        ckpt = make_checkpoint(preset, **overrides)
        with made_once("export", key) as (folder, done):
            out = folder / "export"
            if not done:
                export(ckpt, out, options)
        return ckpt, out

    return make


@pytest.fixture(scope="session")
def tp_export(make_checkpoint):
    """``(checkpoint, OUT)``: ``export --tp 4`` of a model with every block kind in 4 layers (two ranks share
    each Mamba group, the KV heads are replicated), with a fake engine and its real sidecar in every rank
    directory (``rank{r}/model.engine``, as ``hybridtrt build OUT`` names them); once per run."""
    from hybridtrt.engine.profiles import engine_profiles
    from hybridtrt.engine.sidecar import make_sidecar, write_sidecar
    from hybridtrt.exporter.export import ExportOptions
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.exporter.tensor_parallel import export_tp

    checkpoint = make_checkpoint("tiny-nemotron3-moe", num_attention_heads=8, layers_block_type=["mamba", "attention", "moe", "mlp"])
    with made_once("tp-export", str(checkpoint)) as (folder, done):
        out = folder / "tp4"
        if not done:
            export_tp(checkpoint, out, 4, ExportOptions())
            for rank in range(4):
                manifest = read_manifest(out / f"rank{rank}")
                profiles = engine_profiles(manifest, max_batch=2, max_input_len=16, max_cache_len=32)
                sidecar = make_sidecar(manifest, out / f"rank{rank}", profiles, tensorrt_version="11.1.0", gpu_name=None,
                                       compute_capability=None, plugin_library=None, build_flags={})  # fmt: skip
                (out / f"rank{rank}" / "model.engine").write_bytes(b"fake engine")
                write_sidecar(sidecar, out / f"rank{rank}" / "model.engine")
    return checkpoint, out


#: The longest modules on 2 cores (``make test PYTEST_ARGS=--durations=0``, setup + calls summed per module,
#: 2026-12-07), scheduled first: xdist's loadscope hands out whole modules in collection order, and a long
#: module handed out last leaves the other worker idle. Other modules keep their order. The trace-cache module
#: comes late: its replay tests use graphs the others put in the shared cache.
LONGEST_FIRST = (
    "tests/validation/test_moe_routing.py",
    "tests/runtime/test_speculative.py",
    "tests/exporter/test_streaming.py",
    "tests/exporter/test_streaming_quantized.py",
    "tests/exporter/test_stitch.py",
    "tests/test_install.py",
    "tests/validation/test_architectures.py",
    "tests/plugins/test_kernels_emulated.py",
    "tests/exporter/test_verify.py",
    "tests/exporter/test_weight_only_export.py",
    "tests/validation/test_validate.py",
    "tests/exporter/test_moe_export.py",
    "tests/exporter/test_export_cli.py",
    "tests/engine/test_parser_rules.py",
    "tests/exporter/test_static_cache.py",
    "tests/exporter/test_export_files.py",
    "tests/exporter/test_export.py",
    "tests/exporter/test_speculative_export.py",
    "tests/cli/test_hf_checkpoints.py",
    "tests/cli/test_moe_demo.py",
    "tests/cli/test_hostile_inputs.py",
    "tests/engine/test_build_fake_trt.py",
    "tests/exporter/test_modelopt_export.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(LONGEST_FIRST)))  # stable
