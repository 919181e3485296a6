/*
 * Mamba2ChunkScan: the chunked SSD algorithm of Mamba-2 in three kernels.
 *
 * The sequence is cut into chunks of kChunk = 64 tokens (the op's chunk_size attribute only changes
 * rounding, never the math, so the kernels keep their own tile). With a = cumsum(dt * A) inside a
 * chunk, for every (batch, head):
 *
 *   1. chunkStateKernel   states[c] = sum_l x[l] (outer) B[l] * dt[l] * exp(a_end - a[l])
 *                         GEMM X^T [P x Q] . Bw [Q x N] on tensor cores; fp32 into the workspace.
 *                         Also stores a_end (the chunk's total log-decay).
 *   2. statePassingKernel start[c] = exp(a_end[c-1]) * start[c-1] + states[c-1], start[0] = initial
 *                         state (or 0). Sequential over chunks, elementwise over P*N, in place in the
 *                         workspace; writes final_state in the state dtype.
 *   3. chunkOutputKernel  y[l] = sum_{s<=l} (C[l].B[s]) exp(a[l]-a[s]) dt[s] x[s]
 *                              + exp(a[l]) C[l] . start[c] + D x[l]
 *                         Three tensor-core GEMMs per (chunk, head, P tile): C.B^T [QxQ] (lower
 *                         triangle only), then (C*exp(a)).start^T and M.X [QxP] into one accumulator.
 *
 * Tensor cores: WMMA m16n16k16 with fp16/bf16 operands and fp32 accumulation. fp32 activations use
 * the same tiling on a fp32 SIMT tile (exact fp32; TF32 would miss the fp32 accuracy gate).
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

constexpr int kChunk = 64;   //!< tokens per chunk (K of the intra-chunk GEMMs)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

struct ScanParams
{
    void const* x;
    void const* dt;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* initialState;
    void* y;
    void* finalState;
    float* chunkStates; //!< [B*H, nChunks, P, N] fp32: chunk states, then (in place) chunk start states
    float* chunkDecay;  //!< [B*H, nChunks] fp32: a_end of each chunk
    int32_t seqLen;
    int32_t numHeads;
    int32_t headDim;
    int32_t numGroups;
    int32_t headsPerGroup;
    int32_t nChunks;
    int32_t dState;
    int32_t tileP; //!< width of a P tile (multiple of 16, <= ScanLayout::kTileP)
    int32_t dtDtype;
};

template <typename T>
constexpr bool kUseTensorCores = !std::is_same<T, float>::value;

constexpr size_t align128(size_t v)
{
    return (v + 127) / 128 * 128;
}

//! Shared-memory plan of both GEMM kernels (byte offsets; rows padded by 16 bytes against bank conflicts).
template <typename T, int kN>
struct ScanLayout
{
    static constexpr bool kTc = kUseTensorCores<T>;
    static constexpr int kTileP = kTc ? 64 : 32;
    static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
    static constexpr int kLdN = kN + kPad;        //!< rows of C, B, start state
    static constexpr int kLdX = kTileP + kPad;    //!< rows of the x tile
    static constexpr int kLdCB = kChunk + 4;      //!< fp32 C.B^T
    static constexpr int kLdM = kTc ? kChunk + kPad : kLdCB;
    static constexpr int kLdOut = kTileP + 4;     //!< fp32 output tile
    static constexpr size_t kT = sizeof(T);

    // chunkOutputKernel
    static constexpr size_t kOffAcum = 0;
    static constexpr size_t kOffDt = kChunk * 4;
    static constexpr size_t kOffExpA = 2 * kChunk * 4;
    static constexpr size_t kOffC = align128(3 * kChunk * 4); //!< C, later the fp32 output tile
    static constexpr size_t kSizeC = align128(std::max(kChunk * kLdN * kT, size_t(kChunk) * kLdOut * 4));
    static constexpr size_t kOffB = kOffC + kSizeC;           //!< B, later the start-state tile
    static constexpr size_t kSizeB = align128(std::max(kChunk * kLdN * kT, size_t(kTileP) * kLdN * kT));
    static constexpr size_t kOffCB = kOffB + kSizeB;
    static constexpr size_t kSizeCB = align128(size_t(kChunk) * kLdCB * 4);
    static constexpr size_t kOffM = kTc ? kOffCB + kSizeCB : kOffCB; //!< fp32: M overwrites C.B^T in place
    static constexpr size_t kSizeM = kTc ? align128(size_t(kChunk) * kLdM * kT) : 0;
    static constexpr size_t kOffX = kOffCB + kSizeCB + kSizeM;
    static constexpr size_t kBytes = kOffX + align128(kChunk * kLdX * kT);

    // chunkStateKernel
    static constexpr size_t kStOffX = align128(2 * kChunk * 4);
    static constexpr size_t kStOffB = kStOffX + align128(kChunk * kLdX * kT);
    static constexpr size_t kStBytes = kStOffB + align128(kChunk * kLdN * kT);
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

//! sDt[l] = dt, sAcum[l] = dt * A for the chunk (0 past the end of the sequence); call before a sync.
__device__ __forceinline__ void loadDecayInputs(
    ScanParams const& p, int64_t b, int32_t h, int32_t l0, int32_t len, float* sDt, float* sAcum)
{
    if (threadIdx.x < kChunk)
    {
        int const l = threadIdx.x;
        float const dtv = l < len ? loadAny(p.dt, p.dtDtype, (b * p.seqLen + l0 + l) * p.numHeads + h) : 0.F;
        sDt[l] = dtv;
        sAcum[l] = dtv * p.A[h];
    }
}

//! In-place inclusive prefix sum of the kChunk values in sAcum (warp 0 only; sync before and after).
__device__ __forceinline__ void scanChunk(float* sAcum, float* sExpA)
{
    if (threadIdx.x < 32)
    {
        int const lane = threadIdx.x;
        float const a0 = sAcum[2 * lane];
        float const a1 = sAcum[2 * lane + 1];
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
        sAcum[2 * lane] = excl + a0;
        sAcum[2 * lane + 1] = incl;
        if (sExpA != nullptr)
        {
            sExpA[2 * lane] = expf(excl + a0);
            sExpA[2 * lane + 1] = expf(incl);
        }
    }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) chunkStateKernel(ScanParams const p)
{
    using L = ScanLayout<T, kN>;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sAcum = reinterpret_cast<float*>(smem);
    auto* sDt = reinterpret_cast<float*>(smem + kChunk * 4);
    auto* sX = reinterpret_cast<T*>(smem + L::kStOffX);
    auto* sB = reinterpret_cast<T*>(smem + L::kStOffB);

    int64_t const bh = blockIdx.x;
    int32_t const c = blockIdx.y;
    int64_t const b = bh / p.numHeads;
    int32_t const h = static_cast<int32_t>(bh % p.numHeads);
    int32_t const g = h / p.headsPerGroup;
    int32_t const l0 = c * kChunk;
    int32_t const len = min(kChunk, p.seqLen - l0);
    int32_t const p0 = blockIdx.z * p.tileP;
    int32_t const tp = min(p.tileP, p.headDim - p0);
    int32_t const kEff = (len + 15) / 16 * 16;

    loadDecayInputs(p, b, h, l0, len, sDt, sAcum);
    loadTile(sX, L::kLdX, static_cast<T const*>(p.x) + ((b * p.seqLen + l0) * p.numHeads + h) * p.headDim + p0,
        int64_t(p.numHeads) * p.headDim, kEff, len, tp);
    loadTile(sB, L::kLdN, static_cast<T const*>(p.B) + ((b * p.seqLen + l0) * p.numGroups + g) * kN,
        int64_t(p.numGroups) * kN, kEff, len, kN);
    __syncthreads();
    scanChunk(sAcum, nullptr);
    __syncthreads();

    // Fold dt * exp(a_end - a[l]) into the rows of B.
    float const aEnd = sAcum[kChunk - 1];
    for (int i = threadIdx.x; i < kEff * kN; i += blockDim.x)
    {
        int const l = i / kN;
        int const n = i % kN;
        T& v = sB[l * L::kLdN + n];
        v = fromFloat<T>(toFloat(v) * sDt[l] * expf(aEnd - sAcum[l]));
    }
    if (blockIdx.z == 0 && threadIdx.x == 0)
    {
        p.chunkDecay[bh * p.nChunks + c] = aEnd;
    }
    __syncthreads();

    // states[c][p][n] = sum_l X[l][p] * Bw[l][n]: A = X^T (column-major view of sX), B = Bw.
    int const warp = threadIdx.x / 32;
    int const colFrags = kN / 16;
    int const frags = (tp / 16) * colFrags;
    float* out = p.chunkStates + ((bh * p.nChunks + c) * p.headDim + p0) * kN;
    for (int f = warp; f < frags; f += kWarps)
    {
        int const fr = f / colFrags;
        int const fc = f % colFrags;
        WarpTile<T> tile;
        tile.zero();
        tile.template mma<true, false>(sX + fr * 16, L::kLdX, sB + fc * 16, L::kLdN, kEff);
        tile.store(out + (fr * 16) * kN + fc * 16, kN);
    }
}

template <typename TState>
__global__ void __launch_bounds__(256) statePassingKernel(ScanParams const p)
{
    int64_t const bh = blockIdx.y;
    int64_t const pn = int64_t(p.headDim) * p.dState;
    int64_t const e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (e >= pn)
    {
        return;
    }
    float s[4] = {0.F, 0.F, 0.F, 0.F};
    if (p.initialState != nullptr)
    {
        auto const* init = static_cast<TState const*>(p.initialState) + bh * pn + e;
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            s[j] = toFloat(init[j]);
        }
    }
    float* cs = p.chunkStates + bh * p.nChunks * pn + e;
    float const* decay = p.chunkDecay + bh * p.nChunks;
    // The recurrence is sequential over chunks, its loads are not: fetch kAhead chunks at once so that
    // one memory latency is exposed per kAhead chunks instead of per chunk.
    constexpr int kAhead = 4;
    for (int32_t c0 = 0; c0 < p.nChunks; c0 += kAhead)
    {
        float4 cur[kAhead];
#pragma unroll
        for (int j = 0; j < kAhead; ++j)
        {
            if (c0 + j < p.nChunks)
            {
                cur[j] = __ldcg(reinterpret_cast<float4 const*>(cs + (c0 + j) * pn));
            }
        }
#pragma unroll
        for (int j = 0; j < kAhead; ++j)
        {
            if (c0 + j < p.nChunks)
            {
                float const d = expf(decay[c0 + j]);
                __stcg(reinterpret_cast<float4*>(cs + (c0 + j) * pn), make_float4(s[0], s[1], s[2], s[3]));
                s[0] = fmaf(d, s[0], cur[j].x);
                s[1] = fmaf(d, s[1], cur[j].y);
                s[2] = fmaf(d, s[2], cur[j].z);
                s[3] = fmaf(d, s[3], cur[j].w);
            }
        }
    }
    auto* fin = static_cast<TState*>(p.finalState) + bh * pn + e;
#pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        fin[j] = fromFloat<TState>(s[j]);
    }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) chunkOutputKernel(ScanParams const p)
{
    using L = ScanLayout<T, kN>;
    constexpr int kMaxFrags = (kChunk / 16) * (L::kTileP / 16) / kWarps;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sAcum = reinterpret_cast<float*>(smem + L::kOffAcum);
    auto* sDt = reinterpret_cast<float*>(smem + L::kOffDt);
    auto* sExpA = reinterpret_cast<float*>(smem + L::kOffExpA);
    auto* sC = reinterpret_cast<T*>(smem + L::kOffC);
    auto* sOut = reinterpret_cast<float*>(smem + L::kOffC);
    auto* sB = reinterpret_cast<T*>(smem + L::kOffB);
    auto* sS = reinterpret_cast<T*>(smem + L::kOffB);
    auto* sCB = reinterpret_cast<float*>(smem + L::kOffCB);
    auto* sM = reinterpret_cast<T*>(smem + L::kOffM);
    auto* sX = reinterpret_cast<T*>(smem + L::kOffX);

    int64_t const bh = blockIdx.x;
    int32_t const c = blockIdx.y;
    int64_t const b = bh / p.numHeads;
    int32_t const h = static_cast<int32_t>(bh % p.numHeads);
    int32_t const g = h / p.headsPerGroup;
    int32_t const l0 = c * kChunk;
    int32_t const len = min(kChunk, p.seqLen - l0);
    int32_t const p0 = blockIdx.z * p.tileP;
    int32_t const tp = min(p.tileP, p.headDim - p0);
    int32_t const rowFrags = (len + 15) / 16;
    int32_t const kEff = rowFrags * 16;
    int const warp = threadIdx.x / 32;

    loadDecayInputs(p, b, h, l0, len, sDt, sAcum);
    int64_t const bcRow = (b * p.seqLen + l0) * p.numGroups + g;
    loadTile(sC, L::kLdN, static_cast<T const*>(p.C) + bcRow * kN, int64_t(p.numGroups) * kN, kEff, len, kN);
    loadTile(sB, L::kLdN, static_cast<T const*>(p.B) + bcRow * kN, int64_t(p.numGroups) * kN, kEff, len, kN);
    loadTile(sX, L::kLdX, static_cast<T const*>(p.x) + ((b * p.seqLen + l0) * p.numHeads + h) * p.headDim + p0,
        int64_t(p.numHeads) * p.headDim, kEff, len, tp);
    __syncthreads();
    scanChunk(sAcum, sExpA);

    // G1: C.B^T, lower block triangle only (blocks above the diagonal are fully masked).
    for (int f = warp; f < rowFrags * rowFrags; f += kWarps)
    {
        int const fr = f / rowFrags;
        int const fc = f % rowFrags;
        if (fc > fr)
        {
            continue;
        }
        WarpTile<T> tile;
        tile.zero();
        tile.template mma<false, true>(sC + fr * 16 * L::kLdN, L::kLdN, sB + fc * 16 * L::kLdN, L::kLdN, kN);
        tile.store(sCB + fr * 16 * L::kLdCB + fc * 16, L::kLdCB);
    }
    __syncthreads();

    // M[l][s] = C[l].B[s] * exp(a[l] - a[s]) * dt[s] for s <= l; C rows scaled by exp(a[l]);
    // the fp32 start state of this chunk and P tile replaces B (no longer needed).
    for (int i = threadIdx.x; i < kEff * kEff; i += blockDim.x)
    {
        int const l = i / kEff;
        int const s = i % kEff;
        float const v = s <= l ? sCB[l * L::kLdCB + s] * expf(sAcum[l] - sAcum[s]) * sDt[s] : 0.F;
        sM[l * L::kLdM + s] = fromFloat<T>(v);
    }
    for (int i = threadIdx.x; i < kEff * kN; i += blockDim.x)
    {
        int const l = i / kN;
        int const n = i % kN;
        T& v = sC[l * L::kLdN + n];
        v = fromFloat<T>(toFloat(v) * sExpA[l]);
    }
    float const* start = p.chunkStates + ((bh * p.nChunks + c) * p.headDim + p0) * kN;
    for (int i = threadIdx.x; i < tp * (kN / 4); i += blockDim.x)
    {
        int const r = i / (kN / 4);
        int const n = (i % (kN / 4)) * 4;
        float4 const v = __ldcg(reinterpret_cast<float4 const*>(start + r * kN + n));
        T* dst = sS + r * L::kLdN + n;
        dst[0] = fromFloat<T>(v.x);
        dst[1] = fromFloat<T>(v.y);
        dst[2] = fromFloat<T>(v.z);
        dst[3] = fromFloat<T>(v.w);
    }
    __syncthreads();

    // G2 + G3 into one accumulator: Y = (C * exp(a)) . start^T + M . X  (M is lower triangular).
    int const colFrags = tp / 16;
    WarpTile<T> acc[kMaxFrags];
#pragma unroll
    for (int i = 0; i < kMaxFrags; ++i)
    {
        int const f = warp + i * kWarps;
        int const fr = f / colFrags;
        int const fc = f % colFrags;
        if (f < rowFrags * colFrags)
        {
            acc[i].zero();
            acc[i].template mma<false, true>(
                sC + fr * 16 * L::kLdN, L::kLdN, sS + fc * 16 * L::kLdN, L::kLdN, kN);
            acc[i].template mma<false, false>(
                sM + fr * 16 * L::kLdM, L::kLdM, sX + fc * 16, L::kLdX, (fr + 1) * 16);
        }
    }
    __syncthreads(); // sOut overwrites sC
#pragma unroll
    for (int i = 0; i < kMaxFrags; ++i)
    {
        int const f = warp + i * kWarps;
        if (f < rowFrags * colFrags)
        {
            acc[i].store(sOut + (f / colFrags) * 16 * L::kLdOut + (f % colFrags) * 16, L::kLdOut);
        }
    }
    __syncthreads();

    float const skip = p.D != nullptr ? p.D[h] : 0.F;
    auto* y = static_cast<T*>(p.y) + ((b * p.seqLen + l0) * p.numHeads + h) * p.headDim + p0;
    int64_t const yStride = int64_t(p.numHeads) * p.headDim;
    for (int i = threadIdx.x; i < len * tp; i += blockDim.x)
    {
        int const l = i / tp;
        int const col = i % tp;
        float const v = sOut[l * L::kLdOut + col] + skip * toFloat(sX[l * L::kLdX + col]);
        y[l * yStride + col] = fromFloat<T>(v);
    }
}

//! P tiles: as few as possible, each a multiple of 16 and balanced (P = 80 -> 48 + 32 on fp16).
inline int32_t pickTileP(int64_t headDim, int32_t maxTile)
{
    int64_t const tiles = (headDim + maxTile - 1) / maxTile;
    int64_t const width = (headDim + tiles - 1) / tiles;
    return static_cast<int32_t>((width + 15) / 16 * 16);
}

//! Opts the two GEMM kernels in to their dynamic shared memory (> 48 KiB) once per device. A host-side
//! function attribute, not a stream operation: no synchronisation; after the first launch on a device
//! (TensorRT's build / warm-up) it is a cached bit test, so captured launches make no CUDA call here.
template <typename T, int kN>
cudaError_t ensureSharedMemoryOptIn()
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return cudaSuccess;
#else
    static std::atomic<uint64_t> sDevicesDone{0};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
    {
        return err;
    }
    uint64_t const bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (bit != 0 && (sDevicesDone.load(std::memory_order_acquire) & bit) != 0)
    {
        return cudaSuccess;
    }
    using L = ScanLayout<T, kN>;
    err = cudaFuncSetAttribute(
        chunkStateKernel<T, kN>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L::kStBytes));
    if (err == cudaSuccess)
    {
        err = cudaFuncSetAttribute(
            chunkOutputKernel<T, kN>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L::kBytes));
    }
    if (err == cudaSuccess)
    {
        sDevicesDone.fetch_or(bit, std::memory_order_release);
    }
    return err;
#endif
}

template <typename T, int kN>
int32_t launchScan(ScanParams p, int64_t batch, int32_t stateDtype, cudaStream_t stream)
{
    using L = ScanLayout<T, kN>;
    p.tileP = pickTileP(p.headDim, L::kTileP);
    uint32_t const pTiles = static_cast<uint32_t>((p.headDim + p.tileP - 1) / p.tileP);
    dim3 const grid(static_cast<uint32_t>(batch * p.numHeads), static_cast<uint32_t>(p.nChunks), pTiles);

    if (ensureSharedMemoryOptIn<T, kN>() != cudaSuccess)
    {
        return kHYBRIDTRT_CUDA_ERROR;
    }
    launchKernel(chunkStateKernel<T, kN>, grid, dim3(kThreads), L::kStBytes, stream, p);

    int64_t const pn = int64_t(p.headDim) * kN;
    dim3 const gridPass(static_cast<uint32_t>((pn / 4 + 255) / 256), static_cast<uint32_t>(batch * p.numHeads));
    switch (stateDtype)
    {
    case kHYBRIDTRT_FLOAT32: launchKernel(statePassingKernel<float>, gridPass, dim3(256), 0, stream, p); break;
    case kHYBRIDTRT_FLOAT16: launchKernel(statePassingKernel<__half>, gridPass, dim3(256), 0, stream, p); break;
    default: launchKernel(statePassingKernel<__nv_bfloat16>, gridPass, dim3(256), 0, stream, p); break;
    }

    launchKernel(chunkOutputKernel<T, kN>, grid, dim3(kThreads), L::kBytes, stream, p);
    return launchStatus();
}

template <typename T>
int32_t dispatchScanN(ScanParams const& p, int64_t batch, int32_t stateDtype, cudaStream_t stream)
{
    switch (p.dState)
    {
    case 16: return launchScan<T, 16>(p, batch, stateDtype, stream);
    case 64: return launchScan<T, 64>(p, batch, stateDtype, stream);
    case 128: return launchScan<T, 128>(p, batch, stateDtype, stream);
    default: return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
}

struct ScanWorkspace
{
    size_t statesBytes;
    size_t decayBytes;
};

inline ScanWorkspace scanWorkspace(int64_t batch, int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t dState)
{
    int64_t const nChunks = (seqLen + kChunk - 1) / kChunk;
    ScanWorkspace ws{};
    ws.statesBytes = alignUp(static_cast<size_t>(batch * numHeads * nChunks * headDim * dState) * 4, 256);
    ws.decayBytes = alignUp(static_cast<size_t>(batch * numHeads * nChunks) * 4, 256);
    return ws;
}

} // namespace
} // namespace kernels
} // namespace hybridtrt

using namespace hybridtrt::kernels;

extern "C" int32_t hybridtrtMamba2ChunkScanTileLength(void)
{
    return kChunk;
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

extern "C" int32_t hybridtrtMamba2ChunkScanWorkspaceSize(int64_t batch, int64_t seqLen, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    size_t* workspaceBytes)
{
    if (workspaceBytes == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    *workspaceBytes = 0;
    int32_t const status
        = checkShapes(batch, seqLen, numHeads, headDim, numGroups, dState, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    if (seqLen > int64_t(kChunk) * 65535)
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    ScanWorkspace const ws = scanWorkspace(batch, seqLen, numHeads, headDim, dState);
    *workspaceBytes = ws.statesBytes + ws.decayBytes;
    return kHYBRIDTRT_SUCCESS;
}

extern "C" int32_t hybridtrtMamba2ChunkScan(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* initialState, void* y, void* finalState, int64_t batch,
    int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype,
    int32_t dtDtype, int32_t stateDtype, void* workspace, size_t workspaceBytes, void* stream)
{
    int32_t const status
        = checkShapes(batch, seqLen, numHeads, headDim, numGroups, dState, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    if (seqLen > int64_t(kChunk) * 65535) // chunks are grid.y
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    if (x == nullptr || dt == nullptr || A == nullptr || B == nullptr || C == nullptr || y == nullptr
        || finalState == nullptr || workspace == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    if (!isAligned16(x) || !isAligned16(B) || !isAligned16(C) || (reinterpret_cast<uintptr_t>(workspace) & 255U) != 0)
    {
        return kHYBRIDTRT_MISALIGNED_POINTER;
    }
    ScanWorkspace const ws = scanWorkspace(batch, seqLen, numHeads, headDim, dState);
    if (workspaceBytes < ws.statesBytes + ws.decayBytes)
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
    p.chunkStates = static_cast<float*>(workspace);
    p.chunkDecay = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + ws.statesBytes);
    p.seqLen = static_cast<int32_t>(seqLen);
    p.numHeads = static_cast<int32_t>(numHeads);
    p.headDim = static_cast<int32_t>(headDim);
    p.numGroups = static_cast<int32_t>(numGroups);
    p.headsPerGroup = static_cast<int32_t>(numHeads / numGroups);
    p.nChunks = static_cast<int32_t>((seqLen + kChunk - 1) / kChunk);
    p.dState = static_cast<int32_t>(dState);
    p.dtDtype = dtDtype;
    auto const s = static_cast<cudaStream_t>(stream);
    switch (actDtype)
    {
    case kHYBRIDTRT_FLOAT32: return dispatchScanN<float>(p, batch, stateDtype, s);
    case kHYBRIDTRT_FLOAT16: return dispatchScanN<__half>(p, batch, stateDtype, s);
    case kHYBRIDTRT_BFLOAT16: return dispatchScanN<__nv_bfloat16>(p, batch, stateDtype, s);
    default: return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
}
