/*
 * The IPluginV3 plumbing every hybridtrt plugin shares (STYLE 10: twins share their common part; TensorRT keeps what
 * its plugins share in plugin/common/): one object that is its own core, build and runtime capability, the names
 * (plugin name = ONNX op_type, namespace "hybridtrt", version "1": DESIGN.md §5), and the creator's names.
 * The SSD twins (ssdPluginBase.h) and the MoE twins (moeExpertsPlugin.h) add their I/O description, checks and
 * enqueue on top.
 */
#pragma once

#include "pluginCommon.h"

namespace hybridtrt
{
namespace plugin
{

//! CRTP base of every plugin: `Derived::kNAME` is the plugin (= ONNX op) name.
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    ~PluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override
    {
        return Derived::kNAME;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }
};

//! The creator part every plugin shares: name, version, namespace of `Plugin`.
template <typename Plugin>
class PluginCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    ~PluginCreatorBase() override = default;

    char const* getPluginName() const noexcept override
    {
        return Plugin::kNAME;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }
};

} // namespace plugin
} // namespace hybridtrt
