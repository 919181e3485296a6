/*
 * Helpers shared by the hybridtrt TensorRT plugins: names, dtype mapping, plugin-field parsing, logging.
 * The plugins only validate, describe and call the C ABI of libhybridtrt_kernels.so (kernels/include).
 */
#pragma once

#include "NvInferRuntime.h"
#include "hybridtrt/ssdKernels.h"

#include <cstdint>
#include <string>

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

//! Output 0 (y) of both SSD plugins: float32 whatever the activation dtype (DESIGN.md §5; C ABI version 3). The MoE
//! plugins write y in x's dtype.
constexpr nvinfer1::DataType kY_TYPE = nvinfer1::DataType::kFLOAT;

inline char const* dataTypeName(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kFP8: return "float8e4m3fn";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    default: return "a dtype the kernels do not take";
    }
}

//! The kernels want a 256-byte aligned workspace; TensorRT's alignment is not promised, so every plugin with a
//! workspace asks for this much more (getWorkspaceSize) and aligns the pointer inside enqueue (alignWorkspace).
constexpr size_t kWORKSPACE_ALIGNMENT = 256;

//! `workspace` rounded up to the next multiple of kWORKSPACE_ALIGNMENT.
inline void* alignWorkspace(void* workspace) noexcept
{
    auto const address = reinterpret_cast<uintptr_t>(workspace);
    return reinterpret_cast<void*>((address + kWORKSPACE_ALIGNMENT - 1) / kWORKSPACE_ALIGNMENT * kWORKSPACE_ALIGNMENT);
}

//! The tensor description of a build-time (configurePlugin) or run-time (onShapeChange) descriptor, so that one
//! check serves both.
inline nvinfer1::PluginTensorDesc const& tensorDesc(nvinfer1::DynamicPluginTensorDesc const& desc) noexcept
{
    return desc.desc;
}
inline nvinfer1::PluginTensorDesc const& tensorDesc(nvinfer1::PluginTensorDesc const& desc) noexcept
{
    return desc;
}

//! Reads a string plugin field: the ONNX parser hands STRING attributes over as kCHAR with the terminating NUL
//! counted in `length` (onnx-tensorrt loadFields / copyField); trailing NULs are dropped either way.
inline bool readStringField(nvinfer1::PluginField const& field, std::string& value)
{
    if (field.data == nullptr || field.length < 0 || field.type != nvinfer1::PluginFieldType::kCHAR)
    {
        return false;
    }
    value.assign(static_cast<char const*>(field.data), static_cast<size_t>(field.length));
    while (!value.empty() && value.back() == '\0')
    {
        value.pop_back();
    }
    return true;
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

//! Input order both SSD plugins share (DESIGN.md §5); each plugin's kIN_* constants are static_asserted equal.
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

//! Output order both SSD plugins share; each plugin's kOUT_* constants are static_asserted equal.
enum SsdOutput : int32_t
{
    kSSD_Y = 0,
    kSSD_STATE_OUT = 1,
    kSSD_NB_OUTPUTS = 2
};

//! Checks the I/O layout both SSD plugins share, with the sequence axis L (Mamba2ChunkScan) or without it
//! (Mamba2StateUpdate):  x [B,(L),H,P], dt [B,(L),H], A [H], B [B,(L),G,N], C [B,(L),G,N], D [H],
//! state [B,H,P,N] -> y [B,(L),H,P] (x's shape), state out [B,H,P,N] (the state's shape); batch and L agree
//! across x, dt, B, C (and batch with the state); P a multiple of 16, N in {16, 64, 128}, H % G == 0.
//! Dynamic (-1) dims pass at build time; onShapeChange checks them again with the real shapes.
//! \return An empty string when consistent, else what is wrong with the offending shapes.
inline std::string checkSsdLayout(nvinfer1::Dims const* in, nvinfer1::Dims const* out, bool hasSeq)
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
    auto const sameShape = [](nvinfer1::Dims const& a, nvinfer1::Dims const& b) {
        bool same = a.nbDims == b.nbDims;
        for (int32_t i = 0; same && i < a.nbDims; ++i)
        {
            same = dimIs(a.d[i], b.d[i]);
        }
        return same;
    };
    if (!sameShape(out[kSSD_Y], x) || !sameShape(out[kSSD_STATE_OUT], state))
    {
        return "outputs y " + dimsToString(out[kSSD_Y]) + " / state " + dimsToString(out[kSSD_STATE_OUT])
            + " must have the shapes of x / state" + shapes;
    }
    return {};
}

//! The output dtypes both SSD plugins promise (getOutputDataTypes): y float32, the state output in the state's dtype.
//! An engine whose y has x's half dtype was built with a plugin library older than C ABI version 3; the kernels
//! would write 4-byte elements into its 2-byte buffer.
inline std::string checkSsdOutputTypes(
    nvinfer1::DataType stateType, nvinfer1::DataType yType, nvinfer1::DataType stateOutType)
{
    if (yType != kY_TYPE)
    {
        return std::string("output y is ") + dataTypeName(yType)
            + ", the plugin writes float32 (an engine built with a plugin library older than C ABI version 3 has y "
              "in x's dtype: rebuild the engine with this library)";
    }
    if (stateOutType != stateType)
    {
        return std::string("the state output is ") + dataTypeName(stateOutType) + ", the state input "
            + dataTypeName(stateType) + ": both must have the state dtype";
    }
    return {};
}

//! checkSsdLayout and checkSsdOutputTypes on the build-time descriptors (configurePlugin) or the run-time ones
//! (onShapeChange).
template <typename Desc>
std::string checkSsdLayout(Desc const* in, Desc const* out, bool hasSeq)
{
    auto const tensor = [](Desc const& d) -> nvinfer1::PluginTensorDesc const& { return tensorDesc(d); };
    nvinfer1::Dims inDims[kSSD_NB_INPUTS];
    nvinfer1::Dims outDims[kSSD_NB_OUTPUTS];
    for (int32_t i = 0; i < kSSD_NB_INPUTS; ++i)
    {
        inDims[i] = tensor(in[i]).dims;
    }
    for (int32_t i = 0; i < kSSD_NB_OUTPUTS; ++i)
    {
        outDims[i] = tensor(out[i]).dims;
    }
    std::string const problem = checkSsdLayout(
        static_cast<nvinfer1::Dims const*>(inDims), static_cast<nvinfer1::Dims const*>(outDims), hasSeq);
    if (!problem.empty())
    {
        return problem;
    }
    return checkSsdOutputTypes(tensor(in[kSSD_STATE]).type, tensor(out[kSSD_Y]).type, tensor(out[kSSD_STATE_OUT]).type);
}

//! The y dtype check of enqueue (no string is built unless it fails); logs and returns 1 when y is not float32.
inline int32_t reportYType(char const* pluginName, nvinfer1::DataType yType) noexcept
{
    if (yType == kY_TYPE)
    {
        return 0;
    }
    logError(std::string(pluginName) + ": output y is " + dataTypeName(yType)
        + ", the plugin writes float32: rebuild the engine with this plugin library");
    return 1;
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
