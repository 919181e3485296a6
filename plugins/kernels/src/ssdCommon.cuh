/*
 * Shared device helpers of the SSD kernels: dtype conversion, 16-byte vectors, argument checks.
 * Internal to libhybridtrt_kernels.so (not installed).
 */
#pragma once

#include "hybridtrt/ssdKernels.h"

#if defined(HYBRIDTRT_CPU_EMULATION)
#include "cudaEmulation.h" // tests only: plugins/tests/emulation
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <initializer_list>

namespace hybridtrt
{
namespace kernels
{

//! Scalar conversions to and from fp32 for the three activation / state types.
template <typename T>
__device__ __forceinline__ float toFloat(T v);
template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

//! Every element offset into a global tensor is an int64 product of int64 factors, where a 32-bit product would
//! wrap silently (state-spaces/mamba#1015): x / y [B, L, H, P] and the [B*H, chunks, P, N] chunk start states pass
//! 2^31 elements at long context and large batch (Nemotron-H 47B widths H = 256, P = 64: one 65,536-token sequence
//! has 2^31 start-state elements with its N = 256; with N = 128 offsets pass 2^31 from batch 3 on), the [B, H, P, N]
//! state at large batch. The tile base offsets of the kernels go through this identity; the CPU emulation can plant
//! a 32-bit wrap here to prove that the tests catch one (tests/plugins/test_kernels_emulated.py).
__device__ __forceinline__ int64_t globalOffset(int64_t offset)
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return emulation::plantedOffset(offset);
#else
    return offset;
#endif
}

//! Loads element `i` of a tensor whose dtype is only known at run time (dt: tiny, uniform branch).
__device__ __forceinline__ float loadAny(void const* ptr, int32_t dtype, int64_t i)
{
    switch (dtype)
    {
    case kHYBRIDTRT_FLOAT16: return __half2float(static_cast<__half const*>(ptr)[i]);
    case kHYBRIDTRT_BFLOAT16: return __bfloat162float(static_cast<__nv_bfloat16 const*>(ptr)[i]);
    default: return static_cast<float const*>(ptr)[i];
    }
}

//! Stores element `i` of a tensor whose dtype is only known at run time (the final state: once per block).
__device__ __forceinline__ void storeAny(void* ptr, int32_t dtype, int64_t i, float v)
{
    switch (dtype)
    {
    case kHYBRIDTRT_FLOAT16: static_cast<__half*>(ptr)[i] = __float2half_rn(v); break;
    case kHYBRIDTRT_BFLOAT16: static_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(ptr)[i] = v; break;
    }
}

//! kN elements of T moved as whole 16-byte words (kN * sizeof(T) is a multiple of 16).
template <typename T, int kN>
struct alignas(16) Vec
{
    static_assert((kN * sizeof(T)) % 16 == 0, "Vec must be a whole number of 16-byte words");
    T v[kN];

    __device__ __forceinline__ void load(T const* src)
    {
#pragma unroll
        for (int w = 0; w < static_cast<int>(kN * sizeof(T) / 16); ++w)
        {
            reinterpret_cast<uint4*>(v)[w] = reinterpret_cast<uint4 const*>(src)[w];
        }
    }
    //! Streaming (evict-first) variants for data touched exactly once, such as the decode state.
    __device__ __forceinline__ void loadStreaming(T const* src)
    {
#pragma unroll
        for (int w = 0; w < static_cast<int>(kN * sizeof(T) / 16); ++w)
        {
            reinterpret_cast<uint4*>(v)[w] = __ldcs(reinterpret_cast<uint4 const*>(src) + w);
        }
    }
    __device__ __forceinline__ void storeStreaming(T* dst) const
    {
#pragma unroll
        for (int w = 0; w < static_cast<int>(kN * sizeof(T) / 16); ++w)
        {
            __stcs(reinterpret_cast<uint4*>(dst) + w, reinterpret_cast<uint4 const*>(v)[w]);
        }
    }
    __device__ __forceinline__ void store(T* dst) const
    {
#pragma unroll
        for (int w = 0; w < static_cast<int>(kN * sizeof(T) / 16); ++w)
        {
            reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<uint4 const*>(v)[w];
        }
    }
};

//! Declares `name` as the block's dynamic shared memory (a macro, not a function: the compiler must see
//! the __shared__ array itself to use shared-space addressing; a returned pointer is generic).
#if defined(HYBRIDTRT_CPU_EMULATION)
#define HYBRIDTRT_DYNAMIC_SHARED_MEMORY(name) unsigned char* const name = ::hybridtrt::emulation::tBlock->sharedBase()
#else
#define HYBRIDTRT_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(128) unsigned char name[]
#endif

//! kernel<<<grid, block, sharedBytes, stream>>>(params), or its CPU emulation in the test build.
template <typename Params>
inline void launchKernel(
    void (*kernel)(Params), dim3 grid, dim3 block, size_t sharedBytes, cudaStream_t stream, Params const& params)
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    (void) stream;
    emulation::launch(kernel, grid, block, sharedBytes, params);
#else
    kernel<<<grid, block, sharedBytes, stream>>>(params);
#endif
}

//! Status of the launches just enqueued (cudaGetLastError: no synchronisation). The emulation reports the
//! launch configurations it refused (grid limits, dynamic shared memory against the target architecture).
inline int32_t launchStatus()
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return emulation::takeLaunchError() ? kHYBRIDTRT_CUDA_ERROR : kHYBRIDTRT_SUCCESS;
#else
    return cudaGetLastError() == cudaSuccess ? kHYBRIDTRT_SUCCESS : kHYBRIDTRT_CUDA_ERROR;
#endif
}

//! The current CUDA device, or -1 when there is none.
inline int32_t currentDevice()
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return emulation::currentDevice();
#else
    int device = -1;
    return cudaGetDevice(&device) == cudaSuccess ? device : -1;
#endif
}

//! True while `stream` is being captured into a CUDA graph (then no attribute call may run).
inline bool streamIsCapturing(cudaStream_t stream)
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    (void) stream;
    return emulation::capturing();
#else
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
#endif
}

//! Opts `kernel` in to `bytes` of dynamic shared memory on the current device (a host-side function attribute,
//! no stream work). Returns false on failure (e.g. more than the architecture allows).
template <typename Params>
inline bool setMaxDynamicSharedMemory(void (*kernel)(Params), size_t bytes)
{
#if defined(HYBRIDTRT_CPU_EMULATION)
    return emulation::setMaxDynamicSharedMemory(reinterpret_cast<void const*>(kernel), bytes);
#else
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes))
        == cudaSuccess;
#endif
}

inline size_t dtypeSize(int32_t dtype)
{
    return dtype == kHYBRIDTRT_FLOAT32 ? 4 : 2;
}

inline bool isDtype(int32_t dtype)
{
    return dtype == kHYBRIDTRT_FLOAT32 || dtype == kHYBRIDTRT_FLOAT16 || dtype == kHYBRIDTRT_BFLOAT16;
}

inline bool isAligned16(void const* p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15U) == 0;
}

inline size_t alignUp(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

//! `product` = the product of `factors` (all >= 0) in size_t; false when it would not fit (a size that wrapped
//! would make a too-small workspace look big enough).
inline bool checkedProduct(std::initializer_list<int64_t> factors, size_t& product)
{
    product = 1;
    for (int64_t const f : factors)
    {
        if (f < 0 || (f != 0 && product > (SIZE_MAX >> 8) / static_cast<size_t>(f)))
        {
            return false; // (SIZE_MAX >> 8: room for the caller's alignment)
        }
        product *= static_cast<size_t>(f);
    }
    return true;
}

//! Shape checks shared by both ops; returns kHYBRIDTRT_SUCCESS or the first violated rule.
inline int32_t checkShapes(int64_t batch, int64_t seqLen, int64_t numHeads, int64_t headDim, int64_t numGroups,
    int64_t dState, int32_t actDtype, int32_t dtDtype, int32_t stateDtype)
{
    // batch * heads is grid.x of every kernel (limit 2^31 - 1); nothing else depends on either alone.
    if (batch < 1 || seqLen < 1 || numHeads < 1 || numGroups < 1 || numHeads % numGroups != 0
        || numHeads > 65535 || batch > INT32_MAX / numHeads)
    {
        return kHYBRIDTRT_INVALID_SHAPE;
    }
    if (headDim < 16 || headDim % 16 != 0 || headDim > 4096)
    {
        return kHYBRIDTRT_UNSUPPORTED_HEAD_DIM;
    }
    if (dState != 16 && dState != 64 && dState != 128)
    {
        return kHYBRIDTRT_UNSUPPORTED_D_STATE;
    }
    if (!isDtype(actDtype) || !isDtype(dtDtype) || !isDtype(stateDtype))
    {
        return kHYBRIDTRT_UNSUPPORTED_DTYPE;
    }
    return kHYBRIDTRT_SUCCESS;
}

} // namespace kernels
} // namespace hybridtrt
