/*
 * enqueue() of both TensorRT plugins against direct C ABI calls, on the CPU: built by
 * tests/plugins/test_trt_plugins.py together with the CPU emulation of the kernels
 * (-DHYBRIDTRT_CPU_EMULATION), against the stub headers (and TensorRT's own with TENSORRT_ROOT), so it
 * runs without a GPU or libnvinfer. The emulation is deterministic,
 * so the plugin path must reproduce the direct call bit for bit. Covers the argument plumbing
 * (dims -> shapes, TensorRT dtypes -> kernel dtypes, the chunk_size attribute), the L == 1 dispatch of
 * Mamba2ChunkScan to the update kernel, the workspace alignment inside enqueue, onShapeChange's layout
 * check, and Mamba2StateUpdate with new_state == state (the kernel is in-place safe).
 * Exit code = number of failed checks.
 */
#include "NvInferRuntime.h"
#include "hybridtrt/ssdKernels.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
int gFailures = 0;

void check(bool ok, char const* what)
{
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what);
    }
    else
    {
        std::printf("ok: %s\n", what);
    }
}

IPluginV3* create(char const* name, int32_t chunkSize)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
        {
            PluginField field("chunk_size", &chunkSize, PluginFieldType::kINT32, 1);
            PluginFieldCollection fc{1, &field};
            return c->createPlugin(name, &fc, TensorRTPhase::kRUNTIME);
        }
    }
    return nullptr;
}

//! Deterministic values in [lo, hi).
std::vector<float> values(size_t n, uint32_t seed, float lo, float hi)
{
    std::vector<float> v(n);
    uint32_t s = seed * 2654435761U + 1U;
    for (auto& e : v)
    {
        s = s * 1664525U + 1013904223U;
        e = lo + (hi - lo) * static_cast<float>(s >> 8) / static_cast<float>(1U << 24);
    }
    return v;
}

PluginTensorDesc desc(std::vector<int64_t> const& d)
{
    PluginTensorDesc t{};
    t.dims.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        t.dims.d[i] = d[i];
    }
    t.type = DataType::kFLOAT;
    t.format = TensorFormat::kLINEAR;
    return t;
}

void testChunkScan(int64_t L, int32_t chunkSize)
{
    int64_t const b = 2, h = 4, p = 32, g = 2, n = 16;
    auto x = values(b * L * h * p, 1, -1.F, 1.F);
    auto dt = values(b * L * h, 2, 0.01F, 0.2F);
    auto A = values(h, 3, -4.F, -0.5F);
    auto B = values(b * L * g * n, 4, -0.5F, 0.5F);
    auto C = values(b * L * g * n, 5, -0.5F, 0.5F);
    auto D = values(h, 6, -1.F, 1.F);
    auto s0 = values(b * h * p * n, 7, -1.F, 1.F);
    std::vector<float> y(x.size()), fin(s0.size()), yRef(x.size()), finRef(s0.size());

    IPluginV3* plugin = create("Mamba2ChunkScan", chunkSize);
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> in{desc({b, L, h, p}), desc({b, L, h}), desc({h}), desc({b, L, g, n}),
        desc({b, L, g, n}), desc({h}), desc({b, h, p, n})};
    std::vector<PluginTensorDesc> out{desc({b, L, h, p}), desc({b, h, p, n})};
    std::vector<DynamicPluginTensorDesc> dyn(7);
    for (int i = 0; i < 7; ++i)
    {
        dyn[i].desc = in[i];
        dyn[i].min = dyn[i].opt = dyn[i].max = in[i].dims;
    }
    size_t const wsBytes = build->getWorkspaceSize(dyn.data(), 7, nullptr, 2);
    // A workspace 16 bytes past a 256-byte boundary: enqueue must align it itself within wsBytes.
    std::vector<unsigned char> ws(wsBytes + 512);
    unsigned char* base = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
    void* misaligned = base + 16;
    void const* inputs[7] = {x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), s0.data()};
    void* outputs[2] = {y.data(), fin.data()};
    check(runtime->onShapeChange(in.data(), 7, out.data(), 2) == 0, "scan onShapeChange");
    std::vector<PluginTensorDesc> badIn = in;
    badIn[1].dims.d[1] = L + 1; // dt longer than x
    check(runtime->onShapeChange(badIn.data(), 7, out.data(), 2) != 0, "onShapeChange refuses dt length != x length");
    check(runtime->enqueue(in.data(), out.data(), inputs, outputs, misaligned, nullptr) == 0, "scan enqueue");

    int32_t status = 0;
    if (L == 1)
    {
        status = hybridtrtMamba2StateUpdate(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), s0.data(),
            yRef.data(), finRef.data(), b, h, p, g, n, 0, 0, 0, nullptr);
    }
    else
    {
        size_t bytes = 0;
        hybridtrtMamba2ChunkScanWorkspaceSize(b, L, h, p, g, n, chunkSize, 0, 0, 0, &bytes);
        std::vector<unsigned char> ref(bytes + 256);
        void* aligned = ref.data() + (256 - reinterpret_cast<uintptr_t>(ref.data()) % 256) % 256;
        status = hybridtrtMamba2ChunkScan(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), s0.data(),
            yRef.data(), finRef.data(), b, L, h, p, g, n, chunkSize, 0, 0, 0, aligned, bytes, nullptr);
    }
    check(status == 0, "direct C ABI call");
    check(std::memcmp(y.data(), yRef.data(), y.size() * 4) == 0, L == 1 ? "scan L=1 y == update kernel y"
                                                                        : "scan y == direct call");
    check(std::memcmp(fin.data(), finRef.data(), fin.size() * 4) == 0,
        L == 1 ? "scan L=1 final_state == update kernel state" : "scan final_state == direct call");
    delete plugin;
}

void testStateUpdateInPlace()
{
    int64_t const b = 3, h = 4, p = 48, g = 1, n = 64;
    auto x = values(b * h * p, 11, -1.F, 1.F);
    auto dt = values(b * h, 12, 0.01F, 0.2F);
    auto A = values(h, 13, -4.F, -0.5F);
    auto B = values(b * g * n, 14, -0.5F, 0.5F);
    auto C = values(b * g * n, 15, -0.5F, 0.5F);
    auto D = values(h, 16, -1.F, 1.F);
    auto state = values(b * h * p * n, 17, -1.F, 1.F);
    auto stateRef = state;
    std::vector<float> y(x.size()), yRef(x.size()), stateOut(state.size());
    check(hybridtrtMamba2StateUpdate(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), stateRef.data(),
              yRef.data(), stateOut.data(), b, h, p, g, n, 0, 0, 0, nullptr)
            == 0,
        "direct update");

    IPluginV3* plugin = create("Mamba2StateUpdate", 0);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> in{desc({b, h, p}), desc({b, h}), desc({h}), desc({b, g, n}), desc({b, g, n}),
        desc({h}), desc({b, h, p, n})};
    std::vector<PluginTensorDesc> out{desc({b, h, p}), desc({b, h, p, n})};
    void const* inputs[7] = {x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), state.data()};
    void* outputs[2] = {y.data(), state.data()}; // new_state == state: the kernel updates in place
    check(runtime->enqueue(in.data(), out.data(), inputs, outputs, nullptr, nullptr) == 0, "update enqueue");
    check(std::memcmp(y.data(), yRef.data(), y.size() * 4) == 0, "update y == direct call");
    check(std::memcmp(state.data(), stateOut.data(), state.size() * 4) == 0, "in-place state == direct call");
    delete plugin;
}
} // namespace

int main()
{
    testChunkScan(1, 128);
    testChunkScan(70, 128);
    testChunkScan(300, 128); // three chunks of 128, the last partial
    testChunkScan(300, 8);   // chunk_size 8 runs as 64-token chunks
    testStateUpdateInPlace();
    std::printf("enqueue test: %d failures\n", gFailures);
    return gFailures;
}
