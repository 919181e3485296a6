/*
 * CPU emulation of the CUDA subset the SSD kernels use — for tests only (HYBRIDTRT_CPU_EMULATION).
 *
 * Compiles plugins/kernels/src/*.cu with a host C++20 compiler into a library with the same C ABI that
 * runs every kernel on the CPU: one std::thread per CUDA thread, std::barrier for __syncthreads and for
 * the warp shuffles, a per-block buffer for dynamic shared memory. Tensor-core tiles are replaced by a
 * scalar tile with the same interface and the same operand precision (T operands, fp32 accumulation),
 * so everything but the WMMA intrinsics themselves, the GPU memory model and the timing is exercised:
 * grid and block decomposition, shared-memory plans and aliasing, indexing, masking, barriers.
 * tests/plugins/test_kernels_emulated.py builds it and compares it with the PyTorch references.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __global__
#define __global__
#endif

namespace hybridtrt
{
namespace emulation
{

struct Warp
{
    explicit Warp(int32_t lanes)
        : barrier(lanes)
    {
    }
    std::barrier<> barrier;
    float exchange[32]{};
};

struct Block
{
    Block(int32_t threads, size_t sharedBytes)
        : barrier(threads)
        , shared(sharedBytes + 128)
    {
        for (int32_t w = 0; w < (threads + 31) / 32; ++w)
        {
            warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
        }
    }
    std::barrier<> barrier;
    std::vector<unsigned char> shared;
    std::vector<std::unique_ptr<Warp>> warps;

    unsigned char* sharedBase()
    {
        auto address = reinterpret_cast<uintptr_t>(shared.data());
        return reinterpret_cast<unsigned char*>((address + 127) / 128 * 128);
    }
};

inline thread_local dim3 tThreadIdx;
inline thread_local dim3 tBlockIdx;
inline thread_local dim3 tBlockDim;
inline thread_local dim3 tGridDim;
inline thread_local Block* tBlock = nullptr;

inline Warp& currentWarp()
{
    return *tBlock->warps[tThreadIdx.x / 32];
}

inline float shuffle(float v, int32_t srcLane, bool keepOwn)
{
    Warp& w = currentWarp();
    int32_t const lane = static_cast<int32_t>(tThreadIdx.x % 32);
    w.exchange[lane] = v;
    w.barrier.arrive_and_wait();
    float const r = keepOwn ? v : w.exchange[srcLane];
    w.barrier.arrive_and_wait();
    return r;
}

//! Runs kernel(params) for every block of the grid, blocks in turn, on one std::thread per CUDA thread
//! (the same threads serve every block; shared memory is re-poisoned between blocks).
template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t sharedBytes, Params const& params)
{
    int32_t const threads = static_cast<int32_t>(block.x * block.y * block.z);
    Block ctx(threads, sharedBytes);
    std::memset(ctx.shared.data(), 0xFF, ctx.shared.size()); // poison: NaN bit patterns
    std::barrier<> blockDone(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int32_t t = 0; t < threads; ++t)
    {
        pool.emplace_back([&, t] {
            tThreadIdx = dim3(static_cast<uint32_t>(t), 0, 0);
            tBlockDim = block;
            tGridDim = grid;
            tBlock = &ctx;
            for (uint32_t z = 0; z < grid.z; ++z)
            {
                for (uint32_t y = 0; y < grid.y; ++y)
                {
                    for (uint32_t x = 0; x < grid.x; ++x)
                    {
                        tBlockIdx = dim3(x, y, z);
                        kernel(params);
                        blockDone.arrive_and_wait();
                        if (t == 0)
                        {
                            std::memset(ctx.shared.data(), 0xFF, ctx.shared.size());
                        }
                        blockDone.arrive_and_wait();
                    }
                }
            }
        });
    }
    for (std::thread& th : pool)
    {
        th.join();
    }
}

//! Scalar stand-in for the WMMA m16n16k16 tile: every lane computes the whole 16x16 fp32 tile from the
//! same shared operands (reading T, accumulating fp32 like the tensor cores); lane 0 stores it.
template <typename T>
struct EmulatedMmaTile
{
    float acc[16][16];

    void zero()
    {
        std::memset(acc, 0, sizeof(acc));
    }

    template <bool kAColMajor, bool kBColMajor>
    void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        for (int r = 0; r < 16; ++r)
        {
            for (int c = 0; c < 16; ++c)
            {
                float sum = acc[r][c];
                for (int kk = 0; kk < k; ++kk)
                {
                    float const av = static_cast<float>(kAColMajor ? a[kk * lda + r] : a[r * lda + kk]);
                    float const bv = static_cast<float>(kBColMajor ? b[c * ldb + kk] : b[kk * ldb + c]);
                    sum = std::fma(av, bv, sum);
                }
                acc[r][c] = sum;
            }
        }
    }

    void store(float* dst, int ld) const
    {
        if (tThreadIdx.x % 32 == 0)
        {
            for (int r = 0; r < 16; ++r)
            {
                for (int c = 0; c < 16; ++c)
                {
                    dst[r * ld + c] = acc[r][c];
                }
            }
        }
    }
};

} // namespace emulation
} // namespace hybridtrt

#define threadIdx ::hybridtrt::emulation::tThreadIdx
#define blockIdx ::hybridtrt::emulation::tBlockIdx
#define blockDim ::hybridtrt::emulation::tBlockDim
#define gridDim ::hybridtrt::emulation::tGridDim

inline void __syncthreads()
{
    ::hybridtrt::emulation::tBlock->barrier.arrive_and_wait();
}

inline float __shfl_xor_sync(unsigned, float v, int laneMask)
{
    int const lane = static_cast<int>(threadIdx.x % 32);
    return ::hybridtrt::emulation::shuffle(v, lane ^ laneMask, false);
}

inline float __shfl_up_sync(unsigned, float v, unsigned delta)
{
    int const lane = static_cast<int>(threadIdx.x % 32);
    int const src = lane - static_cast<int>(delta);
    return ::hybridtrt::emulation::shuffle(v, src < 0 ? lane : src, src < 0);
}

template <typename V>
inline V __ldcs(V const* p)
{
    return *p;
}
template <typename V>
inline V __ldcg(V const* p)
{
    return *p;
}
template <typename V>
inline void __stcs(V* p, V v)
{
    *p = v;
}
template <typename V>
inline void __stcg(V* p, V v)
{
    *p = v;
}

using std::max;
using std::min;
