"""The collectives tensor-parallel ranks meet at, and a CPU emulation of them (DESIGN.md §12).

A rank's model (`hybridtrt.models.tensor_parallel.RankLM`) calls a `Communicator`; the two
collectives it needs are TensorRT's ``IDistCollectiveLayer`` operations of the same names
(NvInfer.h ``CollectiveOperation::kALL_REDUCE`` with ``ReduceOperation::kSUM``, ``kALL_GATHER``; a
``groups`` array of rank ids restricts a collective to those ranks, NvInfer.h
``INetworkDefinition::addDistCollective``).

`emulate_ranks` runs N ranks as N threads of one process and does each collective in PyTorch: every
rank deposits its tensor, a barrier, every rank reads the others' and combines them in rank order (so
the result is the same bits on every rank and on every run; NCCL's ring sums in another order, which
moves a half-precision result by its rounding), a second barrier. A rank that raises aborts the
barriers, so the others stop instead of waiting forever, and the error names its rank.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class Communicator(Protocol):
    """What a rank's model calls; every rank calls the same collectives in the same order."""

    rank: int
    world: int

    def all_reduce(self, t: Tensor, group: Sequence[int] | None = None) -> Tensor:
        """The sum of ``t`` over ``group`` (all ranks when None), on every rank of the group."""
        ...

    def all_gather(self, t: Tensor, dim: int) -> Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order (sizes may differ on ``dim``)."""
        ...


class RankFailed(RuntimeError):
    """A rank of `emulate_ranks` raised; the message names the rank, the cause is chained."""


class _Exchange:
    """The shared slots and barrier of N emulated ranks."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def swap(self, rank: int, t: Tensor) -> list[Tensor]:
        self.slots[rank] = t
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # everyone has read before the next collective overwrites a slot
        return got  # type: ignore[return-value]


class EmulatedCommunicator:
    """One rank's end of `_Exchange` (`Communicator`)."""

    def __init__(self, exchange: _Exchange, rank: int) -> None:
        self._exchange = exchange
        self.rank = rank
        self.world = exchange.world
        #: Collectives this rank has called, in order: ``(kind, shape, group)`` (tests read it).
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...] | None]] = []

    def all_reduce(self, t: Tensor, group: Sequence[int] | None = None) -> Tensor:
        members = tuple(range(self.world)) if group is None else tuple(group)
        if self.rank not in members:
            raise AssertionError(f"rank {self.rank} all-reduces in group {members} it is not part of")
        self.calls.append(("all_reduce", tuple(t.shape), None if group is None else members))
        got = self._exchange.swap(self.rank, t)
        out = got[members[0]].clone()
        for m in members[1:]:
            out += got[m]
        return out

    def all_gather(self, t: Tensor, dim: int) -> Tensor:
        self.calls.append(("all_gather", tuple(t.shape), None))
        return torch.cat(self._exchange.swap(self.rank, t), dim=dim)


def emulate_ranks(world: int, fn: Callable[[int, EmulatedCommunicator], T]) -> list[T]:
    """Run ``fn(rank, communicator)`` for every rank in its own thread, in lock step at each collective.

    Returns:
        Each rank's result, in rank order.

    Raises:
        RankFailed: a rank raised (the lowest such rank; its exception is the cause).
    """
    exchange = _Exchange(world)
    results: list[object] = [None] * world
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, EmulatedCommunicator(exchange, rank))
        except threading.BrokenBarrierError as e:
            errors.setdefault(rank, e)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below, with its rank
            errors[rank] = e
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"tp-rank-{r}") for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    causes = {r: e for r, e in errors.items() if not isinstance(e, threading.BrokenBarrierError)}
    if causes or errors:
        rank = min(causes or errors)
        err = (causes or errors)[rank]
        raise RankFailed(f"rank {rank} of {world}: {type(err).__name__}: {err}") from err
    return results  # type: ignore[return-value]
