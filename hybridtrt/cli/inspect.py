"""``hybridtrt inspect PATH``: summarize a checkpoint directory or an export directory."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from hybridtrt.cli.common import console, table

HELP = "summarize a checkpoint (config, layers, states) or an export directory (graphs, I/O)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or export directory")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest

    path = Path(args.path)
    if (path / MANIFEST_FILE).is_file():
        m = read_manifest(path)
        for role, g in m.graphs.items():
            rows = [[v["name"], v["dtype"], "[" + ", ".join(map(str, v["shape"])) + "]"] for v in g.inputs + g.outputs]
            console.print(table(f"{role} graph {g.file} ({m.dtype}, state {m.state_dtype}, opset {m.opset})", ["tensor", "dtype", "shape"], rows))
        return 0
    from hybridtrt.exporter.io import state_specs
    from hybridtrt.models.loading import open_checkpoint

    # Headers only (nothing loaded, any size): every tensor present, used and of the right shape.
    ckpt = open_checkpoint(path)
    c = ckpt.config
    n = ckpt.num_parameters
    kinds = Counter(c.layer_types)
    rows = [
        ["family", c.family],
        ["pattern", c.pattern],
        ["layers", f"{kinds.get('M', 0)} mamba, {kinds.get('*', 0)} attention, {kinds.get('-', 0)} mlp, {kinds.get('E', 0)} moe"],
        ["parameters", f"{n:,}"],
        ["declared dtype", c.checkpoint_dtype or "none (exports default to fp32)"],
        ["mamba H×P, N, G", f"{c.mamba_num_heads}×{c.mamba_head_dim}, {c.ssm_state_size}, {c.n_groups}"],
        ["chunk size", c.chunk_size],
        ["states", len(state_specs(c))],
    ]
    if c.moe is not None:
        e = c.moe
        shared = f"shared {e.shared_intermediate_size}" if e.shared_intermediate_size else "no shared expert"
        latent = f", latent {e.latent_size}" if e.latent_size else ""
        rows.append(["moe", f"top-{e.top_k} of {e.num_experts} (I {e.intermediate_size}), {shared}{latent}, groups {e.topk_group}/{e.n_group}, scaling {e.routed_scaling_factor:g}, norm_topk_prob {e.norm_topk_prob}"])
    console.print(table(f"checkpoint {path}", ["", ""], rows, numeric=False))
    return 0
