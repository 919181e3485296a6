"""Speculative decoding against plain greedy decoding, side by side in one run (README "Speculative decoding").

For each runtime (the PyTorch reference, ONNX Runtime on an ``export --speculative``) and
each draft source (n-gram lookup, the checkpoint's MTP head, and scripted drafters that force an
acceptance pattern), generate the same tokens speculatively and greedily and print: whether the
tokens are identical, the acceptance, the tokens per verify call and per main-model call (replays
included), and the wall time against greedy decoding's.

The model is a random one (``tiny-nemotron3-super``, Nemotron-3 Super's structure with its MTP head,
scaled down), so the n-gram and MTP acceptances mean little: random weights neither repeat text nor
train a draft head. The scripted rows show the mechanism's costs at known acceptance; the identity
column is the point.

    python benchmarks/speculative.py [--tokens 256] [--draft-len 3] [--batch 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--draft-len", type=int, nargs="+", default=[3])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hybridtrt.exporter.export import ExportOptions, export
    from hybridtrt.models import create_checkpoint, load_model
    from hybridtrt.models.mtp import load_mtp
    from hybridtrt.runtime.generation import TorchStepper, left_pad
    from hybridtrt.runtime.onnxruntime import OrtModel
    from hybridtrt.runtime.speculative import MtpDrafter, NgramDrafter, ScriptedDrafter, SpeculationStats, generate_speculative

    work = Path(tempfile.mkdtemp(prefix="hybridtrt-speculative-"))
    ckpt = create_checkpoint("tiny-nemotron3-super", work / "ckpt")
    export(ckpt, work / "export", ExportOptions(speculative=True))
    model = load_model(ckpt)
    head = load_mtp(ckpt, model)
    ort = OrtModel(work / "export", threads=args.threads)
    runtimes = {"reference": TorchStepper(model), "onnxruntime": ort}
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 4, 13, 6][: args.batch]
    rows = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = left_pad(rows)

    print(f"tiny-nemotron3-super (random weights), batch {args.batch} (left-padded), {args.tokens} tokens, {args.threads} thread(s)")
    header = f"{'runtime':<12} {'draft':<10} {'K':>2} {'same':>5} {'accept':>7} {'tok/verify':>10} {'tok/call':>8} {'time':>6}"
    print(header)
    print("-" * len(header))
    for name, backend in runtimes.items():
        start = time.perf_counter()
        greedy = backend.generate(ids, mask, max_new_tokens=args.tokens).tokens
        plain = time.perf_counter() - start
        print(f"{name:<12} {'(greedy)':<10} {'-':>2} {'-':>5} {'-':>7} {1:>10.2f} {1:>8.2f} {1:>5.2f}x")
        for k in args.draft_len:
            drafters = {"ngram": NgramDrafter(), "mtp": MtpDrafter(model, head) if name == "reference" else MtpDrafter(ort.mtp_head())}
            for pattern in ("accept", "random", "reject"):
                drafters[pattern] = ScriptedDrafter(greedy, pattern, lengths, 256, seed=1)
            for source, drafter in drafters.items():
                stats = SpeculationStats()
                start = time.perf_counter()
                out = generate_speculative(backend, drafter, ids, mask, max_new_tokens=args.tokens, draft_len=k, stats=stats).tokens
                wall = time.perf_counter() - start
                same = "yes" if torch.equal(out, greedy) else "NO"
                print(
                    f"{name:<12} {source:<10} {k:>2} {same:>5} {100 * stats.acceptance:>6.1f}% {stats.tokens_per_verify:>10.2f} "
                    f"{stats.tokens_per_main_call:>8.2f} {wall / plain:>5.2f}x"
                )
    print("time: wall time relative to greedy decoding on the same runtime (CPU; a GPU's decode step costs what its weight reads cost, not its tokens)")


if __name__ == "__main__":
    main()
