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

//! Static dimension check used at configure time: -1 (dynamic) always passes.
inline bool dimIs(int64_t dim, int64_t expected) noexcept
{
    return dim < 0 || expected < 0 || dim == expected;
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
