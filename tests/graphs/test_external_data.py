"""The streaming writer lays files out exactly as onnx_ir.save / onnx.save_model do, deferred
tensors included; sharing a written graph's weights."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from hybridtrt.graphs.external_data import (
    deferred_key,
    deferred_tensor,
    is_deferred,
    planned_external_bytes,
    save_with_external_data,
    share_before_write,
    write_external_data,
)

#: Sizes around both thresholds: onnx_ir externalizes nbytes > 1024, onnx getsizeof(raw) >= 1024.
SIZES = [16, 990, 991, 992, 1024, 1025, 4096, 3]


def _model(deferred: set[int] = frozenset()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A chain of Adds over float32 initializers of `SIZES` bytes×4; ``deferred`` indices are placeholders."""
    rng = np.random.default_rng(0)
    values, inits, nodes = {}, [], []
    prev = "x"
    for i, n in enumerate(SIZES):
        name = f"w{i}"
        values[name] = rng.standard_normal(n // 4 or 1).astype(np.float32) if n % 4 == 0 else rng.integers(0, 9, n).astype(np.uint8)
        if i in deferred:
            inits.append(deferred_tensor(name, helper.np_dtype_to_tensor_dtype(values[name].dtype), values[name].shape, name))
        else:
            inits.append(numpy_helper.from_array(values[name], name))
        out = f"y{i}"
        nodes.append(helper.make_node("Identity", [name], [out]))
        prev = out
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"y{i}", inits[i].data_type, None) for i in range(len(SIZES))], inits)
    del prev
    return helper.make_model(graph), values


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("rule", ["onnx_ir", "onnx"])
def test_writer_matches_the_library_layout_with_deferred_tensors(tmp_path, rule):
    reference, values = _model()
    (tmp_path / "ref").mkdir()
    if rule == "onnx_ir":
        ir.save(ir.serde.deserialize_model(reference), tmp_path / "ref" / "m.onnx", external_data="m.data", size_threshold_bytes=1024)
    else:
        save_with_external_data(reference, tmp_path / "ref" / "m.onnx", "m.data", 1024)
    streamed, _ = _model(deferred={1, 2, 5, 6, 7})
    assert planned_external_bytes(streamed, rule, 1024) == (tmp_path / "ref" / "m.data").stat().st_size
    (tmp_path / "ours").mkdir()
    written = []
    write_external_data(
        streamed, tmp_path / "ours", "m.data", rule=rule, size_threshold=1024, chunks=lambda t: [values[deferred_key(t)]], progress=written.append
    )
    onnx.save_model(streamed, str(tmp_path / "ours" / "m.onnx"))
    assert not any(is_deferred(t) for t in streamed.graph.initializer)
    assert sum(written) == (tmp_path / "ours" / "m.data").stat().st_size
    assert _digest(tmp_path / "ours" / "m.data") == _digest(tmp_path / "ref" / "m.data")
    ours, ref = (onnx.load(str(tmp_path / d / "m.onnx"), load_external_data=False).graph.initializer for d in ("ours", "ref"))
    assert [t.SerializeToString() for t in ours] == [t.SerializeToString() for t in ref]  # same inline bytes and external entries


def test_deferred_tensor_of_the_wrong_size_is_a_bug(tmp_path):
    model, values = _model(deferred={6})
    with pytest.raises(ValueError, match="wrote 8 bytes, its dims and type say 4096"):
        write_external_data(model, tmp_path, "m.data", rule="onnx", size_threshold=1024, chunks=lambda t: [b"12345678"])


def test_share_before_write_points_equal_tensors_at_the_reference(tmp_path):
    first, values = _model()
    save_with_external_data(first, tmp_path / "a.onnx", "a.data", 1024)
    second, _ = _model(deferred={6})
    changed = second.graph.initializer[5]  # w5 (1025 bytes) differs
    changed.raw_data = bytes(len(changed.raw_data))
    asked = []

    def same(t, path, offset, length):
        asked.append(t.name)
        data = values[t.name].tobytes() if is_deferred(t) else t.raw_data
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length) == data

    shared = share_before_write(second, tmp_path / "a.onnx", rule="onnx", size_threshold=1024, same=same)
    assert sorted(asked) == ["w2", "w3", "w4", "w5", "w6"]  # what onnx would have externalized
    assert shared == 991 + 992 + 1024 + 4096
    location = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in second.graph.initializer}
    assert location["w6"] == "a.data" and location["w5"] is None
