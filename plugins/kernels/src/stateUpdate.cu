/*
 * Mamba2StateUpdate: one decode token, s = exp(dt*A)*s + dt*(x outer B), y = s.C + D*x (y in fp32).
 *
 * Memory-bound: the [B,H,P,N] state is read once and written once with 16-byte streaming accesses;
 * everything else is O(B*H*(P+N)). One block per (batch, head) and tile of 16 rows p. A row of N state
 * elements is spread over kLanesPerRow lanes (one 16-byte word each), so a warp covers
 * 32 / kLanesPerRow rows per pass; every thread issues all its kRowIters loads before it computes.
 * y[p] is a shuffle reduction over the lanes of its row of the fp32 new state (before it is rounded to the
 * state dtype), written in fp32. In place is safe: each thread reads its
 * words before it writes them, and no two threads touch the same word. Offsets are int64 (globalOffset): the
 * [B, H, P, N] state passes 2^31 elements at large batch (2,048 at H = 256, P = 64, N = 128).
 */
#include "ssdCommon.cuh"

namespace hybridtrt
{
namespace kernels
{
namespace
{

struct StateUpdateParams
{
    void const* x;
    void const* dt;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* stateIn;
    float* y; //!< [B, H, P] fp32 whatever the activation dtype
    void* stateOut;
    int32_t numHeads;
    int32_t headDim;
    int32_t numGroups;
    int32_t headsPerGroup;
    int32_t dtDtype;
};

template <typename TState, int kN>
struct UpdateTiling
{
    static constexpr int kVec = 16 / static_cast<int>(sizeof(TState)); //!< state elements per 16-byte word
    static constexpr int kLanesPerRow = kN / kVec;                      //!< 2..32
    static constexpr int kRowsPerWarp = 32 / kLanesPerRow;
    static constexpr int kWarps = 4;
    //! 16-byte words in flight per thread: a block covers 16 rows whenever N >= 64, so any P (a multiple
    //! of 16) fills every block; N = 16 (tests only) covers 32 or 64 rows with one word per thread.
    static constexpr int kRowIters = kRowsPerWarp * kWarps >= 16 ? 1 : 16 / (kRowsPerWarp * kWarps);
    static constexpr int kRowsPerPass = kWarps * kRowsPerWarp;
    static constexpr int kRowsPerBlock = kRowsPerPass * kRowIters;
    static_assert(kLanesPerRow >= 1 && kLanesPerRow <= 32, "unsupported d_state / state dtype");
};

template <typename TAct, typename TState, int kN>
__global__ void __launch_bounds__(128) mamba2StateUpdateKernel(StateUpdateParams const p)
{
    using Tiling = UpdateTiling<TState, kN>;
    constexpr int kVec = Tiling::kVec;
    constexpr int kLanesPerRow = Tiling::kLanesPerRow;

    int64_t const bh = blockIdx.x;
    int32_t const h = static_cast<int32_t>(bh % p.numHeads);
    int64_t const b = bh / p.numHeads;
    int32_t const g = h / p.headsPerGroup;
    int32_t const warp = threadIdx.x / 32;
    int32_t const lane = threadIdx.x % 32;
    int32_t const laneInRow = lane % kLanesPerRow;
    int32_t const n0 = laneInRow * kVec;
    int32_t const firstRow
        = blockIdx.y * Tiling::kRowsPerBlock + warp * Tiling::kRowsPerWarp + lane / kLanesPerRow;

    auto const* stateIn = static_cast<TState const*>(p.stateIn);
    auto* stateOut = static_cast<TState*>(p.stateOut);
    auto const* x = static_cast<TAct const*>(p.x);

    // Issue the state loads first: they are the only large traffic.
    Vec<TState, kVec> s[Tiling::kRowIters];
    float xv[Tiling::kRowIters];
#pragma unroll
    for (int i = 0; i < Tiling::kRowIters; ++i)
    {
        int32_t const r = firstRow + i * Tiling::kRowsPerPass;
        if (r < p.headDim)
        {
            s[i].loadStreaming(stateIn + globalOffset((bh * p.headDim + r) * kN + n0));
            xv[i] = toFloat(x[globalOffset(bh * p.headDim + r)]);
        }
        else
        {
            xv[i] = 0.F;
        }
    }

    float const dtv = loadAny(p.dt, p.dtDtype, bh);
    float const decay = expf(dtv * p.A[h]);
    float const skip = p.D != nullptr ? p.D[h] : 0.F;
    int64_t const bcOffset = globalOffset((b * p.numGroups + g) * kN + n0);
    float bv[kVec];
    float cv[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j)
    {
        bv[j] = toFloat(static_cast<TAct const*>(p.B)[bcOffset + j]);
        cv[j] = toFloat(static_cast<TAct const*>(p.C)[bcOffset + j]);
    }

#pragma unroll
    for (int i = 0; i < Tiling::kRowIters; ++i)
    {
        int32_t const r = firstRow + i * Tiling::kRowsPerPass;
        float const xdt = xv[i] * dtv;
        float acc = 0.F;
        if (r < p.headDim)
        {
#pragma unroll
            for (int j = 0; j < kVec; ++j)
            {
                float const next = decay * toFloat(s[i].v[j]) + xdt * bv[j];
                acc += next * cv[j];
                s[i].v[j] = fromFloat<TState>(next);
            }
            s[i].storeStreaming(stateOut + globalOffset((bh * p.headDim + r) * kN + n0));
        }
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2)
        {
            acc += __shfl_xor_sync(0xffffffffU, acc, offset);
        }
        if (laneInRow == 0 && r < p.headDim)
        {
            p.y[globalOffset(bh * p.headDim + r)] = acc + skip * xv[i];
        }
    }
}

template <typename TAct, typename TState, int kN>
int32_t launchUpdate(StateUpdateParams const& p, int64_t batch, cudaStream_t stream)
{
    using Tiling = UpdateTiling<TState, kN>;
    dim3 const grid(static_cast<uint32_t>(batch * p.numHeads),
        static_cast<uint32_t>((p.headDim + Tiling::kRowsPerBlock - 1) / Tiling::kRowsPerBlock));
    launchKernel(mamba2StateUpdateKernel<TAct, TState, kN>, grid, dim3(Tiling::kWarps * 32), 0, stream, p);
    return launchStatus();
}

template <typename TAct, typename TState>
int32_t dispatchN(StateUpdateParams const& p, int64_t batch, int64_t dState, cudaStream_t stream)
{
    switch (dState)
    {
    case 16: return launchUpdate<TAct, TState, 16>(p, batch, stream);
    case 64: return launchUpdate<TAct, TState, 64>(p, batch, stream);
    case 128: return launchUpdate<TAct, TState, 128>(p, batch, stream);
    default: return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
}

template <typename TAct>
int32_t dispatchState(StateUpdateParams const& p, int64_t batch, int64_t dState, int32_t stateDtype,
    cudaStream_t stream)
{
    switch (stateDtype)
    {
    case kHYBRIDTRT_FLOAT32: return dispatchN<TAct, float>(p, batch, dState, stream);
    case kHYBRIDTRT_FLOAT16: return dispatchN<TAct, __half>(p, batch, dState, stream);
    case kHYBRIDTRT_BFLOAT16: return dispatchN<TAct, __nv_bfloat16>(p, batch, dState, stream);
    default: return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
}

} // namespace
} // namespace kernels
} // namespace hybridtrt

using namespace hybridtrt::kernels;

extern "C" int32_t hybridtrtMamba2StateUpdateWorkspaceSize(int64_t batch, int64_t numHeads, int64_t headDim,
    int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    size_t* workspaceBytes)
{
    if (workspaceBytes == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    int32_t const status
        = checkShapes(batch, 1, numHeads, headDim, numGroups, dState, actDtype, dtDtype, stateDtype);
    *workspaceBytes = 0;
    return status;
}

extern "C" int32_t hybridtrtMamba2StateUpdate(void const* x, void const* dt, float const* A, void const* B,
    void const* C, float const* D, void const* stateIn, float* y, void* stateOut, int64_t batch, int64_t numHeads,
    int64_t headDim, int64_t numGroups, int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype,
    void* stream)
{
    int32_t const status
        = checkShapes(batch, 1, numHeads, headDim, numGroups, dState, actDtype, dtDtype, stateDtype);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return status;
    }
    if (x == nullptr || dt == nullptr || A == nullptr || B == nullptr || C == nullptr || stateIn == nullptr
        || y == nullptr || stateOut == nullptr)
    {
        return kHYBRIDTRT_NULL_POINTER;
    }
    if (!isAligned16(stateIn) || !isAligned16(stateOut)) // the state moves in 16-byte words
    {
        return kHYBRIDTRT_MISALIGNED_POINTER;
    }
    StateUpdateParams p{};
    p.x = x;
    p.dt = dt;
    p.A = A;
    p.B = B;
    p.C = C;
    p.D = D;
    p.stateIn = stateIn;
    p.y = y;
    p.stateOut = stateOut;
    p.numHeads = static_cast<int32_t>(numHeads);
    p.headDim = static_cast<int32_t>(headDim);
    p.numGroups = static_cast<int32_t>(numGroups);
    p.headsPerGroup = static_cast<int32_t>(numHeads / numGroups);
    p.dtDtype = dtDtype;
    auto const s = static_cast<cudaStream_t>(stream);
    switch (actDtype)
    {
    case kHYBRIDTRT_FLOAT32: return dispatchState<float>(p, batch, dState, stateDtype, s);
    case kHYBRIDTRT_FLOAT16: return dispatchState<__half>(p, batch, dState, stateDtype, s);
    case kHYBRIDTRT_BFLOAT16: return dispatchState<__nv_bfloat16>(p, batch, dState, stateDtype, s);
    default: return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
}
