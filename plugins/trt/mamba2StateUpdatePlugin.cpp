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

IPluginCapability* Mamba2StateUpdatePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* Mamba2StateUpdatePlugin::clone() noexcept
{
    return new (std::nothrow) Mamba2StateUpdatePlugin();
}

char const* Mamba2StateUpdatePlugin::getPluginName() const noexcept
{
    return kNAME;
}

char const* Mamba2StateUpdatePlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* Mamba2StateUpdatePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t Mamba2StateUpdatePlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t Mamba2StateUpdatePlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError("Mamba2StateUpdate: expects 7 inputs and 2 outputs");
        return 1;
    }
    return reportLayout(kNAME, checkSsdLayout(in, /*hasSeq=*/false));
}

int32_t Mamba2StateUpdatePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return 1;
    }
    outputTypes[kOUT_Y] = inputTypes[kIN_X];
    outputTypes[kOUT_STATE] = inputTypes[kIN_STATE];
    return 0;
}

int32_t Mamba2StateUpdatePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || inputs[kIN_X].nbDims != 3
        || inputs[kIN_STATE].nbDims != 4)
    {
        return 1;
    }
    outputs[kOUT_Y] = inputs[kIN_X];
    outputs[kOUT_STATE] = inputs[kIN_STATE];
    return 0;
}

bool Mamba2StateUpdatePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= kNB_INPUTS + kNB_OUTPUTS)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kIN_X:
    case kIN_DT:
    case kIN_STATE: return isActivationType(desc.type);
    case kIN_A:
    case kIN_D: return desc.type == DataType::kFLOAT;
    case kIN_B:
    case kIN_C:
    case kNB_INPUTS + kOUT_Y: return desc.type == inOut[kIN_X].desc.type;
    case kNB_INPUTS + kOUT_STATE: return desc.type == inOut[kIN_STATE].desc.type;
    default: return false;
    }
}

size_t Mamba2StateUpdatePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t Mamba2StateUpdatePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return 1;
    }
    if (reportLayout(kNAME, checkSsdLayout(in, /*hasSeq=*/false)) != 0)
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

int32_t Mamba2StateUpdatePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    Dims const& x = inputDesc[kIN_X].dims;
    Dims const& b = inputDesc[kIN_B].dims;
    return reportStatus(kNAME,
        hybridtrtMamba2StateUpdate(inputs[kIN_X], inputs[kIN_DT], static_cast<float const*>(inputs[kIN_A]),
            inputs[kIN_B], inputs[kIN_C], static_cast<float const*>(inputs[kIN_D]), inputs[kIN_STATE],
            outputs[kOUT_Y], outputs[kOUT_STATE], x.d[0], x.d[1], x.d[2], b.d[1], b.d[2],
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

char const* Mamba2StateUpdatePluginCreator::getPluginName() const noexcept
{
    return Mamba2StateUpdatePlugin::kNAME;
}

char const* Mamba2StateUpdatePluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* Mamba2StateUpdatePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
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
