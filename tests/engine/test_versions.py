"""The TensorRT rule table (`hybridtrt.engine.trt_rules`) and the version gates built on it (pure)."""

from __future__ import annotations

import onnx.defs
import pytest

from hybridtrt.engine.trt_rules import (
    HYBRIDTRT_CREATORS,
    LOCAL_FUNCTION_ALWAYS,
    NATIVE_OPS,
    PARSER_RELEASES,
    PLUGIN_NAMESPACE_WINS,
    REGISTERED_PLUGIN_WINS,
)
from hybridtrt.engine.versions import MIN_PLUGIN_DISPATCH, check_runtime_version, parse_version, parser_release
from hybridtrt.errors import MissingDependencyError


@pytest.mark.parametrize(
    ("version", "parsed"), [("11.1.0.106", (11, 1)), ("10.15", (10, 15)), (" 10.7.0", (10, 7)), ("11.0.1+cuda13", (11, 0))]
)
def test_parse_version(version, parsed):
    assert parse_version(version) == parsed


@pytest.mark.parametrize("version", ["", "eleven", "11", "unknown"])
def test_unreadable_version_is_a_typed_error(version):
    with pytest.raises(MissingDependencyError, match="cannot read the TensorRT version"):
        parse_version(version)


# The facts the issue states, as checked in onnx-tensorrt's sources (see trt_rules' docstring):
#   <= 10.6 the local function always wins; 10.7-10.14 a registered plugin wins; >= 10.15 the plugin wins with a
#   plugin_namespace attribute; 10.0 / 10.1 cover opsets up to 20; < 10.8 mishandles aliased function names.
EXPECTED = {
    "10.0.1": (20, LOCAL_FUNCTION_ALWAYS, True),
    "10.1.0": (20, LOCAL_FUNCTION_ALWAYS, True),
    "10.5.0": (20, LOCAL_FUNCTION_ALWAYS, True),
    "10.6.0": (22, LOCAL_FUNCTION_ALWAYS, True),
    "10.7.0": (22, REGISTERED_PLUGIN_WINS, True),
    "10.8.0": (22, REGISTERED_PLUGIN_WINS, False),
    "10.13.3": (23, REGISTERED_PLUGIN_WINS, False),
    "10.14": (23, REGISTERED_PLUGIN_WINS, False),
    "10.15": (24, PLUGIN_NAMESPACE_WINS, False),
    "10.16": (24, PLUGIN_NAMESPACE_WINS, False),
    "11.0": (24, PLUGIN_NAMESPACE_WINS, False),
    "11.1.0.106": (24, PLUGIN_NAMESPACE_WINS, False),
    "11.5": (25, PLUGIN_NAMESPACE_WINS, False),
    "12.0": (25, PLUGIN_NAMESPACE_WINS, False),
}


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_parser_release_table(version):
    release = parser_release(version)
    assert (release.max_opset, release.dispatch, release.function_scope_bug) == EXPECTED[version]
    assert release.source


def test_table_is_ordered_and_monotone():
    since = [r.since for r in PARSER_RELEASES]
    assert since == sorted(since) and len(set(since)) == len(since)
    opsets = [r.max_opset for r in PARSER_RELEASES]
    assert opsets == sorted(opsets)
    assert MIN_PLUGIN_DISPATCH == (10, 7)
    assert [r.function_scope_bug for r in PARSER_RELEASES] == sorted((r.function_scope_bug for r in PARSER_RELEASES), reverse=True)


@pytest.mark.parametrize("version", ["9.3.0", "8.6.1"])
def test_tensorrt_older_than_10_is_refused(version):
    with pytest.raises(MissingDependencyError, match=r"too old.*>= 10\.0") as err:
        check_runtime_version(version)
    assert "TensorRT 11" in err.value.fix


def test_runtime_gate_accepts_10_and_11():
    assert check_runtime_version("10.0.1") == (10, 0)
    assert check_runtime_version("11.1.0") == (11, 1)


def test_native_ops_rows_agree_with_onnx():
    """A row's min_opset is the op's first ONNX opset (so the other helpers' rows cannot drift from onnx)."""
    for op in NATIVE_OPS.values():
        first = min(s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op.op_type and s.domain == "")
        assert op.min_opset == first, op
    assert (NATIVE_OPS["Attention"].layer, NATIVE_OPS["Attention"].since) == ("IAttention", (10, 14))
    assert (NATIVE_OPS["TensorScatter"].layer, NATIVE_OPS["TensorScatter"].since) == ("IKVCacheUpdateLayer", (10, 15))


def test_creators_match_the_op_contract():
    """The creators the rule table expects are the ops the exporter writes (DESIGN.md §5): the SSD ops and the MoE
    experts in x's dtype and in FP8 (issue 26); NVFP4 experts have no plugin yet."""
    from hybridtrt.ops.moe_onnx import MOE_EXPERTS, MOE_EXPERTS_FP8
    from hybridtrt.ops.onnx_functions import CHUNK_SCAN, DOMAIN, STATE_UPDATE

    assert HYBRIDTRT_CREATORS == {(op, "1", DOMAIN) for op in (CHUNK_SCAN, STATE_UPDATE, MOE_EXPERTS, MOE_EXPERTS_FP8)}
