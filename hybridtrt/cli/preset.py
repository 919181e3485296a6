"""``hybridtrt preset NAME -o DIR``: write a built-in random checkpoint directory."""

from __future__ import annotations

import argparse

from hybridtrt.cli.common import console

HELP = "create a built-in tiny random checkpoint (config.json + safetensors + tokenizer.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hybridtrt.models.presets import PRESETS

    p.add_argument("name", choices=sorted(PRESETS), help="preset")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--initializer-range", type=float, default=0.3)
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard the safetensors (with an index json)")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.models.presets import create_checkpoint

    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    out = create_checkpoint(args.name, args.output, seed=args.seed, initializer_range=args.initializer_range, max_shard_bytes=shard)
    console.print(f"wrote {args.name} checkpoint to {out}")
    return 0
