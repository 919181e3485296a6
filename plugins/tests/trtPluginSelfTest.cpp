/*
 * Host-only self test of libhybridtrt_trt.so: exercises the creators and the build/runtime interfaces that
 * need neither a GPU nor libnvinfer (names, fields, serialization round trip, output types, format
 * support, shape validation incl. batch / L agreement, y float32 for every activation dtype and the run-time
 * refusal of an engine whose y is not float32, workspace size, no aliasing) of the SSD plugins, and of the MoE
 * plugins (MoeExperts / MoeExpertsFp8: the activation attribute, y in x's dtype, int64 / int32 indices, FP8 stacks,
 * every shape agreement and kernel limit, the workspace at the profile's max T, no custom tactic, the MoE kernels'
 * C ABI version check — planted by interposing hybridtrtMoeKernelsAbiVersion). Built by
 * tests/plugins/test_trt_plugins.py against the stub headers (plugins/tests/trtStub) and, with
 * TENSORRT_ROOT, against TensorRT's own; CMake also builds it with the plugins. Prints one line per
 * failed check; exit code = failures.
 */
#include "NvInferRuntime.h"
#include "hybridtrt/moeKernels.h"
#include "hybridtrt/ssdKernels.h"
#include "pluginCommon.h" // dataTypeName, for messages

#include <cstdint>
#include <dlfcn.h>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
//! The MoE kernels' C ABI version the plugins see: 0 = the kernels library's own (below).
int32_t gPlantedMoeAbi = 0;
} // namespace

//! Interposes the kernels library's hybridtrtMoeKernelsAbiVersion (the executable's definition wins for the plugin
//! library's call), so that a kernels library of another MoE ABI version can be planted without building one.
extern "C" int32_t hybridtrtMoeKernelsAbiVersion(void)
{
    if (gPlantedMoeAbi != 0)
    {
        return gPlantedMoeAbi;
    }
    using Fn = int32_t (*)();
    static auto const real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "hybridtrtMoeKernelsAbiVersion"));
    return real != nullptr ? real() : -1;
}

namespace
{
int gChecks = 0;
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

IPluginCreatorV3One* findCreator(char const* name)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
        {
            return c;
        }
    }
    return nullptr;
}

Dims dims(std::vector<int64_t> const& d)
{
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        out.d[i] = d[i];
    }
    return out;
}

DynamicPluginTensorDesc desc(std::vector<int64_t> const& d, DataType type)
{
    DynamicPluginTensorDesc t{};
    t.desc.dims = dims(d);
    t.desc.type = type;
    t.desc.format = TensorFormat::kLINEAR;
    t.min = t.desc.dims;
    t.opt = t.desc.dims;
    t.max = t.desc.dims;
    return t;
}

//! Scan inputs x, dt, A, B, C, D, initial_state then outputs y (float32), final_state for the given shapes.
std::vector<DynamicPluginTensorDesc> scanDescs(int64_t b, int64_t l, int64_t h, int64_t p, int64_t g, int64_t n,
    DataType act, DataType state)
{
    return {desc({b, l, h, p}, act), desc({b, l, h}, act), desc({h}, DataType::kFLOAT), desc({b, l, g, n}, act),
        desc({b, l, g, n}, act), desc({h}, DataType::kFLOAT), desc({b, h, p, n}, state),
        desc({b, l, h, p}, DataType::kFLOAT), desc({b, h, p, n}, state)};
}

std::vector<PluginTensorDesc> runtimeDescs(std::vector<DynamicPluginTensorDesc> const& io)
{
    std::vector<PluginTensorDesc> out;
    for (auto const& d : io)
    {
        out.push_back(d.desc);
    }
    return out;
}

//! y is float32 for every activation dtype, at build time (output types, formats, configure) and at run time
//! (onShapeChange, enqueue refuse an engine whose y has another dtype, as one built by an older library has).
void checkYIsFloat32(IPluginV3* plugin, std::vector<DynamicPluginTensorDesc> io, DataType act, char const* name)
{
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::string const what = std::string(name) + " " + hybridtrt::plugin::dataTypeName(act) + " x: ";
    for (int32_t i : {0, 3, 4})
    {
        io[i].desc.type = act;
    }
    DataType in[7];
    for (int32_t i = 0; i < 7; ++i)
    {
        in[i] = io[i].desc.type;
    }
    DataType out[2] = {DataType::kINT8, DataType::kINT8};
    check(build->getOutputDataTypes(out, 2, in, 7) == 0 && out[0] == DataType::kFLOAT && out[1] == in[6],
        what + "output dtypes y float32, state out = state dtype");
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        check(build->supportsFormatCombination(pos, io.data(), 7, 2), what + "supports pos " + std::to_string(pos));
    }
    check(build->configurePlugin(io.data(), 7, io.data() + 7, 2) == 0, what + "configure");
    auto rt = runtimeDescs(io);
    check(runtime->onShapeChange(rt.data(), 7, rt.data() + 7, 2) == 0, what + "onShapeChange");
    for (DataType other : {DataType::kHALF, DataType::kBF16})
    {
        auto wrong = io;
        wrong[7].desc.type = other;
        std::string const y = what + "y " + hybridtrt::plugin::dataTypeName(other);
        check(!build->supportsFormatCombination(7, wrong.data(), 7, 2), y + " refused by supportsFormatCombination");
        check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, y + " refused by configurePlugin");
        auto wrongRt = runtimeDescs(wrong);
        check(runtime->onShapeChange(wrongRt.data(), 7, wrongRt.data() + 7, 2) != 0, y + " refused by onShapeChange");
        void const* inputs[7] = {};
        void* outputs[2] = {};
        check(runtime->enqueue(wrongRt.data(), wrongRt.data() + 7, inputs, outputs, nullptr, nullptr) != 0,
            y + " refused by enqueue without a launch");
    }
    auto wrong = io;
    wrong[8].desc.type = wrong[6].desc.type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
    check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, what + "state out dtype != state refused");
    wrong = io;
    wrong[7].desc.dims.d[wrong[7].desc.dims.nbDims - 1] += 16; // y's P differs from x's
    check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, what + "y shape != x shape refused");
    wrong = io;
    wrong[8].desc.dims.d[3] += 16; // state out's N differs from the state's
    check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, what + "state out shape != state refused");
}

void testCreators()
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 4 && creators != nullptr, "getCreators returns four creators");
    for (int32_t i = 0; i < n; ++i)
    {
        check(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
            "creator interface kind is PLUGIN CREATOR_V3ONE");
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        check(std::strcmp(c->getPluginNamespace(), "hybridtrt") == 0, "namespace hybridtrt");
        check(std::strcmp(c->getPluginVersion(), "1") == 0, "version 1");
    }
    check(findCreator("Mamba2ChunkScan") != nullptr, "Mamba2ChunkScan creator registered");
    check(findCreator("Mamba2StateUpdate") != nullptr, "Mamba2StateUpdate creator registered");
    check(findCreator("MoeExperts") != nullptr, "MoeExperts creator registered");
    check(findCreator("MoeExpertsFp8") != nullptr, "MoeExpertsFp8 creator registered");
}

void testChunkScan()
{
    IPluginCreatorV3One* creator = findCreator("Mamba2ChunkScan");
    if (creator == nullptr)
    {
        return;
    }
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names->nbFields == 1 && std::strcmp(names->fields[0].name, "chunk_size") == 0, "field chunk_size");
    // The ONNX parser passes only the fields getFieldNames lists, INT attributes as kINT32 (loadFields).
    check(names->nbFields == 1 && names->fields[0].type == PluginFieldType::kINT32, "chunk_size declared kINT32");
    int32_t chunk32 = 256;
    PluginField parserField("chunk_size", &chunk32, PluginFieldType::kINT32, 1);
    PluginFieldCollection parserFc{1, &parserField};
    IPluginV3* fromParser = creator->createPlugin("scan", &parserFc, TensorRTPhase::kBUILD);
    check(fromParser != nullptr, "createPlugin(chunk_size=256 kINT32, as the ONNX parser passes it)");
    delete fromParser;

    // The ONNX parser hands attributes over as fields; int64 or int32, plus the namespace/version strings.
    int64_t chunk64 = 128;
    char const* ns = "hybridtrt";
    std::vector<PluginField> fields{PluginField("chunk_size", &chunk64, PluginFieldType::kINT64, 1),
        PluginField("plugin_namespace", ns, PluginFieldType::kCHAR, 9)};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("scan", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin(chunk_size=128 int64)");
    if (plugin == nullptr)
    {
        return;
    }
    int64_t bad = 0;
    PluginField badField("chunk_size", &bad, PluginFieldType::kINT64, 1);
    PluginFieldCollection badFc{1, &badField};
    check(creator->createPlugin("scan", &badFc, TensorRTPhase::kBUILD) == nullptr, "chunk_size=0 refused");

    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginName(), "Mamba2ChunkScan") == 0, "core name");
    check(std::strcmp(core->getPluginNamespace(), "hybridtrt") == 0, "core namespace");
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    check(build->getNbOutputs() == 2, "two outputs");

    DataType in[7] = {DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kHALF, DataType::kHALF,
        DataType::kFLOAT, DataType::kBF16};
    DataType out[2] = {};
    check(build->getOutputDataTypes(out, 2, in, 7) == 0 && out[0] == DataType::kFLOAT && out[1] == DataType::kBF16,
        "output dtypes: y float32 (x fp16), final_state = state dtype");

    auto io = scanDescs(2, 300, 16, 80, 2, 128, DataType::kHALF, DataType::kFLOAT);
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        check(build->supportsFormatCombination(pos, io.data(), 7, 2), "supports fp16 act / fp32 state, pos "
            + std::to_string(pos));
    }
    auto wrong = io;
    wrong[3].desc.type = DataType::kFLOAT; // B must have x's dtype
    check(!build->supportsFormatCombination(3, wrong.data(), 7, 2), "B in another dtype than x refused");
    wrong = io;
    wrong[2].desc.type = DataType::kHALF; // A is fp32
    check(!build->supportsFormatCombination(2, wrong.data(), 7, 2), "fp16 A refused");
    wrong = io;
    wrong[0].desc.format = TensorFormat::kHWC8;
    check(!build->supportsFormatCombination(0, wrong.data(), 7, 2), "non-linear format refused");
    wrong = io;
    wrong[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, wrong.data(), 7, 2), "int8 x refused");
    for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        checkYIsFloat32(plugin, io, act, "scan");
        checkYIsFloat32(plugin, scanDescs(2, 1, 16, 64, 2, 64, act, DataType::kBF16), act, "scan L=1");
    }

    check(build->configurePlugin(io.data(), 7, io.data() + 7, 2) == 0, "configure P=80 N=128");
    auto p72 = scanDescs(2, 300, 16, 72, 2, 128, DataType::kHALF, DataType::kFLOAT);
    check(build->configurePlugin(p72.data(), 7, p72.data() + 7, 2) != 0, "configure P=72 refused");
    auto n32 = scanDescs(2, 300, 16, 80, 2, 32, DataType::kHALF, DataType::kFLOAT);
    check(build->configurePlugin(n32.data(), 7, n32.data() + 7, 2) != 0, "configure N=32 refused");
    auto dyn = io;
    dyn[0].desc.dims.d[1] = -1; // dynamic L passes
    check(build->configurePlugin(dyn.data(), 7, dyn.data() + 7, 2) == 0, "configure dynamic L");
    auto batchMismatch = io;
    batchMismatch[1].desc.dims.d[0] = 3; // dt batch 3, x batch 2
    check(build->configurePlugin(batchMismatch.data(), 7, batchMismatch.data() + 7, 2) != 0, "dt batch != x batch refused");
    auto lengthMismatch = io;
    lengthMismatch[3].desc.dims.d[1] = 299; // B has L 299, x 300
    check(build->configurePlugin(lengthMismatch.data(), 7, lengthMismatch.data() + 7, 2) != 0, "B length != x length refused");
    auto stateBatch = io;
    stateBatch[6].desc.dims.d[0] = 1;
    check(build->configurePlugin(stateBatch.data(), 7, stateBatch.data() + 7, 2) != 0, "state batch != x batch refused");

    size_t expected = 0;
    hybridtrtMamba2ChunkScanWorkspaceSize(2, 300, 16, 80, 2, 128, 128, kHYBRIDTRT_FLOAT16, kHYBRIDTRT_FLOAT16,
        kHYBRIDTRT_FLOAT32, &expected);
    check(expected > 0 && build->getWorkspaceSize(io.data(), 7, io.data() + 7, 2) == expected + 256,
        "workspace size = C ABI query at the profile max + 256 bytes of alignment slack");

    auto* runtime
        = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    check(ser->nbFields == 1 && std::strcmp(ser->fields[0].name, "chunk_size") == 0
            && *static_cast<int32_t const*>(ser->fields[0].data) == 128,
        "serializes chunk_size=128");
    IPluginV3* restored = creator->createPlugin("scan", ser, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "deserialize from serialized fields");
    if (restored != nullptr)
    {
        auto* rt
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(*static_cast<int32_t const*>(rt->getFieldsToSerialize()->fields[0].data) == 128, "round trip");
        delete restored;
    }

    // enqueue validates before touching the GPU: head_dim 72 is refused with an error, no launch.
    std::vector<PluginTensorDesc> bad72;
    for (auto const& d : p72)
    {
        bad72.push_back(d.desc);
    }
    void const* inputs[7] = {};
    void* outputs[2] = {};
    check(runtime->enqueue(bad72.data(), bad72.data() + 7, inputs, outputs, nullptr, nullptr) != 0,
        "enqueue refuses head_dim 72 without a launch");

    IPluginV3* copy = plugin->clone();
    check(copy != nullptr, "clone");
    delete copy;
    delete plugin;
}

void testStateUpdate()
{
    IPluginCreatorV3One* creator = findCreator("Mamba2StateUpdate");
    if (creator == nullptr)
    {
        return;
    }
    PluginFieldCollection empty{0, nullptr};
    IPluginV3* plugin = creator->createPlugin("update", &empty, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin(Mamba2StateUpdate)");
    if (plugin == nullptr)
    {
        return;
    }
    IPluginCapability* buildCap = plugin->getCapabilityInterface(PluginCapabilityType::kBUILD);
    InterfaceInfo const info = buildCap->getInterfaceInfo();
    // Version 1 of the build capability: no getAliasedInput, so new_state never aliases the state input and
    // the runtimes' separate past / present buffers are what TensorRT binds (DESIGN.md §5, aliasing).
    check(std::strcmp(info.kind, "PLUGIN_V3ONE_BUILD") == 0 && info.major == 1, "build interface is V1 (no aliasing)");
    auto* build = static_cast<IPluginV3OneBuild*>(buildCap);
    check(build->getWorkspaceSize(nullptr, 0, nullptr, 0) == 0, "no workspace");

    std::vector<DynamicPluginTensorDesc> io{desc({4, 16, 64}, DataType::kBF16), desc({4, 16}, DataType::kFLOAT),
        desc({16}, DataType::kFLOAT), desc({4, 2, 128}, DataType::kBF16), desc({4, 2, 128}, DataType::kBF16),
        desc({16}, DataType::kFLOAT), desc({4, 16, 64, 128}, DataType::kHALF), desc({4, 16, 64}, DataType::kFLOAT),
        desc({4, 16, 64, 128}, DataType::kHALF)};
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        check(build->supportsFormatCombination(pos, io.data(), 7, 2), "update supports pos " + std::to_string(pos));
    }
    auto wrong = io;
    wrong[8].desc.type = DataType::kFLOAT; // new_state must keep the state dtype
    check(!build->supportsFormatCombination(8, wrong.data(), 7, 2), "new_state dtype change refused");
    check(build->configurePlugin(io.data(), 7, io.data() + 7, 2) == 0, "configure update");
    wrong = io;
    wrong[6].desc.dims.d[2] = 32; // state P disagrees with x
    check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, "inconsistent state shape refused");
    wrong = io;
    wrong[3].desc.dims.d[0] = 5; // B batch disagrees with x
    check(build->configurePlugin(wrong.data(), 7, wrong.data() + 7, 2) != 0, "B batch != x batch refused");
    DataType in[7] = {DataType::kBF16, DataType::kFLOAT, DataType::kFLOAT, DataType::kBF16, DataType::kBF16,
        DataType::kFLOAT, DataType::kHALF};
    DataType out[2] = {};
    check(build->getOutputDataTypes(out, 2, in, 7) == 0 && out[0] == DataType::kFLOAT && out[1] == DataType::kHALF,
        "update output dtypes: y float32 (x bf16), new_state = state dtype");
    for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        checkYIsFloat32(plugin, io, act, "update");
    }
    delete plugin;
}
//! MoE inputs (x, topk_indices, topk_weights, up_proj, [up_weight_scale, up_input_scale,] down_proj,
//! [down_weight_scale, down_input_scale]) then y, for T tokens (max `maxT`), K, E, D, I.
std::vector<DynamicPluginTensorDesc> moeDescs(bool fp8, int64_t t, int64_t k, int64_t e, int64_t d, int64_t i,
    DataType act, DataType index = DataType::kINT64, int64_t maxT = -1, int64_t upCols = 1, int64_t downCols = 1)
{
    DataType const stack = fp8 ? DataType::kFP8 : act;
    std::vector<DynamicPluginTensorDesc> io{desc({t, d}, act), desc({t, k}, index), desc({t, k}, DataType::kFLOAT),
        desc({e, i, d}, stack)};
    if (fp8)
    {
        io.push_back(desc({e, upCols}, DataType::kFLOAT));
        io.push_back(desc({e}, DataType::kFLOAT));
    }
    io.push_back(desc({e, d, i}, stack));
    if (fp8)
    {
        io.push_back(desc({e, downCols}, DataType::kFLOAT));
        io.push_back(desc({e}, DataType::kFLOAT));
    }
    io.push_back(desc({t, d}, act));
    if (maxT >= 0)
    {
        for (int32_t pos : {0, 1, 2, static_cast<int32_t>(io.size()) - 1})
        {
            io[pos].desc.dims.d[0] = -1; // T is dynamic at build time
            io[pos].min.d[0] = 1;
            io[pos].opt.d[0] = t;
            io[pos].max.d[0] = maxT;
        }
    }
    return io;
}

PluginField stringField(char const* name, char const* value)
{
    // As the ONNX parser passes a STRING attribute: kCHAR, the terminating NUL counted.
    return PluginField(name, value, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(value) + 1));
}

void testMoe(char const* name, bool fp8)
{
    IPluginCreatorV3One* creator = findCreator(name);
    if (creator == nullptr)
    {
        return;
    }
    std::string const who = std::string(name) + ": ";
    int32_t const nbIn = fp8 ? 9 : 5;
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names->nbFields == 1 && std::strcmp(names->fields[0].name, "activation") == 0
            && names->fields[0].type == PluginFieldType::kCHAR,
        who + "one field, activation (kCHAR)");

    std::vector<PluginField> fields{stringField("activation", "relu2"), stringField("plugin_namespace", "hybridtrt"),
        stringField("plugin_version", "1")};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("experts", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, who + "createPlugin(activation=relu2, as the ONNX parser passes it)");
    if (plugin == nullptr)
    {
        return;
    }
    PluginField noNul("activation", "relu2", PluginFieldType::kCHAR, 5);
    PluginFieldCollection noNulFc{1, &noNul};
    IPluginV3* fromNoNul = creator->createPlugin("experts", &noNulFc, TensorRTPhase::kBUILD);
    check(fromNoNul != nullptr, who + "activation without its NUL accepted");
    delete fromNoNul;
    PluginFieldCollection empty{0, nullptr};
    IPluginV3* fromEmpty = creator->createPlugin("experts", &empty, TensorRTPhase::kBUILD);
    check(fromEmpty != nullptr, who + "no activation field: relu2");
    delete fromEmpty;
    PluginField silu = stringField("activation", "silu");
    PluginFieldCollection siluFc{1, &silu};
    check(creator->createPlugin("experts", &siluFc, TensorRTPhase::kBUILD) == nullptr, who + "activation silu refused");
    int32_t two = 2;
    PluginField intActivation("activation", &two, PluginFieldType::kINT32, 1);
    PluginFieldCollection intFc{1, &intActivation};
    check(creator->createPlugin("experts", &intFc, TensorRTPhase::kBUILD) == nullptr, who + "integer activation refused");
    gPlantedMoeAbi = HYBRIDTRT_MOE_KERNELS_ABI_VERSION + 1;
    check(creator->createPlugin("experts", &fc, TensorRTPhase::kRUNTIME) == nullptr,
        who + "kernels of another MoE C ABI version refused at creation (engine load)");
    gPlantedMoeAbi = 0;

    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginName(), name) == 0 && std::strcmp(core->getPluginNamespace(), "hybridtrt") == 0
            && std::strcmp(core->getPluginVersion(), "1") == 0,
        who + "core name / namespace / version");
    IPluginCapability* buildCap = plugin->getCapabilityInterface(PluginCapabilityType::kBUILD);
    InterfaceInfo const info = buildCap->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN_V3ONE_BUILD") == 0 && info.major == 1, who + "build interface V1 (no aliasing)");
    auto* build = static_cast<IPluginV3OneBuild*>(buildCap);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(build->getNbOutputs() == 1, who + "one output");
    check(build->getNbTactics() == 0, who + "no custom tactic (AUTO per enqueue)");
    check(runtime->setTactic(0) == 0 && runtime->setTactic(kHYBRIDTRT_MOE_TACTIC_DECODE) != 0,
        who + "default tactic 0 taken, an unadvertised one refused");

    for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        std::string const what = who + hybridtrt::plugin::dataTypeName(act) + " x: ";
        auto io = moeDescs(fp8, 7, 2, 8, 64, 96, act);
        std::vector<DataType> in;
        for (int32_t i = 0; i < nbIn; ++i)
        {
            in.push_back(io[i].desc.type);
        }
        DataType out[1] = {DataType::kINT8};
        check(build->getOutputDataTypes(out, 1, in.data(), nbIn) == 0 && out[0] == act, what + "y in x's dtype");
        for (DataType index : {DataType::kINT64, DataType::kINT32})
        {
            auto withIndex = moeDescs(fp8, 7, 2, 8, 64, 96, act, index);
            for (int32_t pos = 0; pos <= nbIn; ++pos)
            {
                check(build->supportsFormatCombination(pos, withIndex.data(), nbIn, 1),
                    what + hybridtrt::plugin::dataTypeName(index) + " indices, supports pos " + std::to_string(pos));
            }
            check(build->configurePlugin(withIndex.data(), nbIn, withIndex.data() + nbIn, 1) == 0,
                what + hybridtrt::plugin::dataTypeName(index) + " indices: configure");
        }
        auto wrong = io;
        wrong[nbIn].desc.type = act == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT; // the SSD y rule
        check(!build->supportsFormatCombination(nbIn, wrong.data(), nbIn, 1), what + "y in another dtype refused");
        check(build->configurePlugin(wrong.data(), nbIn, wrong.data() + nbIn, 1) != 0,
            what + "y in another dtype refused by configurePlugin");
        auto wrongRt = runtimeDescs(wrong);
        check(runtime->onShapeChange(wrongRt.data(), nbIn, wrongRt.data() + nbIn, 1) != 0,
            what + "y in another dtype refused by onShapeChange");
        wrong = io;
        wrong[3].desc.type = fp8 ? act : (act == DataType::kFLOAT ? DataType::kBF16 : DataType::kFLOAT);
        check(!build->supportsFormatCombination(3, wrong.data(), nbIn, 1), what + "up_proj in the wrong dtype refused");
        check(build->configurePlugin(wrong.data(), nbIn, wrong.data() + nbIn, 1) != 0,
            what + "up_proj in the wrong dtype refused by configurePlugin");
        wrong = io;
        wrong[nbIn - (fp8 ? 3 : 1)].desc.type = fp8 ? act : DataType::kFP8;
        check(!build->supportsFormatCombination(nbIn - (fp8 ? 3 : 1), wrong.data(), nbIn, 1),
            what + (fp8 ? "down_proj not FP8 refused" : "FP8 down_proj refused (MoeExpertsFp8's)"));
    }

    auto io = moeDescs(fp8, 7, 2, 8, 64, 96, DataType::kBF16);
    auto refused = [&](std::vector<DynamicPluginTensorDesc> const& bad, int32_t pos, std::string const& what) {
        check(!build->supportsFormatCombination(pos, bad.data(), nbIn, 1), who + what);
    };
    auto wrong = io;
    wrong[1].desc.type = DataType::kINT8;
    refused(wrong, 1, "int8 topk_indices refused");
    wrong = io;
    wrong[2].desc.type = DataType::kHALF;
    refused(wrong, 2, "fp16 topk_weights refused");
    wrong = io;
    wrong[0].desc.format = TensorFormat::kHWC8;
    refused(wrong, 0, "non-linear format refused");
    wrong = io;
    wrong[0].desc.type = DataType::kINT8;
    refused(wrong, 0, "int8 x refused");
    if (fp8)
    {
        for (int32_t pos : {4, 5, 7, 8})
        {
            wrong = io;
            wrong[pos].desc.type = DataType::kHALF;
            refused(wrong, pos, "fp16 scale at " + std::to_string(pos) + " refused");
        }
    }
    check(!build->supportsFormatCombination(nbIn + 1, io.data(), nbIn, 1), who + "position past y refused");

    auto configureRefuses = [&](std::vector<DynamicPluginTensorDesc> const& bad, std::string const& what) {
        check(build->configurePlugin(bad.data(), nbIn, bad.data() + nbIn, 1) != 0, who + what + " refused by configurePlugin");
        auto rt = runtimeDescs(bad);
        check(runtime->onShapeChange(rt.data(), nbIn, rt.data() + nbIn, 1) != 0, who + what + " refused by onShapeChange");
    };
    int32_t const down = fp8 ? 6 : 4;
    wrong = io;
    wrong[2].desc.dims.d[1] = 3;
    configureRefuses(wrong, "topk_weights K 3 != topk_indices K 2");
    wrong = io;
    wrong[1].desc.dims.d[0] = 6;
    configureRefuses(wrong, "topk_indices T != x T");
    wrong = io;
    wrong[3].desc.dims.d[2] = 80;
    configureRefuses(wrong, "up_proj D != x D");
    wrong = io;
    wrong[down].desc.dims.d[2] = 80;
    configureRefuses(wrong, "down_proj I != up_proj I");
    wrong = io;
    wrong[down].desc.dims.d[0] = 9;
    configureRefuses(wrong, "down_proj E != up_proj E");
    configureRefuses(moeDescs(fp8, 7, 2, 8, 72, 96, DataType::kBF16), "hidden 72 (not a multiple of 16)");
    configureRefuses(moeDescs(fp8, 7, 2, 8, 64, 65552, DataType::kBF16), "inter 65552 (past 65536)");
    configureRefuses(moeDescs(fp8, 7, 2, 4097, 64, 96, DataType::kBF16), "4097 experts");
    configureRefuses(moeDescs(fp8, 7, 0, 8, 64, 96, DataType::kBF16), "top-k 0");
    wrong = io;
    wrong[nbIn].desc.dims.d[1] = 32;
    configureRefuses(wrong, "y shape != x shape");
    wrong = io;
    wrong[0].desc.dims.nbDims = 3;
    wrong[0].desc.dims.d[2] = 1;
    configureRefuses(wrong, "rank-3 x");
    check(build->configurePlugin(io.data(), nbIn - 1, io.data() + nbIn, 1) != 0, who + "a missing input refused");
    if (fp8)
    {
        auto perChannel = moeDescs(true, 7, 2, 8, 64, 96, DataType::kBF16, DataType::kINT64, -1, 96, 64);
        check(build->configurePlugin(perChannel.data(), 9, perChannel.data() + 9, 1) == 0,
            who + "per-channel weight scales [E, I] / [E, D]");
        configureRefuses(moeDescs(true, 7, 2, 8, 64, 96, DataType::kBF16, DataType::kINT64, -1, 2, 1),
            "up_weight_scale [E, 2]");
        configureRefuses(moeDescs(true, 7, 2, 8, 64, 96, DataType::kBF16, DataType::kINT64, -1, 1, 96),
            "down_weight_scale [E, I] (must be [E, 1|D])");
        wrong = io;
        wrong[5].desc.dims.d[0] = 7;
        configureRefuses(wrong, "up_input_scale [7] for 8 experts");
        wrong = io;
        wrong[8].desc.dims.nbDims = 2;
        wrong[8].desc.dims.d[1] = 1;
        configureRefuses(wrong, "down_input_scale of rank 2");
    }

    // Build time: T dynamic, the workspace from the profile's max T.
    auto dyn = moeDescs(fp8, 64, 6, 128, 64, 96, DataType::kBF16, DataType::kINT64, 2048);
    check(build->configurePlugin(dyn.data(), nbIn, dyn.data() + nbIn, 1) == 0, who + "configure with dynamic T");
    size_t expected = 0;
    hybridtrtMoeExpertsWorkspaceSize(2048, 6, 128, 64, 96, kHYBRIDTRT_BFLOAT16,
        fp8 ? static_cast<int32_t>(kHYBRIDTRT_FLOAT8_E4M3) : kHYBRIDTRT_BFLOAT16, &expected);
    check(expected > 0 && build->getWorkspaceSize(dyn.data(), nbIn, dyn.data() + nbIn, 1) == expected + 256,
        who + "workspace = C ABI query at the profile's max T + 256 bytes of alignment slack");
    auto huge = moeDescs(fp8, 64, 22, 128, 64, 96, DataType::kBF16, DataType::kINT64, int64_t(1) << 27);
    check(build->configurePlugin(huge.data(), nbIn, huge.data() + nbIn, 1) != 0,
        who + "profile max T*K past 2^31 - 1 refused by configurePlugin");
    check(build->getWorkspaceSize(huge.data(), nbIn, huge.data() + nbIn, 1) == 0, who + "no workspace for it");

    // getOutputShapes: y is x's expressions (a static output shape). The builder is never touched.
    DimsExprs shapes[9]{};
    for (int32_t i = 0; i < nbIn; ++i)
    {
        shapes[i].nbDims = static_cast<int32_t>(io[i].desc.dims.nbDims);
    }
    alignas(16) static unsigned char builderBytes[64];
    DimsExprs y{};
    check(build->getOutputShapes(shapes, nbIn, nullptr, 0, &y, 1, *reinterpret_cast<IExprBuilder*>(builderBytes)) == 0
            && y.nbDims == 2,
        who + "y [T, D] = x's shape");

    // Run time: T = 0 launches nothing (null pointers are fine); serialization round trip.
    auto emptyT = runtimeDescs(moeDescs(fp8, 0, 2, 8, 64, 96, DataType::kBF16));
    void const* inputs[9] = {};
    void* outputs[1] = {};
    check(runtime->onShapeChange(emptyT.data(), nbIn, emptyT.data() + nbIn, 1) == 0, who + "onShapeChange T = 0");
    check(runtime->enqueue(emptyT.data(), emptyT.data() + nbIn, inputs, outputs, nullptr, nullptr) == 0,
        who + "enqueue T = 0: nothing to launch");
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    check(ser->nbFields == 1 && std::strcmp(ser->fields[0].name, "activation") == 0
            && ser->fields[0].type == PluginFieldType::kCHAR && ser->fields[0].length == 6
            && std::strcmp(static_cast<char const*>(ser->fields[0].data), "relu2") == 0,
        who + "serializes activation=relu2");
    IPluginV3* restored = creator->createPlugin("experts", ser, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, who + "deserialize from serialized fields");
    delete restored;
    IPluginV3* attached = runtime->attachToContext(nullptr);
    check(attached != nullptr, who + "attachToContext (no per-device set-up)");
    delete attached;
    IPluginV3* copy = plugin->clone();
    check(copy != nullptr, who + "clone");
    delete copy;
    delete plugin;
}
} // namespace

int main()
{
    testCreators();
    testChunkScan();
    testStateUpdate();
    testMoe("MoeExperts", /*fp8=*/false);
    testMoe("MoeExpertsFp8", /*fp8=*/true);
    std::printf("%d checks, %d failures\n", gChecks, gFailures);
    return gFailures;
}
