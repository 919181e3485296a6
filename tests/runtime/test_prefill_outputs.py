"""A prefill call's outputs live in arrays of their own, outside ONNX Runtime's arena (issue 29,
goal 7).

Arrays ONNX Runtime returns are views of its arena (their base is a capsule): the previous call's KV,
alive as the next call's input, kept a score-sized arena region from being handed back, and a long
prompt's peak grew by it (small-nemotron-h: 2.48 GiB at 16k tokens against 1.93 GiB at 8k; 1.90
for both once the outputs are the caller's). The peaks over 8k-65k: benchmarks/long_context.py
(README "Long context").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridtrt.exporter.export import ExportOptions
from hybridtrt.runtime.onnxruntime import OrtModel, OrtSession
from tests.static_capacity import CAPACITY

FLAVOURS = {"dynamic": ExportOptions(), "static": ExportOptions(kv_cache="static", max_cache_len=CAPACITY)}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_prefill_outputs_are_the_callers_and_equal_the_arena_run(make_export, flavour, monkeypatch):
    _, out = make_export("tiny-nemotron-h", FLAVOURS[flavour])
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model = OrtModel(out)
    bound = model.run(ids, mask, model.zero_state(2), shrink_arena=True)  # a prefill call
    assert bound and all(a.flags.owndata and a.base is None for a in bound.values()), {k: type(a.base) for k, a in bound.items()}
    monkeypatch.setattr(OrtSession, "_output_shapes", lambda *a: None)  # ONNX Runtime allocates them
    arena = model.run(ids, mask, model.zero_state(2), shrink_arena=True)
    assert any(a.base is not None for a in arena.values())  # what the check above tells apart
    assert sorted(bound) == sorted(arena)
    for name in bound:
        np.testing.assert_array_equal(bound[name], arena[name], err_msg=name)
