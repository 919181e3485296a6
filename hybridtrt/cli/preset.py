"""``hybridtrt preset NAME -o DIR``: write a built-in random checkpoint directory."""

from __future__ import annotations

import argparse

from hybridtrt.cli.common import console

HELP = "create a built-in tiny random checkpoint (config.json + safetensors + tokenizer.json)"

#: Built-in presets (kept here, not imported from hybridtrt.models, so `--help` does not import torch).
PRESET_NAMES = ("small-nemotron-h", "tiny-mamba2", "tiny-nemotron-h", "tiny-nemotron3-moe", "tiny-nemotron3-super")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=PRESET_NAMES, help="preset: " + ", ".join(PRESET_NAMES))
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--initializer-range", type=float, default=None, help="std of the random linear weights (default 0.3)")
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard the safetensors (with an index json) at this size")
    p.add_argument("--force", action="store_true", help="replace the checkpoint files of a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.errors import InputError
    from hybridtrt.models.presets import create_checkpoint

    if args.max_shard_mb is not None and not args.max_shard_mb > 0:
        raise InputError(f"--max-shard-mb {args.max_shard_mb} must be > 0", fix="give a shard size in MiB, e.g. --max-shard-mb 100")
    if args.initializer_range is not None and not args.initializer_range > 0:
        raise InputError(f"--initializer-range {args.initializer_range} must be > 0", fix="e.g. --initializer-range 0.3")
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    out = create_checkpoint(
        args.name,
        args.output,
        seed=args.seed,
        initializer_range=0.3 if args.initializer_range is None else args.initializer_range,
        max_shard_bytes=shard,
        force=args.force,
    )
    console.print(f"wrote {args.name} checkpoint to {out}", markup=False)
    return 0
