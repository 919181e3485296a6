/*
 * Mamba2StateUpdate IPluginV3: validates, describes and calls hybridtrtMamba2StateUpdate (see the header
 * for the contract).
 */
#include "mamba2StateUpdatePlugin.h"

#include <new>

using namespace nvinfer1;

namespace hybridtrt
{
namespace plugin
{

IPluginV3* Mamba2StateUpdatePlugin::clone() noexcept
{
    return new (std::nothrow) Mamba2StateUpdatePlugin();
}

size_t Mamba2StateUpdatePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t Mamba2StateUpdatePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (checkRuntimeLayout(in, nbInputs, out, nbOutputs) != 0)
    {
        return 1;
    }
    Dims const& x = in[kIN_X].dims;
    Dims const& b = in[kIN_B].dims;
    size_t bytes = 0;
    return reportStatus(kNAME,
        hybridtrtMamba2StateUpdateWorkspaceSize(x.d[0], x.d[1], x.d[2], b.d[1], b.d[2], toKernelDtype(in[kIN_X].type),
            toKernelDtype(in[kIN_DT].type), toKernelDtype(in[kIN_STATE].type), &bytes));
}

int32_t Mamba2StateUpdatePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (reportYType(kNAME, outputDesc[kOUT_Y].type) != 0)
    {
        return 1;
    }
    Dims const& x = inputDesc[kIN_X].dims;
    Dims const& b = inputDesc[kIN_B].dims;
    return reportStatus(kNAME,
        hybridtrtMamba2StateUpdate(inputs[kIN_X], inputs[kIN_DT], static_cast<float const*>(inputs[kIN_A]),
            inputs[kIN_B], inputs[kIN_C], static_cast<float const*>(inputs[kIN_D]), inputs[kIN_STATE],
            static_cast<float*>(outputs[kOUT_Y]), outputs[kOUT_STATE], x.d[0], x.d[1], x.d[2], b.d[1], b.d[2],
            toKernelDtype(inputDesc[kIN_X].type), toKernelDtype(inputDesc[kIN_DT].type),
            toKernelDtype(inputDesc[kIN_STATE].type), stream));
}

IPluginV3* Mamba2StateUpdatePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* Mamba2StateUpdatePlugin::getFieldsToSerialize() noexcept
{
    mFieldCollection.nbFields = 0;
    mFieldCollection.fields = nullptr;
    return &mFieldCollection;
}

PluginFieldCollection const* Mamba2StateUpdatePluginCreator::getFieldNames() noexcept
{
    mFieldCollection.nbFields = 0;
    mFieldCollection.fields = nullptr;
    return &mFieldCollection;
}

IPluginV3* Mamba2StateUpdatePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* /*fc*/, TensorRTPhase /*phase*/) noexcept
{
    // No attributes besides plugin_namespace / plugin_version, which the ONNX parser consumes.
    return new (std::nothrow) Mamba2StateUpdatePlugin();
}

} // namespace plugin
} // namespace hybridtrt
