/*
 * Helpers shared by the hybridtrt TensorRT plugins: names, dtype mapping, plugin-field parsing, logging.
 * The plugins only validate, describe and call the C ABI of libhybridtrt_kernels.so (kernels/include).
 */
#pragma once

#include "NvInferRuntime.h"
#include "hybridtrt/ssdKernels.h"

#include <cstdint>
#include <string>
#include <type_traits>

namespace hybridtrt
{
namespace plugin
{

//! DESIGN.md §5: TensorRT plugin name = ONNX op_type, namespace "hybridtrt", version "1".
constexpr char const* kPLUGIN_NAMESPACE = "hybridtrt";
constexpr char const* kPLUGIN_VERSION = "1";

//! Sends `message` to the logger TensorRT handed to setLoggerFinder (stderr when there is none).
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

inline void logError(std::string const& message) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, message);
}

//! TensorRT dtype -> C ABI dtype; -1 when the kernels do not take it.
inline int32_t toKernelDtype(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return kHYBRIDTRT_FLOAT32;
    case nvinfer1::DataType::kHALF: return kHYBRIDTRT_FLOAT16;
    case nvinfer1::DataType::kBF16: return kHYBRIDTRT_BFLOAT16;
    default: return -1;
    }
}

inline bool isActivationType(nvinfer1::DataType type) noexcept
{
    return toKernelDtype(type) >= 0;
}

//! Reads an integer plugin field (the ONNX parser may hand INT attributes over as int32 or int64).
inline bool readIntField(nvinfer1::PluginField const& field, int64_t& value) noexcept
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case nvinfer1::PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); return true;
    default: return false;
    }
}

//! Dimension agreement: -1 (dynamic at build time) always passes.
inline bool dimIs(int64_t dim, int64_t expected) noexcept
{
    return dim < 0 || expected < 0 || dim == expected;
}

inline std::string dimsToString(nvinfer1::Dims const& dims)
{
    std::string text = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text += (i ? "," : "") + std::to_string(dims.d[i]);
    }
    return text + "]";
}

//! Input order both plugins share (DESIGN.md §5); each plugin's kIN_* constants are static_asserted equal.
enum SsdInput : int32_t
{
    kSSD_X = 0,
    kSSD_DT = 1,
    kSSD_A = 2,
    kSSD_B = 3,
    kSSD_C = 4,
    kSSD_D = 5,
    kSSD_STATE = 6,
    kSSD_NB_INPUTS = 7
};

//! Checks the I/O layout both plugins share, with the sequence axis L (Mamba2ChunkScan) or without it
//! (Mamba2StateUpdate):  x [B,(L),H,P], dt [B,(L),H], A [H], B [B,(L),G,N], C [B,(L),G,N], D [H],
//! state [B,H,P,N]; batch and L agree across x, dt, B, C (and batch with the state); P a multiple of 16,
//! N in {16, 64, 128}, H % G == 0. Dynamic (-1) dims pass at build time; onShapeChange checks them again
//! with the real shapes.
//! \return An empty string when consistent, else what is wrong with the offending shapes.
inline std::string checkSsdLayout(nvinfer1::Dims const* in, bool hasSeq)
{
    int32_t const s = hasSeq ? 1 : 0;
    nvinfer1::Dims const& x = in[kSSD_X];
    nvinfer1::Dims const& dt = in[kSSD_DT];
    nvinfer1::Dims const& a = in[kSSD_A];
    nvinfer1::Dims const& b = in[kSSD_B];
    nvinfer1::Dims const& c = in[kSSD_C];
    nvinfer1::Dims const& d = in[kSSD_D];
    nvinfer1::Dims const& state = in[kSSD_STATE];
    std::string const shapes = " (x " + dimsToString(x) + ", dt " + dimsToString(dt) + ", A " + dimsToString(a)
        + ", B " + dimsToString(b) + ", C " + dimsToString(c) + ", D " + dimsToString(d) + ", state "
        + dimsToString(state) + ")";
    if (x.nbDims != 3 + s || dt.nbDims != 2 + s || a.nbDims != 1 || b.nbDims != 3 + s || c.nbDims != 3 + s
        || d.nbDims != 1 || state.nbDims != 4)
    {
        return std::string("expected ranks x ") + (hasSeq ? "4, dt 3, A 1, B 4, C 4" : "3, dt 2, A 1, B 3, C 3")
            + ", D 1, state 4" + shapes;
    }
    int64_t const batch = x.d[0];
    int64_t const heads = x.d[1 + s];
    int64_t const headDim = x.d[2 + s];
    int64_t const groups = b.d[1 + s];
    int64_t const dState = b.d[2 + s];
    if (!dimIs(dt.d[0], batch) || !dimIs(b.d[0], batch) || !dimIs(c.d[0], batch) || !dimIs(state.d[0], batch))
    {
        return "batch differs across x, dt, B, C, state" + shapes;
    }
    if (hasSeq && (!dimIs(dt.d[1], x.d[1]) || !dimIs(b.d[1], x.d[1]) || !dimIs(c.d[1], x.d[1])))
    {
        return "sequence length L differs across x, dt, B, C" + shapes;
    }
    if (!dimIs(dt.d[1 + s], heads) || !dimIs(a.d[0], heads) || !dimIs(d.d[0], heads) || !dimIs(state.d[1], heads)
        || !dimIs(c.d[1 + s], groups) || !dimIs(c.d[2 + s], dState) || !dimIs(state.d[2], headDim)
        || !dimIs(state.d[3], dState))
    {
        return "inconsistent heads / groups / head_dim / d_state" + shapes;
    }
    if (headDim >= 0 && (headDim < 16 || headDim % 16 != 0))
    {
        return "head_dim " + std::to_string(headDim) + " is not a positive multiple of 16" + shapes;
    }
    if (dState >= 0 && dState != 16 && dState != 64 && dState != 128)
    {
        return "d_state " + std::to_string(dState) + " is not 16, 64 or 128" + shapes;
    }
    if (heads > 0 && groups > 0 && heads % groups != 0)
    {
        return "heads " + std::to_string(heads) + " is not a multiple of groups " + std::to_string(groups) + shapes;
    }
    return {};
}

//! checkSsdLayout on the build-time descriptors (configurePlugin) or the run-time ones (onShapeChange).
template <typename Desc>
std::string checkSsdLayout(Desc const* in, bool hasSeq)
{
    nvinfer1::Dims dims[kSSD_NB_INPUTS];
    for (int32_t i = 0; i < kSSD_NB_INPUTS; ++i)
    {
        if constexpr (std::is_same_v<Desc, nvinfer1::DynamicPluginTensorDesc>)
        {
            dims[i] = in[i].desc.dims;
        }
        else
        {
            dims[i] = in[i].dims;
        }
    }
    return checkSsdLayout(static_cast<nvinfer1::Dims const*>(dims), hasSeq);
}

//! Logs `problem` (when not empty) for `pluginName`; returns 0 when there is none, 1 otherwise.
inline int32_t reportLayout(char const* pluginName, std::string const& problem) noexcept
{
    if (problem.empty())
    {
        return 0;
    }
    logMessage(nvinfer1::ILogger::Severity::kERROR, std::string(pluginName) + ": " + problem);
    return 1;
}

//! Kernel status -> readable error, logged; returns the status (0 on success).
inline int32_t reportStatus(char const* pluginName, int32_t status) noexcept
{
    if (status != kHYBRIDTRT_SUCCESS)
    {
        logError(std::string(pluginName) + ": " + hybridtrtStatusString(status));
    }
    return status;
}

} // namespace plugin
} // namespace hybridtrt
