/*
 * MoeExperts / MoeExpertsFp8 IPluginV3: validate, describe and call hybridtrtMoeExperts / hybridtrtMoeExpertsFp8
 * (see the header for the contract).
 */
#include "moeExpertsPlugin.h"

#include <cstring>
#include <utility>

using namespace nvinfer1;

namespace hybridtrt
{
namespace plugin
{
namespace
{
constexpr char const* kATTR_ACTIVATION = "activation";

//! The inputs of `io` by name, in order (names for messages).
std::pair<char const*, int32_t> const* namedInputs(MoeInputs const& io, int32_t& count) noexcept
{
    static std::pair<char const*, int32_t> const kPLAIN[] = {{"x", kMOE_INPUTS.x},
        {"topk_indices", kMOE_INPUTS.topkIndices}, {"topk_weights", kMOE_INPUTS.topkWeights},
        {"up_proj", kMOE_INPUTS.upProj}, {"down_proj", kMOE_INPUTS.downProj}};
    static std::pair<char const*, int32_t> const kFP8[] = {{"x", kMOE_FP8_INPUTS.x},
        {"topk_indices", kMOE_FP8_INPUTS.topkIndices}, {"topk_weights", kMOE_FP8_INPUTS.topkWeights},
        {"up_proj", kMOE_FP8_INPUTS.upProj}, {"up_weight_scale", kMOE_FP8_INPUTS.upWeightScale},
        {"up_input_scale", kMOE_FP8_INPUTS.upInputScale}, {"down_proj", kMOE_FP8_INPUTS.downProj},
        {"down_weight_scale", kMOE_FP8_INPUTS.downWeightScale}, {"down_input_scale", kMOE_FP8_INPUTS.downInputScale}};
    bool const fp8 = io.upWeightScale >= 0;
    count = fp8 ? kMOE_FP8_INPUTS.nbInputs : kMOE_INPUTS.nbInputs;
    return fp8 ? kFP8 : kPLAIN;
}

//! " (x [7,64] bfloat16, topk_indices [7,2] int64, ..., y [7,64] bfloat16)": what every refusal quotes.
std::string describe(PluginTensorDesc const* in, PluginTensorDesc const& y, MoeInputs const& io)
{
    int32_t count = 0;
    auto const* named = namedInputs(io, count);
    std::string text = " (";
    for (int32_t i = 0; i < count; ++i)
    {
        PluginTensorDesc const& d = in[named[i].second];
        text += std::string(named[i].first) + " " + dimsToString(d.dims) + " " + dataTypeName(d.type) + ", ";
    }
    return text + "y " + dimsToString(y.dims) + " " + dataTypeName(y.type) + ")";
}

//! A width the kernels take (D, I): a positive multiple of 16 up to HYBRIDTRT_MOE_MAX_WIDTH; -1 (dynamic) passes.
bool widthOk(int64_t v) noexcept
{
    return v < 0 || (v >= 16 && v % 16 == 0 && v <= HYBRIDTRT_MOE_MAX_WIDTH);
}
} // namespace

MoeCall moeCall(Dims const* dims, DataType const* types, MoeInputs const& io) noexcept
{
    MoeCall call{};
    call.tokens = dims[io.x].d[0];
    call.topK = dims[io.topkIndices].d[1];
    call.experts = dims[io.upProj].d[0];
    call.inter = dims[io.upProj].d[1];
    call.hidden = dims[io.upProj].d[2];
    call.actDtype = toKernelDtype(types[io.x]);
    call.weightDtype = io.upWeightScale >= 0 ? static_cast<int32_t>(kHYBRIDTRT_FLOAT8_E4M3) : call.actDtype;
    call.indexDtype = toKernelIndexDtype(types[io.topkIndices]);
    return call;
}

std::string checkMoeLayout(PluginTensorDesc const* in, PluginTensorDesc const& y, MoeInputs const& io)
{
    bool const fp8 = io.upWeightScale >= 0;
    Dims const& x = in[io.x].dims;
    Dims const& indices = in[io.topkIndices].dims;
    Dims const& weights = in[io.topkWeights].dims;
    Dims const& up = in[io.upProj].dims;
    Dims const& down = in[io.downProj].dims;
    std::string const shapes = describe(in, y, io);
    if (x.nbDims != 2 || indices.nbDims != 2 || weights.nbDims != 2 || up.nbDims != 3 || down.nbDims != 3
        || y.dims.nbDims != 2
        || (fp8
            && (in[io.upWeightScale].dims.nbDims != 2 || in[io.upInputScale].dims.nbDims != 1
                || in[io.downWeightScale].dims.nbDims != 2 || in[io.downInputScale].dims.nbDims != 1)))
    {
        return std::string("expected ranks x 2, topk_indices 2, topk_weights 2, up_proj 3, down_proj 3")
            + (fp8 ? ", up_weight_scale 2, up_input_scale 1, down_weight_scale 2, down_input_scale 1" : "") + ", y 2"
            + shapes;
    }
    int64_t const tokens = x.d[0];
    int64_t const hidden = x.d[1];
    int64_t const topK = indices.d[1];
    int64_t const experts = up.d[0];
    int64_t const inter = up.d[1];
    if (!dimIs(indices.d[0], tokens) || !dimIs(weights.d[0], tokens) || !dimIs(weights.d[1], topK))
    {
        return "tokens T / top-k K differ across x, topk_indices, topk_weights" + shapes;
    }
    if (!dimIs(up.d[2], hidden) || !dimIs(down.d[1], hidden) || !dimIs(down.d[0], experts) || !dimIs(down.d[2], inter))
    {
        return "inconsistent experts E / hidden D / inter I: up_proj must be [E, I, D] and down_proj [E, D, I] with D "
               "= x's last dim"
            + shapes;
    }
    if (fp8)
    {
        Dims const& upWeightScale = in[io.upWeightScale].dims;
        Dims const& downWeightScale = in[io.downWeightScale].dims;
        auto const channelsOk = [](int64_t cols, int64_t width) { return dimIs(cols, 1) || dimIs(cols, width); };
        if (!dimIs(upWeightScale.d[0], experts) || !dimIs(in[io.upInputScale].dims.d[0], experts)
            || !dimIs(downWeightScale.d[0], experts) || !dimIs(in[io.downInputScale].dims.d[0], experts)
            || !channelsOk(upWeightScale.d[1], inter) || !channelsOk(downWeightScale.d[1], hidden))
        {
            return "FP8 scales must be up_weight_scale [E, 1|I], up_input_scale [E], down_weight_scale [E, 1|D], "
                   "down_input_scale [E]"
                + shapes;
        }
    }
    if (!widthOk(hidden) || !widthOk(inter))
    {
        return "hidden D " + std::to_string(hidden) + " and inter I " + std::to_string(inter)
            + " must be positive multiples of 16 up to " + std::to_string(HYBRIDTRT_MOE_MAX_WIDTH) + shapes;
    }
    if (experts == 0 || experts > HYBRIDTRT_MOE_MAX_EXPERTS)
    {
        return "experts E " + std::to_string(experts) + " must be in [1, " + std::to_string(HYBRIDTRT_MOE_MAX_EXPERTS)
            + "]" + shapes;
    }
    if (topK == 0)
    {
        return "top-k K must be >= 1" + shapes;
    }
    bool sameShape = y.dims.nbDims == x.nbDims;
    for (int32_t i = 0; sameShape && i < x.nbDims; ++i)
    {
        sameShape = dimIs(y.dims.d[i], x.d[i]);
    }
    if (!sameShape)
    {
        return "output y must have x's shape" + shapes;
    }
    DataType const act = in[io.x].type;
    DataType const stack = fp8 ? DataType::kFP8 : act;
    bool const scalesOk = !fp8
        || (in[io.upWeightScale].type == DataType::kFLOAT && in[io.upInputScale].type == DataType::kFLOAT
            && in[io.downWeightScale].type == DataType::kFLOAT && in[io.downInputScale].type == DataType::kFLOAT);
    if (!isActivationType(act) || toKernelIndexDtype(in[io.topkIndices].type) < 0
        || in[io.topkWeights].type != DataType::kFLOAT || in[io.upProj].type != stack || in[io.downProj].type != stack
        || !scalesOk || y.type != act)
    {
        return std::string("dtypes: x float32 / float16 / bfloat16, topk_indices int64 / int32, topk_weights float32, ")
            + (fp8 ? "up_proj / down_proj float8e4m3fn, the scales float32" : "up_proj / down_proj in x's dtype")
            + ", y in x's dtype" + shapes;
    }
    return {};
}

bool supportsMoeFormat(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs, MoeInputs const& io) noexcept
{
    if (nbInputs != io.nbInputs || nbOutputs != kMOE_NB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    bool const fp8 = io.upWeightScale >= 0;
    // TensorRT asks position by position with the earlier ones fixed: x (position 0) decides the others.
    DataType const act = inOut[io.x].desc.type;
    if (pos == io.x)
    {
        return isActivationType(desc.type);
    }
    if (pos == io.topkIndices)
    {
        return toKernelIndexDtype(desc.type) >= 0;
    }
    if (pos == io.upProj || pos == io.downProj)
    {
        return desc.type == (fp8 ? DataType::kFP8 : act);
    }
    if (pos == nbInputs + kMOE_Y)
    {
        return desc.type == act;
    }
    return desc.type == DataType::kFLOAT; // topk_weights and the FP8 scales
}

int32_t moeWorkspaceSize(MoeCall const& call, size_t& bytes) noexcept
{
    return hybridtrtMoeExpertsWorkspaceSize(call.tokens, call.topK, call.experts, call.hidden, call.inter,
        call.actDtype, call.weightDtype, &bytes);
}

bool checkMoeCreation(char const* pluginName, PluginFieldCollection const* fc) noexcept
{
    int32_t const abi = hybridtrtMoeKernelsAbiVersion();
    if (abi != HYBRIDTRT_MOE_KERNELS_ABI_VERSION)
    {
        logError(std::string(pluginName) + ": libhybridtrt_kernels.so has MoE kernels C ABI version "
            + std::to_string(abi) + ", this plugin library needs " + std::to_string(HYBRIDTRT_MOE_KERNELS_ABI_VERSION)
            + ": rebuild the plugins from one checkout (`hybridtrt plugins build`) and keep the libraries together");
        return false;
    }
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr || std::strcmp(field.name, kATTR_ACTIVATION) != 0)
        {
            continue; // plugin_namespace / plugin_version (consumed by the ONNX parser) and unknown fields
        }
        std::string activation;
        if (!readStringField(field, activation))
        {
            logError(std::string(pluginName) + ": attribute activation must be a string");
            return false;
        }
        if (activation != kMOE_ACTIVATION_RELU2)
        {
            logError(std::string(pluginName) + ": activation \"" + activation
                + "\" is not supported: the kernels compute relu2 (Nemotron-3's experts) only");
            return false;
        }
    }
    return true; // no activation field: relu2, the op's only activation
}

int32_t MoeExpertsPlugin::launch(MoeCall const& call, PluginTensorDesc const* /*inputDesc*/, void const* const* inputs,
    void* const* outputs, void* workspace, size_t workspaceBytes, cudaStream_t stream) noexcept
{
    return hybridtrtMoeExperts(inputs[kIN_X], inputs[kIN_TOPK_INDICES], static_cast<float const*>(inputs[kIN_TOPK_WEIGHTS]),
        inputs[kIN_UP_PROJ], inputs[kIN_DOWN_PROJ], outputs[kOUT_Y], call.tokens, call.topK, call.experts, call.hidden,
        call.inter, call.actDtype, call.indexDtype, kHYBRIDTRT_MOE_TACTIC_AUTO, workspace, workspaceBytes, stream);
}

int32_t MoeExpertsFp8Plugin::launch(MoeCall const& call, PluginTensorDesc const* inputDesc, void const* const* inputs,
    void* const* outputs, void* workspace, size_t workspaceBytes, cudaStream_t stream) noexcept
{
    auto const floats = [&](int32_t i) { return static_cast<float const*>(inputs[i]); };
    return hybridtrtMoeExpertsFp8(inputs[kIN_X], inputs[kIN_TOPK_INDICES], floats(kIN_TOPK_WEIGHTS), inputs[kIN_UP_PROJ],
        floats(kIN_UP_WEIGHT_SCALE), floats(kIN_UP_INPUT_SCALE), inputs[kIN_DOWN_PROJ], floats(kIN_DOWN_WEIGHT_SCALE),
        floats(kIN_DOWN_INPUT_SCALE), outputs[kOUT_Y], call.tokens, call.topK, call.experts, call.hidden, call.inter,
        inputDesc[kIN_UP_WEIGHT_SCALE].dims.d[1], inputDesc[kIN_DOWN_WEIGHT_SCALE].dims.d[1], call.actDtype,
        call.indexDtype, kHYBRIDTRT_MOE_TACTIC_AUTO, workspace, workspaceBytes, stream);
}

} // namespace plugin
} // namespace hybridtrt
