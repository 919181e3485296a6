/*
 * CPU emulation of the CUDA subset the SSD kernels use — for tests only (HYBRIDTRT_CPU_EMULATION).
 *
 * Compiles plugins/kernels/src/*.cu with a host C++20 compiler into a library with the same C ABI that
 * runs every kernel on the CPU: one std::thread per CUDA thread, std::barrier for __syncthreads and for
 * the warp shuffles, a per-block buffer for dynamic shared memory. Tensor-core tiles are replaced by a
 * scalar tile with the same interface and the same operand precision (T operands, fp32 accumulation),
 * so everything but the WMMA intrinsics themselves, the GPU memory model and the timing is exercised:
 * grid and block decomposition, shared-memory plans and aliasing, indexing, masking, barriers.
 *
 * Every launch is validated as the GPU would (before anything runs): grid.x <= 2^31 - 1, grid.y/z <= 65535,
 * <= 1024 threads per block, and dynamic shared memory <= 48 KiB unless the kernel was opted in
 * (cudaFuncSetAttribute, emulated) to at most the target architecture's limit (sm_89 by default: 99 KiB). A
 * refused launch runs nothing and makes launchStatus() report a CUDA error, like cudaGetLastError. Attribute
 * calls made while a stream is "being captured" (a test hook) are recorded as violations. Test hooks
 * (emulationHooks.cpp, C ABI): target architecture, validate-only mode (launches are checked and logged, not
 * run: huge shapes), capture flag, current device, launch log, block filters (a launch of the full grid runs
 * only a box of its blocks: real-scale shapes on virtual memory, e.g. 65,536 tokens at Nemotron-H 47B widths)
 * and planted faults that the tests must catch (32-bit global offsets, fp16 chunk start states, MoE faults).
 * Besides the SSD kernels' needs it has int atomicAdd (the MoE routing histogram) and __fmul_rn / __fadd_rn.
 * tests/plugins/test_kernels_emulated.py builds it and compares it with the PyTorch references.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
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

// ---- launch validation (what the GPU would refuse) -------------------------------------------------------

//! Default dynamic shared memory limit without an opt-in.
constexpr size_t kDEFAULT_DYNAMIC_SHARED = 48 * 1024;

//! Largest dynamic shared memory a block may opt in to, by compute capability (CUDA programming guide).
inline size_t maxDynamicSharedOptIn(int32_t sm)
{
    switch (sm)
    {
    case 75: return 64 * 1024;
    case 80: return 163 * 1024;
    case 86:
    case 87:
    case 89:
    case 120: return 99 * 1024;
    case 90:
    case 100: return 227 * 1024;
    default: return 48 * 1024;
    }
}

//! The blocks of one launch that run: [x0, x1) x [y0, y1) x [z0, z1), clipped to the grid (a test hook).
struct BlockFilter
{
    int64_t x0, x1, y0, y1, z0, z1;
};

//! Deliberate faults the tests plant to show that they catch them (a test of the test); all off by default.
struct Plants
{
    //! Every global element offset that goes through kernels::globalOffset wraps to a signed 32-bit value, as
    //! the same product computed in int32 would (what mamba_ssm's Triton SSD did: state-spaces/mamba#1015).
    bool int32Offsets{false};
    //! The fp16 scan's chunk start states are rounded to fp16 before they are stored (the storage of C ABI 3).
    bool halfStartStates{false};
    //! One fault of the MoE expert kernels (moeExperts.cu, MoeFault): 0 none, 1 the weighted sum pairs w[t,k] with
    //! the output of pair (t, k+1 mod K), 2 the routing drops pair 0, 3 the FP8 up input is quantized without its
    //! scale, 4 the up GEMM reads the weights of expert e+1 mod E instead of e.
    int32_t moeFault{0};
};

//! One validated launch (the log the tests read).
struct LaunchRecord
{
    dim3 grid;
    dim3 block;
    size_t sharedBytes;
    bool ok;
};

struct State
{
    int32_t sm{89};
    bool validateOnly{false};
    bool capturing{false};
    int32_t device{0};
    //! (device, kernel) -> opted-in dynamic shared memory (cudaFuncSetAttribute).
    std::map<std::pair<int32_t, void const*>, size_t> optIn;
    std::vector<LaunchRecord> launches;
    //! filters[i] selects the blocks launch i runs (launches past the end run every block).
    std::vector<BlockFilter> filters;
    Plants plants;
    int64_t violations{0};
    bool pendingError{false};
    std::string lastError;
};

inline State& state()
{
    static State s;
    return s;
}

inline void fail(std::string const& what)
{
    State& s = state();
    ++s.violations;
    s.pendingError = true;
    s.lastError = what;
}

inline bool takeLaunchError()
{
    bool const error = state().pendingError;
    state().pendingError = false;
    return error;
}

inline int32_t currentDevice()
{
    return state().device;
}

inline bool capturing()
{
    return state().capturing;
}

//! kernels::globalOffset in the emulation: the offset itself, or its 32-bit wrap when that fault is planted.
inline int64_t plantedOffset(int64_t offset)
{
    return state().plants.int32Offsets ? static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(offset)))
                                       : offset;
}

inline bool plantHalfStartStates()
{
    return state().plants.halfStartStates;
}

inline int32_t plantedMoeFault()
{
    return state().plants.moeFault;
}

//! cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) on the current device.
inline bool setMaxDynamicSharedMemory(void const* kernel, size_t bytes)
{
    State& s = state();
    if (s.capturing)
    {
        fail("cudaFuncSetAttribute called while the stream is being captured");
    }
    if (bytes > maxDynamicSharedOptIn(s.sm))
    {
        return false; // cudaErrorInvalidValue
    }
    s.optIn[{s.device, kernel}] = bytes;
    return true;
}

//! The launch checks of the CUDA runtime; returns an empty string when the launch is valid.
inline std::string checkLaunch(void const* kernel, dim3 grid, dim3 block, size_t sharedBytes)
{
    State const& s = state();
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647U || grid.y > 65535U || grid.z > 65535U)
    {
        return "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z)
            + ") exceeds the CUDA limits (x <= 2^31 - 1, y and z <= 65535)";
    }
    if (block.x * block.y * block.z > 1024U || block.x > 1024U || block.y > 1024U || block.z > 64U)
    {
        return "block of " + std::to_string(block.x * block.y * block.z) + " threads exceeds 1024";
    }
    size_t limit = kDEFAULT_DYNAMIC_SHARED;
    auto const it = s.optIn.find({s.device, kernel});
    if (it != s.optIn.end())
    {
        limit = std::max(limit, it->second);
    }
    if (sharedBytes > limit)
    {
        return "dynamic shared memory " + std::to_string(sharedBytes) + " B > " + std::to_string(limit)
            + " B allowed for this kernel on device " + std::to_string(s.device) + " (sm_" + std::to_string(s.sm)
            + (it == s.optIn.end() ? ", no cudaFuncSetAttribute opt-in)" : ")");
    }
    return {};
}

//! Runs kernel(params) for every block of the grid (or of its block filter), blocks in turn, on one std::thread
//! per CUDA thread (the same threads serve every block; shared memory is re-poisoned between blocks). The launch
//! is validated first, with the full grid; a refused launch runs nothing (launchStatus() then reports it).
template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t sharedBytes, Params const& params)
{
    std::string const problem = checkLaunch(reinterpret_cast<void const*>(kernel), grid, block, sharedBytes);
    size_t const index = state().launches.size();
    state().launches.push_back({grid, block, sharedBytes, problem.empty()});
    if (!problem.empty())
    {
        fail(problem);
        return;
    }
    if (state().validateOnly)
    {
        return;
    }
    BlockFilter box{0, grid.x, 0, grid.y, 0, grid.z};
    if (index < state().filters.size())
    {
        BlockFilter const& f = state().filters[index];
        box = {std::max<int64_t>(f.x0, 0), std::min<int64_t>(f.x1, grid.x), std::max<int64_t>(f.y0, 0),
            std::min<int64_t>(f.y1, grid.y), std::max<int64_t>(f.z0, 0), std::min<int64_t>(f.z1, grid.z)};
    }
    if (box.x0 >= box.x1 || box.y0 >= box.y1 || box.z0 >= box.z1)
    {
        return;
    }
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
            for (int64_t z = box.z0; z < box.z1; ++z)
            {
                for (int64_t y = box.y0; y < box.y1; ++y)
                {
                    for (int64_t x = box.x0; x < box.x1; ++x)
                    {
                        tBlockIdx = dim3(static_cast<uint32_t>(x), static_cast<uint32_t>(y), static_cast<uint32_t>(z));
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

//! Stand-in for the WMMA m16n16k16 fp32 accumulator tile: the same operand precision (T operands, fp32
//! accumulation with fma) distributed over the warp like the fp32 SIMT tile (lane owns row lane / 2, columns
//! (lane % 2) * 8 .. + 8). Only layout-independent operations exist (uniform scale, load / store through
//! memory), exactly the ones the kernels apply to WMMA fragments.
template <typename T>
struct EmulatedMmaTile
{
    float acc[8];

    static int row()
    {
        return static_cast<int>(tThreadIdx.x % 32) / 2;
    }
    static int col0()
    {
        return (static_cast<int>(tThreadIdx.x % 32) % 2) * 8;
    }

    void zero()
    {
        std::fill(acc, acc + 8, 0.F);
    }

    void scale(float s)
    {
        for (float& v : acc)
        {
            v *= s;
        }
    }

    template <bool kAColMajor, bool kBColMajor>
    void mma(T const* a, int lda, T const* b, int ldb, int k)
    {
        int const r = row();
        int const c0 = col0();
        for (int kk = 0; kk < k; ++kk)
        {
            float const av = static_cast<float>(kAColMajor ? a[kk * lda + r] : a[r * lda + kk]);
            for (int j = 0; j < 8; ++j)
            {
                float const bv = static_cast<float>(kBColMajor ? b[(c0 + j) * ldb + kk] : b[kk * ldb + c0 + j]);
                acc[j] = std::fma(av, bv, acc[j]);
            }
        }
    }

    void load(float const* src, int ld)
    {
        for (int j = 0; j < 8; ++j)
        {
            acc[j] = src[row() * ld + col0() + j];
        }
    }

    void store(float* dst, int ld) const
    {
        for (int j = 0; j < 8; ++j)
        {
            dst[row() * ld + col0() + j] = acc[j];
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

//! Integer atomics (the MoE routing histogram in shared memory): the result does not depend on the order.
inline int atomicAdd(int* address, int value)
{
    return std::atomic_ref<int>(*address).fetch_add(value);
}

//! fp32 multiply / add rounded to nearest, never contracted into an fma (x86-64 without -mfma has none).
inline float __fmul_rn(float a, float b)
{
    return a * b;
}
inline float __fadd_rn(float a, float b)
{
    return a + b;
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
