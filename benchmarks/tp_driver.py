"""What the tensor-parallel driver costs per call (`hybridtrt.runtime.tensor_parallel.TensorParallelModel`).

Every `step` goes to every rank's process through a pipe and rank 0's logits ``[B, V]`` (fp32) come back;
the ranks here compute nothing (a stand-in model whose step returns ready logits), so the time per step is
the driver's own: the round trip to N processes and the logits' copy. Nemotron-H's vocabulary (131,072).
Run on any machine (no GPU needed); compare with a decode step of the engine it would drive.

    python benchmarks/tp_driver.py [--vocab 131072] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridtrt.runtime.tensor_parallel import RankSpec, TensorParallelModel  # noqa: E402


class _Idle:
    """A rank that computes nothing: its step returns logits made once."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size = vocab
        self._logits: dict[int, torch.Tensor] = {}

    def zero_state(self, batch: int) -> int:
        return 0

    def step(self, input_ids, attention_mask, state, decode):  # noqa: ANN001, ANN201
        batch = input_ids.shape[0]
        if batch not in self._logits:
            self._logits[batch] = torch.randn(batch, self.vocab_size)
        return self._logits[batch], state + 1


class _NoCommunicator:
    def close(self) -> None:
        pass


def idle_rank(spec: RankSpec, rank: int, rendezvous: object) -> tuple[_Idle, _NoCommunicator]:
    return _Idle(int(spec.options["vocab"])), _NoCommunicator()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    rows = []
    for world in (2, 4, 8):
        spec = RankSpec(tuple(f"rank{r}" for r in range(world)), "gloo", f"{__name__}:idle_rank", {"vocab": args.vocab}, "idle")
        for batch in (1, 8):
            medians = {}
            for shared in (False, True):
                start = time.perf_counter()
                with TensorParallelModel(spec, shared_logits=shared) as model:
                    started = time.perf_counter() - start
                    state = model.zero_state(batch)
                    ids, mask = torch.ones(batch, 1, dtype=torch.long), torch.ones(batch, 1, dtype=torch.long)
                    times = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        logits, state = model.step(ids, mask, state, decode=True)
                        times.append(time.perf_counter() - t)
                    assert logits.shape == (batch, args.vocab)
                medians[shared] = statistics.median(times) * 1e3
            rows.append((world, batch, medians[False], medians[True], started))
    print(f"tensor-parallel driver, idle ranks, vocab {args.vocab:,}, {args.steps} steps each: median ms per step, rank 0's")
    print("logits back through the pipe or through shared memory (the default), side by side\n")
    print("| ranks | batch | logits | pipe ms/step | shared ms/step | pipe ÷ shared | start s |")
    print("|---|---|---|---|---|---|---|")
    for world, batch, pipe, shared, started in rows:
        print(f"| {world} | {batch} | {batch * args.vocab * 4 / 2**20:.1f} MiB | {pipe:.2f} | {shared:.2f} | {pipe / shared:.1f} | {started:.1f} |")


if __name__ == "__main__":
    main()
