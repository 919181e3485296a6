"""ONNX Runtime CPU time of one MoE layer's routed experts: the attached ``MoeExperts`` body (work
on the selected experts only) vs the dense all-experts formulation, measured side by side.

Both bodies run as the one-node models the exporter produces (expert weights as initializers,
routing as inputs) on the same inputs; routing comes from a random sigmoid router (top-k of
``sigmoid(h·W)``), so experts are unevenly loaded as in a real model. Printed per token count:
median time of each body, the ratio dense / grouped, and the matmul work the grouped body does
(``A·C`` expert rows: ``A`` experts chosen, ``C`` rows for the busiest one) against dense ``E·T``.

    .venv/bin/python benchmarks/moe_cpu.py [--experts 128 --top-k 6 --dim 512 --inter 256] [--threads 1]

Nemotron-3-Nano's layer (hidden 2688, moe_intermediate_size 1856) holds 5.1 GB of fp32 expert
weights; the defaults keep the expert count and top-k and scale the matrices down.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from hybridtrt.ops.moe import moe_experts_ref
from hybridtrt.ops.moe_onnx import MOE_EXPERTS_INPUTS, moe_experts_dense_function, moe_experts_function
from hybridtrt.ops.onnx_functions import DOMAIN


def session(function: onnx.FunctionProto, up: np.ndarray, down: np.ndarray, threads: int) -> ort.InferenceSession:
    """``y = MoeExperts(x, topk_indices, topk_weights, up_proj, down_proj)`` with the weights as initializers."""
    x, idx, w = MOE_EXPERTS_INPUTS[:3]
    inputs = [
        helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", up.shape[2]]),
        helper.make_tensor_value_info(idx, TensorProto.INT64, ["T", "K"]),
        helper.make_tensor_value_info(w, TensorProto.FLOAT, ["T", "K"]),
    ]
    node = helper.make_node(function.name, list(MOE_EXPERTS_INPUTS), ["y"], domain=DOMAIN, activation="relu2")
    graph = helper.make_graph(
        [node], "moe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", up.shape[2]])],
        [numpy_helper.from_array(up, "up_proj"), numpy_helper.from_array(down, "down_proj")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], functions=[function])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def routing(tokens: int, dim: int, experts: int, top_k: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x [T, D]``, ``topk_indices [T, K]``, ``topk_weights [T, K]`` from a random sigmoid router."""
    x = torch.randn(tokens, dim, generator=gen)
    scores = torch.sigmoid(x @ torch.randn(dim, experts, generator=gen) / dim**0.5 * 2)
    weights, indices = scores.topk(top_k, dim=-1)
    return x.numpy(), indices.numpy(), (weights / weights.sum(-1, keepdim=True)).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--dim", type=int, default=512, help="expert input width D (hidden, or latent size)")
    p.add_argument("--inter", type=int, default=256, help="expert width I (moe_intermediate_size)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512], help="T = batch × new tokens")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    up = (torch.randn(args.experts, args.inter, args.dim, generator=gen) * args.dim**-0.5).numpy()
    down = (torch.randn(args.experts, args.dim, args.inter, generator=gen) * args.inter**-0.5).numpy()
    grouped = session(moe_experts_function(18), up, down, args.threads)
    dense = session(moe_experts_dense_function(18), up, down, args.threads)
    print(
        f"MoE routed experts on ONNX Runtime CPU ({ort.__version__}, {args.threads} thread(s)): "
        f"E={args.experts}, top-{args.top_k}, D={args.dim}, I={args.inter}, fp32, median of {args.repeats}"
    )
    print("| tokens T | grouped body ms | dense body ms | dense / grouped | grouped rows A·C | dense rows E·T | max rel L2 vs _ref |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x, idx, w = routing(tokens, args.dim, args.experts, args.top_k, gen)
        feeds = dict(zip(MOE_EXPERTS_INPUTS[:3], (x, idx, w)))
        ref = moe_experts_ref(*(torch.from_numpy(a) for a in (x, idx, w, up, down))).numpy()
        err = max(float(np.linalg.norm(s.run(None, feeds)[0] - ref) / np.linalg.norm(ref)) for s in (grouped, dense))
        t_grouped = statistics.median(timeit.repeat(lambda: grouped.run(None, feeds), number=1, repeat=args.repeats + 1)[1:])
        t_dense = statistics.median(timeit.repeat(lambda: dense.run(None, feeds), number=1, repeat=args.repeats + 1)[1:])
        counts = np.bincount(idx.reshape(-1), minlength=args.experts)
        rows = int((counts > 0).sum() * counts.max())
        print(
            f"| {tokens} | {t_grouped * 1e3:.2f} | {t_dense * 1e3:.2f} | **{t_dense / t_grouped:.1f}×** | "
            f"{rows} | {args.experts * tokens} | {err:.1e} |"
        )


if __name__ == "__main__":
    main()
