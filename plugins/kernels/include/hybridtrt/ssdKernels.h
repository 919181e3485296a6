/*
 * hybridtrt CUDA kernels for the Mamba-2 SSD ops — C ABI (no TensorRT include).
 *
 * Op contract (DESIGN.md §5; domain/namespace "hybridtrt", version 1):
 *
 *   Mamba2ChunkScan   x [B,L,H,P], dt [B,L,H], A [H] fp32, B [B,L,G,N], C [B,L,G,N], D [H] fp32,
 *                     initial_state [B,H,P,N]  ->  y [B,L,H,P] float32, final_state [B,H,P,N]
 *   Mamba2StateUpdate x [B,H,P], dt [B,H], A [H] fp32, B [B,G,N], C [B,G,N], D [H] fp32,
 *                     state [B,H,P,N]  ->  y [B,H,P] float32, new_state [B,H,P,N] (may alias state)
 *
 *   s_t = exp(dt_t * A) * s_{t-1} + dt_t * (x_t outer B_t),   y_t = s_t . C_t + D * x_t
 *   head h reads group h / (H / G); every sum is accumulated in fp32.
 *   y is float32 whatever the activation dtype: it feeds a gated RMSNorm that normalises in fp32 (HF's
 *   NemotronH keeps the scan output in fp32 too), and in fp16 |y| can exceed 65504 where the fp32 value is fine.
 *
 * Conventions:
 *   - All tensors are dense and contiguous (row-major, TensorRT kLINEAR) and live on the device.
 *   - x, B and C share one activation dtype; y is always float32; dt has its own dtype; the state has its own
 *     dtype (final_state / new_state keep it).
 *   - P (head_dim) is any positive multiple of 16 up to 4096; N (d_state) is 16, 64 or 128;
 *     H % G == 0; H <= 65535; B * H <= 2^31 - 1 (B * H is grid.x of every kernel, nothing sits in grid.y).
 *   - Tensor base pointers are 16-byte aligned (any cudaMalloc / TensorRT / torch allocation is).
 *   - A launcher never synchronises the host, never allocates and only enqueues work on `stream`.
 *     Inside a CUDA-graph capture it makes no CUDA call besides the launches: the scan's shared-memory
 *     opt-in (cudaFuncSetAttribute) runs outside captures only, so a captured scan needs
 *     hybridtrtMamba2ChunkScanPrepare (or any uncaptured scan launch) on that device first.
 *     Scratch comes from `workspace`, whose size the matching `...WorkspaceSize` function returns.
 *   - Every function returns a HybridTrtStatus; 0 is success. `hybridtrtStatusString` names it.
 *   - Offsets into tensors are 64-bit: any tensor may hold more than 2^31 elements (long context, large batch).
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
#define HYBRIDTRT_KERNELS_ABI_VERSION 4 /* 2: chunkSize arguments, Prepare, NOT_PREPARED; 3: y is float32; 4: fp16 start states fp32 (workspace 2x) */

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
    kHYBRIDTRT_CUDA_ERROR = 8,         /* a kernel launch failed (see cudaGetLastError) */
    kHYBRIDTRT_NOT_PREPARED = 9        /* scan launched inside a stream capture before its shared-memory opt-in
                                          ran on this device (hybridtrtMamba2ChunkScanPrepare) */
} HybridTrtStatus;

/* Returns HYBRIDTRT_KERNELS_ABI_VERSION of the built library. */
HYBRIDTRT_API int32_t hybridtrtKernelsAbiVersion(void);

/* Static, NUL-terminated description of a status code. */
HYBRIDTRT_API char const* hybridtrtStatusString(int32_t status);

/* Chunk length (tokens) the scan kernels use for an op's chunk_size: rounded up to a multiple of 64 and
 * capped at 256 (Nemotron's 128 and Mamba-2's 256 are used as they are); 0 when chunkSize < 1. Any
 * chunking computes the same recurrence; the chunk decides where start states are materialised. */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanChunkLength(int64_t chunkSize);

/*
 * Dynamic shared memory (bytes) of the two GEMM kernels of the scan for an activation dtype and d_state
 * (pure host code; ptxas -v cannot report dynamic shared memory, so tests and CI print these).
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanSharedMemory(
    int32_t actDtype, int64_t dState, size_t* chunkStateKernelBytes, size_t* chunkOutputKernelBytes);

/*
 * Scratch bytes needed by hybridtrtMamba2ChunkScan for these shapes (pure host code, no CUDA call): the
 * start state of every chunk, fp32 for fp32 and fp16 activations (a start state can pass fp16's 65504), bf16 for
 * bf16 (fp32's exponent range),
 *   Q = hybridtrtMamba2ChunkScanChunkLength(chunkSize);  bytes = align256(B*H*ceil(L/Q)*P*N*s),  s = 4, 4, 2,
 * computed in size_t; INVALID_SHAPE (and 0 bytes) when it would not fit.
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanWorkspaceSize(int64_t batch, int64_t seqLen, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int64_t chunkSize, int32_t actDtype, int32_t dtDtype,
    int32_t stateDtype, size_t* workspaceBytes);

/*
 * Opts the scan kernels in to their dynamic shared memory on the current device, for one activation dtype and
 * d_state (a negative value means all of them). Host-side attribute calls only; call it outside any stream
 * capture, e.g. when a TensorRT execution context is created, before capturing scans into a CUDA graph.
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScanPrepare(int32_t actDtype, int64_t dState);

/*
 * Chunked SSD scan (prefill), any 1 <= L <= Q * 65535. `initialState` may be NULL (zero state); `D` may be
 * NULL; `finalState` may equal `initialState` (updated in place). `y` [B,L,H,P] is float32 (written in
 * 16-byte vectors: 16-byte aligned, like x, B and C). `workspace` must hold at least
 * hybridtrtMamba2ChunkScanWorkspaceSize(...) bytes and be 256-byte aligned. Enqueues two kernels: the
 * chunk start states (one pass over the sequence per head and P tile, state passing fused, tensor cores)
 * and the chunk outputs (tensor cores).
 */
HYBRIDTRT_API int32_t hybridtrtMamba2ChunkScan(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* initialState, float* y, void* finalState, int64_t batch,
    int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups, int64_t dState, int64_t chunkSize,
    int32_t actDtype, int32_t dtDtype, int32_t stateDtype, void* workspace, size_t workspaceBytes, void* stream);

/* Scratch bytes needed by hybridtrtMamba2StateUpdate: always 0 (kept for symmetry). */
HYBRIDTRT_API int32_t hybridtrtMamba2StateUpdateWorkspaceSize(int64_t batch, int64_t numHeads, int64_t headDim,
    int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    size_t* workspaceBytes);

/*
 * One-token state update (decode). Reads `stateIn` once and writes `stateOut` once, 16-byte vectors;
 * `stateOut == stateIn` updates in place. `D` may be NULL (no skip term). `y` [B,H,P] is float32.
 */
HYBRIDTRT_API int32_t hybridtrtMamba2StateUpdate(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* stateIn, float* y, void* stateOut, int64_t batch, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HYBRIDTRT_SSD_KERNELS_H */
