/*
 * hybridtrt CUDA kernels for the Mamba-2 SSD ops — C ABI (no TensorRT include).
 *
 * Op contract (DESIGN.md §5; domain/namespace "hybridtrt", version 1):
 *
 *   Mamba2ChunkScan   x [B,L,H,P], dt [B,L,H], A [H] fp32, B [B,L,G,N], C [B,L,G,N], D [H] fp32,
 *                     initial_state [B,H,P,N]  ->  y [B,L,H,P] (x dtype), final_state [B,H,P,N]
 *   Mamba2StateUpdate x [B,H,P], dt [B,H], A [H] fp32, B [B,G,N], C [B,G,N], D [H] fp32,
 *                     state [B,H,P,N]  ->  y [B,H,P] (x dtype), new_state [B,H,P,N] (may alias state)
 *
 *   s_t = exp(dt_t * A) * s_{t-1} + dt_t * (x_t outer B_t),   y_t = s_t . C_t + D * x_t
 *   head h reads group h / (H / G); every sum is accumulated in fp32.
 *
 * Conventions:
 *   - All tensors are dense and contiguous (row-major, TensorRT kLINEAR) and live on the device.
 *   - x, y, B and C share one activation dtype; dt has its own dtype; the state has its own dtype.
 *   - P (head_dim) is any positive multiple of 16 up to 4096; N (d_state) is 16, 64 or 128;
 *     H % G == 0; H <= 65535.
 *   - Tensor base pointers are 16-byte aligned (any cudaMalloc / TensorRT / torch allocation is).
 *   - A launcher never synchronises the host, never allocates and only enqueues work on `stream`
 *     (safe inside CUDA-graph capture). Scratch comes from `workspace`, whose size the matching
 *     `...WorkspaceSize` function returns for the same shapes.
 *   - Every function returns a HybridTrtStatus; 0 is success. `hybridtrtStatusString` names it.
 */
#ifndef HYBRIDTRT_SSD_KERNELS_H
#define HYBRIDTRT_SSD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define HYBRIDTRT_API __declspec(dllexport)
#else
#define HYBRIDTRT_API __attribute__((visibility("default")))
#endif

/* Version of this C ABI; bumped whenever a signature or a meaning changes. */
#define HYBRIDTRT_KERNELS_ABI_VERSION 1

/* Element types. */
typedef enum HybridTrtDtype
{
    kHYBRIDTRT_FLOAT32 = 0,
    kHYBRIDTRT_FLOAT16 = 1,
    kHYBRIDTRT_BFLOAT16 = 2
} HybridTrtDtype;

/* Status codes. */
typedef enum HybridTrtStatus
{
    kHYBRIDTRT_SUCCESS = 0,
    kHYBRIDTRT_INVALID_SHAPE = 1,      /* a dimension is < 1, or H % G != 0 */
    kHYBRIDTRT_UNSUPPORTED_HEAD_DIM = 2, /* P is not a positive multiple of 16 */
    kHYBRIDTRT_UNSUPPORTED_D_STATE = 3,  /* N is not 16, 64 or 128 */
    kHYBRIDTRT_UNSUPPORTED_DTYPE = 4,
    kHYBRIDTRT_NULL_POINTER = 5,
    kHYBRIDTRT_MISALIGNED_POINTER = 6,
    kHYBRIDTRT_WORKSPACE_TOO_SMALL = 7,
    kHYBRIDTRT_CUDA_ERROR = 8          /* a kernel launch failed (see cudaGetLastError) */
} HybridTrtStatus;

/* Returns HYBRIDTRT_KERNELS_ABI_VERSION of the built library. */
HYBRIDTRT_API int32_t hybridtrtKernelsAbiVersion(void);

/* Static, NUL-terminated description of a status code. */
HYBRIDTRT_API char const* hybridtrtStatusString(int32_t status);

/* Internal chunk length (tokens) of the scan kernels. The op's chunk_size attribute does not change
 * the math (any chunking computes the same recurrence), so the kernels use their own tile. */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanTileLength(void);

/*
 * Dynamic shared memory (bytes) of the two GEMM kernels of the scan for an activation dtype and d_state
 * (pure host code; ptxas -v cannot report dynamic shared memory, so tests and CI print these).
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanSharedMemory(
    int32_t actDtype, int64_t dState, size_t* chunkStateKernelBytes, size_t* chunkOutputKernelBytes);

/*
 * Scratch bytes needed by hybridtrtMamba2ChunkScan for these shapes (pure host code, no CUDA call):
 *   nChunks = ceil(L / 64);  bytes = align256(B*H*nChunks*P*N*4) + align256(B*H*nChunks*4)
 * (fp32 per-chunk states, then fp32 per-chunk total log-decay). The dtypes are validated but do not
 * change the size.
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanWorkspaceSize(int64_t batch, int64_t seqLen, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    size_t* workspaceBytes);

/*
 * Chunked SSD scan (prefill), any 1 <= L <= 64 * 65535 (= 4,194,240). `initialState` may be NULL
 * (zero state); `D` may be NULL. `workspace` must
 * hold at least hybridtrtMamba2ChunkScanWorkspaceSize(...) bytes and be 256-byte aligned. Enqueues
 * three kernels (chunk states with tensor cores, state passing, chunk outputs with tensor cores).
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScan(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* initialState, void* y, void* finalState, int64_t batch,
    int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype,
    int32_t dtDtype, int32_t stateDtype, void* workspace, size_t workspaceBytes, void* stream);

/* Scratch bytes needed by hybridtrtMamba2StateUpdate: always 0 (kept for symmetry). */
HYBRIDTRT_API int32_t hybridtrtMamba2StateUpdateWorkspaceSize(int64_t batch, int64_t numHeads, int64_t headDim,
    int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    size_t* workspaceBytes);

/*
 * One-token state update (decode). Reads `stateIn` once and writes `stateOut` once, 16-byte vectors;
 * `stateOut == stateIn` updates in place. `D` may be NULL (no skip term).
 */
HYBRIDTRT_API int32_t hybridtrtMamba2StateUpdate(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* stateIn, void* y, void* stateOut, int64_t batch, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HYBRIDTRT_SSD_KERNELS_H */
