/*
 * TensorRT plugin "Mamba2StateUpdate", namespace "hybridtrt", version "1" (DESIGN.md §5).
 *
 * Contract (the ONNX node hybridtrt::Mamba2StateUpdate, version 1; one decode token):
 *   inputs   0 x          [B, H, P]     fp32 | fp16 | bf16 (the activation dtype)
 *            1 dt         [B, H]        fp32 | fp16 | bf16 (final dt)
 *            2 A          [H]           fp32
 *            3 B          [B, G, N]     activation dtype
 *            4 C          [B, G, N]     activation dtype
 *            5 D          [H]           fp32
 *            6 state      [B, H, P, N]  fp32 | fp16 | bf16 (the state dtype)
 *   outputs  0 y          [B, H, P]     fp32, whatever the activation dtype
 *            1 new_state  [B, H, P, N]  state dtype. Not declared aliased to input 6: plugin I/O aliasing
 *                                       (PreviewFeature::kALIASED_PLUGIN_IO_10_03) lets TensorRT insert a copy
 *                                       of a network-input state instead of binding one buffer, so the runtimes
 *                                       bind past and present states to separate buffers (ping-pong) and the
 *                                       kernel reads the state once and writes it once. The kernel itself is
 *                                       in-place safe (the C ABI accepts stateOut == stateIn).
 *   attrs    plugin_namespace = "hybridtrt", plugin_version = "1" (read by the ONNX parser)
 *   limits   P a multiple of 16, N in {16, 64, 128}, H % G == 0; batch agrees across x, dt, B, C, state;
 *            output shapes and dtypes as above (checked again at run time); all tensors kLINEAR; no workspace.
 *
 *   s = exp(dt A) s + dt (x outer B),   y = s . C + D x,   head h uses group h / (H/G)
 */
#pragma once

#include "ssdPluginBase.h"

namespace hybridtrt
{
namespace plugin
{

//! Names, I/O description, formats and layout checks: SsdPluginBase (shared with Mamba2ChunkScan).
class Mamba2StateUpdatePlugin : public SsdPluginBase<Mamba2StateUpdatePlugin, /*kHasSeq=*/false>
{
public:
    static constexpr char const* kNAME = "Mamba2StateUpdate";
    static constexpr int32_t kIN_X = 0;
    static constexpr int32_t kIN_DT = 1;
    static constexpr int32_t kIN_A = 2;
    static constexpr int32_t kIN_B = 3;
    static constexpr int32_t kIN_C = 4;
    static constexpr int32_t kIN_D = 5;
    static constexpr int32_t kIN_STATE = 6;
    static constexpr int32_t kNB_INPUTS = 7;
    static constexpr int32_t kOUT_Y = 0;
    static constexpr int32_t kOUT_STATE = 1;
    static constexpr int32_t kNB_OUTPUTS = 2;
    static_assert(kIN_X == kSSD_X && kIN_DT == kSSD_DT && kIN_A == kSSD_A && kIN_B == kSSD_B && kIN_C == kSSD_C
            && kIN_D == kSSD_D && kIN_STATE == kSSD_STATE && kNB_INPUTS == kSSD_NB_INPUTS,
        "input order of the shared layout check");
    static_assert(kOUT_Y == kSSD_Y && kOUT_STATE == kSSD_STATE_OUT && kNB_OUTPUTS == kSSD_NB_OUTPUTS,
        "output order of the shared layout check");

    Mamba2StateUpdatePlugin() = default;
    ~Mamba2StateUpdatePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneBuild
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class Mamba2StateUpdatePluginCreator : public PluginCreatorBase<Mamba2StateUpdatePlugin>
{
public:
    Mamba2StateUpdatePluginCreator() = default;
    ~Mamba2StateUpdatePluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace hybridtrt
