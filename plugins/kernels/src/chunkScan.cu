/*
 * Mamba2ChunkScan: the chunked SSD algorithm of Mamba-2 in two kernels.
 *
 * The sequence is cut into chunks of Q tokens, Q = the op's chunk_size rounded up to a multiple of 64 and
 * capped at 256 (hybridtrtMamba2ChunkScanChunkLength: Nemotron's 128 and Mamba-2's 256 are used as they are).
 * With a = cumsum(dt * A) inside a piece of the sequence, for every (batch, head):
 *
 *   1. chunkStateKernel   grid (B*H, P tiles), sequential over the sequence in 64-token sub-tiles. The running
 *                         state s [P tile x N] stays in fp32 tensor-core accumulators for the whole sequence:
 *                           s = exp(a_end) * s + X^T . Bw,   Bw[l] = B[l] * dt[l] * exp(a_end - a[l])
 *                         (one GEMM per sub-tile, state passing fused). At the start of every chunk it writes
 *                         s, the chunk's start state, to the workspace once (StartState<T>: fp32 for fp16
 *                         activations, whose range |s| can pass, else the activation dtype); at the end it
 *                         writes final_state in the state dtype. Per chunk and head the state moves
 *                         P*N*sizeof(StartState<T>) bytes out and the same in.
 *   2. chunkOutputKernel  grid (B*H, chunks, P tiles), sequential over the chunk's 64-row tiles r:
 *                           y[l] = sum_{s<=l in chunk} (C[l].B[s]) exp(a[l]-a[s]) dt[s] x[s]
 *                                + exp(a[l]) C[l] . start[c] + D x[l]
 *                         per (r, s) sub-tile pair: C.B^T [64x64] (lower block triangle on the diagonal),
 *                         masked and weighted into M, Y += M.X; then Y += (C*exp(a)).start^T, all into one
 *                         accumulator. The start tile is read once per block (fp16: twice, fp32, to scale it
 *                         into fp16 range by a power of two that the accumulator undoes). y is written in fp32
 *                         straight from that accumulator tile (+ D x), four columns per 16-byte store.
 *
 * Tensor cores: WMMA m16n16k16 with fp16/bf16 operands and fp32 accumulation. fp32 activations use the same
 * tiling on a fp32 SIMT tile (exact fp32; TF32 would miss the fp32 accuracy gate).
 *
 * The state kernel reads initial_state and writes final_state for the same tile of the same block, and the
 * output kernel reads start states from the workspace only: final_state may alias initial_state.
 *
 * Offsets into global tensors are int64 throughout (globalOffset, ssdCommon.cuh): x / y and the start states pass
 * 2^31 elements at long context and large batch.
 */
#include "ssdCommon.cuh"

#if !defined(HYBRIDTRT_CPU_EMULATION)
#include <mma.h>
#endif

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace hybridtrt
{
namespace kernels
{
namespace
{

constexpr int kSub = 64;       //!< tokens per sub-tile: K of the GEMMs, rows of an output tile
constexpr int kMaxChunk = 256; //!< longest chunk (4 sub-tiles)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
//! Blocks per SM the register budget is planned for: 65536 / (4 * 128) = 128 registers per thread. Without it
//! ptxas picks a tighter budget on its own and spills the fp32 tiles.
constexpr int kMinBlocks = 4;

//! Tokens per chunk for an op's chunk_size: rounded up to a multiple of kSub, in [kSub, kMaxChunk]; 0 if < 1.
inline int32_t chunkLength(int64_t chunkSize)
{
    if (chunkSize < 1)
    {
        return 0;
    }
    int64_t const rounded = (chunkSize + kSub - 1) / kSub * kSub;
    return static_cast<int32_t>(std::min<int64_t>(rounded, kMaxChunk));
}

struct ScanParams
{
    void const* x;
    void const* dt;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* initialState;
    float* y; //!< [B, L, H, P] fp32 whatever the activation dtype
    void* finalState;
    void* startStates; //!< [B*H, nChunks, P, N] StartState<T>: the state at each chunk's start
    int32_t seqLen;
    int32_t numHeads;
    int32_t headDim;
    int32_t numGroups;
    int32_t headsPerGroup;
    int32_t chunk;   //!< Q, a multiple of kSub
    int32_t nChunks;
    int32_t dState;
    int32_t tileP; //!< width of a P tile (multiple of 16, <= ScanLayout::kTileP)
    int32_t dtDtype;
    int32_t stateDtype;
};

template <typename T>
constexpr bool kUseTensorCores = !std::is_same<T, float>::value;

//! How the chunk start states are kept in the workspace: fp32 for fp16 activations (a state the fp32 recurrence
//! holds can pass fp16's 65504, as y can), the activation dtype for fp32 and bf16 (bf16 has fp32's exponent range;
//! the output GEMM rounds the state to bf16 anyway, so a fp32 copy would double the bytes for nothing).
template <typename T>
struct StartStateOf
{
    using Type = T;
};
template <>
struct StartStateOf<__half>
{
    using Type = float;
};
template <typename T>
using StartState = typename StartStateOf<T>::Type;

//! Bytes per start-state element for an activation dtype (the workspace formula; mirrors StartState).
inline size_t startStateSize(int32_t actDtype)
{
    return actDtype == kHYBRIDTRT_FLOAT16 ? 4 : dtypeSize(actDtype);
}

constexpr size_t align128(size_t v)
{
    return (v + 127) / 128 * 128;
}

//! Shared-memory plan of both kernels (byte offsets; rows padded by 16 bytes against bank conflicts).
template <typename T, int kN>
struct ScanLayout
{
    static constexpr bool kTc = kUseTensorCores<T>;
    //! fp32 keeps 16-column P tiles so that the output kernel fits the sm_89 opt-in limit (99 KiB).
    static constexpr int kTileP = kTc ? 64 : 16;
    static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
    static constexpr int kLdN = kN + kPad;     //!< rows of C, B, start state
    static constexpr int kLdX = kTileP + kPad; //!< rows of the x tile
    static constexpr int kLdCB = kSub + 4;     //!< fp32 C.B^T
    static constexpr int kLdM = kTc ? kSub + kPad : kLdCB;
    static constexpr int kLdOut = kTileP + 4; //!< fp32 output tile
    static constexpr int kLdStage = kN + 4;   //!< fp32 staging of 16 state rows
    static constexpr size_t kT = sizeof(T);

    // chunkOutputKernel
    static constexpr size_t kOffAcum = 0;
    static constexpr size_t kOffDt = kMaxChunk * 4;
    static constexpr size_t kOffC = align128(2 * kMaxChunk * 4);
    static constexpr size_t kOffB = kOffC + align128(size_t(kSub) * kLdN * kT);
    static constexpr size_t kOffS = kOffB + align128(size_t(kSub) * kLdN * kT);
    static constexpr size_t kOffCB = kOffS + align128(size_t(kTileP) * kLdN * kT); //!< C.B^T, later the output tile
    static constexpr size_t kSizeCB = align128(std::max(size_t(kSub) * kLdCB, size_t(kSub) * kLdOut) * 4);
    static constexpr size_t kOffM = kTc ? kOffCB + kSizeCB : kOffCB; //!< fp32: M overwrites C.B^T in place
    static constexpr size_t kSizeM = kTc ? align128(size_t(kSub) * kLdM * kT) : 0;
    static constexpr size_t kOffX = kOffCB + kSizeCB + kSizeM;
    static constexpr size_t kBytes = kOffX + align128(size_t(kSub) * kLdX * kT);

    // chunkStateKernel: a 16-row fp32 staging band of the state aliases the B tile (free at chunk boundaries)
    static constexpr size_t kStOffX = align128(2 * kSub * 4);
    static constexpr size_t kStOffB = kStOffX + align128(size_t(kSub) * kLdX * kT);
    static constexpr size_t kStBytes
        = kStOffB + align128(std::max(size_t(kSub) * kLdN * kT, size_t(16) * kLdStage * 4));
    //! Accumulator tiles per warp holding the running state [kTileP x kN].
    static constexpr int kStateFrags = ((kTileP / 16) * (kN / 16) + kWarps - 1) / kWarps;
    //! Accumulator tiles per warp of one 64-row output tile.
    static constexpr int kOutFrags = ((kSub / 16) * (kTileP / 16) + kWarps - 1) / kWarps;

    static_assert(kBytes <= 99 * 1024 && kStBytes <= 99 * 1024, "shared memory plan exceeds the sm_89 opt-in limit");
};

#if defined(HYBRIDTRT_CPU_EMULATION)
template <typename T, bool kTc = kUseTensorCores<T>>
struct WarpTile : emulation::EmulatedMmaTile<T>
{
};
#else
//! 16x16 fp32 accumulator tile of one warp on tensor cores (WMMA m16n16k16).
//! Operand pointers address element (row0, k=0) of A and (k=0, col0) of B; lda/ldb in elements.
template <typename T, bool kTc = kUseTensorCores<T>>
struct WarpTile
{
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;

    __device__ __forceinline__ void zero()
    {
        nvcuda::wmma::fill_fragment(acc, 0.F);
    }

    //! Uniform scale: independent of the (opaque) fragment layout.
    __device__ __forceinline__ void scale(float s)
    {
#pragma unroll
        for (int i = 0; i < acc.num_elements; ++i)
        {
            acc.x[i] *= s;
        }
    }

    template <bool kAColMajor, bool kBColMajor>
    __device__ __forceinline__ void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        using namespace nvcuda;
        using LayoutA = std::conditional_t<kAColMajor, wmma::col_major, wmma::row_major>;
        using LayoutB = std::conditional_t<kBColMajor, wmma::col_major, wmma::row_major>;
        for (int kk = 0; kk < k; kk += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
            wmma::load_matrix_sync(fa, a + (kAColMajor ? kk * lda : kk), lda);
            wmma::load_matrix_sync(fb, b + (kBColMajor ? kk : kk * ldb), ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
    }

    __device__ __forceinline__ void load(float const* src, int ld)
    {
        nvcuda::wmma::load_matrix_sync(acc, src, ld, nvcuda::wmma::mem_row_major);
    }

    __device__ __forceinline__ void store(float* dst, int ld) const
    {
        nvcuda::wmma::store_matrix_sync(dst, acc, ld, nvcuda::wmma::mem_row_major);
    }
};
#endif

//! The same tile in exact fp32 on CUDA cores: lane owns row lane/2, columns (lane%2)*8 .. +8.
template <typename T>
struct WarpTile<T, false>
{
    float acc[8];

    __device__ __forceinline__ void zero()
    {
#pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            acc[j] = 0.F;
        }
    }

    __device__ __forceinline__ void scale(float s)
    {
#pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            acc[j] *= s;
        }
    }

    template <bool kAColMajor, bool kBColMajor>
    __device__ __forceinline__ void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        int const lane = threadIdx.x % 32;
        int const r = lane / 2;
        int const c0 = (lane % 2) * 8;
        for (int kk = 0; kk < k; ++kk)
        {
            float const av = kAColMajor ? a[kk * lda + r] : a[r * lda + kk];
#pragma unroll
            for (int j = 0; j < 8; ++j)
            {
                float const bv = kBColMajor ? b[(c0 + j) * ldb + kk] : b[kk * ldb + c0 + j];
                acc[j] = fmaf(av, bv, acc[j]);
            }
        }
    }

    __device__ __forceinline__ void load(float const* src, int ld)
    {
        int const lane = threadIdx.x % 32;
        float const* row = src + (lane / 2) * ld + (lane % 2) * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            acc[j] = row[j];
        }
    }

    __device__ __forceinline__ void store(float* dst, int ld) const
    {
        int const lane = threadIdx.x % 32;
        float* row = dst + (lane / 2) * ld + (lane % 2) * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            row[j] = acc[j];
        }
    }
};

//! Copies rows x cols elements (cols * sizeof(T) a multiple of 16) into shared memory in 16-byte
//! words; rows >= validRows are zero-filled.
template <typename T>
__device__ __forceinline__ void loadTile(
    T* dst, int ldDst, T const* src, int64_t srcStride, int rows, int validRows, int cols)
{
    constexpr int kV = 16 / static_cast<int>(sizeof(T));
    int const wordsPerRow = cols / kV;
    for (int i = threadIdx.x; i < rows * wordsPerRow; i += blockDim.x)
    {
        int const r = i / wordsPerRow;
        int const w = i % wordsPerRow;
        uint4 v = make_uint4(0U, 0U, 0U, 0U);
        if (r < validRows)
        {
            v = *reinterpret_cast<uint4 const*>(src + r * srcStride + w * kV);
        }
        *reinterpret_cast<uint4*>(dst + r * ldDst + w * kV) = v;
    }
}

//! sDt[i] = dt, sAcum[i] = dt * A for `count` tokens from l0 (0 from `len` on, i.e. past the sequence's end).
__device__ __forceinline__ void loadDecayInputs(
    ScanParams const& p, int64_t b, int32_t h, int32_t l0, int32_t len, int32_t count, float* sDt, float* sAcum)
{
    for (int i = threadIdx.x; i < count; i += blockDim.x)
    {
        float const dtv
            = i < len ? loadAny(p.dt, p.dtDtype, globalOffset((b * p.seqLen + l0 + i) * p.numHeads + h)) : 0.F;
        sDt[i] = dtv;
        sAcum[i] = dtv * p.A[h];
    }
}

//! Inclusive prefix sum of `count` (a multiple of 64, <= 256) values of sAcum: warp w scans values
//! [64 w, 64 w + 64), then adds the totals of the warps before it. Call with the whole block after a sync;
//! contains three __syncthreads (the last one publishes the result).
__device__ __forceinline__ void blockScan(float* sAcum, int count)
{
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    bool const active = warp * kSub < count;
    float* seg = sAcum + warp * kSub;
    if (active)
    {
        float const a0 = seg[2 * lane];
        float const a1 = seg[2 * lane + 1];
        float incl = a0 + a1;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2)
        {
            float const up = __shfl_up_sync(0xffffffffU, incl, offset);
            if (lane >= offset)
            {
                incl += up;
            }
        }
        float const excl = incl - (a0 + a1);
        seg[2 * lane] = excl + a0;
        seg[2 * lane + 1] = incl;
    }
    __syncthreads();
    float carry = 0.F; // totals of the warps before this one, read before any segment changes again
    for (int w = 0; w < warp && active; ++w)
    {
        carry += sAcum[w * kSub + kSub - 1];
    }
    __syncthreads();
    if (active && warp > 0)
    {
        seg[2 * lane] += carry;
        seg[2 * lane + 1] += carry;
    }
    __syncthreads();
}

//! Writes element i (of a [rows x kN] state tile) of a chunk start state, as StartState<T>.
template <typename T>
struct StoreStart
{
    StartState<T>* dst;
    __device__ __forceinline__ void operator()(int64_t i, float v) const
    {
#if defined(HYBRIDTRT_CPU_EMULATION)
        if (std::is_same<T, __half>::value && emulation::plantHalfStartStates())
        {
            v = __half2float(__float2half_rn(v)); // planted by a test: the fp16 storage of C ABI 3 (inf past 65504)
        }
#endif
        dst[i] = fromFloat<StartState<T>>(v);
    }
};

//! Writes element i in the state dtype, known at run time: final_state.
struct StoreAny
{
    void* dst;
    int32_t dtype;
    int64_t offset; //!< elements before the tile
    __device__ __forceinline__ void operator()(int64_t i, float v) const
    {
        storeAny(dst, dtype, offset + i, v);
    }
};

//! Moves the state rows [16 band, 16 band + 16) between this warp's accumulator tiles and the fp32 staging
//! band (row-major, ld kLdStage): stores them there (`toStage`) or loads them from there.
template <typename T, int kN>
__device__ __forceinline__ void exchangeBand(WarpTile<T>* s, int32_t tp, int band, float* sStage, bool toStage)
{
    using L = ScanLayout<T, kN>;
    constexpr int kColFrags = kN / 16;
    int const warp = threadIdx.x / 32;
    int const frags = (tp / 16) * kColFrags;
#pragma unroll
    for (int i = 0; i < L::kStateFrags; ++i)
    {
        int const f = warp + i * kWarps;
        if (f < frags && f / kColFrags == band)
        {
            if (toStage)
            {
                s[i].store(sStage + (f % kColFrags) * 16, L::kLdStage);
            }
            else
            {
                s[i].load(sStage + (f % kColFrags) * 16, L::kLdStage);
            }
        }
    }
}

//! Stores the running state held in the warps' accumulators (tile rows [0, tp), kN columns) through a 16-row
//! fp32 staging band: element (row, n) goes to store(row * kN + n, value). Contains __syncthreads.
template <typename T, int kN, typename Store>
__device__ __forceinline__ void publishState(WarpTile<T>* s, int32_t tp, float* sStage, Store const& store)
{
    using L = ScanLayout<T, kN>;
    for (int band = 0; band < tp / 16; ++band)
    {
        exchangeBand<T, kN>(s, tp, band, sStage, true);
        __syncthreads();
        for (int i = threadIdx.x; i < 16 * kN; i += blockDim.x)
        {
            int const r = i / kN;
            int const n = i % kN;
            store(int64_t(band * 16 + r) * kN + n, sStage[r * L::kLdStage + n]);
        }
        __syncthreads();
    }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) chunkStateKernel(ScanParams const p)
{
    using L = ScanLayout<T, kN>;
    constexpr int kColFrags = kN / 16;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sAcum = reinterpret_cast<float*>(smem);
    auto* sDt = reinterpret_cast<float*>(smem + kSub * 4);
    auto* sX = reinterpret_cast<T*>(smem + L::kStOffX);
    auto* sB = reinterpret_cast<T*>(smem + L::kStOffB);
    auto* sStage = reinterpret_cast<float*>(smem + L::kStOffB); // only between sub-tiles, when sB is free

    int64_t const bh = blockIdx.x;
    int64_t const b = bh / p.numHeads;
    int32_t const h = static_cast<int32_t>(bh % p.numHeads);
    int32_t const g = h / p.headsPerGroup;
    int32_t const p0 = blockIdx.y * p.tileP;
    int32_t const tp = min(p.tileP, p.headDim - p0);
    int const warp = threadIdx.x / 32;
    int const frags = (tp / 16) * kColFrags;
    int64_t const stateBase = globalOffset((bh * p.headDim + p0) * kN); // this tile in [B, H, P, N]

    // The running state s [tp x N], fp32, in tensor-core accumulators for the whole sequence.
    WarpTile<T> s[L::kStateFrags];
#pragma unroll
    for (int i = 0; i < L::kStateFrags; ++i)
    {
        s[i].zero();
    }
    if (p.initialState != nullptr)
    {
        for (int band = 0; band < tp / 16; ++band)
        {
            for (int i = threadIdx.x; i < 16 * kN; i += blockDim.x)
            {
                int const r = i / kN;
                int const n = i % kN;
                sStage[r * L::kLdStage + n] = loadAny(p.initialState, p.stateDtype, stateBase + (band * 16 + r) * kN + n);
            }
            __syncthreads();
            exchangeBand<T, kN>(s, tp, band, sStage, false);
            __syncthreads();
        }
    }

    int32_t const subsPerChunk = p.chunk / kSub;
    int32_t const nSubs = (p.seqLen + kSub - 1) / kSub;
    auto* starts = static_cast<StartState<T>*>(p.startStates);
    for (int32_t j = 0; j < nSubs; ++j)
    {
        if (j % subsPerChunk == 0) // the state entering chunk j / subsPerChunk, written once
        {
            int64_t const c = j / subsPerChunk;
            StoreStart<T> const store{starts + globalOffset(((bh * p.nChunks + c) * p.headDim + p0) * kN)};
            publishState<T, kN>(s, tp, sStage, store);
        }
        int32_t const l0 = j * kSub;
        int32_t const len = min(kSub, p.seqLen - l0);
        int32_t const kEff = (len + 15) / 16 * 16;
        loadDecayInputs(p, b, h, l0, len, kSub, sDt, sAcum);
        loadTile(sX, L::kLdX,
            static_cast<T const*>(p.x) + globalOffset(((b * p.seqLen + l0) * p.numHeads + h) * p.headDim + p0),
            int64_t(p.numHeads) * p.headDim, kEff, len, tp);
        loadTile(sB, L::kLdN, static_cast<T const*>(p.B) + globalOffset(((b * p.seqLen + l0) * p.numGroups + g) * kN),
            int64_t(p.numGroups) * kN, kEff, len, kN);
        __syncthreads();
        blockScan(sAcum, kSub);

        // Fold dt * exp(a_end - a[l]) into the rows of B (dt = 0 past the end: those rows add nothing).
        float const aEnd = sAcum[kSub - 1];
        for (int i = threadIdx.x; i < kEff * kN; i += blockDim.x)
        {
            int const l = i / kN;
            int const n = i % kN;
            T& v = sB[l * L::kLdN + n];
            v = fromFloat<T>(toFloat(v) * sDt[l] * expf(aEnd - sAcum[l]));
        }
        __syncthreads();

        // s = exp(a_end) s + X^T Bw: A = X^T (column-major view of sX), B = Bw.
        float const decay = expf(aEnd);
#pragma unroll
        for (int i = 0; i < L::kStateFrags; ++i)
        {
            int const f = warp + i * kWarps;
            if (f < frags)
            {
                s[i].scale(decay);
                s[i].template mma<true, false>(
                    sX + (f / kColFrags) * 16, L::kLdX, sB + (f % kColFrags) * 16, L::kLdN, kEff);
            }
        }
        __syncthreads(); // sX, sB and the staging band are rewritten next
    }
    publishState<T, kN>(s, tp, sStage, StoreAny{p.finalState, p.stateDtype, stateBase});
}

//! Loads the chunk's start tile [tp x kN] into shared memory as the GEMM operand (T) and returns its scale: the
//! start state is scale * tile. Start states in T (fp32, bf16) are copied as they are (scale 1). fp16 start states
//! are fp32 in the workspace; the tile is their value times 2^-k, k >= 0 the smallest that brings max |state| below
//! 2^15 (no fp16 overflow; the relative rounding is fp16's either way): a first pass finds the maximum, a second
//! converts. `scratch` holds kWarps floats of shared memory not otherwise in use. Contains __syncthreads.
template <typename T, int kN>
__device__ __forceinline__ float loadStartTile(T* sS, StartState<T> const* src, int32_t tp, float* scratch)
{
    using L = ScanLayout<T, kN>;
    if constexpr (std::is_same<StartState<T>, T>::value)
    {
        (void) scratch;
        loadTile(sS, L::kLdN, src, kN, tp, tp, kN);
        return 1.F;
    }
    else
    {
        int const quads = tp * kN / 4;
        float peak = 0.F;
        for (int i = threadIdx.x; i < quads; i += blockDim.x)
        {
            float4 const v = reinterpret_cast<float4 const*>(src)[i];
            peak = fmaxf(peak, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
        {
            peak = fmaxf(peak, __shfl_xor_sync(0xffffffffU, peak, offset));
        }
        if (threadIdx.x % 32 == 0)
        {
            scratch[threadIdx.x / 32] = peak;
        }
        __syncthreads();
        peak = fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
        static_assert(kWarps == 4, "the block maximum reads one value per warp");
        int exponent = 0; // peak = m 2^exponent, m in [0.5, 1)
        frexpf(peak, &exponent);
        // Not finite (inf / NaN, which fmaxf drops unless all are NaN): no scaling, the value stays non-finite.
        int const k = peak < INFINITY ? max(exponent - 15, 0) : 0;
        float const inverse = ldexpf(1.F, -k);
        for (int i = threadIdx.x; i < quads; i += blockDim.x)
        {
            int const row = (i * 4) / kN;
            int const col = (i * 4) % kN;
            float4 const v = reinterpret_cast<float4 const*>(src)[i];
            T* dst = sS + row * L::kLdN + col;
            dst[0] = fromFloat<T>(v.x * inverse);
            dst[1] = fromFloat<T>(v.y * inverse);
            dst[2] = fromFloat<T>(v.z * inverse);
            dst[3] = fromFloat<T>(v.w * inverse);
        }
        return ldexpf(1.F, k);
    }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) chunkOutputKernel(ScanParams const p)
{
    using L = ScanLayout<T, kN>;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sAcum = reinterpret_cast<float*>(smem + L::kOffAcum);
    auto* sDt = reinterpret_cast<float*>(smem + L::kOffDt);
    auto* sC = reinterpret_cast<T*>(smem + L::kOffC);
    auto* sB = reinterpret_cast<T*>(smem + L::kOffB);
    auto* sS = reinterpret_cast<T*>(smem + L::kOffS);
    auto* sCB = reinterpret_cast<float*>(smem + L::kOffCB);
    auto* sOut = reinterpret_cast<float*>(smem + L::kOffCB);
    auto* sM = reinterpret_cast<T*>(smem + L::kOffM);
    auto* sX = reinterpret_cast<T*>(smem + L::kOffX);

    int64_t const bh = blockIdx.x;
    int32_t const c = blockIdx.y;
    int64_t const b = bh / p.numHeads;
    int32_t const h = static_cast<int32_t>(bh % p.numHeads);
    int32_t const g = h / p.headsPerGroup;
    int32_t const c0 = c * p.chunk;
    int32_t const len = min(p.chunk, p.seqLen - c0);
    int32_t const count = (len + kSub - 1) / kSub * kSub;
    int32_t const p0 = blockIdx.z * p.tileP;
    int32_t const tp = min(p.tileP, p.headDim - p0);
    int32_t const colFrags = tp / 16;
    int const warp = threadIdx.x / 32;

    loadDecayInputs(p, b, h, c0, len, count, sDt, sAcum);
    // The start state = startScale * sS (startScale a power of two, 1 unless fp16 activations need it).
    auto const* startTile
        = static_cast<StartState<T> const*>(p.startStates) + globalOffset(((bh * p.nChunks + c) * p.headDim + p0) * kN);
    float const startScale = loadStartTile<T, kN>(sS, startTile, tp, sCB);
    __syncthreads();
    blockScan(sAcum, count);

    auto const* C = static_cast<T const*>(p.C);
    auto const* Bm = static_cast<T const*>(p.B);
    auto const* x = static_cast<T const*>(p.x);
    int64_t const bcStride = int64_t(p.numGroups) * kN;  // between tokens in B and C
    int64_t const xStride = int64_t(p.numHeads) * p.headDim; // between tokens in x and y
    int64_t const bcToken0 = globalOffset(((b * p.seqLen + c0) * p.numGroups + g) * kN);
    int64_t const xToken0 = globalOffset(((b * p.seqLen + c0) * p.numHeads + h) * p.headDim + p0);
    float const skip = p.D != nullptr ? p.D[h] : 0.F;

    for (int32_t r = 0; r < count / kSub; ++r)
    {
        int32_t const lenR = min(kSub, len - r * kSub);
        int32_t const rowFrags = (lenR + 15) / 16;
        int32_t const kEffR = rowFrags * 16;
        loadTile(sC, L::kLdN, C + bcToken0 + r * kSub * bcStride, bcStride, kEffR, lenR, kN);
        WarpTile<T> acc[L::kOutFrags];
#pragma unroll
        for (int i = 0; i < L::kOutFrags; ++i)
        {
            acc[i].zero();
        }
        for (int32_t s = 0; s <= r; ++s)
        {
            bool const diagonal = s == r;
            int32_t const lenS = min(kSub, len - s * kSub);
            int32_t const colFragsS = (lenS + 15) / 16;
            int32_t const kEffS = colFragsS * 16;
            loadTile(sB, L::kLdN, Bm + bcToken0 + s * kSub * bcStride, bcStride, kEffS, lenS, kN);
            loadTile(sX, L::kLdX, x + xToken0 + s * kSub * xStride, xStride, kEffS, lenS, tp);
            __syncthreads();

            // C.B^T for rows r and columns s; on the diagonal the lower block triangle only.
            for (int f = warp; f < rowFrags * colFragsS; f += kWarps)
            {
                int const fr = f / colFragsS;
                int const fc = f % colFragsS;
                if (diagonal && fc > fr)
                {
                    continue;
                }
                WarpTile<T> tile;
                tile.zero();
                tile.template mma<false, true>(sC + fr * 16 * L::kLdN, L::kLdN, sB + fc * 16 * L::kLdN, L::kLdN, kN);
                tile.store(sCB + fr * 16 * L::kLdCB + fc * 16, L::kLdCB);
            }
            __syncthreads();

            // M[l][s'] = C[l].B[s'] exp(a[l] - a[s']) dt[s'], causal (s' <= l) on the diagonal.
            float const* aR = sAcum + r * kSub;
            float const* aS = sAcum + s * kSub;
            float const* dtS = sDt + s * kSub;
            for (int i = threadIdx.x; i < kEffR * kEffS; i += blockDim.x)
            {
                int const l = i / kEffS;
                int const sp = i % kEffS;
                float const v
                    = (!diagonal || sp <= l) ? sCB[l * L::kLdCB + sp] * expf(aR[l] - aS[sp]) * dtS[sp] : 0.F;
                sM[l * L::kLdM + sp] = fromFloat<T>(v);
            }
            __syncthreads();

            // Y += M.X_s (on the diagonal M is lower triangular: the depth stops at the diagonal block).
#pragma unroll
            for (int i = 0; i < L::kOutFrags; ++i)
            {
                int const f = warp + i * kWarps;
                if (f < rowFrags * colFrags)
                {
                    int const fr = f / colFrags;
                    int const fc = f % colFrags;
                    acc[i].template mma<false, false>(sM + fr * 16 * L::kLdM, L::kLdM, sX + fc * 16, L::kLdX,
                        diagonal ? (fr + 1) * 16 : kEffS);
                }
            }
            __syncthreads(); // sB, sX, sCB and sM are rewritten next
        }

        // Y += (C * exp(a)) . start^T: the chunk's start state decayed to each row.
        for (int i = threadIdx.x; i < kEffR * kN; i += blockDim.x)
        {
            int const l = i / kN;
            int const n = i % kN;
            T& v = sC[l * L::kLdN + n];
            v = fromFloat<T>(toFloat(v) * expf(sAcum[r * kSub + l]));
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < L::kOutFrags; ++i)
        {
            int const f = warp + i * kWarps;
            if (f < rowFrags * colFrags)
            {
                int const fr = f / colFrags;
                int const fc = f % colFrags;
                // Y += (C e^a).(startScale sS)^T = startScale ((Y / startScale) + (C e^a).sS^T): powers of two, exact.
                if (startScale != 1.F)
                {
                    acc[i].scale(1.F / startScale);
                }
                acc[i].template mma<false, true>(sC + fr * 16 * L::kLdN, L::kLdN, sS + fc * 16 * L::kLdN, L::kLdN, kN);
                if (startScale != 1.F)
                {
                    acc[i].scale(startScale);
                }
                acc[i].store(sOut + fr * 16 * L::kLdOut + fc * 16, L::kLdOut); // sCB is no longer read
            }
        }
        __syncthreads();

        // y = Y + D x in fp32 (sX holds x of this row tile: the last s was r), four columns per 16-byte store:
        // tp, P, p0 and the output tile's row pitch are multiples of 4 floats, y is 16-byte aligned.
        float* y = p.y + xToken0 + r * kSub * xStride;
        int const quads = tp / 4;
        for (int i = threadIdx.x; i < lenR * quads; i += blockDim.x)
        {
            int const l = i / quads;
            int const col = (i % quads) * 4;
            float4 v = *reinterpret_cast<float4 const*>(sOut + l * L::kLdOut + col);
            T const* xs = sX + l * L::kLdX + col;
            v.x += skip * toFloat(xs[0]);
            v.y += skip * toFloat(xs[1]);
            v.z += skip * toFloat(xs[2]);
            v.w += skip * toFloat(xs[3]);
            *reinterpret_cast<float4*>(y + l * xStride + col) = v;
        }
        __syncthreads(); // sC, sX and the output tile are rewritten by the next row tile
    }
}

//! P tiles: as few as possible, each a multiple of 16 and balanced (P = 80 -> 48 + 32 on fp16).
inline int32_t pickTileP(int64_t headDim, int32_t maxTile)
{
    int64_t const tiles = (headDim + maxTile - 1) / maxTile;
    int64_t const width = (headDim + tiles - 1) / tiles;
    return static_cast<int32_t>((width + 15) / 16 * 16);
}

//! Opts both kernels of (T, kN) in to their dynamic shared memory (> 48 KiB) on the current device. Outside a
//! stream capture it calls cudaFuncSetAttribute every time (a host-side attribute: no stream work, no sync), so
//! a new device or a new context is never assumed to be set up already. Inside a capture it makes no CUDA call:
//! the opt-in must have happened on this device before (hybridtrtMamba2ChunkScanPrepare, or any launch outside a
//! capture), else the launch is refused with NOT_PREPARED.
template <typename T, int kN>
int32_t optInSharedMemory(cudaStream_t stream, bool capturing)
{
    static std::atomic<uint64_t> sPrepared{0}; // one bit per device < 64 (this instantiation's kernels)
    int32_t const device = currentDevice();
    if (device < 0)
    {
        return kHYBRIDTRT_CUDA_ERROR;
    }
    uint64_t const bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (capturing)
    {
        return bit != 0 && (sPrepared.load(std::memory_order_acquire) & bit) != 0 ? kHYBRIDTRT_SUCCESS
                                                                                : kHYBRIDTRT_NOT_PREPARED;
    }
    (void) stream;
    using L = ScanLayout<T, kN>;
    if (!setMaxDynamicSharedMemory(chunkStateKernel<T, kN>, L::kStBytes)
        || !setMaxDynamicSharedMemory(chunkOutputKernel<T, kN>, L::kBytes))
    {
        return kHYBRIDTRT_CUDA_ERROR;
    }
    sPrepared.fetch_or(bit, std::memory_order_release);
    return kHYBRIDTRT_SUCCESS;
}

template <typename T, int kN>
int32_t launchScan(ScanParams p, int64_t batch, cudaStream_t stream)
{
    using L = ScanLayout<T, kN>;
    p.tileP = pickTileP(p.headDim, L::kTileP);
    auto const pTiles = static_cast<uint32_t>((p.headDim + p.tileP - 1) / p.tileP);
    auto const rows = static_cast<uint32_t>(batch * p.numHeads); // grid.x: up to 2^31 - 1 (checkShapes)
    int32_t const status = optInSharedMemory<T, kN>(stream, streamIsCapturing(stream));
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    launchKernel(chunkStateKernel<T, kN>, dim3(rows, pTiles), dim3(kThreads), L::kStBytes, stream, p);
    launchKernel(chunkOutputKernel<T, kN>, dim3(rows, static_cast<uint32_t>(p.nChunks), pTiles), dim3(kThreads),
        L::kBytes, stream, p);
    return launchStatus();
}

template <typename T>
int32_t dispatchScanN(ScanParams const& p, int64_t batch, cudaStream_t stream)
{
    switch (p.dState)
    {
    case 16: return launchScan<T, 16>(p, batch, stream);
    case 64: return launchScan<T, 64>(p, batch, stream);
    case 128: return launchScan<T, 128>(p, batch, stream);
    default: return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
}

template <typename T>
int32_t prepareN(int64_t dState)
{
    int32_t status = kHYBRIDTRT_SUCCESS;
    if (status == kHYBRIDTRT_SUCCESS && (dState < 0 || dState == 16))
    {
        status = optInSharedMemory<T, 16>(nullptr, false);
    }
    if (status == kHYBRIDTRT_SUCCESS && (dState < 0 || dState == 64))
    {
        status = optInSharedMemory<T, 64>(nullptr, false);
    }
    if (status == kHYBRIDTRT_SUCCESS && (dState < 0 || dState == 128))
    {
        status = optInSharedMemory<T, 128>(nullptr, false);
    }
    return status;
}

//! Workspace bytes of the chunk start states, align256(B*H*chunks*P*N*sizeof(StartState)), in size_t; false
//! when that does not fit.
inline bool startStatesBytes(int64_t batch, int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t dState,
    int32_t chunk, int32_t actDtype, size_t& bytes)
{
    int64_t const nChunks = (seqLen + chunk - 1) / chunk;
    if (!checkedProduct({batch, numHeads, nChunks, headDim, dState, static_cast<int64_t>(startStateSize(actDtype))},
            bytes))
    {
        bytes = 0;
        return false;
    }
    bytes = alignUp(bytes, 256);
    return true;
}

//! Shape checks of the scan on top of checkShapes: chunk_size >= 1 and at most 65535 chunks (grid.y).
inline int32_t checkScan(int64_t batch, int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups,
    int64_t dState, int64_t chunkSize, int32_t actDtype, int32_t dtDtype, int32_t stateDtype)
{
    int32_t const status
        = checkShapes(batch, seqLen, numHeads, headDim, numGroups, dState, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    int32_t const chunk = chunkLength(chunkSize);
    if (chunk == 0 || seqLen > int64_t(chunk) * 65535)
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    return kHYBRIDTRT_SUCCESS;
}

} // namespace
} // namespace kernels
} // namespace hybridtrt

using namespace hybridtrt::kernels;

extern "C" int32_t hybridtrtMamba2ChunkScanChunkLength(int64_t chunkSize)
{
    return chunkLength(chunkSize);
}

template <typename T>
void sharedMemory(int64_t dState, size_t* stateBytes, size_t* outputBytes)
{
    switch (dState)
    {
    case 16: *stateBytes = ScanLayout<T, 16>::kStBytes; *outputBytes = ScanLayout<T, 16>::kBytes; break;
    case 64: *stateBytes = ScanLayout<T, 64>::kStBytes; *outputBytes = ScanLayout<T, 64>::kBytes; break;
    default: *stateBytes = ScanLayout<T, 128>::kStBytes; *outputBytes = ScanLayout<T, 128>::kBytes; break;
    }
}

extern "C" int32_t hybridtrtMamba2ChunkScanSharedMemory(
    int32_t actDtype, int64_t dState, size_t* chunkStateKernelBytes, size_t* chunkOutputKernelBytes)
{
    if (chunkStateKernelBytes == nullptr || chunkOutputKernelBytes == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    if (dState != 16 && dState != 64 && dState != 128)
    {
        return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
    switch (actDtype)
    {
    case kHYBRIDTRT_FLOAT32: sharedMemory<float>(dState, chunkStateKernelBytes, chunkOutputKernelBytes); break;
    case kHYBRIDTRT_FLOAT16: sharedMemory<__half>(dState, chunkStateKernelBytes, chunkOutputKernelBytes); break;
    case kHYBRIDTRT_BFLOAT16:
        sharedMemory<__nv_bfloat16>(dState, chunkStateKernelBytes, chunkOutputKernelBytes);
        break;
    default: return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
    return kHYBRIDTRT_SUCCESS;
}

extern "C" int32_t hybridtrtMamba2ChunkScanPrepare(int32_t actDtype, int64_t dState)
{
    if (dState >= 0 && dState != 16 && dState != 64 && dState != 128)
    {
        return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
    if (actDtype >= 0 && !isDtype(actDtype))
    {
        return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
    int32_t status = kHYBRIDTRT_SUCCESS;
    if (status == kHYBRIDTRT_SUCCESS && (actDtype < 0 || actDtype == kHYBRIDTRT_FLOAT32))
    {
        status = prepareN<float>(dState);
    }
    if (status == kHYBRIDTRT_SUCCESS && (actDtype < 0 || actDtype == kHYBRIDTRT_FLOAT16))
    {
        status = prepareN<__half>(dState);
    }
    if (status == kHYBRIDTRT_SUCCESS && (actDtype < 0 || actDtype == kHYBRIDTRT_BFLOAT16))
    {
        status = prepareN<__nv_bfloat16>(dState);
    }
    return status;
}

extern "C" int32_t hybridtrtMamba2ChunkScanWorkspaceSize(int64_t batch, int64_t seqLen, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int64_t chunkSize, int32_t actDtype, int32_t dtDtype,
    int32_t stateDtype, size_t* workspaceBytes)
{
    if (workspaceBytes == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    *workspaceBytes = 0;
    int32_t const status
        = checkScan(batch, seqLen, numHeads, headDim, numGroups, dState, chunkSize, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    return startStatesBytes(batch, seqLen, numHeads, headDim, dState, chunkLength(chunkSize), actDtype, *workspaceBytes)
        ? kHYBRIDTRT_SUCCESS
        : kHYBRIDTRT_INVALID_SHAPE;
}

extern "C" int32_t hybridtrtMamba2ChunkScan(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* initialState, float* y, void* finalState, int64_t batch,
    int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups, int64_t dState, int64_t chunkSize,
    int32_t actDtype, int32_t dtDtype, int32_t stateDtype, void* workspace, size_t workspaceBytes, void* stream)
{
    int32_t const status
        = checkScan(batch, seqLen, numHeads, headDim, numGroups, dState, chunkSize, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    if (x == nullptr || dt == nullptr || A == nullptr || B == nullptr || C == nullptr || y == nullptr
        || finalState == nullptr || workspace == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    if (!isAligned16(x) || !isAligned16(B) || !isAligned16(C) || !isAligned16(y)
        || (reinterpret_cast<uintptr_t>(workspace) & 255U) != 0)
    {
        return kHYBRIDTRT_MISALIGNED_POINTER;
    }
    int32_t const chunk = chunkLength(chunkSize);
    size_t needed = 0;
    if (!startStatesBytes(batch, seqLen, numHeads, headDim, dState, chunk, actDtype, needed))
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    if (workspaceBytes < needed)
    {
        return kHYBRIDTRT_WORKSPACE_TOO_SMALL;
    }
    ScanParams p{};
    p.x = x;
    p.dt = dt;
    p.A = A;
    p.B = B;
    p.C = C;
    p.D = D;
    p.initialState = initialState;
    p.y = y;
    p.finalState = finalState;
    p.startStates = workspace;
    p.seqLen = static_cast<int32_t>(seqLen);
    p.numHeads = static_cast<int32_t>(numHeads);
    p.headDim = static_cast<int32_t>(headDim);
    p.numGroups = static_cast<int32_t>(numGroups);
    p.headsPerGroup = static_cast<int32_t>(numHeads / numGroups);
    p.chunk = chunk;
    p.nChunks = static_cast<int32_t>((seqLen + chunk - 1) / chunk);
    p.dState = static_cast<int32_t>(dState);
    p.dtDtype = dtDtype;
    p.stateDtype = stateDtype;
    auto const s = static_cast<cudaStream_t>(stream);
    switch (actDtype)
    {
    case kHYBRIDTRT_FLOAT32: return dispatchScanN<float>(p, batch, s);
    case kHYBRIDTRT_FLOAT16: return dispatchScanN<__half>(p, batch, s);
    case kHYBRIDTRT_BFLOAT16: return dispatchScanN<__nv_bfloat16>(p, batch, s);
    default: return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
}
