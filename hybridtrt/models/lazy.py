"""The reference model with its weights read when used: ``load_model(path, lazy=True)``.

Parameters are grouped: a decoder layer's parameters (``layers.{i}.*``) form one group, every
other parameter is a group of its own (``norm_f.weight``). One group is resident at a time.
The embedding and the LM head (`ROW_READ`, the two largest tensors: 131072 × 4480 in Nano-9B-v2,
2.3 GB each in fp32) are never read whole: the lookup reads the rows of the ids it is given, and
the head is applied `HEAD_BLOCK_BYTES` of vocabulary rows at a time. Routed experts are read one
expert at a time, only those some token chose (a layer's stacks of Nemotron-3-Nano-30B's size are
2.6 GB in bf16, 5.1 GB in fp32). Each parameter is a parametrization
(`torch.nn.utils.parametrize`) over a meta tensor: the first access to a parameter of another group
drops the resident group and reads the new one from the checkpoint (converted to the model dtype
and checked for NaN/Inf, exactly as the eager load does). The forward pass is `HybridLM`'s own, so
the numbers are the eager model's; a forward pass reads every weight once and holds one decoder
layer.

`LazyWeights.lockstep` is sequential onloading for many inputs (as ModelOpt / llm-compressor do for
calibration): each input's forward pass runs in its own thread, the threads take turns in a fixed
order and meet whenever the pass needs the next group, so every group is read once for all inputs
and only the activations between groups are kept. One thread computes at a time, and each input
runs exactly the operations it runs alone, so results are identical to running them one by one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hybridtrt.models.cache import HybridCache
from hybridtrt.models.loading import Checkpoint
from hybridtrt.models.model import HybridLM, head_projection, meta_modules
from hybridtrt.models.moe import Experts

T = TypeVar("T")
_LAYER = re.compile(r"^layers\.(\d+)\.")
#: Parameters read by rows, never whole (embedding lookup; LM head by vocabulary blocks).
ROW_READ = ("embeddings.weight", "lm_head.weight")
#: Routed-expert stacks ``[E, out, in]``: read one expert at a time (`Experts.expert_weights`).
_EXPERT_STACK = re.compile(r"\.experts\.(up_proj|down_proj)$")


#: Bytes of LM-head rows (in the model dtype) applied at a time.
HEAD_BLOCK_BYTES = 16 << 20


def _by_rows(name: str) -> bool:
    """Is ``name`` read by rows (embedding, LM head) or by experts, never as part of its group?"""
    return name in ROW_READ or _EXPERT_STACK.search(name) is not None


def group_of(name: str) -> str:
    """``layers.3.mixer.D`` -> ``layers.3``; any other parameter is its own group."""
    m = _LAYER.match(name)
    return f"layers.{m.group(1)}" if m else name


class _Aborted(Exception):
    """Raised in lock-step threads when another thread failed."""


class _Lockstep:
    """Turn-taking state of one `LazyWeights.lockstep` call (guarded by the weights' condition)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.turn = 0
        self.waiting: dict[int, str] = {}
        self.done: set[int] = set()
        self.error: BaseException | None = None
        self.local = threading.local()

    def next_turn(self, after: int) -> int | None:
        """The next thread (in index order) that can run now, or None when all are waiting/done."""
        return next((k for k in range(after + 1, self.n) if k not in self.done and k not in self.waiting), None)


class LazyWeights:
    """Checkpoint-backed parameter values, one group resident at a time.

    Args:
        checkpoint: An opened checkpoint (`hybridtrt.models.loading.open_checkpoint`).
        device: Where read tensors go.

    Attributes:
        loads: Number of group reads so far (a forward pass reads each group once).
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> None:
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.groups: dict[str, list[str]] = {}
        for name in checkpoint.parameters:
            if not _by_rows(name):
                self.groups.setdefault(group_of(name), []).append(name)
        self.group: str | None = None
        self.resident: dict[str, Tensor] = {}
        self.loads = 0
        self._cv = threading.Condition()
        self._step: _Lockstep | None = None
        self._progress: Callable[[int, int], None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.checkpoint.dtype

    def _load(self, group: str) -> None:
        self.resident = {}  # drop the old group before reading the new one
        self.group = None
        self.resident = {n: self.checkpoint.read(n).to(self.device) for n in self.groups[group]}
        self.group = group
        self.loads += 1
        if self._progress is not None:
            self._progress(self.loads, len(self.groups))

    def release(self) -> None:
        """Drop the resident group (the next access reads again)."""
        with self._cv:
            self.resident, self.group = {}, None

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a `ROW_READ` parameter or experts of a stack (read now, not kept)."""
        return self.checkpoint.read_rows(name, start, stop).to(self.device)

    def get(self, name: str) -> Tensor:
        """The value of parameter ``name`` (reads its group if it is not resident; a `ROW_READ`
        parameter or expert stack is read whole for this one access)."""
        if _by_rows(name):
            return self.checkpoint.read(name).to(self.device)
        group = group_of(name)
        with self._cv:
            if group != self.group:
                if self._step is None:
                    self._load(group)
                else:
                    self._wait_for(group)
            return self.resident[name]

    def _wait_for(self, group: str) -> None:
        """Lock-step: park this thread until every thread needs ``group``, then read it once."""
        step = self._step
        assert step is not None
        me = step.local.index
        step.waiting[me] = group
        self._pass_turn(me)
        self._cv.wait_for(lambda: step.error is not None or (step.turn == me and me not in step.waiting))
        if step.error is not None:
            raise _Aborted

    def _pass_turn(self, me: int) -> None:
        step = self._step
        assert step is not None
        nxt = step.next_turn(me)
        if nxt is None and step.waiting:
            wanted = set(step.waiting.values())
            if len(wanted) != 1:
                raise RuntimeError(f"lock-step inputs need different weight groups at once: {sorted(wanted)}")
            self._load(wanted.pop())
            nxt = min(step.waiting)
            step.waiting.clear()
        if nxt is not None:
            step.turn = nxt
        self._cv.notify_all()

    def lockstep(self, fns: list[Callable[[], T]], progress: Callable[[int, int], None] | None = None) -> list[T]:
        """Run ``fns`` (forward passes of the lazy model) with sequential onloading.

        Every group is read once for all of them; one runs at a time, in list order within each
        group. Returns their results in order; the first exception is re-raised.

        Args:
            fns: Callables that run the lazy model (each in its own thread, under ``no_grad``).
            progress: Called as ``progress(groups_read, groups_total)`` after each group read.
        """
        if not fns:
            return []
        step = _Lockstep(len(fns))
        results: list = [None] * len(fns)

        def worker(k: int) -> None:
            step.local.index = k
            try:
                with self._cv:
                    self._cv.wait_for(lambda: step.error is not None or step.turn == k)
                    if step.error is not None:
                        return
                with torch.no_grad():
                    results[k] = fns[k]()
            except _Aborted:
                return
            except BaseException as e:  # re-raised in the caller
                with self._cv:
                    step.error = step.error or e
                    self._cv.notify_all()
                return
            with self._cv:
                step.done.add(k)
                try:
                    self._pass_turn(k)
                except BaseException as e:
                    step.error = step.error or e
                    self._cv.notify_all()

        with self._cv:
            self._step, self._progress = step, progress
        threads = [threading.Thread(target=worker, args=(k,), name=f"hybridtrt-lockstep-{k}") for k in range(len(fns))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            with self._cv:
                self._step, self._progress = None, None
        if step.error is not None:
            raise step.error
        return results


class _Onload(nn.Module):
    """Parametrization: the parameter's value is read from `LazyWeights` (the meta original is ignored)."""

    def __init__(self, weights: LazyWeights, name: str) -> None:
        super().__init__()
        self.weights = weights
        self.name = name

    def forward(self, original: Tensor) -> Tensor:
        return self.weights.get(self.name)


class LazyHybridLM(HybridLM):
    """`HybridLM` whose parameters live in a `LazyWeights` (build it with `lazy_model`)."""

    weights: LazyWeights

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def embed(self, input_ids: Tensor) -> Tensor:
        """The rows of the ids in ``input_ids`` only (the eager lookup's values)."""
        ids, inverse = torch.unique(input_ids, return_inverse=True)
        rows = torch.cat([self.weights.rows("embeddings.weight", int(a), int(b) + 1) for a, b in _runs(ids.tolist())])
        return rows[inverse.to(rows.device)]

    def head_logits(self, h: Tensor) -> Tensor:
        """The LM head one block of vocabulary rows at a time (each logit is the same dot product as
        the eager head's: its reduction runs over the hidden size, which is never split)."""
        name = "embeddings.weight" if self.lm_head is None else "lm_head.weight"
        vocab, hidden = self.config.vocab_size, self.config.hidden_size
        block = max(1, HEAD_BLOCK_BYTES // (hidden * self.dtype.itemsize))
        parts = []
        for start in range(0, vocab, block):
            w = self.weights.rows(name, start, min(start + block, vocab))
            parts.append(head_projection(h, w))
            del w
        return torch.cat(parts, dim=-1)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ids as inclusive runs of consecutive values: ``[1, 2, 3, 7] -> [(1, 3), (7, 7)]``."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def lazy_model(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LazyHybridLM:
    """A `LazyHybridLM` over ``checkpoint``: nothing is read until the forward pass needs it."""
    with meta_modules():
        model = LazyHybridLM(checkpoint.config).to(checkpoint.dtype)
    model.weights = LazyWeights(checkpoint, device)
    modules = dict(model.named_modules())
    for name in checkpoint.parameters:
        owner, _, leaf = name.rpartition(".")
        parametrize.register_parametrization(modules[owner], leaf, _Onload(model.weights, name), unsafe=True)
    for name, module in modules.items():
        if isinstance(module, Experts):
            module.expert_weights = partial(_one_expert, model.weights, name)
    return model.requires_grad_(False).eval()


def _one_expert(weights: LazyWeights, experts: str, expert: int) -> tuple[Tensor, Tensor]:
    """``(up [I, D], down [D, I])`` of one expert of the `Experts` module named ``experts``."""
    return weights.rows(f"{experts}.up_proj", expert, expert + 1)[0], weights.rows(f"{experts}.down_proj", expert, expert + 1)[0]


__all__ = ["HEAD_BLOCK_BYTES", "ROW_READ", "LazyHybridLM", "LazyWeights", "group_of", "lazy_model"]
