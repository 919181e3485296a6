"""Optimization profiles from the manifest (pure; no TensorRT)."""

from __future__ import annotations

import json

import pytest

from hybridtrt.engine.profiles import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CACHE_LEN,
    DEFAULT_MAX_INPUT_LEN,
    ProfileSpec,
    engine_profiles,
    profile_rows,
    resolve_shape,
)
from hybridtrt.errors import EngineError
from hybridtrt.runtime.generation import DEFAULT_PREFILL_CHUNK
from hybridtrt.exporter.export import ExportOptions
from hybridtrt.exporter.manifest import read_manifest


@pytest.fixture(scope="module")
def manifest(make_export):
    _, out = make_export("tiny-nemotron-h", ExportOptions(split=True))
    return read_manifest(out)


def test_unified_has_prefill_then_decode(manifest):
    profiles = engine_profiles(manifest, max_batch=4, max_input_len=32, max_cache_len=64)
    assert [p.name for p in profiles] == ["prefill", "decode"]
    prefill, decode = profiles
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 32), (4, 32))
    assert prefill.shapes["attention_mask"][:2] == ((1, 1), (1, 32))
    # prefill: from empty KV inputs (min, opt) up to a chunk on S - L cached positions (max)
    assert prefill.shapes["past_key_values.1.key"] == ((1, 2, 0, 16), (1, 2, 0, 16), (4, 2, 32, 16))
    assert prefill.shapes["attention_mask"][2] == (4, 64)
    # decode: one token, past 0..S-1, mask past+1 up to S
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode.shapes["attention_mask"][2] == (4, 64)
    assert decode.shapes["past_key_values.5.value"] == ((1, 2, 0, 16), (1, 2, 32, 16), (4, 2, 63, 16))
    # fixed-size states are fixed but for batch
    assert decode.shapes["past_ssm_state.0"] == ((1, 8, 16, 16), (1, 8, 16, 16), (4, 8, 16, 16))
    assert set(prefill.shapes) == {i["name"] for i in manifest.graphs["unified"].inputs}


def test_decode_graph_has_one_profile(manifest):
    (p,) = engine_profiles(manifest, graph="decode", max_batch=2, max_input_len=8, max_cache_len=16)
    assert p.name == "decode"
    assert p.shapes["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert p.shapes["attention_mask"][2] == (2, 16)


def test_defaults_are_documented_values(manifest):
    prefill, decode = engine_profiles(manifest)
    assert prefill.dims["batch"].max == DEFAULT_MAX_BATCH == 8
    assert prefill.dims["seq"].max == DEFAULT_MAX_INPUT_LEN == 2048
    assert decode.dims["past"].max + 1 == DEFAULT_MAX_CACHE_LEN == 4096
    # TensorRT tunes for the prompt length the runtimes call the prefill profile with: the prefill chunk
    assert prefill.dims["seq"].opt == DEFAULT_PREFILL_CHUNK == 2048
    (short, _) = engine_profiles(manifest, max_input_len=512)
    assert short.dims["seq"].opt == 512


def test_min_opt_max_are_ordered(manifest):
    for p in engine_profiles(manifest, max_batch=3, max_input_len=5, max_cache_len=7):
        for lo, opt, hi in p.shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_input_len": 100, "max_cache_len": 50}, "max-cache-len"),
        ({"max_batch": 0}, "--max-batch"),
        ({"max_cache_len": -1}, "--max-cache-len"),
        ({"graph": "nope"}, "--graph"),
    ],
)
def test_bad_limits_are_typed_errors(manifest, kwargs, needle):
    with pytest.raises(EngineError) as e:
        engine_profiles(manifest, **kwargs)
    assert needle in str(e.value)


def test_missing_decode_graph_says_split(manifest):
    unsplit = type(manifest).from_dict(json.loads(manifest.to_json()))
    del unsplit.graphs["decode"]
    with pytest.raises(EngineError, match="--split"):
        engine_profiles(unsplit, graph="decode")


def test_roundtrip_and_rows(manifest):
    profiles = engine_profiles(manifest, max_batch=2, max_input_len=4, max_cache_len=8)
    for p in profiles:
        assert ProfileSpec.from_dict(p.to_dict()) == p
    rows = profile_rows(profiles)
    assert rows[0][:2] == ["0 prefill", "input_ids"] and rows[0][4] == "2×4"


def test_resolve_shape():
    dims = {"batch": 2, "seq": 3, "past": 5}
    assert resolve_shape(["batch", 4, "past+seq", "past", "seq"], dims) == (2, 4, 8, 5, 3)
    with pytest.raises(EngineError, match="symbolic dim"):
        resolve_shape(["batch", "heads"], dims, name="x")
