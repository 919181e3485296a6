/*
 * MoeExperts / MoeExpertsFp8: the routed experts of a Nemotron-3 MoE layer (contract: hybridtrt/moeKernels.h).
 *
 * With P = T * K (token, k) pairs, one call enqueues (all on `stream`, no host synchronisation):
 *
 *   1. moeRouteCountKernel    grid (ceil(P / 256)): per 256-pair tile, a histogram over the experts in shared memory
 *                             (int atomics: the counts do not depend on their order); row E counts skipped pairs
 *                             (index outside [0, E)). Written expert-major: tileCounts[e][tile].
 *   2. moeRouteScanKernel     one block: exclusive scan of tileCounts in that order, so entry (e, tile) becomes the
 *                             first row of expert e's pairs of that tile; then per expert its first row, the 64-row
 *                             work items of the prefill GEMMs and the list of chosen experts (decode GEMMs).
 *   3. moeRoutePermuteKernel  grid (ceil(P / 256)): each pair's rank among the earlier pairs of its tile with the same
 *                             expert (a broadcast loop over the tile in shared memory: stable, no atomics), so the rows
 *                             of an expert hold its pairs in ascending pair order t * K + k — tokens ascending, the
 *                             order of hybridtrt.ops.moe.group_by_expert. rowPair[row] = pair, pairRow[pair] = row.
 *  (4. moeQuantizeInputKernel FP8 only: each row's up input, x[t] / up_input_scale[e], as e4m3 codes.)
 *   5. up GEMM                H[row, :] = relu(x[t(row)] . up_e^T)^2 with the epilogue of the op (rounding to x's
 *                             dtype; FP8: the dequantization scales, relu^2 in fp32 and the e4m3 quantization of h with
 *                             down_input_scale[e]).
 *   6. down GEMM              OUT[row, :] = H[row, :] . down_e^T (x's dtype; FP8: fp32 after the scales).
 *   7. moeCombineKernel       grid (ceil(T / 4)), a warp per token: y[t] = sum over k ascending of w[t,k] * OUT[row of
 *                             (t,k)] in fp32 (__fmul_rn / __fadd_rn: no contraction, a fixed order, no atomics), rounded
 *                             once to x's dtype. Skipped pairs add nothing.
 *
 * The GEMMs have two paths (hybridtrtMoeExpertsTactic picks one by T*K / E, or the caller does):
 *   - prefill (moeGemmKernel): a grouped GEMM, grid (R work items, N / 64). A work item is 64 consecutive rows of one
 *     expert (no padding to a capacity: an expert of n rows has ceil(n / 64) items; R = ceil(P / 64) + min(E, P)
 *     bounds their number, blocks past the real count return at once). 64 x 64 output tiles, 4 warps each owning a
 *     16 x 64 strip, operands staged through shared memory in 16-byte words, WMMA m16n16k16 with fp32 accumulators
 *     for fp16 / bf16 (FP8: the e4m3 codes widened to fp16, exact, the scales applied in the epilogue); fp32
 *     activations on an exact fp32 SIMT tile (TF32 would miss the fp32 gate), as in chunkScan.cu.
 *     Why our own WMMA tiles and not CUTLASS 3.x's grouped GEMM: CUTLASS is not available here and must not be
 *     vendored; its grouped GEMM takes per-group problem sizes and pointer arrays prepared on the host (or by an extra
 *     kernel into its own format), while ours reads the device-side work list of step 2 directly; and this source
 *     compiles for the CPU emulation (the WMMA tile has a scalar stand-in), so the whole path is tested without a GPU.
 *     The cost: no TMA / wgmma / software pipelining on sm_90 (see plugins/README.md).
 *   - decode (moeDecodeKernel): GEMV-like, grid (N / 32, min(E, P)): block y serves the y-th chosen expert, block x
 *     32 of its output channels. It stages a 32 x 128 tile of weights and 16 rows of inputs (as fp32) in shared memory,
 *     each thread accumulates 4 (row, channel) dot products; all the expert's rows are served 16 at a time, so its
 *     weights stream from DRAM once per 16 rows (once for T*K <= 16*E on average).
 *
 * Unchosen experts are never read: the GEMMs address weights and scales only through the work list / chosen list.
 * Indices outside [0, E) are never used to address anything (their pairs are skipped).
 * Offsets into global tensors are int64 (rows are int32: P <= 2^31 - 1).
 */
#include "hybridtrt/moeKernels.h"
#include "ssdCommon.cuh"

#include <cuda_fp8.h>

#if !defined(HYBRIDTRT_CPU_EMULATION)
#include <mma.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace hybridtrt
{
namespace kernels
{
namespace
{

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRouteTile = 256;                          //!< pairs per routing block
constexpr int kPairsPerThread = kRouteTile / kThreads;   //!< 2
constexpr int kTileRows = 64;                            //!< rows of a prefill work item (output tile rows)
constexpr int kTileCols = 64;                            //!< output channels of a prefill tile
constexpr int kDecodeCols = 32;                          //!< output channels of a decode block
constexpr int kDecodeRows = 16;                          //!< expert rows per decode pass
constexpr int kDecodeRowsPerThread = kDecodeRows * kDecodeCols / kThreads; //!< 4
constexpr int kDecodeDepth = 128;                        //!< K elements staged per decode step
constexpr int kCombineTokens = kWarps;                   //!< tokens per combine block (a warp each)
//! Blocks per SM the GEMMs' register budgets are planned for (65536 / (blocks * 128) registers per thread): without
//! them ptxas picked 48 registers for a decode kernel on its own and spilled. The GEMM (18.3 KiB of shared memory)
//! gets 128 registers (its fp32 SIMT strip holds 32 accumulators), the decode kernel (24.4 KiB) 64.
constexpr int kGemmMinBlocks = 4;
constexpr int kDecodeMinBlocks = 8;

//! Elements of the workspace header (int32).
enum HeaderField : int
{
    kHEADER_SKIPPED = 0,  //!< pairs whose index was outside [0, E)
    kHEADER_WORK = 1,     //!< prefill work items
    kHEADER_ACTIVE = 2,   //!< chosen experts
    kHEADER_RESERVED = 3, //!< 0
    kHEADER_FIELDS = 4
};

//! Faults the CPU emulation plants to show that the tests catch them (emulation::Plants::moeFault); never on a GPU.
enum MoeFault : int32_t
{
    kFAULT_NONE = 0,
    kFAULT_SWAP_K = 1,             //!< the weighted sum pairs w[t,k] with the output of pair (t, k+1 mod K)
    kFAULT_DROP_PAIR = 2,          //!< the routing drops pair 0
    kFAULT_UNSCALED_FP8_INPUT = 3, //!< the FP8 up input is quantized without up_input_scale
    kFAULT_WRONG_EXPERT = 4        //!< the up GEMM reads the weights of expert e+1 mod E
};

__device__ __forceinline__ int32_t plantedFault()
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return emulation::plantedMoeFault();
#else
    return kFAULT_NONE;
#endif
}

using Fp8 = uint8_t; //!< an e4m3 code (__nv_fp8_storage_t)

struct MoeParams
{
    void const* x;                //!< [T, D] activation dtype
    void const* topkIndices;      //!< [T, K] int64 | int32
    float const* topkWeights;     //!< [T, K]
    void const* upProj;           //!< [E, I, D] weights (x's dtype | e4m3)
    void const* downProj;         //!< [E, D, I]
    float const* upWeightScale;   //!< FP8: [E, upScaleCols]
    float const* upInputScale;    //!< FP8: [E]
    float const* downWeightScale; //!< FP8: [E, downScaleCols]
    float const* downInputScale;  //!< FP8: [E]
    void* y;                      //!< [T, D] activation dtype
    // workspace sections (hybridtrt/moeKernels.h)
    int32_t* header;
    int32_t* tileCounts;    //!< [E + 1][numTiles], scanned in place
    int32_t* expertOffsets; //!< [E + 1]
    int32_t* workExpert;    //!< [maxWork]
    int32_t* workRow;       //!< [maxWork]
    int32_t* activeExperts; //!< [min(E, P)]
    int32_t* rowPair;       //!< [P]
    int32_t* pairRow;       //!< [P]
    Fp8* xQuant;            //!< FP8: [P, D]
    void* h;                //!< [P, I]
    void* out;              //!< [P, D]
    int32_t numPairs;
    int32_t numTokens;
    int32_t topK;
    int32_t numExperts;
    int32_t hidden; //!< D
    int32_t inter;  //!< I
    int32_t numTiles;
    int32_t actDtype;
    int32_t indexDtype;
    int32_t upScaleCols;
    int32_t downScaleCols;
};

// ---- element helpers ---------------------------------------------------------------------------------------------

//! e4m3 code of v / scale: the division in fp32 (IEEE, as ONNX QuantizeLinear and fake_quantize), round to nearest
//! even, saturated to +-448 (QuantizeLinear saturate=1 = torch's clamp(-448, 448) before float8_e4m3fn); NaN stays
//! NaN. hybridtrt/exporter/fp8_reference.py fake_quantize is the reference.
__device__ __forceinline__ Fp8 quantizeE4m3(float v, float scale)
{
    return static_cast<Fp8>(__nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3));
}

//! The exact value of an e4m3 code (every e4m3 value is an fp16 value).
__device__ __forceinline__ float e4m3ToFloat(Fp8 code)
{
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

//! Two e4m3 codes (low byte first) as the bits of a half2 (low half first).
__device__ __forceinline__ uint32_t e4m3x2ToHalf2(uint32_t codes)
{
    __half2_raw const r = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes & 0xFFFFU), __NV_E4M3);
    return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}

//! topk_indices[pair] as an expert, or E for an index outside [0, E) (a skipped pair).
__device__ __forceinline__ int32_t expertOf(MoeParams const& p, int64_t pair)
{
    if (plantedFault() == kFAULT_DROP_PAIR && pair == 0)
    {
        return p.numExperts;
    }
    int64_t const e = p.indexDtype == kHYBRIDTRT_INT64 ? static_cast<int64_t const*>(p.topkIndices)[pair]
                                                        : static_cast<int64_t>(static_cast<int32_t const*>(p.topkIndices)[pair]);
    return e >= 0 && e < p.numExperts ? static_cast<int32_t>(e) : p.numExperts;
}

//! Stores 4 consecutive fp32 values as T at dst (8- or 16-byte aligned): one vector store.
template <typename T>
__device__ __forceinline__ void storeQuad(T* dst, float const (&v)[4])
{
    T packed[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        packed[j] = fromFloat<T>(v[j]);
    }
    if constexpr (sizeof(T) == 4)
    {
        uint4 word;
        memcpy(&word, packed, sizeof(word));
        *reinterpret_cast<uint4*>(dst) = word;
    }
    else
    {
        uint2 word;
        memcpy(&word, packed, sizeof(word));
        *reinterpret_cast<uint2*>(dst) = word;
    }
}

//! 4 consecutive values of T at src (8- or 16-byte aligned) as fp32: one vector load.
template <typename T>
__device__ __forceinline__ void loadQuad(T const* src, float (&v)[4])
{
    T packed[4];
    if constexpr (sizeof(T) == 4)
    {
        uint4 const word = *reinterpret_cast<uint4 const*>(src);
        memcpy(static_cast<void*>(packed), &word, sizeof(word));
    }
    else
    {
        uint2 const word = *reinterpret_cast<uint2 const*>(src);
        memcpy(static_cast<void*>(packed), &word, sizeof(word));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        v[j] = toFloat(packed[j]);
    }
}

// ---- the two expert formats: what the GEMMs read, and their epilogues ---------------------------------------------

//! MoeExperts: weights, h and the expert outputs in x's dtype T (torch's matmuls in x's dtype round each output).
template <typename T>
struct ActExperts
{
    using Weight = T; //!< up_proj / down_proj elements
    using H = T;      //!< the GEMMs' A operand in memory: x (up) and h (down)
    using Op = T;     //!< operand type in shared memory (tensor cores for fp16 / bf16)
    using Out = T;    //!< expert outputs

    //! h = round(round(acc)^2), relu between: hybridtrt.ops.moe.relu2(x @ up.T) in x's dtype (torch.relu keeps NaN).
    __device__ static __forceinline__ H up(MoeParams const&, int32_t, int32_t, float acc)
    {
        float v = toFloat(fromFloat<T>(acc));
        v = v < 0.F ? 0.F : v;
        return fromFloat<T>(v * v);
    }

    __device__ static __forceinline__ Out down(MoeParams const&, int32_t, int32_t, float acc)
    {
        return fromFloat<T>(acc);
    }
};

//! MoeExpertsFp8: e4m3 weights, inputs quantized per expert; acc = sum of code products (exact in fp32 per product).
//! As the MoeExpertsFp8 body (hybridtrt/ops/moe_onnx.py) and hybridtrt/exporter/fp8_reference.py: h = relu(x_q . w)^2
//! in fp32, x_q = up_input_scale[e] * codes, w = up_weight_scale[e, n] * codes; h quantized with down_input_scale[e].
struct Fp8Experts
{
    using Weight = Fp8;
    using H = Fp8;
    using Op = __half; //!< e4m3 codes widened to fp16 (exact) for the tensor cores
    using Out = float;

    __device__ static __forceinline__ H up(MoeParams const& p, int32_t e, int32_t n, float acc)
    {
        float const w = p.upWeightScale[int64_t(e) * p.upScaleCols + (p.upScaleCols == 1 ? 0 : n)];
        float v = acc * (p.upInputScale[e] * w);
        v = v < 0.F ? 0.F : v;
        return quantizeE4m3(v * v, p.downInputScale[e]);
    }

    __device__ static __forceinline__ Out down(MoeParams const& p, int32_t e, int32_t n, float acc)
    {
        float const w = p.downWeightScale[int64_t(e) * p.downScaleCols + (p.downScaleCols == 1 ? 0 : n)];
        return acc * (p.downInputScale[e] * w);
    }
};

//! The weights of the GEMM's expert (kUp: up_proj, else down_proj) from output channel n0 on: [N - n0, depth] rows.
template <typename Experts, bool kUp>
__device__ __forceinline__ typename Experts::Weight const* expertWeights(MoeParams const& p, int32_t e, int32_t n0)
{
    int32_t const nOut = kUp ? p.inter : p.hidden;
    int32_t const depth = kUp ? p.hidden : p.inter;
    int32_t const read = kUp && plantedFault() == kFAULT_WRONG_EXPERT ? (e + 1) % p.numExperts : e;
    return static_cast<typename Experts::Weight const*>(kUp ? p.upProj : p.downProj)
        + (int64_t(read) * nOut + n0) * depth;
}

//! Row `row` of the GEMM's A operand (kUp: x of its token, or for FP8 its quantized copy; else h), given its token.
template <typename Experts, bool kUp>
__device__ __forceinline__ typename Experts::H const* operandRow(MoeParams const& p, int32_t row, int32_t token)
{
    using H = typename Experts::H;
    if constexpr (kUp && !std::is_same<H, Fp8>::value)
    {
        return static_cast<H const*>(p.x) + int64_t(token) * p.hidden;
    }
    else if constexpr (kUp)
    {
        return p.xQuant + int64_t(row) * p.hidden;
    }
    else
    {
        return static_cast<H const*>(p.h) + int64_t(row) * p.inter;
    }
}

//! The GEMM's output element: h (kUp) or the expert output, stored at [row, n].
template <typename Experts, bool kUp>
__device__ __forceinline__ void storeResult(MoeParams const& p, int32_t e, int32_t row, int32_t n, float acc)
{
    if constexpr (kUp)
    {
        static_cast<typename Experts::H*>(p.h)[int64_t(row) * p.inter + n] = Experts::up(p, e, n, acc);
    }
    else
    {
        static_cast<typename Experts::Out*>(p.out)[int64_t(row) * p.hidden + n] = Experts::down(p, e, n, acc);
    }
}

//! Stages a [rows x chunk] block of row-major sources (row r at rowPtr(r), elements [k0, k0 + chunk)) into shared
//! memory as TDst, row pitch ld, in 16-byte source words: e4m3 codes become fp16 (or fp32) values, other sources are
//! copied (or widened to fp32). Rows >= validRows and elements >= kEnd are zero. chunk, k0 and kEnd are multiples of
//! 16 (D and I are). kVectorStore: ld keeps every destination word 16-byte aligned.
template <typename TDst, typename TSrc, bool kVectorStore, typename RowPtr>
__device__ __forceinline__ void stageRows(
    TDst* dst, int ld, int rows, int validRows, int chunk, int k0, int kEnd, RowPtr const& rowPtr)
{
    constexpr int kE = 16 / static_cast<int>(sizeof(TSrc)); // source elements per 16-byte word
    int const words = chunk / kE;
    for (int i = threadIdx.x; i < rows * words; i += kThreads)
    {
        int const r = i / words;
        int const w = i % words;
        int const k = k0 + w * kE;
        TDst* d = dst + r * ld + w * kE;
        uint4 word = make_uint4(0U, 0U, 0U, 0U);
        if (r < validRows && k < kEnd)
        {
            word = *reinterpret_cast<uint4 const*>(rowPtr(r) + k);
        }
        if constexpr (std::is_same<TDst, TSrc>::value && kVectorStore)
        {
            *reinterpret_cast<uint4*>(d) = word;
        }
        else if constexpr (std::is_same<TSrc, Fp8>::value && std::is_same<TDst, __half>::value && kVectorStore)
        {
            uint32_t const codes[4] = {word.x, word.y, word.z, word.w};
            uint32_t halves[8];
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                halves[2 * j] = e4m3x2ToHalf2(codes[j]);
                halves[2 * j + 1] = e4m3x2ToHalf2(codes[j] >> 16);
            }
            reinterpret_cast<uint4*>(d)[0] = make_uint4(halves[0], halves[1], halves[2], halves[3]);
            reinterpret_cast<uint4*>(d)[1] = make_uint4(halves[4], halves[5], halves[6], halves[7]);
        }
        else // widen to fp32, element by element (the decode kernel's odd-pitched tiles)
        {
            static_assert(std::is_same<TDst, float>::value, "unsupported staging");
            TSrc src[kE];
            memcpy(static_cast<void*>(src), &word, sizeof(word));
#pragma unroll
            for (int j = 0; j < kE; ++j)
            {
                if constexpr (std::is_same<TSrc, Fp8>::value)
                {
                    d[j] = e4m3ToFloat(src[j]);
                }
                else
                {
                    d[j] = toFloat(src[j]);
                }
            }
        }
    }
}

// ---- routing -------------------------------------------------------------------------------------------------------

//! Per 256-pair tile: how many pairs chose each expert (row E: skipped pairs), written expert-major.
__global__ void __launch_bounds__(kThreads) moeRouteCountKernel(MoeParams const p)
{
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sCount = reinterpret_cast<int*>(smem); // [E + 1]
    for (int e = threadIdx.x; e <= p.numExperts; e += kThreads)
    {
        sCount[e] = 0;
    }
    __syncthreads();
    int64_t const first = int64_t(blockIdx.x) * kRouteTile;
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q)
    {
        int64_t const pair = first + threadIdx.x + q * kThreads;
        if (pair < p.numPairs)
        {
            atomicAdd(&sCount[expertOf(p, pair)], 1);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= p.numExperts; e += kThreads)
    {
        p.tileCounts[int64_t(e) * p.numTiles + blockIdx.x] = sCount[e];
    }
}

//! One block: the counts become first rows (exclusive scan, expert-major); then per expert its first row, work items
//! and the chosen list; the header. Each thread scans a contiguous segment; thread 0 scans the 128 segment totals.
__global__ void __launch_bounds__(kThreads) moeRouteScanKernel(MoeParams const p)
{
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sSum = reinterpret_cast<int*>(smem); // [kThreads] segment totals -> their first rows
    auto* sWork = sSum + kThreads;             // [kThreads] work items of the segment's experts -> first item
    auto* sActive = sWork + kThreads;          // [kThreads] chosen experts of the segment -> first slot
    int const tid = threadIdx.x;

    int64_t const n = int64_t(p.numExperts + 1) * p.numTiles;
    int64_t const seg = (n + kThreads - 1) / kThreads;
    int64_t const begin = min(n, tid * seg);
    int64_t const end = min(n, begin + seg);
    int sum = 0;
    for (int64_t i = begin; i < end; ++i)
    {
        sum += p.tileCounts[i];
    }
    sSum[tid] = sum;
    __syncthreads();
    if (tid == 0)
    {
        int run = 0;
        for (int i = 0; i < kThreads; ++i)
        {
            int const v = sSum[i];
            sSum[i] = run;
            run += v;
        }
    }
    __syncthreads();
    int run = sSum[tid];
    for (int64_t i = begin; i < end; ++i)
    {
        int const v = p.tileCounts[i];
        p.tileCounts[i] = run;
        run += v;
    }
    __syncthreads(); // the scanned counts (global memory) are read by other threads of the block below

    // First row of expert e = scanned entry (e, tile 0); entry (E, 0) = the rows of all chosen pairs.
    auto const firstRow = [&](int32_t e) { return p.tileCounts[int64_t(e) * p.numTiles]; };
    int32_t const segE = (p.numExperts + kThreads - 1) / kThreads;
    int32_t const e0 = min(p.numExperts, tid * segE);
    int32_t const e1 = min(p.numExperts, e0 + segE);
    int work = 0;
    int active = 0;
    for (int32_t e = e0; e < e1; ++e)
    {
        int32_t const rows = firstRow(e + 1) - firstRow(e);
        work += (rows + kTileRows - 1) / kTileRows;
        active += rows > 0 ? 1 : 0;
    }
    sWork[tid] = work;
    sActive[tid] = active;
    __syncthreads();
    if (tid == 0)
    {
        int workRun = 0;
        int activeRun = 0;
        for (int i = 0; i < kThreads; ++i)
        {
            int const w = sWork[i];
            int const a = sActive[i];
            sWork[i] = workRun;
            sActive[i] = activeRun;
            workRun += w;
            activeRun += a;
        }
        int32_t const rows = firstRow(p.numExperts);
        p.expertOffsets[p.numExperts] = rows;
        p.header[kHEADER_SKIPPED] = p.numPairs - rows;
        p.header[kHEADER_WORK] = workRun;
        p.header[kHEADER_ACTIVE] = activeRun;
        p.header[kHEADER_RESERVED] = 0;
    }
    __syncthreads();
    int w = sWork[tid];
    int a = sActive[tid];
    for (int32_t e = e0; e < e1; ++e)
    {
        int32_t const start = firstRow(e);
        int32_t const rows = firstRow(e + 1) - start;
        p.expertOffsets[e] = start;
        for (int32_t r = 0; r < rows; r += kTileRows, ++w)
        {
            p.workExpert[w] = e;
            p.workRow[w] = start + r;
        }
        if (rows > 0)
        {
            p.activeExperts[a++] = e;
        }
    }
}

//! Per 256-pair tile: the row of each pair = first row of (its expert, this tile) + its rank among the tile's earlier
//! pairs of the same expert. The rank loop reads the tile's experts in order (a shared-memory broadcast per step).
__global__ void __launch_bounds__(kThreads) moeRoutePermuteKernel(MoeParams const p)
{
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sExpert = reinterpret_cast<int*>(smem); // [kRouteTile]; -1 past the last pair
    int64_t const first = int64_t(blockIdx.x) * kRouteTile;
    int mine[kPairsPerThread];
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q)
    {
        int const i = threadIdx.x + q * kThreads;
        mine[q] = first + i < p.numPairs ? expertOf(p, first + i) : -1;
        sExpert[i] = mine[q];
    }
    __syncthreads();
    int rank[kPairsPerThread] = {};
    for (int j = 0; j < kRouteTile; ++j)
    {
        int const e = sExpert[j];
#pragma unroll
        for (int q = 0; q < kPairsPerThread; ++q)
        {
            rank[q] += (j < static_cast<int>(threadIdx.x) + q * kThreads && e == mine[q]) ? 1 : 0;
        }
    }
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q)
    {
        int64_t const pair = first + threadIdx.x + q * kThreads;
        if (pair >= p.numPairs)
        {
            continue;
        }
        if (mine[q] < p.numExperts)
        {
            int32_t const row = p.tileCounts[int64_t(mine[q]) * p.numTiles + blockIdx.x] + rank[q];
            p.rowPair[row] = static_cast<int32_t>(pair);
            p.pairRow[pair] = row;
        }
        else
        {
            p.pairRow[pair] = -1; // skipped: never addresses an expert
        }
    }
}

//! FP8: each row's up input as e4m3 codes of x[t] / up_input_scale[e], a warp per row, 4 codes per lane step.
__global__ void __launch_bounds__(kThreads) moeQuantizeInputKernel(MoeParams const p)
{
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int64_t const row = int64_t(blockIdx.x) * kWarps + warp;
    if (row >= p.expertOffsets[p.numExperts])
    {
        return; // rows exist for the chosen pairs only
    }
    int32_t const pair = p.rowPair[row];
    int64_t const token = pair / p.topK;
    int32_t const e = expertOf(p, pair);
    float const scale = plantedFault() == kFAULT_UNSCALED_FP8_INPUT ? 1.F : p.upInputScale[e];
    for (int32_t c = lane * 4; c < p.hidden; c += 32 * 4)
    {
        uint32_t codes = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            uint32_t const q = quantizeE4m3(loadAny(p.x, p.actDtype, token * p.hidden + c + j), scale);
            codes |= q << (8 * j);
        }
        *reinterpret_cast<uint32_t*>(p.xQuant + row * p.hidden + c) = codes;
    }
}

// ---- prefill: grouped GEMM ------------------------------------------------------------------------------------------

//! A warp's 16 x 64 strip of a 64 x 64 output tile: 4 fp32 accumulator tiles 16 x 16. mma(a, lda, b, ldb, k) adds
//! A . B^T for A [16 x k] row-major and B [64 x k] row-major (the weights' [out, in] rows: WMMA's col_major B).
#if defined(HYBRIDTRT_CPU_EMULATION)
template <typename T, bool kTc = !std::is_same<T, float>::value>
struct WarpStrip
{
    emulation::EmulatedMmaTile<T> acc[4];

    void zero()
    {
        for (auto& tile : acc)
        {
            tile.zero();
        }
    }
    void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        for (int j = 0; j < 4; ++j)
        {
            acc[j].template mma<false, true>(a, lda, b + j * 16 * ldb, ldb, k);
        }
    }
    void store(float* dst, int ld) const
    {
        for (int j = 0; j < 4; ++j)
        {
            acc[j].store(dst + j * 16, ld);
        }
    }
};
#else
template <typename T, bool kTc = !std::is_same<T, float>::value>
struct WarpStrip
{
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[4];

    __device__ __forceinline__ void zero()
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            nvcuda::wmma::fill_fragment(acc[j], 0.F);
        }
    }
    __device__ __forceinline__ void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        using namespace nvcuda;
        for (int kk = 0; kk < k; kk += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, b + j * 16 * ldb + kk, ldb);
                wmma::mma_sync(acc[j], fa, fb, acc[j]);
            }
        }
    }
    __device__ __forceinline__ void store(float* dst, int ld) const
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            nvcuda::wmma::store_matrix_sync(dst + j * 16, acc[j], ld, nvcuda::wmma::mem_row_major);
        }
    }
};
#endif

//! The same strip in exact fp32 on CUDA cores: lane owns row lane / 2, columns (lane % 2) * 32 .. + 32.
template <typename T>
struct WarpStrip<T, false>
{
    float acc[32];

    __device__ __forceinline__ void zero()
    {
#pragma unroll
        for (int j = 0; j < 32; ++j)
        {
            acc[j] = 0.F;
        }
    }
    __device__ __forceinline__ void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        int const lane = threadIdx.x % 32;
        T const* aRow = a + (lane / 2) * lda;
        T const* bCols = b + (lane % 2) * 32 * ldb;
        for (int kk = 0; kk < k; ++kk)
        {
            float const av = aRow[kk];
#pragma unroll
            for (int j = 0; j < 32; ++j)
            {
                acc[j] = fmaf(av, bCols[j * ldb + kk], acc[j]);
            }
        }
    }
    __device__ __forceinline__ void store(float* dst, int ld) const
    {
        int const lane = threadIdx.x % 32;
        float* row = dst + (lane / 2) * ld + (lane % 2) * 32;
#pragma unroll
        for (int j = 0; j < 32; ++j)
        {
            row[j] = acc[j];
        }
    }
};

//! Shared-memory plan of moeGemmKernel (bytes): tokens of the tile's rows, A [64 x depth], B [64 x depth] (rows padded
//! by 16 bytes against bank conflicts), and the fp32 output tile over A and B after the last step.
template <typename TOp>
struct GemmLayout
{
    static constexpr int kDepth = sizeof(TOp) == 4 ? 32 : 64; //!< K per stage
    static constexpr int kLd = kDepth + 16 / static_cast<int>(sizeof(TOp));
    static constexpr int kLdOut = kTileCols + 4;
    static constexpr size_t kOffA = 256; //!< after int32 tokens[kTileRows]
    static constexpr size_t kOffB = kOffA + size_t(kTileRows) * kLd * sizeof(TOp);
    static constexpr size_t kOperandEnd = kOffB + size_t(kTileCols) * kLd * sizeof(TOp);
    static constexpr size_t kOutEnd = kOffA + size_t(kTileRows) * kLdOut * 4;
    static constexpr size_t kBytes = kOperandEnd > kOutEnd ? kOperandEnd : kOutEnd;
    static_assert(kBytes <= 48 * 1024, "the GEMM tiles must fit the default shared memory (no opt-in: capturable)");
    static_assert(kTileRows == kWarps * 16 && kTileCols == 64, "a warp owns a 16 x 64 strip");
};

//! Grouped GEMM, one 64-row work item of one expert x 64 output channels per block: kUp H = relu(A.up_e^T)^2 (the
//! op's epilogue), else OUT = H.down_e^T. Blocks past the work items of this call return at once.
template <typename Experts, bool kUp>
__global__ void __launch_bounds__(kThreads, kGemmMinBlocks) moeGemmKernel(MoeParams const p)
{
    using TOp = typename Experts::Op;
    using L = GemmLayout<TOp>;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sToken = reinterpret_cast<int32_t*>(smem);
    auto* sA = reinterpret_cast<TOp*>(smem + L::kOffA);
    auto* sB = reinterpret_cast<TOp*>(smem + L::kOffB);
    auto* sOut = reinterpret_cast<float*>(smem + L::kOffA); // after the last step

    int32_t const item = blockIdx.x;
    if (item >= p.header[kHEADER_WORK])
    {
        return;
    }
    int32_t const e = p.workExpert[item];
    int32_t const row0 = p.workRow[item];
    int32_t const rows = min(kTileRows, p.expertOffsets[e + 1] - row0);
    int32_t const nOut = kUp ? p.inter : p.hidden;
    int32_t const depth = kUp ? p.hidden : p.inter;
    int32_t const n0 = blockIdx.y * kTileCols;
    int32_t const cols = min(kTileCols, nOut - n0);
    int const warp = threadIdx.x / 32;

    for (int r = threadIdx.x; r < kTileRows; r += kThreads) // the token of each row (x rows of the up GEMM)
    {
        sToken[r] = r < rows ? p.rowPair[row0 + r] / p.topK : 0;
    }
    __syncthreads();
    auto const aRow = [&](int r) { return operandRow<Experts, kUp>(p, row0 + r, sToken[r]); };
    auto const* w = expertWeights<Experts, kUp>(p, e, n0);
    auto const bRow = [&](int r) { return w + int64_t(r) * depth; };

    WarpStrip<TOp> acc;
    acc.zero();
    for (int32_t k0 = 0; k0 < depth; k0 += L::kDepth)
    {
        int32_t const chunk = min(L::kDepth, depth - k0); // a multiple of 16
        stageRows<TOp, typename Experts::H, true>(sA, L::kLd, kTileRows, rows, L::kDepth, k0, depth, aRow);
        stageRows<TOp, typename Experts::Weight, true>(sB, L::kLd, kTileCols, cols, L::kDepth, k0, depth, bRow);
        __syncthreads();
        acc.mma(sA + warp * 16 * L::kLd, L::kLd, sB, L::kLd, chunk);
        __syncthreads(); // sA / sB are rewritten next (or become the output tile)
    }
    acc.store(sOut + warp * 16 * L::kLdOut, L::kLdOut);
    __syncthreads();
    for (int i = threadIdx.x; i < kTileRows * kTileCols; i += kThreads)
    {
        int const r = i / kTileCols;
        int const c = i % kTileCols;
        if (r < rows && c < cols)
        {
            storeResult<Experts, kUp>(p, e, row0 + r, n0 + c, sOut[r * L::kLdOut + c]);
        }
    }
}

// ---- decode: GEMV-like --------------------------------------------------------------------------------------------

//! Shared-memory plan of moeDecodeKernel (bytes): tokens of the pass's rows, fp32 weights [32 x 128] (pitch 129: lane
//! n reads row n conflict-free), fp32 inputs [16 x 128] (read as broadcasts).
struct DecodeLayout
{
    static constexpr int kLdW = kDecodeDepth + 1;
    static constexpr size_t kOffW = 256;
    static constexpr size_t kOffX = kOffW + size_t(kDecodeCols) * kLdW * 4;
    static constexpr size_t kBytes = kOffX + size_t(kDecodeRows) * kDecodeDepth * 4;
    static_assert(kBytes <= 48 * 1024, "the decode tiles must fit the default shared memory (no opt-in: capturable)");
};

//! Block (x, y): output channels [32 x, 32 x + 32) of the y-th chosen expert, for all of its rows, 16 at a time.
//! Thread (c = tid % 32, g = tid / 32) accumulates rows 4 g .. 4 g + 3 of channel c in fp32.
template <typename Experts, bool kUp>
__global__ void __launch_bounds__(kThreads, kDecodeMinBlocks) moeDecodeKernel(MoeParams const p)
{
    using L = DecodeLayout;
    HYBRIDTRT_DYNAMIC_SHARED_MEMORY(smem);
    auto* sToken = reinterpret_cast<int32_t*>(smem);
    auto* sW = reinterpret_cast<float*>(smem + L::kOffW);
    auto* sX = reinterpret_cast<float*>(smem + L::kOffX);

    int32_t const slot = blockIdx.y;
    if (slot >= p.header[kHEADER_ACTIVE])
    {
        return;
    }
    int32_t const e = p.activeExperts[slot];
    int32_t const first = p.expertOffsets[e];
    int32_t const count = p.expertOffsets[e + 1] - first;
    int32_t const nOut = kUp ? p.inter : p.hidden;
    int32_t const depth = kUp ? p.hidden : p.inter;
    int32_t const n0 = blockIdx.x * kDecodeCols;
    int32_t const cols = min(kDecodeCols, nOut - n0);
    int const c = threadIdx.x % kDecodeCols;
    int const m0 = (threadIdx.x / kDecodeCols) * kDecodeRowsPerThread;
    auto const* w = expertWeights<Experts, kUp>(p, e, n0);
    auto const wRow = [&](int r) { return w + int64_t(r) * depth; };

    for (int32_t pass = 0; pass < count; pass += kDecodeRows)
    {
        int32_t const rows = min(kDecodeRows, count - pass);
        for (int r = threadIdx.x; r < kDecodeRows; r += kThreads)
        {
            sToken[r] = r < rows ? p.rowPair[first + pass + r] / p.topK : 0;
        }
        __syncthreads();
        auto const xRow = [&](int r) { return operandRow<Experts, kUp>(p, first + pass + r, sToken[r]); };
        float acc[kDecodeRowsPerThread] = {};
        for (int32_t k0 = 0; k0 < depth; k0 += kDecodeDepth)
        {
            int32_t const chunk = min(kDecodeDepth, depth - k0);
            stageRows<float, typename Experts::Weight, false>(sW, L::kLdW, kDecodeCols, cols, kDecodeDepth, k0, depth, wRow);
            stageRows<float, typename Experts::H, false>(sX, kDecodeDepth, kDecodeRows, rows, kDecodeDepth, k0, depth, xRow);
            __syncthreads();
            for (int k = 0; k < chunk; ++k)
            {
                float const wv = sW[c * L::kLdW + k];
#pragma unroll
                for (int q = 0; q < kDecodeRowsPerThread; ++q)
                {
                    acc[q] = fmaf(wv, sX[(m0 + q) * kDecodeDepth + k], acc[q]);
                }
            }
            __syncthreads(); // the tiles (and sToken) are rewritten next
        }
#pragma unroll
        for (int q = 0; q < kDecodeRowsPerThread; ++q)
        {
            if (m0 + q < rows && c < cols)
            {
                storeResult<Experts, kUp>(p, e, first + pass + m0 + q, n0 + c, acc[q]);
            }
        }
    }
}

// ---- the weighted sum ---------------------------------------------------------------------------------------------

//! y[t] = sum over k ascending of w[t,k] * OUT[row of (t, k)], fp32, each product rounded then added (as
//! moe_experts_ref's acc + w * out), rounded once to x's dtype. A warp per token, 4 channels per lane step.
template <typename TOut>
__global__ void __launch_bounds__(kThreads) moeCombineKernel(MoeParams const p)
{
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int64_t const t = int64_t(blockIdx.x) * kCombineTokens + warp;
    if (t >= p.numTokens)
    {
        return;
    }
    bool const swapK = plantedFault() == kFAULT_SWAP_K;
    auto const* out = static_cast<TOut const*>(p.out);
    for (int32_t c = lane * 4; c < p.hidden; c += 32 * 4)
    {
        float acc[4] = {0.F, 0.F, 0.F, 0.F};
        for (int32_t k = 0; k < p.topK; ++k)
        {
            int64_t const pair = t * p.topK + k;
            int32_t const row = p.pairRow[swapK ? t * p.topK + (k + 1) % p.topK : pair];
            if (row < 0)
            {
                continue; // skipped pair
            }
            float const weight = p.topkWeights[pair];
            float v[4];
            loadQuad(out + int64_t(row) * p.hidden + c, v);
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                acc[j] = __fadd_rn(acc[j], __fmul_rn(weight, v[j]));
            }
        }
        int64_t const at = t * p.hidden + c;
        switch (p.actDtype)
        {
        case kHYBRIDTRT_FLOAT16: storeQuad(static_cast<__half*>(p.y) + at, acc); break;
        case kHYBRIDTRT_BFLOAT16: storeQuad(static_cast<__nv_bfloat16*>(p.y) + at, acc); break;
        default: storeQuad(static_cast<float*>(p.y) + at, acc); break;
        }
    }
}

// ---- host side ----------------------------------------------------------------------------------------------------

//! Work items of the prefill GEMMs for P pairs: sum over experts of ceil(n_e / 64) <= ceil(P / 64) + min(E, P).
inline int64_t maxWorkItems(int64_t pairs, int64_t experts)
{
    return (pairs + kTileRows - 1) / kTileRows + std::min(experts, pairs);
}

//! Argument checks shared by the size queries and the launchers.
inline int32_t checkMoe(int64_t tokens, int64_t topK, int64_t experts, int64_t hidden, int64_t inter, int32_t actDtype,
    int32_t weightDtype)
{
    auto const width = [](int64_t v) { return v >= 16 && v % 16 == 0 && v <= HYBRIDTRT_MOE_MAX_WIDTH; };
    if (tokens < 0 || topK < 1 || experts < 1 || experts > HYBRIDTRT_MOE_MAX_EXPERTS || !width(hidden)
        || !width(inter) || tokens > INT32_MAX / topK)
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    if (!isDtype(actDtype) || (weightDtype != actDtype && weightDtype != kHYBRIDTRT_FLOAT8_E4M3))
    {
        return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
    return kHYBRIDTRT_SUCCESS;
}

//! Byte offsets of the workspace sections (hybridtrt/moeKernels.h) for `tokens`; false when a size does not fit.
inline bool moeLayout(int64_t tokens, int64_t topK, int64_t experts, int64_t hidden, int64_t inter, int32_t actDtype,
    int32_t weightDtype, size_t (&offsets)[kHYBRIDTRT_MOE_WS_SECTIONS + 1])
{
    bool const fp8 = weightDtype == kHYBRIDTRT_FLOAT8_E4M3;
    int64_t const pairs = tokens * topK;
    int64_t const tiles = (pairs + kRouteTile - 1) / kRouteTile;
    int64_t const act = static_cast<int64_t>(dtypeSize(actDtype));
    int64_t const sizes[kHYBRIDTRT_MOE_WS_SECTIONS][4] = {
        {kHEADER_FIELDS, 4, 1, 1},                    // HEADER
        {experts + 1, tiles, 4, 1},                   // TILE_COUNTS
        {experts + 1, 4, 1, 1},                       // EXPERT_OFFSETS
        {maxWorkItems(pairs, experts), 4, 1, 1},      // WORK_EXPERT
        {maxWorkItems(pairs, experts), 4, 1, 1},      // WORK_ROW
        {std::min(experts, pairs), 4, 1, 1},          // ACTIVE_EXPERTS
        {pairs, 4, 1, 1},                             // ROW_PAIR
        {pairs, 4, 1, 1},                             // PAIR_ROW
        {fp8 ? pairs : 0, hidden, 1, 1},              // X_QUANT
        {pairs, inter, fp8 ? 1 : act, 1},             // H
        {pairs, hidden, fp8 ? 4 : act, 1},            // OUT
    };
    size_t at = 0;
    for (int s = 0; s < kHYBRIDTRT_MOE_WS_SECTIONS; ++s)
    {
        size_t bytes = 0;
        if (!checkedProduct({sizes[s][0], sizes[s][1], sizes[s][2], sizes[s][3]}, bytes) || at > (SIZE_MAX >> 2) - bytes)
        {
            return false;
        }
        offsets[s] = at;
        at = alignUp(at + bytes, 256);
    }
    offsets[kHYBRIDTRT_MOE_WS_SECTIONS] = at;
    return true;
}

//! The AUTO rule: decode while on average an expert has at most one 16-row pass.
inline int32_t autoTactic(int64_t tokens, int64_t topK, int64_t experts)
{
    return tokens * topK <= int64_t(kDecodeRows) * experts ? kHYBRIDTRT_MOE_TACTIC_DECODE : kHYBRIDTRT_MOE_TACTIC_PREFILL;
}

template <typename Experts>
void launchGemms(MoeParams const& p, bool decode, int64_t maxWork, cudaStream_t stream)
{
    auto const tiles = [](int32_t n, int32_t per) { return static_cast<uint32_t>((n + per - 1) / per); };
    if (decode)
    {
        auto const slots = static_cast<uint32_t>(std::min<int64_t>(p.numExperts, p.numPairs));
        launchKernel(moeDecodeKernel<Experts, true>, dim3(tiles(p.inter, kDecodeCols), slots), dim3(kThreads),
            DecodeLayout::kBytes, stream, p);
        launchKernel(moeDecodeKernel<Experts, false>, dim3(tiles(p.hidden, kDecodeCols), slots), dim3(kThreads),
            DecodeLayout::kBytes, stream, p);
    }
    else
    {
        size_t const bytes = GemmLayout<typename Experts::Op>::kBytes;
        auto const items = static_cast<uint32_t>(maxWork);
        launchKernel(moeGemmKernel<Experts, true>, dim3(items, tiles(p.inter, kTileCols)), dim3(kThreads), bytes,
            stream, p);
        launchKernel(moeGemmKernel<Experts, false>, dim3(items, tiles(p.hidden, kTileCols)), dim3(kThreads), bytes,
            stream, p);
    }
}

//! Validates everything on the host, then enqueues the routing, (the x quantization,) the two GEMMs and the sum.
int32_t launchMoe(MoeParams p, int32_t weightDtype, int32_t tactic, void* workspace, size_t workspaceBytes,
    void* streamHandle, int64_t tokens, int64_t topK, int64_t experts, int64_t hidden, int64_t inter)
{
    int32_t const status = checkMoe(tokens, topK, experts, hidden, inter, p.actDtype, weightDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    if (p.indexDtype != kHYBRIDTRT_INT64 && p.indexDtype != kHYBRIDTRT_INT32)
    {
        return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
    if (tactic != kHYBRIDTRT_MOE_TACTIC_AUTO && tactic != kHYBRIDTRT_MOE_TACTIC_PREFILL
        && tactic != kHYBRIDTRT_MOE_TACTIC_DECODE)
    {
        return kHYBRIDTRT_INVALID_TACTIC;
    }
    bool const fp8 = weightDtype == kHYBRIDTRT_FLOAT8_E4M3;
    if (p.x == nullptr || p.topkIndices == nullptr || p.topkWeights == nullptr || p.upProj == nullptr
        || p.downProj == nullptr || p.y == nullptr || workspace == nullptr
        || (fp8
            && (p.upWeightScale == nullptr || p.upInputScale == nullptr || p.downWeightScale == nullptr
                || p.downInputScale == nullptr)))
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    if (!isAligned16(p.x) || !isAligned16(p.upProj) || !isAligned16(p.downProj) || !isAligned16(p.y)
        || (reinterpret_cast<uintptr_t>(workspace) & 255U) != 0)
    {
        return kHYBRIDTRT_MISALIGNED_POINTER;
    }
    size_t offsets[kHYBRIDTRT_MOE_WS_SECTIONS + 1];
    if (!moeLayout(tokens, topK, experts, hidden, inter, p.actDtype, weightDtype, offsets))
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    if (workspaceBytes < offsets[kHYBRIDTRT_MOE_WS_SECTIONS])
    {
        return kHYBRIDTRT_WORKSPACE_TOO_SMALL;
    }
    if (tokens == 0)
    {
        return kHYBRIDTRT_SUCCESS; // y [0, D]: nothing to write
    }
    auto* base = static_cast<unsigned char*>(workspace);
    auto const section = [&](int s) { return base + offsets[s]; };
    p.header = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_HEADER));
    p.tileCounts = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_TILE_COUNTS));
    p.expertOffsets = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_EXPERT_OFFSETS));
    p.workExpert = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_WORK_EXPERT));
    p.workRow = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_WORK_ROW));
    p.activeExperts = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_ACTIVE_EXPERTS));
    p.rowPair = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_ROW_PAIR));
    p.pairRow = reinterpret_cast<int32_t*>(section(kHYBRIDTRT_MOE_WS_PAIR_ROW));
    p.xQuant = section(kHYBRIDTRT_MOE_WS_X_QUANT);
    p.h = section(kHYBRIDTRT_MOE_WS_H);
    p.out = section(kHYBRIDTRT_MOE_WS_OUT);
    int64_t const pairs = tokens * topK;
    p.numPairs = static_cast<int32_t>(pairs);
    p.numTokens = static_cast<int32_t>(tokens);
    p.topK = static_cast<int32_t>(topK);
    p.numExperts = static_cast<int32_t>(experts);
    p.hidden = static_cast<int32_t>(hidden);
    p.inter = static_cast<int32_t>(inter);
    p.numTiles = static_cast<int32_t>((pairs + kRouteTile - 1) / kRouteTile);
    bool const decode = (tactic == kHYBRIDTRT_MOE_TACTIC_AUTO ? autoTactic(tokens, topK, experts) : tactic)
        == kHYBRIDTRT_MOE_TACTIC_DECODE;

    auto const stream = static_cast<cudaStream_t>(streamHandle);
    auto const routeTiles = static_cast<uint32_t>(p.numTiles);
    launchKernel(moeRouteCountKernel, dim3(routeTiles), dim3(kThreads), size_t(experts + 1) * 4, stream, p);
    launchKernel(moeRouteScanKernel, dim3(1), dim3(kThreads), size_t(3 * kThreads) * 4, stream, p);
    launchKernel(moeRoutePermuteKernel, dim3(routeTiles), dim3(kThreads), size_t(kRouteTile) * 4, stream, p);
    int64_t const maxWork = maxWorkItems(pairs, experts);
    if (fp8)
    {
        launchKernel(moeQuantizeInputKernel, dim3(static_cast<uint32_t>((pairs + kWarps - 1) / kWarps)), dim3(kThreads),
            0, stream, p);
        launchGemms<Fp8Experts>(p, decode, maxWork, stream);
    }
    else
    {
        switch (p.actDtype)
        {
        case kHYBRIDTRT_FLOAT16: launchGemms<ActExperts<__half>>(p, decode, maxWork, stream); break;
        case kHYBRIDTRT_BFLOAT16: launchGemms<ActExperts<__nv_bfloat16>>(p, decode, maxWork, stream); break;
        default: launchGemms<ActExperts<float>>(p, decode, maxWork, stream); break;
        }
    }
    dim3 const combineGrid(static_cast<uint32_t>((tokens + kCombineTokens - 1) / kCombineTokens));
    if (fp8 || p.actDtype == kHYBRIDTRT_FLOAT32)
    {
        launchKernel(moeCombineKernel<float>, combineGrid, dim3(kThreads), 0, stream, p);
    }
    else if (p.actDtype == kHYBRIDTRT_FLOAT16)
    {
        launchKernel(moeCombineKernel<__half>, combineGrid, dim3(kThreads), 0, stream, p);
    }
    else
    {
        launchKernel(moeCombineKernel<__nv_bfloat16>, combineGrid, dim3(kThreads), 0, stream, p);
    }
    return launchStatus();
}

} // namespace
} // namespace kernels
} // namespace hybridtrt

using namespace hybridtrt::kernels;

extern "C" int32_t hybridtrtMoeExpertsTactic(int64_t numTokens, int64_t topK, int64_t numExperts)
{
    if (numTokens < 0 || topK < 1 || numExperts < 1)
    {
        return -1;
    }
    return autoTactic(numTokens, topK, numExperts);
}

extern "C" int32_t hybridtrtMoeExpertsWorkspaceLayout(int64_t numTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t weightDtype, size_t* offsets)
{
    if (offsets == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    int32_t const status = checkMoe(numTokens, topK, numExperts, hidden, inter, actDtype, weightDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    size_t layout[kHYBRIDTRT_MOE_WS_SECTIONS + 1];
    if (!moeLayout(numTokens, topK, numExperts, hidden, inter, actDtype, weightDtype, layout))
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    std::copy(layout, layout + kHYBRIDTRT_MOE_WS_SECTIONS + 1, offsets);
    return kHYBRIDTRT_SUCCESS;
}

extern "C" int32_t hybridtrtMoeExpertsWorkspaceSize(int64_t maxTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t weightDtype, size_t* workspaceBytes)
{
    if (workspaceBytes == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    *workspaceBytes = 0;
    size_t layout[kHYBRIDTRT_MOE_WS_SECTIONS + 1];
    int32_t const status
        = hybridtrtMoeExpertsWorkspaceLayout(maxTokens, topK, numExperts, hidden, inter, actDtype, weightDtype, layout);
    if (status == kHYBRIDTRT_SUCCESS)
    {
        *workspaceBytes = layout[kHYBRIDTRT_MOE_WS_SECTIONS];
    }
    return status;
}

extern "C" int32_t hybridtrtMoeExperts(void const* x, void const* topkIndices, float const* topkWeights,
    void const* upProj, void const* downProj, void* y, int64_t numTokens, int64_t topK, int64_t numExperts,
    int64_t hidden, int64_t inter, int32_t actDtype, int32_t indexDtype, int32_t tactic, void* workspace,
    size_t workspaceBytes, void* stream)
{
    MoeParams p{};
    p.x = x;
    p.topkIndices = topkIndices;
    p.topkWeights = topkWeights;
    p.upProj = upProj;
    p.downProj = downProj;
    p.y = y;
    p.actDtype = actDtype;
    p.indexDtype = indexDtype;
    return launchMoe(p, actDtype, tactic, workspace, workspaceBytes, stream, numTokens, topK, numExperts, hidden, inter);
}

extern "C" int32_t hybridtrtMoeExpertsFp8(void const* x, void const* topkIndices, float const* topkWeights,
    void const* upProj, float const* upWeightScale, float const* upInputScale, void const* downProj,
    float const* downWeightScale, float const* downInputScale, void* y, int64_t numTokens, int64_t topK,
    int64_t numExperts, int64_t hidden, int64_t inter, int64_t upWeightScaleCols, int64_t downWeightScaleCols,
    int32_t actDtype, int32_t indexDtype, int32_t tactic, void* workspace, size_t workspaceBytes, void* stream)
{
    if ((upWeightScaleCols != 1 && upWeightScaleCols != inter) || (downWeightScaleCols != 1 && downWeightScaleCols != hidden))
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    MoeParams p{};
    p.x = x;
    p.topkIndices = topkIndices;
    p.topkWeights = topkWeights;
    p.upProj = upProj;
    p.downProj = downProj;
    p.upWeightScale = upWeightScale;
    p.upInputScale = upInputScale;
    p.downWeightScale = downWeightScale;
    p.downInputScale = downInputScale;
    p.y = y;
    p.actDtype = actDtype;
    p.indexDtype = indexDtype;
    p.upScaleCols = static_cast<int32_t>(upWeightScaleCols);
    p.downScaleCols = static_cast<int32_t>(downWeightScaleCols);
    return launchMoe(p, kHYBRIDTRT_FLOAT8_E4M3, tactic, workspace, workspaceBytes, stream, numTokens, topK, numExperts,
        hidden, inter);
}
