/*
 * Host-only self test of libhybridtrt_trt.so: exercises the creators and the build/runtime interfaces that
 * need neither a GPU nor libnvinfer (names, fields, serialization round trip, output types, format
 * support, shape validation incl. batch / L agreement, workspace size, no aliasing). Built by
 * tests/plugins/test_trt_plugins.py against the stub headers (plugins/tests/trtStub) and, with
 * TENSORRT_ROOT, against TensorRT's own; CMake also builds it with the plugins. Prints one line per
 * failed check; exit code = failures.
 */
#include "NvInferRuntime.h"
#include "hybridtrt/ssdKernels.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

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

//! Scan inputs x, dt, A, B, C, D, initial_state then outputs y, final_state for the given shapes.
std::vector<DynamicPluginTensorDesc> scanDescs(int64_t b, int64_t l, int64_t h, int64_t p, int64_t g, int64_t n,
    DataType act, DataType state)
{
    return {desc({b, l, h, p}, act), desc({b, l, h}, act), desc({h}, DataType::kFLOAT), desc({b, l, g, n}, act),
        desc({b, l, g, n}, act), desc({h}, DataType::kFLOAT), desc({b, h, p, n}, state), desc({b, l, h, p}, act),
        desc({b, h, p, n}, state)};
}

void testCreators()
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 2 && creators != nullptr, "getCreators returns two creators");
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
    check(build->getOutputDataTypes(out, 2, in, 7) == 0 && out[0] == DataType::kHALF && out[1] == DataType::kBF16,
        "output dtypes: y = x dtype, final_state = state dtype");

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
        desc({16}, DataType::kFLOAT), desc({4, 16, 64, 128}, DataType::kHALF), desc({4, 16, 64}, DataType::kBF16),
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
    check(build->getOutputDataTypes(out, 2, in, 7) == 0 && out[0] == DataType::kBF16 && out[1] == DataType::kHALF,
        "update output dtypes");
    delete plugin;
}
} // namespace

int main()
{
    testCreators();
    testChunkScan();
    testStateUpdate();
    std::printf("%d checks, %d failures\n", gChecks, gFailures);
    return gFailures;
}
