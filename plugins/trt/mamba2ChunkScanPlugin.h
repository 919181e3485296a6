/*
 * TensorRT plugin "Mamba2ChunkScan", namespace "hybridtrt", version "1" (DESIGN.md §5).
 *
 * Contract (the ONNX node hybridtrt::Mamba2ChunkScan, version 1):
 *   inputs   0 x              [B, L, H, P]  fp32 | fp16 | bf16 (the activation dtype)
 *            1 dt             [B, L, H]     fp32 | fp16 | bf16 (final dt: bias, softplus, clamp, mask applied)
 *            2 A              [H]           fp32
 *            3 B              [B, L, G, N]  activation dtype
 *            4 C              [B, L, G, N]  activation dtype
 *            5 D              [H]           fp32
 *            6 initial_state  [B, H, P, N]  fp32 | fp16 | bf16 (the state dtype)
 *   outputs  0 y              [B, L, H, P]  fp32, whatever the activation dtype (a gated RMSNorm in fp32 reads it)
 *            1 final_state    [B, H, P, N]  state dtype
 *   attrs    chunk_size (int, >= 1; serialized): the kernels' chunk, rounded up to a multiple of 64 and capped at
 *            256 (hybridtrtMamba2ChunkScanChunkLength); plugin_namespace = "hybridtrt", plugin_version = "1"
 *            (read by the ONNX parser, which hands chunk_size over as a kINT32 field)
 *   limits   P a multiple of 16, N in {16, 64, 128}, H % G == 0, any L >= 1; batch and L agree across x, dt,
 *            B, C; output shapes and dtypes as above (checked again at run time); all tensors kLINEAR. No output
 *            aliases an input.
 *   L == 1 is dispatched to the one-token update kernel (no workspace used).
 *
 *   s_t = exp(dt_t A) s_{t-1} + dt_t (x_t outer B_t),   y_t = s_t . C_t + D x_t,   head h uses group h / (H/G)
 */
#pragma once

#include "ssdPluginBase.h"

#include <vector>

namespace hybridtrt
{
namespace plugin
{

//! Names, I/O description, formats and layout checks: SsdPluginBase (shared with Mamba2StateUpdate).
class Mamba2ChunkScanPlugin : public SsdPluginBase<Mamba2ChunkScanPlugin, /*kHasSeq=*/true>
{
public:
    static constexpr char const* kNAME = "Mamba2ChunkScan";
    static constexpr int32_t kIN_X = 0;
    static constexpr int32_t kIN_DT = 1;
    static constexpr int32_t kIN_A = 2;
    static constexpr int32_t kIN_B = 3;
    static constexpr int32_t kIN_C = 4;
    static constexpr int32_t kIN_D = 5;
    static constexpr int32_t kIN_INITIAL_STATE = 6;
    static constexpr int32_t kNB_INPUTS = 7;
    static constexpr int32_t kOUT_Y = 0;
    static constexpr int32_t kOUT_STATE = 1;
    static constexpr int32_t kNB_OUTPUTS = 2;
    static_assert(kIN_X == kSSD_X && kIN_DT == kSSD_DT && kIN_A == kSSD_A && kIN_B == kSSD_B && kIN_C == kSSD_C
            && kIN_D == kSSD_D && kIN_INITIAL_STATE == kSSD_STATE && kNB_INPUTS == kSSD_NB_INPUTS,
        "input order of the shared layout check");
    static_assert(kOUT_Y == kSSD_Y && kOUT_STATE == kSSD_STATE_OUT && kNB_OUTPUTS == kSSD_NB_OUTPUTS,
        "output order of the shared layout check");

    explicit Mamba2ChunkScanPlugin(int32_t chunkSize);
    ~Mamba2ChunkScanPlugin() override = default;

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
    int32_t mChunkSize;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class Mamba2ChunkScanPluginCreator : public PluginCreatorBase<Mamba2ChunkScanPlugin>
{
public:
    Mamba2ChunkScanPluginCreator();
    ~Mamba2ChunkScanPluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace hybridtrt
