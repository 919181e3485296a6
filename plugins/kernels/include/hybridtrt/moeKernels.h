/*
 * hybridtrt CUDA kernels for the routed experts of a Nemotron-3 MoE layer — C ABI (no TensorRT include).
 *
 * Op contract (DESIGN.md §5; domain/namespace "hybridtrt", version 1):
 *
 *   MoeExperts     x [T,D], topk_indices [T,K] int64|int32, topk_weights [T,K] fp32,
 *                  up_proj [E,I,D], down_proj [E,D,I] (x's dtype; each expert [out, in])   ->  y [T,D] (x's dtype)
 *   MoeExpertsFp8  x, topk_indices, topk_weights, up_proj [E,I,D] float8e4m3fn, up_weight_scale [E,1|I] fp32,
 *                  up_input_scale [E] fp32, down_proj [E,D,I] float8e4m3fn, down_weight_scale [E,1|D] fp32,
 *                  down_input_scale [E] fp32                                                   ->  y [T,D] (x's dtype)
 *
 *   y[t] = sum_k w[t,k] * down_e relu(up_e x_t)^2,   e = topk_indices[t,k]
 *
 * Precision, as the PyTorch references (hybridtrt/ops/moe.py moe_experts_grouped / moe_experts_ref, and for FP8
 * the MoeExpertsFp8 body of hybridtrt/ops/moe_onnx.py = hybridtrt/exporter/fp8_reference.py):
 *   - MoeExperts: both matmuls accumulate in fp32; their outputs are rounded to x's dtype (h = round(round(up.x)^2)
 *     with relu in between; the expert output round(down.h)), as torch does for matmuls in x's dtype.
 *   - MoeExpertsFp8: fq(v, s) = s * e4m3(v / s), the division in fp32 (IEEE), e4m3 = round to nearest even with
 *     saturation to +-448 (ONNX QuantizeLinear saturate=1; torch clamp + float8_e4m3fn in fake_quantize). Expert e's
 *     up input is fq(x_t, up_input_scale[e]); relu(up_e x)^2 is computed in fp32 and quantized with
 *     down_input_scale[e] in the up GEMM's epilogue; the weights are code * weight_scale[e, out channel | 0]; both
 *     matmuls in fp32 (products of e4m3 codes are exact in fp32); the expert output stays fp32.
 *   - Then y[t] = sum over k ascending of w[t,k] * out(t,k) in fp32 (each product rounded, then added: no float
 *     atomics, a fixed order), rounded once to x's dtype.
 *
 * Conventions:
 *   - All tensors are dense row-major device tensors (TensorRT kLINEAR); x, up/down_proj and y 16-byte aligned.
 *   - D (hidden) and I (inter) are positive multiples of 16, at most 65536; 1 <= E <= 4096; K >= 1; T >= 0 (T = 0
 *     enqueues nothing); T * K <= 2^31 - 1. The experts of a token should be distinct (the contract); duplicates
 *     are computed as separate pairs.
 *   - topk_indices outside [0, E) (any value of int64 or int32) are skipped: that (token, k) pair contributes
 *     nothing to y (as if its weight were 0), no expert memory is read for it, and the number of skipped pairs of
 *     the last call is the int32 at workspace offset 0 (kHYBRIDTRT_MOE_WS_HEADER, element 0), for debugging and
 *     tests. No host synchronisation ever reports it.
 *   - Routing runs on the device (histogram, exclusive scan, stable permutation into expert-contiguous rows:
 *     tokens ascending within an expert, the order of group_by_expert), without padding to a capacity; unchosen
 *     experts' weights and scales are never read. No host synchronisation, no allocation, no attribute call: the
 *     launchers are CUDA-graph capturable as they are (every kernel fits the 48 KiB default shared memory).
 *   - Scratch comes from `workspace` (256-byte aligned), sized by hybridtrtMoeExpertsWorkspaceSize for the
 *     largest T the caller will pass (a TensorRT profile's max): the size grows with T.
 *   - Every function returns a HybridTrtStatus (hybridtrt/ssdKernels.h); 0 is success. Shape errors are
 *     kHYBRIDTRT_INVALID_SHAPE; arguments are validated on the host before anything is enqueued.
 */
#ifndef HYBRIDTRT_MOE_KERNELS_H
#define HYBRIDTRT_MOE_KERNELS_H

#include "hybridtrt/ssdKernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the MoE part of the C ABI; bumped whenever one of its signatures or meanings changes. */
#define HYBRIDTRT_MOE_KERNELS_ABI_VERSION 1

/* Limits (see Conventions). */
#define HYBRIDTRT_MOE_MAX_EXPERTS 4096
#define HYBRIDTRT_MOE_MAX_WIDTH 65536

/* Dtype codes of the MoE kernels beyond HybridTrtDtype (0 float32, 1 float16, 2 bfloat16). */
typedef enum HybridTrtMoeDtype
{
    kHYBRIDTRT_INT32 = 3,       /* topk_indices */
    kHYBRIDTRT_INT64 = 4,       /* topk_indices (the ONNX contract) */
    kHYBRIDTRT_FLOAT8_E4M3 = 5  /* expert weights of MoeExpertsFp8 (float8e4m3fn) */
} HybridTrtMoeDtype;

/* Status codes of the MoE launchers beyond HybridTrtStatus (hybridtrtStatusString names them too). */
typedef enum HybridTrtMoeStatus
{
    kHYBRIDTRT_INVALID_TACTIC = 10 /* tactic is not a HybridTrtMoeTactic */
} HybridTrtMoeStatus;

/* Which GEMM path runs the experts. */
typedef enum HybridTrtMoeTactic
{
    kHYBRIDTRT_MOE_TACTIC_AUTO = 0,    /* hybridtrtMoeExpertsTactic(T, K, E) */
    kHYBRIDTRT_MOE_TACTIC_PREFILL = 1, /* grouped GEMM on tensor cores: 64x64 tiles of (expert rows x outputs) */
    kHYBRIDTRT_MOE_TACTIC_DECODE = 2   /* GEMV-like: one block column per chosen expert, its weights streamed once
                                          per 16 rows of that expert */
} HybridTrtMoeTactic;

/* Sections of the workspace, in order (hybridtrtMoeExpertsWorkspaceLayout gives their byte offsets). With P = T*K
 * pairs, R = ceil(P/64) + min(E, P) work items of the prefill GEMMs, A = min(E, P):
 *   HEADER         int32[4]        skipped pairs, work items, chosen experts, 0
 *   TILE_COUNTS    int32[E+1][ceil(P/256)]  per expert (row E: skipped pairs) and 256-pair tile, then scanned
 *   EXPERT_OFFSETS int32[E+1]      first row of each expert; [E] = rows in all
 *   WORK_EXPERT    int32[R]        expert of each 64-row work item of the prefill GEMMs
 *   WORK_ROW       int32[R]        its first row
 *   ACTIVE_EXPERTS int32[A]        the chosen experts, ascending (decode GEMMs)
 *   ROW_PAIR       int32[P]        pair t*K+k of each expert-contiguous row
 *   PAIR_ROW       int32[P]        row of each pair, -1 for a skipped pair
 *   X_QUANT        uint8[P][D]     MoeExpertsFp8 only: each row's up input as e4m3 codes (x / up_input_scale[e])
 *   H              [P][I]          relu(up x)^2: x's dtype (MoeExperts), e4m3 codes of h / down_input_scale[e] (Fp8)
 *   OUT            [P][D]          each row's expert output: x's dtype (MoeExperts), fp32 (Fp8)
 * Each section starts on a 256-byte boundary. */
typedef enum HybridTrtMoeWorkspaceSection
{
    kHYBRIDTRT_MOE_WS_HEADER = 0,
    kHYBRIDTRT_MOE_WS_TILE_COUNTS = 1,
    kHYBRIDTRT_MOE_WS_EXPERT_OFFSETS = 2,
    kHYBRIDTRT_MOE_WS_WORK_EXPERT = 3,
    kHYBRIDTRT_MOE_WS_WORK_ROW = 4,
    kHYBRIDTRT_MOE_WS_ACTIVE_EXPERTS = 5,
    kHYBRIDTRT_MOE_WS_ROW_PAIR = 6,
    kHYBRIDTRT_MOE_WS_PAIR_ROW = 7,
    kHYBRIDTRT_MOE_WS_X_QUANT = 8,
    kHYBRIDTRT_MOE_WS_H = 9,
    kHYBRIDTRT_MOE_WS_OUT = 10,
    kHYBRIDTRT_MOE_WS_SECTIONS = 11
} HybridTrtMoeWorkspaceSection;

/* Returns HYBRIDTRT_MOE_KERNELS_ABI_VERSION of the built library. */
HYBRIDTRT_API int32_t hybridtrtMoeKernelsAbiVersion(void);

/* The path kHYBRIDTRT_MOE_TACTIC_AUTO takes (pure host code): DECODE while T*K <= 16*E (on average at most one
 * 16-row pass per expert, so each chosen expert's weights are read about once), else PREFILL; -1 (INVALID) for
 * T < 0, K < 1 or E < 1. */
HYBRIDTRT_API int32_t hybridtrtMoeExpertsTactic(int64_t numTokens, int64_t topK, int64_t numExperts);

/*
 * Scratch bytes of hybridtrtMoeExperts (weightDtype = actDtype) or hybridtrtMoeExpertsFp8 (weightDtype =
 * kHYBRIDTRT_FLOAT8_E4M3) for up to maxTokens tokens (pure host code, size_t arithmetic; INVALID_SHAPE and 0 bytes
 * when a limit is exceeded or the size would not fit). Any tactic, any T <= maxTokens fits in it.
 */
HYBRIDTRT_API int32_t hybridtrtMoeExpertsWorkspaceSize(int64_t maxTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t weightDtype, size_t* workspaceBytes);

/*
 * Byte offsets of the workspace sections for a call with numTokens tokens: offsets[s] for each
 * HybridTrtMoeWorkspaceSection s, offsets[kHYBRIDTRT_MOE_WS_SECTIONS] = the bytes the call uses. For tests and
 * debugging (reading the routing back); launching needs only the size.
 */
HYBRIDTRT_API int32_t hybridtrtMoeExpertsWorkspaceLayout(int64_t numTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t weightDtype, size_t* offsets);

/*
 * MoeExperts: y [T,D] in actDtype (kHYBRIDTRT_FLOAT32/FLOAT16/BFLOAT16, also the dtype of x, up_proj, down_proj);
 * indexDtype kHYBRIDTRT_INT64 or kHYBRIDTRT_INT32; tactic a HybridTrtMoeTactic. Enqueues 6 kernels on `stream`:
 * routing (count, scan, permute), up GEMM + relu^2, down GEMM, weighted sum.
 */
HYBRIDTRT_API int32_t hybridtrtMoeExperts(void const* x, void const* topkIndices, float const* topkWeights,
    void const* upProj, void const* downProj, void* y, int64_t numTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t indexDtype, int32_t tactic, void* workspace,
    size_t workspaceBytes, void* stream);

/*
 * MoeExpertsFp8: up/downProj are float8e4m3fn bytes; upWeightScaleCols is 1 (up_weight_scale [E,1], per expert) or
 * I ([E,I], per expert and output channel), downWeightScaleCols 1 or D. Scales are fp32 (finite and > 0 as the
 * exporter writes them; an expert no calibration token reached carries the fallback scale in the tensor itself,
 * hybridtrt/graphs/fp8_qdq.py expert_input_scales). Enqueues 7 kernels: routing, x quantization, up GEMM (+ relu^2
 * and the quantization of h), down GEMM, weighted sum.
 */
HYBRIDTRT_API int32_t hybridtrtMoeExpertsFp8(void const* x, void const* topkIndices, float const* topkWeights,
    void const* upProj, float const* upWeightScale, float const* upInputScale, void const* downProj,
    float const* downWeightScale, float const* downInputScale, void* y, int64_t numTokens, int64_t topK,
    int64_t numExperts, int64_t hidden, int64_t inter, int64_t upWeightScaleCols, int64_t downWeightScaleCols,
    int32_t actDtype, int32_t indexDtype, int32_t tactic, void* workspace, size_t workspaceBytes, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HYBRIDTRT_MOE_KERNELS_H */
