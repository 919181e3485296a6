/*
 * enqueue() of the TensorRT plugins against direct C ABI calls, on the CPU: built by
 * tests/plugins/test_trt_plugins.py together with the CPU emulation of the kernels
 * (-DHYBRIDTRT_CPU_EMULATION), against the stub headers (and TensorRT's own with TENSORRT_ROOT), so it
 * runs without a GPU or libnvinfer. The emulation is deterministic,
 * so the plugin path must reproduce the direct call bit for bit. Covers the argument plumbing
 * (dims -> shapes, TensorRT dtypes -> kernel dtypes, the chunk_size attribute), the L == 1 dispatch of
 * Mamba2ChunkScan to the update kernel, the workspace alignment inside enqueue, onShapeChange's layout
 * check, and Mamba2StateUpdate with new_state == state (the kernel is in-place safe); fp32 / fp16 / bf16
 * activations and states, y float32 (poisoned before, every element written). MoeExperts / MoeExpertsFp8: the I/O
 * plumbing (dims -> T, K, E, D, I; TensorRT dtypes -> kernel dtypes, int64 / int32 indices; the FP8 scales and their
 * per-expert / per-channel widths), y in x's dtype, AUTO on both paths (decode at T = 3, prefill at T = 70), a
 * workspace sized for the profile's max T and misaligned by 16 bytes, a skipped out-of-range index.
 * Exit code = number of failed checks.
 */
#include "NvInferRuntime.h"
#include "hybridtrt/moeKernels.h"
#include "hybridtrt/ssdKernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
    else
    {
        std::printf("ok: %s\n", what.c_str());
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

int32_t kernelDtype(DataType type)
{
    return type == DataType::kHALF ? kHYBRIDTRT_FLOAT16 : type == DataType::kBF16 ? kHYBRIDTRT_BFLOAT16 : kHYBRIDTRT_FLOAT32;
}

//! A host tensor of one TensorRT dtype (fp32 / fp16 / bf16), filled from fp32 values rounded to nearest.
struct Tensor
{
    DataType type;
    std::vector<unsigned char> bytes;

    Tensor(std::vector<float> const& v, DataType t)
        : type(t)
        , bytes(v.size() * (t == DataType::kFLOAT ? 4 : 2))
    {
        for (size_t i = 0; i < v.size(); ++i)
        {
            switch (t)
            {
            case DataType::kHALF: reinterpret_cast<__half*>(bytes.data())[i] = __float2half_rn(v[i]); break;
            case DataType::kBF16: reinterpret_cast<__nv_bfloat16*>(bytes.data())[i] = __float2bfloat16_rn(v[i]); break;
            default: reinterpret_cast<float*>(bytes.data())[i] = v[i]; break;
            }
        }
    }
    void* data()
    {
        return bytes.data();
    }
    bool operator==(Tensor const& other) const
    {
        return type == other.type && bytes == other.bytes;
    }
};

//! An output buffer of n elements of `type`, poisoned (0xFF bytes: NaN in every float format).
Tensor poisoned(size_t n, DataType type)
{
    Tensor t(std::vector<float>(n), type);
    std::memset(t.data(), 0xFF, t.bytes.size());
    return t;
}

bool allFinite(Tensor const& y)
{
    size_t const n = y.bytes.size() / (y.type == DataType::kFLOAT ? 4 : 2);
    for (size_t i = 0; i < n; ++i)
    {
        float v = 0.F;
        switch (y.type)
        {
        case DataType::kHALF: v = __half2float(reinterpret_cast<__half const*>(y.bytes.data())[i]); break;
        case DataType::kBF16: v = __bfloat162float(reinterpret_cast<__nv_bfloat16 const*>(y.bytes.data())[i]); break;
        default: v = reinterpret_cast<float const*>(y.bytes.data())[i]; break;
        }
        if (!std::isfinite(v))
        {
            return false;
        }
    }
    return true;
}

PluginTensorDesc desc(std::vector<int64_t> const& d, DataType type = DataType::kFLOAT)
{
    PluginTensorDesc t{};
    t.dims.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        t.dims.d[i] = d[i];
    }
    t.type = type;
    t.format = TensorFormat::kLINEAR;
    return t;
}

std::string label(char const* what, int64_t L, int32_t chunkSize, DataType act, DataType state)
{
    auto const name = [](DataType t) { return t == DataType::kHALF ? "fp16" : t == DataType::kBF16 ? "bf16" : "fp32"; };
    return std::string(what) + " (L=" + std::to_string(L) + ", chunk_size=" + std::to_string(chunkSize) + ", x "
        + name(act) + ", state " + name(state) + ")";
}

//! The scan plugin's enqueue against the direct C ABI call, x / B / C / dt in `act`, the state in `state`; y is
//! float32 in both.
void testChunkScan(int64_t L, int32_t chunkSize, DataType act = DataType::kFLOAT, DataType state = DataType::kFLOAT)
{
    int64_t const b = 2, h = 4, p = 32, g = 2, n = 16;
    Tensor x(values(b * L * h * p, 1, -1.F, 1.F), act);
    Tensor dt(values(b * L * h, 2, 0.01F, 0.2F), act);
    auto A = values(h, 3, -4.F, -0.5F);
    Tensor B(values(b * L * g * n, 4, -0.5F, 0.5F), act);
    Tensor C(values(b * L * g * n, 5, -0.5F, 0.5F), act);
    auto D = values(h, 6, -1.F, 1.F);
    Tensor s0(values(b * h * p * n, 7, -1.F, 1.F), state);
    Tensor y = poisoned(b * L * h * p, DataType::kFLOAT), yRef = y;
    Tensor fin = poisoned(b * h * p * n, state), finRef = fin;

    IPluginV3* plugin = create("Mamba2ChunkScan", chunkSize);
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> in{desc({b, L, h, p}, act), desc({b, L, h}, act), desc({h}), desc({b, L, g, n}, act),
        desc({b, L, g, n}, act), desc({h}), desc({b, h, p, n}, state)};
    std::vector<PluginTensorDesc> out{desc({b, L, h, p}, DataType::kFLOAT), desc({b, h, p, n}, state)};
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
    check(runtime->onShapeChange(in.data(), 7, out.data(), 2) == 0, label("scan onShapeChange", L, chunkSize, act, state));
    std::vector<PluginTensorDesc> badIn = in;
    badIn[1].dims.d[1] = L + 1; // dt longer than x
    check(runtime->onShapeChange(badIn.data(), 7, out.data(), 2) != 0,
        label("onShapeChange refuses dt length != x length", L, chunkSize, act, state));
    check(runtime->enqueue(in.data(), out.data(), inputs, outputs, misaligned, nullptr) == 0,
        label("scan enqueue", L, chunkSize, act, state));

    int32_t status = 0;
    int32_t const a = kernelDtype(act), st = kernelDtype(state);
    auto* yOut = reinterpret_cast<float*>(yRef.data());
    if (L == 1)
    {
        status = hybridtrtMamba2StateUpdate(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), s0.data(),
            yOut, finRef.data(), b, h, p, g, n, a, a, st, nullptr);
    }
    else
    {
        size_t bytes = 0;
        hybridtrtMamba2ChunkScanWorkspaceSize(b, L, h, p, g, n, chunkSize, a, a, st, &bytes);
        std::vector<unsigned char> ref(bytes + 256);
        void* aligned = ref.data() + (256 - reinterpret_cast<uintptr_t>(ref.data()) % 256) % 256;
        status = hybridtrtMamba2ChunkScan(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), s0.data(),
            yOut, finRef.data(), b, L, h, p, g, n, chunkSize, a, a, st, aligned, bytes, nullptr);
    }
    check(status == 0, label("direct C ABI call", L, chunkSize, act, state));
    check(allFinite(y), label("scan y: every float32 element written", L, chunkSize, act, state));
    check(y == yRef, label(L == 1 ? "scan L=1 y == update kernel y" : "scan y == direct call", L, chunkSize, act, state));
    check(fin == finRef,
        label(L == 1 ? "scan L=1 final_state == update kernel state" : "scan final_state == direct call", L, chunkSize,
            act, state));
    delete plugin;
}

//! The update plugin's enqueue with new_state == state against the direct C ABI call; y float32.
void testStateUpdateInPlace(DataType act = DataType::kFLOAT, DataType state = DataType::kFLOAT)
{
    int64_t const b = 3, h = 4, p = 48, g = 1, n = 64;
    Tensor x(values(b * h * p, 11, -1.F, 1.F), act);
    Tensor dt(values(b * h, 12, 0.01F, 0.2F), act);
    auto A = values(h, 13, -4.F, -0.5F);
    Tensor B(values(b * g * n, 14, -0.5F, 0.5F), act);
    Tensor C(values(b * g * n, 15, -0.5F, 0.5F), act);
    auto D = values(h, 16, -1.F, 1.F);
    Tensor stateBuf(values(b * h * p * n, 17, -1.F, 1.F), state);
    Tensor stateRef = stateBuf;
    Tensor y = poisoned(b * h * p, DataType::kFLOAT), yRef = y;
    Tensor stateOut = poisoned(b * h * p * n, state);
    int32_t const a = kernelDtype(act);
    check(hybridtrtMamba2StateUpdate(x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), stateRef.data(),
              reinterpret_cast<float*>(yRef.data()), stateOut.data(), b, h, p, g, n, a, a, kernelDtype(state), nullptr)
            == 0,
        label("direct update", 1, 0, act, state));

    IPluginV3* plugin = create("Mamba2StateUpdate", 0);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> in{desc({b, h, p}, act), desc({b, h}, act), desc({h}), desc({b, g, n}, act),
        desc({b, g, n}, act), desc({h}), desc({b, h, p, n}, state)};
    std::vector<PluginTensorDesc> out{desc({b, h, p}, DataType::kFLOAT), desc({b, h, p, n}, state)};
    void const* inputs[7] = {x.data(), dt.data(), A.data(), B.data(), C.data(), D.data(), stateBuf.data()};
    void* outputs[2] = {y.data(), stateBuf.data()}; // new_state == state: the kernel updates in place
    check(runtime->onShapeChange(in.data(), 7, out.data(), 2) == 0, label("update onShapeChange", 1, 0, act, state));
    check(runtime->enqueue(in.data(), out.data(), inputs, outputs, nullptr, nullptr) == 0,
        label("update enqueue", 1, 0, act, state));
    check(allFinite(y), label("update y: every float32 element written", 1, 0, act, state));
    check(y == yRef, label("update y == direct call", 1, 0, act, state));
    check(stateBuf == stateOut, label("in-place state == direct call", 1, 0, act, state));
    delete plugin;
}
//! Raw bytes of a host tensor of another kind (indices, FP8 codes).
template <typename T>
std::vector<unsigned char> rawBytes(std::vector<T> const& v)
{
    std::vector<unsigned char> out(v.size() * sizeof(T));
    std::memcpy(out.data(), v.data(), out.size());
    return out;
}

//! FP8 e4m3 codes of magnitude 2^-3 .. 1.875 * 2^1 with random signs (never NaN, never saturated).
std::vector<unsigned char> fp8Codes(size_t n, uint32_t seed)
{
    auto const u = values(n, seed, 0.F, 1.F);
    std::vector<unsigned char> codes(n);
    for (size_t i = 0; i < n; ++i)
    {
        auto const r = static_cast<uint32_t>(u[i] * 16777216.F);
        codes[i] = static_cast<unsigned char>(((r & 1U) << 7) | ((4U + (r >> 1) % 5U) << 3) | ((r >> 4) & 7U));
    }
    return codes;
}

char const* typeName(DataType t)
{
    switch (t)
    {
    case DataType::kHALF: return "fp16";
    case DataType::kBF16: return "bf16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    default: return "fp32";
    }
}

//! MoeExperts / MoeExpertsFp8 enqueue against the direct C ABI call with tactic AUTO, y in x's dtype. Token t's k-th
//! expert is (7t + k) mod E (distinct within a token); the last pair's index is -1 (skipped). `scaleCols`: the FP8
//! weight scales per expert (false) or per expert and output channel (true).
void testMoe(bool fp8, int64_t T, DataType act, DataType index, bool scaleCols = false)
{
    int64_t const E = 8, K = 2, D = 32, I = 48, maxT = 128;
    char const* name = fp8 ? "MoeExpertsFp8" : "MoeExperts";
    int32_t const tactic = hybridtrtMoeExpertsTactic(T, K, E);
    std::string const what = std::string(name) + " (T=" + std::to_string(T) + ", " + typeName(act) + " x, "
        + typeName(index) + " indices" + (fp8 ? scaleCols ? ", per-channel scales" : ", per-expert scales" : "")
        + ", AUTO = " + (tactic == kHYBRIDTRT_MOE_TACTIC_DECODE ? "decode" : "prefill") + ")";
    Tensor x(values(T * D, 21, -1.F, 1.F), act);
    std::vector<int64_t> experts(T * K);
    for (int64_t t = 0; t < T; ++t)
    {
        for (int64_t k = 0; k < K; ++k)
        {
            experts[t * K + k] = (7 * t + k) % E;
        }
    }
    experts.back() = -1; // skipped: adds nothing, reads no expert
    std::vector<unsigned char> indices = index == DataType::kINT64
        ? rawBytes(experts)
        : rawBytes(std::vector<int32_t>(experts.begin(), experts.end()));
    auto weights = values(T * K, 22, 0.1F, 1.F);
    Tensor upHalf(values(E * I * D, 23, -0.2F, 0.2F), act);
    Tensor downHalf(values(E * D * I, 24, -0.2F, 0.2F), act);
    std::vector<unsigned char> upCodes = fp8Codes(E * I * D, 25), downCodes = fp8Codes(E * D * I, 26);
    int64_t const upCols = scaleCols ? I : 1, downCols = scaleCols ? D : 1;
    auto upWeightScale = values(E * upCols, 27, 0.01F, 0.03F), downWeightScale = values(E * downCols, 28, 0.01F, 0.03F);
    auto upInputScale = values(E, 29, 0.01F, 0.02F), downInputScale = values(E, 30, 0.002F, 0.01F);
    void const* up = fp8 ? static_cast<void const*>(upCodes.data()) : upHalf.data();
    void const* down = fp8 ? static_cast<void const*>(downCodes.data()) : downHalf.data();
    Tensor y = poisoned(T * D, act), yRef = y;

    DataType const stack = fp8 ? DataType::kFP8 : act;
    std::vector<PluginTensorDesc> in{desc({T, D}, act), desc({T, K}, index), desc({T, K}), desc({E, I, D}, stack)};
    std::vector<void const*> inputs{x.data(), indices.data(), weights.data(), up};
    if (fp8)
    {
        in.insert(in.end(), {desc({E, upCols}), desc({E})});
        inputs.insert(inputs.end(), {upWeightScale.data(), upInputScale.data()});
    }
    in.push_back(desc({E, D, I}, stack));
    inputs.push_back(down);
    if (fp8)
    {
        in.insert(in.end(), {desc({E, downCols}), desc({E})});
        inputs.insert(inputs.end(), {downWeightScale.data(), downInputScale.data()});
    }
    auto const nbIn = static_cast<int32_t>(in.size());
    std::vector<PluginTensorDesc> out{desc({T, D}, act)};

    IPluginV3* plugin = create(name, 0);
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<DynamicPluginTensorDesc> dyn(nbIn);
    for (int32_t i = 0; i < nbIn; ++i)
    {
        dyn[i].desc = in[i];
        dyn[i].min = dyn[i].opt = dyn[i].max = in[i].dims;
    }
    for (int32_t i : {0, 1, 2})
    {
        dyn[i].max.d[0] = maxT; // the workspace is sized for the profile's max T, this call has fewer tokens
    }
    size_t const wsBytes = build->getWorkspaceSize(dyn.data(), nbIn, nullptr, 1);
    std::vector<unsigned char> ws(wsBytes + 512, 0xFF);
    unsigned char* base = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
    check(wsBytes > 256 && runtime->setTactic(0) == 0, what + ": workspace and the default tactic");
    check(runtime->onShapeChange(in.data(), nbIn, out.data(), 1) == 0, what + ": onShapeChange");
    void* outputs[1] = {y.data()};
    check(runtime->enqueue(in.data(), out.data(), inputs.data(), outputs, base + 16, nullptr) == 0, what + ": enqueue");

    int32_t const a = kernelDtype(act);
    int32_t const idx = index == DataType::kINT64 ? kHYBRIDTRT_INT64 : kHYBRIDTRT_INT32;
    size_t bytes = 0;
    hybridtrtMoeExpertsWorkspaceSize(T, K, E, D, I, a, fp8 ? static_cast<int32_t>(kHYBRIDTRT_FLOAT8_E4M3) : a, &bytes);
    std::vector<unsigned char> ref(bytes + 256, 0xFF);
    void* aligned = ref.data() + (256 - reinterpret_cast<uintptr_t>(ref.data()) % 256) % 256;
    int32_t const status = fp8
        ? hybridtrtMoeExpertsFp8(x.data(), indices.data(), weights.data(), up, upWeightScale.data(),
            upInputScale.data(), down, downWeightScale.data(), downInputScale.data(), yRef.data(), T, K, E, D, I, upCols,
            downCols, a, idx, kHYBRIDTRT_MOE_TACTIC_AUTO, aligned, bytes, nullptr)
        : hybridtrtMoeExperts(x.data(), indices.data(), weights.data(), up, down, yRef.data(), T, K, E, D, I, a, idx,
            kHYBRIDTRT_MOE_TACTIC_AUTO, aligned, bytes, nullptr);
    check(status == 0, what + ": direct C ABI call");
    check(allFinite(y), what + ": y in x's dtype, every element written");
    check(y == yRef, what + ": y == direct call");
    // The workspace header's first int32 counts the skipped pairs: the plugin passed its own 256-byte aligned pointer.
    int32_t skipped = -1;
    std::memcpy(&skipped, base + 256, sizeof(skipped));
    check(skipped == 1, what + ": workspace aligned inside enqueue (header: 1 skipped pair)");
    delete plugin;
}
} // namespace

int main()
{
    testMoe(false, 3, DataType::kBF16, DataType::kINT64);
    testMoe(false, 70, DataType::kBF16, DataType::kINT32);
    testMoe(false, 70, DataType::kHALF, DataType::kINT64);
    testMoe(false, 3, DataType::kFLOAT, DataType::kINT32);
    testMoe(true, 3, DataType::kBF16, DataType::kINT64);
    testMoe(true, 70, DataType::kHALF, DataType::kINT32, /*scaleCols=*/true);
    testMoe(true, 70, DataType::kFLOAT, DataType::kINT64);
    testChunkScan(1, 128);
    testChunkScan(70, 128);
    testChunkScan(300, 128); // three chunks of 128, the last partial
    testChunkScan(300, 8);   // chunk_size 8 runs as 64-token chunks
    testChunkScan(1, 128, DataType::kHALF, DataType::kFLOAT);
    testChunkScan(130, 128, DataType::kHALF, DataType::kFLOAT); // y float32 from fp16 activations
    testChunkScan(130, 64, DataType::kBF16, DataType::kBF16);
    testStateUpdateInPlace();
    testStateUpdateInPlace(DataType::kBF16, DataType::kFLOAT);
    testStateUpdateInPlace(DataType::kHALF, DataType::kHALF);
    std::printf("enqueue test: %d failures\n", gFailures);
    return gFailures;
}
