/*
 * Host-only parts of the C ABI: version and status strings.
 */
#include "hybridtrt/ssdKernels.h"

extern "C" int32_t hybridtrtKernelsAbiVersion(void)
{
    return HYBRIDTRT_KERNELS_ABI_VERSION;
}

extern "C" char const* hybridtrtStatusString(int32_t status)
{
    switch (status)
    {
    case kHYBRIDTRT_SUCCESS: return "success";
    case kHYBRIDTRT_INVALID_SHAPE:
        return "invalid shape: every dimension and chunk_size must be >= 1, H a multiple of G, B*H <= 2^31-1, "
               "H <= 65535 and L <= 65535 chunks";
    case kHYBRIDTRT_UNSUPPORTED_HEAD_DIM: return "unsupported head_dim: must be a positive multiple of 16";
    case kHYBRIDTRT_UNSUPPORTED_D_STATE: return "unsupported d_state: must be 16, 64 or 128";
    case kHYBRIDTRT_UNSUPPORTED_DTYPE: return "unsupported dtype: must be float32, float16 or bfloat16";
    case kHYBRIDTRT_NULL_POINTER: return "a required pointer is NULL";
    case kHYBRIDTRT_MISALIGNED_POINTER:
        return "misaligned pointer: tensors need 16-byte alignment, the workspace 256-byte alignment";
    case kHYBRIDTRT_WORKSPACE_TOO_SMALL: return "workspace smaller than the ...WorkspaceSize query returned";
    case kHYBRIDTRT_CUDA_ERROR: return "CUDA kernel launch failed (see cudaGetLastError)";
    case kHYBRIDTRT_NOT_PREPARED:
        return "scan launched inside a CUDA-graph capture before hybridtrtMamba2ChunkScanPrepare ran on this device";
    default: return "unknown status";
    }
}
