/*
 * TensorRT plugins "MoeExperts" and "MoeExpertsFp8", namespace "hybridtrt", version "1" (DESIGN.md §5): the routed
 * experts of a Nemotron-3 MoE layer (the router stays plain ONNX). They validate, describe and call the MoE C ABI of
 * libhybridtrt_kernels.so (kernels/include/hybridtrt/moeKernels.h).
 *
 * Contract (the ONNX nodes hybridtrt::MoeExperts / hybridtrt::MoeExpertsFp8, version 1):
 *
 *   MoeExperts
 *   inputs   0 x                  [T, D]     fp32 | fp16 | bf16 (the activation dtype); T = tokens, D = hidden
 *            1 topk_indices       [T, K]     int64 (the ONNX contract) | int32
 *            2 topk_weights       [T, K]     fp32
 *            3 up_proj            [E, I, D]  x's dtype (each expert [out, in])
 *            4 down_proj          [E, D, I]  x's dtype
 *   outputs  0 y                  [T, D]     x's dtype (not fp32: HF's rule; the SSD plugins' y rule does not apply)
 *
 *   MoeExpertsFp8
 *   inputs   0 x, 1 topk_indices, 2 topk_weights   as MoeExperts
 *            3 up_proj            [E, I, D]  float8e4m3fn (kFP8)
 *            4 up_weight_scale    [E, 1|I]   fp32 (per expert, or per expert and output channel)
 *            5 up_input_scale     [E]        fp32
 *            6 down_proj          [E, D, I]  float8e4m3fn (kFP8)
 *            7 down_weight_scale  [E, 1|D]   fp32
 *            8 down_input_scale   [E]        fp32
 *   outputs  0 y                  [T, D]     x's dtype
 *
 *   attrs    activation = "relu2" (the only one; any other value is refused, a missing one is relu2),
 *            plugin_namespace = "hybridtrt", plugin_version = "1" (read by the ONNX parser)
 *   limits   D, I positive multiples of 16 up to 65536; 1 <= E <= 4096; K >= 1; T >= 0 and T*K <= 2^31 - 1; T, K,
 *            E, D, I agree across the inputs; y has x's shape (a static output shape); all tensors kLINEAR. No output
 *            aliases an input. An index outside [0, E) is skipped (adds nothing, reads no expert).
 *   workspace hybridtrtMoeExpertsWorkspaceSize at the profile's max T (+256 bytes: enqueue aligns the pointer).
 *   tactics  none advertised: every enqueue runs kHYBRIDTRT_MOE_TACTIC_AUTO, which picks the decode (GEMV-like) or
 *            the prefill (grouped GEMM) path from this call's T on the host (plugins/README.md, "MoE plugins").
 *
 *   y[t] = sum_k w[t,k] * down_e relu(up_e x_t)^2,   e = topk_indices[t,k]
 */
#pragma once

#include "hybridtrt/moeKernels.h"
#include "pluginBase.h"

#include <new>
#include <string>

namespace hybridtrt
{
namespace plugin
{

//! Where each input of a MoE plugin sits (DESIGN.md §5); -1 for the scales MoeExperts does not have. Each plugin's
//! kIN_* constants are static_asserted equal to its row.
struct MoeInputs
{
    int32_t x;
    int32_t topkIndices;
    int32_t topkWeights;
    int32_t upProj;
    int32_t upWeightScale;
    int32_t upInputScale;
    int32_t downProj;
    int32_t downWeightScale;
    int32_t downInputScale;
    int32_t nbInputs;
};
constexpr MoeInputs kMOE_INPUTS{0, 1, 2, 3, -1, -1, 4, -1, -1, 5};
constexpr MoeInputs kMOE_FP8_INPUTS{0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
constexpr int32_t kMOE_Y = 0;
constexpr int32_t kMOE_NB_OUTPUTS = 1;
constexpr int32_t kMOE_MAX_INPUTS = 9;

//! The one expert activation (value of the `activation` attribute).
constexpr char const* kMOE_ACTIVATION_RELU2 = "relu2";

//! TensorRT index dtype -> C ABI index dtype (kHYBRIDTRT_INT64 / kHYBRIDTRT_INT32); -1 when the kernels do not take it.
inline int32_t toKernelIndexDtype(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kINT64: return kHYBRIDTRT_INT64;
    case nvinfer1::DataType::kINT32: return kHYBRIDTRT_INT32;
    default: return -1;
    }
}

//! T, K, E, D, I and the dtypes of one call (or of a profile's max), read from the input descriptions.
struct MoeCall
{
    int64_t tokens;
    int64_t topK;
    int64_t experts;
    int64_t hidden;
    int64_t inter;
    int32_t actDtype;
    int32_t weightDtype; //!< actDtype (MoeExperts) or kHYBRIDTRT_FLOAT8_E4M3 (MoeExpertsFp8)
    int32_t indexDtype;
};

//! The call the descriptions `in` (dims `dims[i]`, dtypes `types[i]`) describe.
MoeCall moeCall(nvinfer1::Dims const* dims, nvinfer1::DataType const* types, MoeInputs const& io) noexcept;

//! Checks the I/O layout both MoE plugins share: ranks; T, K, E, D, I agreement across x, topk_*, the stacks (and the
//! scales: [E,1|I], [E], [E,1|D], [E]); the kernels' limits on D, I, E, K; y of x's shape; every dtype (x fp32 / fp16
//! / bf16, indices int64 / int32, weights and scales fp32, stacks x's dtype or FP8, y x's dtype). Dynamic (-1) dims
//! pass at build time; onShapeChange checks them again with the real shapes.
//! \return An empty string when consistent, else what is wrong with the offending shapes and dtypes.
std::string checkMoeLayout(nvinfer1::PluginTensorDesc const* in, nvinfer1::PluginTensorDesc const& y, MoeInputs const& io);

//! checkMoeLayout on the build-time descriptors (configurePlugin) or the run-time ones (onShapeChange), I/O counts
//! first.
template <typename Desc>
std::string checkMoeLayout(Desc const* in, int32_t nbInputs, Desc const* out, int32_t nbOutputs, MoeInputs const& io)
{
    if (nbInputs != io.nbInputs || nbOutputs != kMOE_NB_OUTPUTS)
    {
        return "expects " + std::to_string(io.nbInputs) + " inputs and 1 output, got " + std::to_string(nbInputs)
            + " and " + std::to_string(nbOutputs);
    }
    nvinfer1::PluginTensorDesc descs[kMOE_MAX_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        descs[i] = tensorDesc(in[i]);
    }
    return checkMoeLayout(static_cast<nvinfer1::PluginTensorDesc const*>(descs), tensorDesc(out[kMOE_Y]), io);
}

//! supportsFormatCombination of both MoE plugins: kLINEAR only; x fp32 / fp16 / bf16; indices int64 / int32; weights and
//! scales fp32; the stacks in x's dtype (MoeExperts) or FP8 (MoeExpertsFp8); y in x's dtype.
bool supportsMoeFormat(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs,
    MoeInputs const& io) noexcept;

//! hybridtrtMoeExpertsWorkspaceSize of `call` (a status; logged by the caller).
int32_t moeWorkspaceSize(MoeCall const& call, size_t& bytes) noexcept;

//! The creators' checks: the kernels' MoE C ABI version (HYBRIDTRT_MOE_KERNELS_ABI_VERSION) and the activation
//! attribute; logs and returns false when the plugin must not be created.
bool checkMoeCreation(char const* pluginName, nvinfer1::PluginFieldCollection const* fc) noexcept;

//! CRTP base of the MoE plugins (STYLE 10: twins share their common part): output type and shape, formats, the
//! layout checks of configurePlugin / onShapeChange, workspace, tactic and serialization live here once, on top of
//! the plumbing every plugin shares (pluginBase.h), and enqueue up to the C ABI call. `kFp8` picks the input layout;
//! each plugin adds its `launch` (the C ABI call).
template <typename Derived, bool kFp8>
class MoePluginBase : public PluginBase<Derived>
{
public:
    static constexpr MoeInputs kIO = kFp8 ? kMOE_FP8_INPUTS : kMOE_INPUTS;

    MoePluginBase() = default;
    ~MoePluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) Derived();
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return kMOE_NB_OUTPUTS;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        if (reportLayout(Derived::kNAME, checkMoeLayout(in, nbInputs, out, nbOutputs, kIO)) != 0)
        {
            return 1;
        }
        // The profile's largest call must fit the kernels (T*K <= 2^31 - 1, the workspace size in size_t).
        MoeCall const call = maxCall(in);
        size_t bytes = 0;
        if (moeWorkspaceSize(call, bytes) != kHYBRIDTRT_SUCCESS)
        {
            logError(std::string(Derived::kNAME) + ": the profile's max T " + std::to_string(call.tokens) + " x top-k "
                + std::to_string(call.topK) + " (E " + std::to_string(call.experts) + ", D "
                + std::to_string(call.hidden) + ", I " + std::to_string(call.inter)
                + ") exceeds the kernels' limits (T*K <= 2^31 - 1, a workspace size that fits size_t): "
                  "lower the profile's max tokens");
            return 1;
        }
        return 0;
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != kIO.nbInputs || nbOutputs != kMOE_NB_OUTPUTS)
        {
            return 1;
        }
        outputTypes[kMOE_Y] = inputTypes[kIO.x]; // x's dtype
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if (nbInputs != kIO.nbInputs || nbOutputs != kMOE_NB_OUTPUTS || inputs[kIO.x].nbDims != 2)
        {
            return 1;
        }
        outputs[kMOE_Y] = inputs[kIO.x]; // static output shape: y [T, D] = x's
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        return supportsMoeFormat(pos, inOut, nbInputs, nbOutputs, kIO);
    }

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        if (nbInputs != kIO.nbInputs)
        {
            return 0;
        }
        size_t bytes = 0;
        return moeWorkspaceSize(maxCall(inputs), bytes) == kHYBRIDTRT_SUCCESS ? bytes + kWORKSPACE_ALIGNMENT : 0;
    }

    // IPluginV3OneRuntime
    //! No custom tactic is advertised (getNbTactics() == 0), so TensorRT sets the default tactic 0: the kernels'
    //! kHYBRIDTRT_MOE_TACTIC_AUTO, decided per enqueue from T. Anything else is refused.
    int32_t setTactic(int32_t tactic) noexcept override
    {
        if (tactic != kHYBRIDTRT_MOE_TACTIC_AUTO)
        {
            logError(std::string(Derived::kNAME) + ": tactic " + std::to_string(tactic)
                + " was never advertised (the plugin runs the default tactic 0, AUTO): rebuild the engine");
            return 1;
        }
        return 0;
    }

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        if (reportLayout(Derived::kNAME, checkMoeLayout(in, nbInputs, out, nbOutputs, kIO)) != 0)
        {
            return 1;
        }
        size_t bytes = 0;
        return reportStatus(Derived::kNAME, moeWorkspaceSize(runtimeCall(in), bytes));
    }

    //! The call and its workspace bytes (host arithmetic only: no CUDA call, no sync), then `Derived::launch`, the
    //! plugin's C ABI call, on the aligned workspace. T == 0 launches nothing (TensorRT may bind null pointers to
    //! empty tensors).
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        MoeCall const call = runtimeCall(inputDesc);
        if (call.tokens == 0)
        {
            return 0;
        }
        size_t bytes = 0;
        int32_t const status = moeWorkspaceSize(call, bytes);
        if (status != kHYBRIDTRT_SUCCESS)
        {
            return reportStatus(Derived::kNAME, status);
        }
        return reportStatus(Derived::kNAME,
            Derived::launch(call, inputDesc, inputs, outputs, alignWorkspace(workspace), bytes, stream));
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override
    {
        // The MoE kernels need no per-device set-up: every kernel fits the default 48 KiB of shared memory.
        return clone();
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        // activation = "relu2": kCHAR with the NUL counted, as the ONNX parser passes a STRING attribute.
        mSerialized = nvinfer1::PluginField("activation", kMOE_ACTIVATION_RELU2, nvinfer1::PluginFieldType::kCHAR,
            static_cast<int32_t>(std::char_traits<char>::length(kMOE_ACTIVATION_RELU2) + 1));
        mFieldCollection.nbFields = 1;
        mFieldCollection.fields = &mSerialized;
        return &mFieldCollection;
    }

protected:
    //! The call of one enqueue / onShapeChange.
    static MoeCall runtimeCall(nvinfer1::PluginTensorDesc const* in) noexcept
    {
        nvinfer1::Dims dims[kMOE_MAX_INPUTS];
        nvinfer1::DataType types[kMOE_MAX_INPUTS];
        for (int32_t i = 0; i < kIO.nbInputs; ++i)
        {
            dims[i] = in[i].dims;
            types[i] = in[i].type;
        }
        return moeCall(dims, types, kIO);
    }

    //! The largest call of the profile (its max dims).
    static MoeCall maxCall(nvinfer1::DynamicPluginTensorDesc const* in) noexcept
    {
        nvinfer1::Dims dims[kMOE_MAX_INPUTS];
        nvinfer1::DataType types[kMOE_MAX_INPUTS];
        for (int32_t i = 0; i < kIO.nbInputs; ++i)
        {
            dims[i] = in[i].max;
            types[i] = in[i].desc.type;
        }
        return moeCall(dims, types, kIO);
    }

private:
    nvinfer1::PluginField mSerialized;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

//! MoeExperts: experts in x's dtype.
class MoeExpertsPlugin : public MoePluginBase<MoeExpertsPlugin, /*kFp8=*/false>
{
public:
    static constexpr char const* kNAME = "MoeExperts";
    static constexpr int32_t kIN_X = 0;
    static constexpr int32_t kIN_TOPK_INDICES = 1;
    static constexpr int32_t kIN_TOPK_WEIGHTS = 2;
    static constexpr int32_t kIN_UP_PROJ = 3;
    static constexpr int32_t kIN_DOWN_PROJ = 4;
    static constexpr int32_t kNB_INPUTS = 5;
    static constexpr int32_t kOUT_Y = 0;
    static constexpr int32_t kNB_OUTPUTS = 1;
    static_assert(kIN_X == kMOE_INPUTS.x && kIN_TOPK_INDICES == kMOE_INPUTS.topkIndices
            && kIN_TOPK_WEIGHTS == kMOE_INPUTS.topkWeights && kIN_UP_PROJ == kMOE_INPUTS.upProj
            && kIN_DOWN_PROJ == kMOE_INPUTS.downProj && kNB_INPUTS == kMOE_INPUTS.nbInputs,
        "input order of the shared layout check");
    static_assert(kOUT_Y == kMOE_Y && kNB_OUTPUTS == kMOE_NB_OUTPUTS, "output order of the shared layout check");

    MoeExpertsPlugin() = default;
    ~MoeExpertsPlugin() override = default;

    //! hybridtrtMoeExperts for `call` (the shared enqueue validated the call and sized the aligned workspace).
    static int32_t launch(MoeCall const& call, nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, size_t workspaceBytes, cudaStream_t stream) noexcept;
};

//! MoeExpertsFp8: FP8 expert stacks with per-expert (or per-channel) weight scales and per-expert input scales.
class MoeExpertsFp8Plugin : public MoePluginBase<MoeExpertsFp8Plugin, /*kFp8=*/true>
{
public:
    static constexpr char const* kNAME = "MoeExpertsFp8";
    static constexpr int32_t kIN_X = 0;
    static constexpr int32_t kIN_TOPK_INDICES = 1;
    static constexpr int32_t kIN_TOPK_WEIGHTS = 2;
    static constexpr int32_t kIN_UP_PROJ = 3;
    static constexpr int32_t kIN_UP_WEIGHT_SCALE = 4;
    static constexpr int32_t kIN_UP_INPUT_SCALE = 5;
    static constexpr int32_t kIN_DOWN_PROJ = 6;
    static constexpr int32_t kIN_DOWN_WEIGHT_SCALE = 7;
    static constexpr int32_t kIN_DOWN_INPUT_SCALE = 8;
    static constexpr int32_t kNB_INPUTS = 9;
    static constexpr int32_t kOUT_Y = 0;
    static constexpr int32_t kNB_OUTPUTS = 1;
    static_assert(kIN_X == kMOE_FP8_INPUTS.x && kIN_TOPK_INDICES == kMOE_FP8_INPUTS.topkIndices
            && kIN_TOPK_WEIGHTS == kMOE_FP8_INPUTS.topkWeights && kIN_UP_PROJ == kMOE_FP8_INPUTS.upProj
            && kIN_UP_WEIGHT_SCALE == kMOE_FP8_INPUTS.upWeightScale
            && kIN_UP_INPUT_SCALE == kMOE_FP8_INPUTS.upInputScale && kIN_DOWN_PROJ == kMOE_FP8_INPUTS.downProj
            && kIN_DOWN_WEIGHT_SCALE == kMOE_FP8_INPUTS.downWeightScale
            && kIN_DOWN_INPUT_SCALE == kMOE_FP8_INPUTS.downInputScale && kNB_INPUTS == kMOE_FP8_INPUTS.nbInputs,
        "input order of the shared layout check");
    static_assert(kOUT_Y == kMOE_Y && kNB_OUTPUTS == kMOE_NB_OUTPUTS, "output order of the shared layout check");

    MoeExpertsFp8Plugin() = default;
    ~MoeExpertsFp8Plugin() override = default;

    //! hybridtrtMoeExpertsFp8 for `call` (the scales' widths from their descriptions).
    static int32_t launch(MoeCall const& call, nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, size_t workspaceBytes, cudaStream_t stream) noexcept;
};

//! The creator both MoE plugins share: one field, `activation` (kCHAR); refuses a kernels library of another MoE
//! C ABI version and any activation but relu2.
template <typename Plugin>
class MoePluginCreator : public PluginCreatorBase<Plugin>
{
public:
    MoePluginCreator() = default;
    ~MoePluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        // The ONNX parser passes only the attributes listed here (loadFields), a STRING one as kCHAR.
        mFieldCollection.nbFields = 1;
        mFieldCollection.fields = &mFieldName;
        return &mFieldCollection;
    }

    nvinfer1::IPluginV3* createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        return checkMoeCreation(Plugin::kNAME, fc) ? new (std::nothrow) Plugin() : nullptr;
    }

private:
    nvinfer1::PluginField mFieldName{"activation", nullptr, nvinfer1::PluginFieldType::kCHAR, 0};
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

using MoeExpertsPluginCreator = MoePluginCreator<MoeExpertsPlugin>;
using MoeExpertsFp8PluginCreator = MoePluginCreator<MoeExpertsFp8Plugin>;

} // namespace plugin
} // namespace hybridtrt
