/*
 * Host-only parts of the C ABI: versions and status strings.
 */
#include "hybridtrt/moeKernels.h"
#include "hybridtrt/ssdKernels.h"

extern "C" int32_t hybridtrtKernelsAbiVersion(void)
{
    return HYBRIDTRT_KERNELS_ABI_VERSION;
}

extern "C" int32_t hybridtrtMoeKernelsAbiVersion(void)
{
    return HYBRIDTRT_MOE_KERNELS_ABI_VERSION;
}

extern "C" char const* hybridtrtStatusString(int32_t status)
{
    switch (status)
    {
    case kHYBRIDTRT_SUCCESS: return "success";
    case kHYBRIDTRT_INVALID_SHAPE:
        return "invalid shape: every dimension and chunk_size must be >= 1, H a multiple of G, B*H <= 2^31-1, "
               "H <= 65535 and L <= 65535 chunks (MoE: T >= 0, K >= 1, 1 <= E <= 4096, D and I multiples of 16 "
               "up to 65536, T*K <= 2^31-1, weight-scale columns 1 or the output width)";
    case kHYBRIDTRT_UNSUPPORTED_HEAD_DIM: return "unsupported head_dim: must be a positive multiple of 16";
    case kHYBRIDTRT_UNSUPPORTED_D_STATE: return "unsupported d_state: must be 16, 64 or 128";
    case kHYBRIDTRT_UNSUPPORTED_DTYPE:
        return "unsupported dtype: must be float32, float16 or bfloat16 (MoE: weights in x's dtype or float8e4m3fn, "
               "topk_indices int64 or int32)";
    case kHYBRIDTRT_NULL_POINTER: return "a required pointer is NULL";
    case kHYBRIDTRT_MISALIGNED_POINTER:
        return "misaligned pointer: tensors need 16-byte alignment, the workspace 256-byte alignment";
    case kHYBRIDTRT_WORKSPACE_TOO_SMALL: return "workspace smaller than the ...WorkspaceSize query returned";
    case kHYBRIDTRT_CUDA_ERROR: return "CUDA kernel launch failed (see cudaGetLastError)";
    case kHYBRIDTRT_NOT_PREPARED:
        return "scan launched inside a CUDA-graph capture before hybridtrtMamba2ChunkScanPrepare ran on this device";
    case kHYBRIDTRT_INVALID_TACTIC: return "invalid MoE tactic: must be 0 (auto), 1 (prefill) or 2 (decode)";
    default: return "unknown status";
    }
}
