"""The unified and decode sessions of an export read one memory-mapped copy of its weights
(`hybridtrt.runtime.onnxruntime.SharedWeights`), compute what ONNX Runtime's own loading computes,
and a republished weight file is mapped afresh. Memory and speed are measured side by side with
ONNX Runtime's own loading and HF transformers in benchmarks/runtime_memory.py."""

from __future__ import annotations

import shutil
import numpy as np
import torch

from hybridtrt.runtime.onnxruntime import OrtModel, SharedWeights


def _mappings_of(path) -> int:
    """Mappings of ``path`` in this process (``/proc/self/maps``)."""
    return sum(1 for line in open("/proc/self/maps") if line.rstrip().endswith(str(path)))


def test_both_graphs_share_one_mapping_and_compute_what_ort_loads(make_export, tmp_path):
    _, exported = make_export("tiny-nemotron-h")
    out = shutil.copytree(exported, tmp_path / "export")  # a path no other test's session maps
    weights = (out / "weights.data").resolve()
    shared = OrtModel(out)
    assert shared.unified.weights is shared.decode.weights is SharedWeights.of(out)
    names = {t.name for t in shared.unified.graph.graph.initializer if t.external_data}
    assert names and set(shared.unified.weights.values(shared.unified.graph)) == names
    assert _mappings_of(weights) == 1  # ours: ONNX Runtime mapped nothing of its own

    own = OrtModel(out, prepack=True)  # ONNX Runtime's own loading, one copy per session
    assert own.unified.weights is None and _mappings_of(weights) > 1

    ids = torch.tensor([[5, 17, 99, 42, 7], [0, 0, 3, 8, 1]])
    mask = (ids != 0).long()
    mask[1, 2:] = 1
    a = shared.generate(ids, mask, max_new_tokens=6, keep_logits=True)
    b = own.generate(ids, mask, max_new_tokens=6, keep_logits=True)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.logits, b.logits):  # pre-packed MatMuls sum in another order
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_a_republished_weight_file_is_mapped_again(make_export, tmp_path):
    """`hybridtrt export` publishes by rename (a new inode): a later session must not read the old
    mapping, while sessions already open keep theirs."""
    _, exported = make_export("tiny-nemotron-h")
    out = shutil.copytree(exported, tmp_path / "export")
    first = OrtModel(out)
    before = first.unified.weights.values(first.unified.graph)
    data = out / "weights.data"
    replaced = tmp_path / "new.data"
    shutil.copy(data, replaced)
    replaced.replace(data)  # same bytes, new file
    after = OrtModel(out).unified.weights.values(first.unified.graph)
    name = next(iter(before))
    assert after[name] is not before[name]
    np.testing.assert_array_equal(after[name].numpy(), before[name].numpy())


# Memory and speed against ONNX Runtime's own loading and HF: benchmarks/runtime_memory.py (README "Benchmarks (CPU)").
