/*
 * What the two SSD plugins share (STYLE 10: twins share their common part). Mamba2ChunkScan and Mamba2StateUpdate
 * have the same inputs and outputs but for the sequence axis L (DESIGN.md §5; the layout in pluginCommon.h), so
 * their output types and shapes, format support and the layout checks of configurePlugin / onShapeChange live here
 * once, on top of the IPluginV3 plumbing and names every plugin shares (pluginBase.h). Each plugin adds its
 * attributes, workspace, enqueue and context set-up.
 */
#pragma once

#include "pluginBase.h"

namespace hybridtrt
{
namespace plugin
{

//! CRTP base of the SSD plugins: `Derived::kNAME` is the plugin (= ONNX op) name; `kHasSeq` says whether the
//! activations carry the sequence axis (x [B,L,H,P], Mamba2ChunkScan) or not (x [B,H,P], Mamba2StateUpdate).
//! Capabilities and names: PluginBase (shared with every plugin).
template <typename Derived, bool kHasSeq>
class SsdPluginBase : public PluginBase<Derived>
{
public:
    ~SsdPluginBase() override = default;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return kSSD_NB_OUTPUTS;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS)
        {
            logError(std::string(Derived::kNAME) + ": expects 7 inputs and 2 outputs");
            return 1;
        }
        return reportLayout(Derived::kNAME, checkSsdLayout(in, out, kHasSeq));
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS)
        {
            return 1;
        }
        outputTypes[kSSD_Y] = kY_TYPE; // float32 whatever x's dtype
        outputTypes[kSSD_STATE_OUT] = inputTypes[kSSD_STATE];
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS || inputs[kSSD_X].nbDims != 3 + kHasSeq
            || inputs[kSSD_STATE].nbDims != 4)
        {
            return 1;
        }
        outputs[kSSD_Y] = inputs[kSSD_X];
        outputs[kSSD_STATE_OUT] = inputs[kSSD_STATE];
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS || pos < 0
            || pos >= kSSD_NB_INPUTS + kSSD_NB_OUTPUTS)
        {
            return false;
        }
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kSSD_X:
        case kSSD_DT:
        case kSSD_STATE: return isActivationType(desc.type);
        case kSSD_A:
        case kSSD_D: return desc.type == nvinfer1::DataType::kFLOAT;
        case kSSD_B:
        case kSSD_C: return desc.type == inOut[kSSD_X].desc.type;
        case kSSD_NB_INPUTS + kSSD_Y: return desc.type == kY_TYPE;
        case kSSD_NB_INPUTS + kSSD_STATE_OUT: return desc.type == inOut[kSSD_STATE].desc.type;
        default: return false;
        }
    }

protected:
    //! The part of onShapeChange both plugins share: I/O counts and the layout check on the real shapes (logged).
    //! \return 0 when the shapes are consistent, 1 otherwise.
    static int32_t checkRuntimeLayout(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
    {
        if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS)
        {
            return 1;
        }
        return reportLayout(Derived::kNAME, checkSsdLayout(in, out, kHasSeq));
    }
};

} // namespace plugin
} // namespace hybridtrt
