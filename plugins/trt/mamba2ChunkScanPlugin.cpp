/*
 * Mamba2ChunkScan IPluginV3: validates, describes and calls hybridtrtMamba2ChunkScan (see the header for
 * the contract).
 */
#include "mamba2ChunkScanPlugin.h"

#include <cstdint>
#include <cstring>
#include <new>

using namespace nvinfer1;

namespace hybridtrt
{
namespace plugin
{
namespace
{
constexpr char const* kATTR_CHUNK_SIZE = "chunk_size";
constexpr int32_t kDEFAULT_CHUNK_SIZE = 256;
} // namespace

Mamba2ChunkScanPlugin::Mamba2ChunkScanPlugin(int32_t chunkSize)
    : mChunkSize(chunkSize)
{
}

IPluginV3* Mamba2ChunkScanPlugin::clone() noexcept
{
    return new (std::nothrow) Mamba2ChunkScanPlugin(mChunkSize);
}

size_t Mamba2ChunkScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNB_INPUTS)
    {
        return 0;
    }
    Dims const& x = inputs[kIN_X].max;
    Dims const& b = inputs[kIN_B].max;
    size_t bytes = 0;
    int32_t const status = hybridtrtMamba2ChunkScanWorkspaceSize(x.d[0], x.d[1], x.d[2], x.d[3], b.d[2], b.d[3],
        mChunkSize, toKernelDtype(inputs[kIN_X].desc.type), toKernelDtype(inputs[kIN_DT].desc.type),
        toKernelDtype(inputs[kIN_INITIAL_STATE].desc.type), &bytes);
    return status == kHYBRIDTRT_SUCCESS ? bytes + kWORKSPACE_ALIGNMENT : 0;
}

int32_t Mamba2ChunkScanPlugin::onShapeChange(
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
        hybridtrtMamba2ChunkScanWorkspaceSize(x.d[0], x.d[1], x.d[2], x.d[3], b.d[2], b.d[3], mChunkSize,
            toKernelDtype(in[kIN_X].type), toKernelDtype(in[kIN_DT].type), toKernelDtype(in[kIN_INITIAL_STATE].type),
            &bytes));
}

int32_t Mamba2ChunkScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (reportYType(kNAME, outputDesc[kOUT_Y].type) != 0)
    {
        return 1;
    }
    Dims const& x = inputDesc[kIN_X].dims;
    Dims const& b = inputDesc[kIN_B].dims;
    int64_t const batch = x.d[0];
    int64_t const seqLen = x.d[1];
    int32_t const actDtype = toKernelDtype(inputDesc[kIN_X].type);
    int32_t const dtDtype = toKernelDtype(inputDesc[kIN_DT].type);
    int32_t const stateDtype = toKernelDtype(inputDesc[kIN_INITIAL_STATE].type);
    auto const* A = static_cast<float const*>(inputs[kIN_A]);
    auto const* D = static_cast<float const*>(inputs[kIN_D]);
    auto* y = static_cast<float*>(outputs[kOUT_Y]);
    if (seqLen == 1)
    {
        // One token: [B,1,H,P] is [B,H,P] in memory; the update kernel streams the state once, no workspace.
        return reportStatus(kNAME,
            hybridtrtMamba2StateUpdate(inputs[kIN_X], inputs[kIN_DT], A, inputs[kIN_B], inputs[kIN_C], D,
                inputs[kIN_INITIAL_STATE], y, outputs[kOUT_STATE], batch, x.d[2], x.d[3], b.d[2], b.d[3],
                actDtype, dtDtype, stateDtype, stream));
    }
    size_t bytes = 0;
    int32_t status = hybridtrtMamba2ChunkScanWorkspaceSize(
        batch, seqLen, x.d[2], x.d[3], b.d[2], b.d[3], mChunkSize, actDtype, dtDtype, stateDtype, &bytes);
    if (status != kHYBRIDTRT_SUCCESS)
    {
        return reportStatus(kNAME, status);
    }
    void* aligned = alignWorkspace(workspace);
    status = hybridtrtMamba2ChunkScan(inputs[kIN_X], inputs[kIN_DT], A, inputs[kIN_B], inputs[kIN_C], D,
        inputs[kIN_INITIAL_STATE], y, outputs[kOUT_STATE], batch, seqLen, x.d[2], x.d[3], b.d[2],
        b.d[3], mChunkSize, actDtype, dtDtype, stateDtype, aligned, bytes, stream);
    return reportStatus(kNAME, status);
}

IPluginV3* Mamba2ChunkScanPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // A new execution context, possibly on another device than the build's: opt the scan kernels in to their
    // dynamic shared memory on the current device here, outside any stream capture, so that a captured enqueue
    // needs no attribute call. The dtypes are not known here: every dtype and d_state is prepared (a handful of
    // host-side attribute calls). Launches outside a capture opt in by themselves (the builder's timing runs).
    if (reportStatus(kNAME, hybridtrtMamba2ChunkScanPrepare(-1, -1)) != 0)
    {
        return nullptr;
    }
    return clone();
}

PluginFieldCollection const* Mamba2ChunkScanPlugin::getFieldsToSerialize() noexcept
{
    mFields.clear();
    mFields.emplace_back(kATTR_CHUNK_SIZE, &mChunkSize, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

Mamba2ChunkScanPluginCreator::Mamba2ChunkScanPluginCreator()
{
    mFieldNames.emplace_back(kATTR_CHUNK_SIZE, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

PluginFieldCollection const* Mamba2ChunkScanPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* Mamba2ChunkScanPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    int64_t chunkSize = kDEFAULT_CHUNK_SIZE;
    if (fc != nullptr)
    {
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name != nullptr && std::strcmp(field.name, kATTR_CHUNK_SIZE) == 0)
            {
                if (!readIntField(field, chunkSize))
                {
                    logError("Mamba2ChunkScan: attribute chunk_size must be an integer");
                    return nullptr;
                }
            }
            // plugin_namespace / plugin_version (consumed by the ONNX parser) and unknown fields are ignored.
        }
    }
    if (chunkSize < 1 || chunkSize > (int64_t(1) << 20))
    {
        logError("Mamba2ChunkScan: chunk_size " + std::to_string(chunkSize) + " must be in [1, 2^20]");
        return nullptr;
    }
    return new (std::nothrow) Mamba2ChunkScanPlugin(static_cast<int32_t>(chunkSize));
}

} // namespace plugin
} // namespace hybridtrt
