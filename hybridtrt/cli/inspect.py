"""``hybridtrt inspect PATH``: summarize a checkpoint directory or an export directory."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from hybridtrt.cli.common import add_integrity_argument, console, routing_summary, table

HELP = "summarize a checkpoint (config, layers, states), an export directory (graphs, I/O) or a tensor-parallel export (ranks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory, export directory, or a tensor-parallel export's top directory")
    add_integrity_argument(p)


def _export_rows(path: Path, level: str) -> tuple[object, list[list[str]], list[list[str]]]:
    """The manifest, one row per file (size, how it was checked) and one row per graph as its header reads."""
    import onnx

    from hybridtrt.cli.common import human_bytes
    from hybridtrt.exporter.manifest import check_export, read_manifest
    from hybridtrt.ops.onnx_functions import DOMAIN

    m = read_manifest(path, integrity=None)
    report = check_export(path, m, level=level)
    files = [[name, human_bytes(rec["bytes"]), "sha256 ok" if report.files[name] == "sha256" else "sampled sha256 ok"] for name, rec in sorted(m.files.items())]
    graphs = []
    for role, g in m.graphs.items():
        proto = onnx.load(str(path / g.file), load_external_data=False)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        custom = Counter(f"{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx"))
        ours = Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN)  # the manifest counts hybridtrt's (not TensorRT's trt ops)
        dtypes = Counter(onnx.TensorProto.DataType.Name(i.data_type).lower() for i in proto.graph.initializer)
        found = ", ".join(f"{k}×{v}" for k, v in sorted(custom.items())) or "none"
        if dict(ours) != dict(g.custom_ops) or opset != m.opset:
            found += f" (manifest: {g.custom_ops}, opset {m.opset})"
        graphs.append([f"{role} ({g.file})", f"opset {opset}", found, ", ".join(f"{k} {v}" for k, v in dtypes.most_common(3))])
    return m, files, graphs


def _tensor_parallel(path: Path, level: str) -> int:
    """A tensor-parallel export's top directory: the ranks (each one's manifest and files checked, as
    `read_tp_manifest` does for every consumer), what each holds, the one recipe, the verification."""
    from hybridtrt.cli.common import human_bytes
    from hybridtrt.cli.export import tp_holds, tp_quantization, tp_verdict
    from hybridtrt.exporter.tensor_parallel import read_tp_manifest

    top, manifests = read_tp_manifest(path, integrity=level)
    tp, m = top["tensor_parallel"], manifests[0]
    rows = [
        ["ranks", f"{tp['world']} ({tp['vocab']} vocabulary)"],
        ["dtype", f"{m.dtype}, state {m.state_dtype}, kv {m.kv_cache}"],
        ["quantization", tp_quantization(m)],
        ["source", f"{top['source'].get('checkpoint')} (sha256 {str(top['source'].get('sha256'))[:12]}…)"],
        ["verification", tp_verdict(top.get("verification") or {"method": "skipped", "reason": "none recorded"}, tp["world"])],
    ]
    if m.source.get("dequantized"):
        rows.append(["weights", f"dequantized to {m.dtype} from the checkpoint's {m.source['dequantized']}"])
    console.print(table(f"tensor-parallel export {path}", ["", ""], rows, numeric=False))
    ranks = [[f"rank{r}/", human_bytes(sum(rec["bytes"] for rec in rank.files.values())), ", ".join(rank.graphs), tp_holds(rank.tensor_parallel["holds"], tp["vocab"])]
             for r, rank in enumerate(manifests)]  # fmt: skip
    console.print(table("ranks (manifests and files checked)", ["dir", "files", "graphs", "holds"], ranks, numeric=False))
    return 0


def run(args: argparse.Namespace) -> int:
    from hybridtrt.exporter.integrity import FULL, SAMPLED
    from hybridtrt.exporter.manifest import MANIFEST_FILE, is_tp_export

    path = Path(args.path)
    if is_tp_export(path):
        return _tensor_parallel(path, FULL if args.check_integrity else SAMPLED)
    if (path / MANIFEST_FILE).is_file():
        m, files, graphs = _export_rows(path, FULL if args.check_integrity else SAMPLED)
        console.print(table(f"export {path} ({m.dtype}, state {m.state_dtype}, kv {m.kv_cache})", ["file", "size", "check"], files, numeric=False))
        console.print(table("graphs as their headers read", ["graph", "opset", "custom ops", "initializers"], graphs, numeric=False))
        verification = m.verification or {}
        worst = {f: g["worst"]["rel_l2"] for f, g in verification.get("graphs", {}).items()}
        method = verification.get("method", "none")
        if m.source.get("dequantized"):
            console.print(f"weights: dequantized to {m.dtype} from the checkpoint's {m.source['dequantized']}", markup=False, soft_wrap=True)
        if m.quantization and str(m.quantization.get("source", "")).startswith("checkpoint: "):
            console.print(f"quantization: the checkpoint's own scales, {m.quantization['source'].removeprefix('checkpoint: ')}", markup=False, soft_wrap=True)
        if m.weight_only:
            from hybridtrt.cli.export import _weight_only_summary

            console.print(f"4-bit weights: {_weight_only_summary(m.weight_only)}", markup=False, soft_wrap=True)
        console.print(f"verification: {method}" + (f" ({verification.get('reason')})" if verification.get("reason") else "")
                      + "".join(f", {f} worst rel L2 {v:.2e}" for f, v in worst.items()), markup=False)  # fmt: skip
        if routing_summary(verification):
            console.print(f"MoE routing: {routing_summary(verification)}", markup=False, soft_wrap=True)
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
    if ckpt.quantization is not None:
        rows.append(["quantization", ckpt.quantization.describe()])
    console.print(table(f"checkpoint {path}", ["", ""], rows, numeric=False))
    return 0
