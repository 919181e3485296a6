/*
 * hybridtrt_runner — run a `hybridtrt build` engine from C++: prefill + greedy decode.
 *
 *   hybridtrt_runner model.engine --ids "1 2 3" [--max-new-tokens N] [--plugins libhybridtrt_trt.so]
 *   hybridtrt_runner model.engine --ids-file prompt.txt [--no-cuda-graphs]
 *   TRT_NCCL_ID_FILE=/shared/nccl.id mpirun -np 4 hybridtrt_runner OUT/rank0/model.engine --ids "1 2 3"
 *
 * Tensor parallel (`hybridtrt export --tp N`, `hybridtrt build OUT`): one process per rank, started by a launcher
 * (mpirun, srun, or anything that sets TRT_MY_RANK / TRT_WORLD_SIZE as TensorRT's sampleDistCollective reads them;
 * sidecar_checks.h launchFromEnvironment). Rank r runs OUT/rank<r>/ENGINE (the engine named on the command line,
 * in its own rank directory) on GPU r of the node, refused unless its sidecar says rank r of that world; its NCCL
 * communicator (nccl_communicator.h: the unique id through TRT_NCCL_ID_FILE, as the sample) is set on the
 * execution context (IExecutionContext::setCommunicator). Every rank runs the same steps (the logits are
 * all-gathered inside the engines, so every rank picks the same token); rank 0 prints.
 *
 * Everything it needs comes from the engine's sidecar `model.engine.json` (the contract shared
 * with the Python side; no code is shared):
 *   - "tensorrt": the TensorRT that built the engine; a runtime of another major.minor is refused;
 *   - "plugins.path" / "plugins.sha256": the plugin library to load (IPluginRegistry::loadLibrary, which
 *     takes libhybridtrt_trt.so's getCreators) before deserializing, refused when its sha256 differs;
 *     null when the engine holds no plugin layer. Loaded once per process (plugin_libraries.h: loadLibrary
 *     fails when the creators are already registered, so a second Runner reuses the first handle);
 *   - "kv_cache" / "max_cache_len": the KV-cache flavour. "dynamic" (or absent: an older sidecar) binds
 *     attention_mask [1, past + seq]; "static" binds cache_position [1] (= past) and padding_length [1] (= 0,
 *     no padding at batch 1), and its KV states are fixed-capacity [1, H, max_cache_len, D];
 *   - "inputs"/"outputs": tensor names and dtypes; "states": past_* / present_* names and
 *     symbolic shapes ("batch", "past", ints); "dtype"/"state_dtype": their precision;
 *   - "profiles": [{"name": "prefill"|"decode", "dims": {"batch"|"seq"|"past": [min, opt, max]}}].
 *
 * Buffers: two device buffers per state at max batch x max cache length, allocated once. At every
 * call one is bound as past_* and the other as present_*, and they swap afterwards (ping-pong):
 * no per-step allocation and no state copy. A state whose output the engine aliases to its input
 * (ICudaEngine::getAliasedInputTensor) gets one buffer bound as both — on a static-cache engine the KV states,
 * which TensorRT's IKVCacheUpdateLayer writes in place; conv/SSM ping-pong. Profile rule: seq > 1 or past == 0 ->
 * "prefill", otherwise "decode". Batch 1, no padding, to keep the example short.
 *
 * CUDA graphs (static-cache engines; --no-cuda-graphs turns them off): a decode step has fixed shapes and, per
 * ping-pong parity, fixed addresses, so the first decode step of each parity runs eagerly (TensorRT's warm-up after
 * new shapes), is then captured (cudaStreamBeginCapture, thread-local mode, on the runner's non-default stream) and
 * every later decode step of that parity is a cudaGraphLaunch; the token id and cache_position are copied into
 * their fixed device buffers before the launch. A dynamic-cache engine's decode shapes grow every step: eager.
 */

#include "json_lite.h"
#include "nccl_communicator.h"
#include "plugin_libraries.h"
#include "sidecar_checks.h"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{

#define CHECK_CUDA(call)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const status_ = (call);                                                                            \
        if (status_ != cudaSuccess)                                                                                    \
        {                                                                                                              \
            throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(status_));                 \
        }                                                                                                              \
    } while (0)

using json_lite::JsonValue;
using Shape = std::vector<int64_t>;

class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << "[TensorRT] " << msg << "\n";
        }
    }
};

//! Owning device allocation.
class DeviceBuffer
{
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes)
        : mBytes(bytes)
    {
        CHECK_CUDA(cudaMalloc(&mPtr, std::max<size_t>(bytes, 1)));
    }
    ~DeviceBuffer()
    {
        if (mPtr != nullptr)
        {
            cudaFree(mPtr);
        }
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept
        : mPtr(other.mPtr)
        , mBytes(other.mBytes)
    {
        other.mPtr = nullptr;
    }
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept
    {
        std::swap(mPtr, other.mPtr);
        std::swap(mBytes, other.mBytes);
        return *this;
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;

    void* get() const { return mPtr; }
    size_t bytes() const { return mBytes; }

private:
    void* mPtr{nullptr};
    size_t mBytes{0};
};

size_t dtypeSize(std::string const& dtype)
{
    if (dtype == "float32" || dtype == "fp32" || dtype == "int32")
    {
        return 4;
    }
    if (dtype == "float16" || dtype == "fp16" || dtype == "bfloat16" || dtype == "bf16")
    {
        return 2;
    }
    if (dtype == "int64")
    {
        return 8;
    }
    throw std::runtime_error("unsupported dtype in sidecar: " + dtype);
}

std::string tensorDtype(std::string const& precision)
{
    if (precision == "fp32")
    {
        return "float32";
    }
    if (precision == "fp16")
    {
        return "float16";
    }
    return "bfloat16";
}

//! Concrete shape of a sidecar shape template ("batch", "seq", "past", "past+seq" or ints).
Shape resolveShape(JsonValue const& shape, int64_t batch, int64_t seq, int64_t past)
{
    Shape out;
    for (auto const& d : shape.array)
    {
        if (d.isNumber())
        {
            out.push_back(d.asInt());
        }
        else if (d.asString() == "batch")
        {
            out.push_back(batch);
        }
        else if (d.asString() == "seq")
        {
            out.push_back(seq);
        }
        else if (d.asString() == "past")
        {
            out.push_back(past);
        }
        else if (d.asString() == "past+seq")
        {
            out.push_back(past + seq);
        }
        else
        {
            throw std::runtime_error("unknown symbolic dim '" + d.asString() + "' in sidecar");
        }
    }
    return out;
}

int64_t volume(Shape const& s)
{
    int64_t n = 1;
    for (auto d : s)
    {
        n *= d;
    }
    return n;
}

nvinfer1::Dims toDims(Shape const& s)
{
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(s.size());
    for (size_t i = 0; i < s.size(); ++i)
    {
        dims.d[i] = s[i];
    }
    return dims;
}

//! One element of a logits row as float (fp32, fp16 or bf16 storage).
float toFloat(uint8_t const* p, std::string const& dtype)
{
    if (dtype == "float32")
    {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    uint32_t bits;
    if (dtype == "bfloat16")
    {
        bits = static_cast<uint32_t>(h) << 16;
    }
    else // IEEE half -> float
    {
        uint32_t sign = (h & 0x8000u) << 16;
        uint32_t exponent = (h >> 10) & 0x1Fu;
        uint32_t mantissa = h & 0x3FFu;
        if (exponent == 0)
        {
            float f = std::ldexp(static_cast<float>(mantissa), -24);
            return sign ? -f : f;
        }
        bits = exponent == 31 ? (sign | 0x7F800000u | (mantissa << 13))
                              : (sign | ((exponent + 112u) << 23) | (mantissa << 13));
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

std::string readFile(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
    {
        throw std::runtime_error("cannot open " + path);
    }
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

//! A state: names, shape template, element size and its ping-pong pair (one buffer when updated in place).
struct StateSlot
{
    std::string pastName;
    std::string presentName;
    JsonValue const* shape{nullptr};
    size_t elementSize{0};
    bool inPlace{false}; //!< the engine aliases presentName to pastName
    DeviceBuffer buffers[2];

    void* buffer(int index) const
    {
        return buffers[inPlace ? 0 : index].get();
    }
};

class Runner
{
public:
    //! `launch`: this process's rank and world; `communicator`: its ncclComm_t when the world is more than one.
    Runner(std::string const& enginePath, std::string const& pluginOverride, bool cudaGraphs,
        sidecar_checks::Launch const& launch = {}, void* communicator = nullptr)
        : mCudaGraphs(cudaGraphs)
    {
        mSidecar = json_lite::parse(readFile(enginePath + ".json"));
        std::string const versionError = sidecar_checks::checkTensorRtVersion(mSidecar, getInferLibVersion());
        if (!versionError.empty())
        {
            throw std::runtime_error(enginePath + ": " + versionError);
        }
        std::string const rankError = sidecar_checks::checkTensorParallel(mSidecar, launch.rank, launch.world);
        if (!rankError.empty())
        {
            throw std::runtime_error(enginePath + ": " + rankError);
        }
        mFlavour = sidecar_checks::cacheFlavour(mSidecar);
        if (!mFlavour.error.empty())
        {
            throw std::runtime_error(enginePath + ": " + mFlavour.error);
        }
        mStatic = mFlavour.kind == "static";
        loadPlugins(pluginOverride);
        mRuntime.reset(nvinfer1::createInferRuntime(mLogger));
        std::string blob = readFile(enginePath);
        mEngine.reset(mRuntime->deserializeCudaEngine(blob.data(), blob.size()));
        if (!mEngine)
        {
            throw std::runtime_error("could not deserialize " + enginePath + " (TensorRT version, GPU or plugins differ?)");
        }
        mContext.reset(mEngine->createExecutionContext());
        if (communicator != nullptr && !mContext->setCommunicator(communicator))
        {
            throw std::runtime_error(enginePath + ": TensorRT refused rank " + std::to_string(launch.rank) + "'s NCCL communicator");
        }
        CHECK_CUDA(cudaStreamCreateWithFlags(&mStream, cudaStreamNonBlocking));
        readProfiles();
        allocate();
    }

    ~Runner()
    {
        for (cudaGraphExec_t exec : mDecodeGraphs)
        {
            if (exec != nullptr)
            {
                cudaGraphExecDestroy(exec);
            }
        }
        if (mStream != nullptr)
        {
            cudaStreamDestroy(mStream);
        }
    }

    //! Runs `ids` (batch 1) on the cached states; returns the argmax of the last logits.
    int64_t step(std::vector<int64_t> const& ids)
    {
        int64_t const seq = static_cast<int64_t>(ids.size());
        if (mPast + seq > (mStatic ? mFlavour.maxCacheLen : mMaxCacheLen))
        {
            throw std::runtime_error(mStatic ? "cache full: re-export with a larger --kv-cache static --max-cache-len and rebuild"
                                             : "cache full: rebuild with a larger --max-cache-len");
        }
        int32_t const profile = (seq > 1 || mPast == 0) && mPrefillProfile >= 0 ? mPrefillProfile : mDecodeProfile;
        if (profile < 0 || (seq > 1 && profile != mPrefillProfile))
        {
            throw std::runtime_error("this engine has no profile for seq=" + std::to_string(seq));
        }
        if (profile != mActiveProfile)
        {
            if (!mContext->setOptimizationProfileAsync(profile, mStream))
            {
                throw std::runtime_error("setOptimizationProfileAsync failed");
            }
            mActiveProfile = profile;
        }
        // input_ids: int64 (or int32) on the device.
        std::vector<uint8_t> host(seq * mIdsElementSize);
        for (int64_t i = 0; i < seq; ++i)
        {
            if (mIdsElementSize == 8)
            {
                std::memcpy(host.data() + i * 8, &ids[i], 8);
            }
            else
            {
                int32_t v = static_cast<int32_t>(ids[i]);
                std::memcpy(host.data() + i * 4, &v, 4);
            }
        }
        CHECK_CUDA(cudaMemcpyAsync(mIds.get(), host.data(), host.size(), cudaMemcpyHostToDevice, mStream));

        setInput("input_ids", {1, seq}, mIds.get());
        if (mStatic)
        {
            CHECK_CUDA(cudaMemcpyAsync(mCachePosition.get(), &mPast, sizeof(int64_t), cudaMemcpyHostToDevice, mStream));
            setInput("cache_position", {1}, mCachePosition.get());
            setInput("padding_length", {1}, mPadding.get()); // zero: no padding
        }
        else
        {
            setInput("attention_mask", {1, mPast + seq}, mMask.get()); // all ones: no padding
        }
        int const pastIndex = mParity;
        int const presentIndex = 1 - mParity;
        for (auto& s : mStates)
        {
            setInput(s.pastName, resolveShape(*s.shape, 1, seq, mPast), s.buffer(pastIndex));
            mContext->setTensorAddress(s.presentName.c_str(), s.buffer(presentIndex));
        }
        for (auto& [name, buffer] : mOutputs)
        {
            mContext->setTensorAddress(name.c_str(), buffer.get());
        }
        bool const decode = seq == 1 && mPast > 0;
        if (mStatic && decode && mCudaGraphs)
        {
            launchDecodeGraph(pastIndex);
        }
        else
        {
            enqueue();
        }
        nvinfer1::Dims const logitsDims = mContext->getTensorShape("logits");
        int64_t const vocab = logitsDims.d[logitsDims.nbDims - 1];
        int64_t rows = 1;
        for (int32_t i = 0; i < logitsDims.nbDims - 1; ++i)
        {
            rows *= logitsDims.d[i];
        }
        size_t const rowBytes = vocab * dtypeSize(mLogitsDtype);
        std::vector<uint8_t> last(rowBytes);
        auto const* src = static_cast<uint8_t const*>(mOutputs.at("logits").get()) + (rows - 1) * rowBytes;
        CHECK_CUDA(cudaMemcpyAsync(last.data(), src, rowBytes, cudaMemcpyDeviceToHost, mStream));
        CHECK_CUDA(cudaStreamSynchronize(mStream));

        mParity = presentIndex; // ping-pong: present becomes past
        mPast += seq;
        int64_t best = 0;
        float bestValue = toFloat(last.data(), mLogitsDtype);
        for (int64_t v = 1; v < vocab; ++v)
        {
            float const x = toFloat(last.data() + v * dtypeSize(mLogitsDtype), mLogitsDtype);
            if (x > bestValue)
            {
                best = v;
                bestValue = x;
            }
        }
        return best;
    }

    //! Prefill (or token-by-token on a decode-only engine); returns the first new token.
    int64_t prefill(std::vector<int64_t> const& prompt)
    {
        if (mPrefillProfile >= 0)
        {
            return step(prompt);
        }
        int64_t token = 0;
        for (int64_t id : prompt)
        {
            token = step({id});
        }
        return token;
    }

    int64_t eosTokenId() const
    {
        auto const& eos = mSidecar["model"]["eos_token_id"];
        return eos.isNull() ? -1 : eos.asInt();
    }

private:
    void enqueue()
    {
        if (!mContext->enqueueV3(mStream))
        {
            throw std::runtime_error("enqueueV3 failed");
        }
    }

    //! The decode step of this ping-pong parity: captured on its first use (after an eager warm-up run), replayed after.
    void launchDecodeGraph(int parity)
    {
        cudaGraphExec_t& exec = mDecodeGraphs[parity];
        if (exec != nullptr)
        {
            CHECK_CUDA(cudaGraphLaunch(exec, mStream));
            ++mReplays;
            return;
        }
        enqueue(); // computes this step; TensorRT's first enqueue after new shapes may do work a capture must not see
        cudaGraph_t graph = nullptr;
        CHECK_CUDA(cudaStreamBeginCapture(mStream, cudaStreamCaptureModeThreadLocal));
        bool const ok = mContext->enqueueV3(mStream); // recorded, not executed
        cudaError_t const end = cudaStreamEndCapture(mStream, &graph);
        if (!ok || end != cudaSuccess)
        {
            if (graph != nullptr)
            {
                cudaGraphDestroy(graph);
            }
            throw std::runtime_error("capturing the decode step as a CUDA graph failed (run with --no-cuda-graphs)");
        }
        CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
        CHECK_CUDA(cudaGraphDestroy(graph));
        ++mCaptures;
    }

public:
    //! "captures N replays M" of the decode graphs (static-cache engines).
    std::string graphSummary() const
    {
        return mStatic && mCudaGraphs ? " · cuda graphs: " + std::to_string(mCaptures) + " captured, " + std::to_string(mReplays) + " replayed" : "";
    }

private:
    void loadPlugins(std::string const& pluginOverride)
    {
        sidecar_checks::PluginCheck const lib = sidecar_checks::checkPluginLibrary(mSidecar, pluginOverride);
        if (!lib.error.empty())
        {
            throw std::runtime_error(lib.error);
        }
        if (lib.path.empty())
        {
            std::cout << "plugins: none (the engine holds no plugin layer)\n";
            return;
        }
        // libhybridtrt_trt.so registers through its getCreators, which loadLibrary calls (never the autoreg shim); once
        // per process: a second Runner (or a second engine) reuses the handle.
        plugin_libraries::Loaded const loaded = plugin_libraries::PluginLibraries::instance().load(*getPluginRegistry(), lib.path);
        if (!loaded.error.empty())
        {
            throw std::runtime_error(loaded.error);
        }
        std::cout << "plugins: " << lib.path << " (sha256 verified)\n";
    }

    void readProfiles()
    {
        auto const& profiles = mSidecar["profiles"];
        for (size_t i = 0; i < profiles.size(); ++i)
        {
            auto const& p = profiles.at(i);
            auto const& dims = p["dims"];
            mMaxBatch = std::max(mMaxBatch, dims["batch"].at(2).asInt());
            mMaxSeq = std::max(mMaxSeq, dims["seq"].at(2).asInt());
            mMaxCacheLen = std::max(mMaxCacheLen, dims["past"].at(2).asInt() + dims["seq"].at(2).asInt());
            if (p["name"].asString() == "prefill")
            {
                mPrefillProfile = static_cast<int32_t>(i);
            }
            else if (p["name"].asString() == "decode")
            {
                mDecodeProfile = static_cast<int32_t>(i);
            }
        }
    }

    void allocate()
    {
        std::string const modelDtype = tensorDtype(mSidecar["dtype"].asString());
        std::string const stateDtype = tensorDtype(mSidecar["state_dtype"].asString());
        size_t total = 0;
        for (auto const& s : mSidecar["states"].array)
        {
            StateSlot slot;
            slot.pastName = s["past_name"].asString();
            slot.presentName = s["present_name"].asString();
            slot.shape = &s["shape"];
            slot.elementSize = dtypeSize(s["dtype"].asString() == "state" ? stateDtype : modelDtype);
            if (char const* alias = mEngine->getAliasedInputTensor(slot.presentName.c_str()))
            {
                if (slot.pastName != alias)
                {
                    throw std::runtime_error("the engine aliases output " + slot.presentName + " to input " + alias
                        + ", not to " + slot.pastName + ": rebuild it from an export of this hybridtrt");
                }
                slot.inPlace = true;
            }
            size_t const bytes = volume(resolveShape(s["shape"], mMaxBatch, 0, mMaxCacheLen)) * slot.elementSize;
            for (int i = 0; i < (slot.inPlace ? 1 : 2); ++i)
            {
                slot.buffers[i] = DeviceBuffer(bytes);
                CHECK_CUDA(cudaMemset(slot.buffers[i].get(), 0, bytes)); // zero states: conv and SSM start at 0
            }
            total += (slot.inPlace ? 1 : 2) * bytes;
            mStates.push_back(std::move(slot));
        }
        for (auto const& o : mSidecar["outputs"].array)
        {
            std::string const name = o["name"].asString();
            bool const isState = std::any_of(mStates.begin(), mStates.end(), [&](StateSlot const& s) { return s.presentName == name; });
            if (isState)
            {
                continue;
            }
            if (name == "logits")
            {
                mLogitsDtype = o["dtype"].asString();
            }
            size_t const bytes = volume(resolveShape(o["shape"], mMaxBatch, mMaxSeq, mMaxCacheLen)) * dtypeSize(o["dtype"].asString());
            mOutputs.emplace(name, DeviceBuffer(bytes));
            total += bytes;
        }
        for (auto const& i : mSidecar["inputs"].array)
        {
            if (i["name"].asString() == "input_ids")
            {
                mIdsElementSize = dtypeSize(i["dtype"].asString());
            }
        }
        mIds = DeviceBuffer(mMaxBatch * mMaxSeq * mIdsElementSize);
        mCachePosition = DeviceBuffer(mMaxBatch * sizeof(int64_t));
        mPadding = DeviceBuffer(mMaxBatch * sizeof(int64_t));
        CHECK_CUDA(cudaMemset(mPadding.get(), 0, mPadding.bytes()));
        std::vector<int64_t> ones(mMaxCacheLen, 1);
        mMask = DeviceBuffer(ones.size() * sizeof(int64_t));
        CHECK_CUDA(cudaMemcpy(mMask.get(), ones.data(), mMask.bytes(), cudaMemcpyHostToDevice));
        auto const inPlace = std::count_if(mStates.begin(), mStates.end(), [](StateSlot const& s) { return s.inPlace; });
        std::cout << "buffers: " << mStates.size() << " states (" << inPlace << " updated in place, the others ping-pong), "
                  << (total >> 20) << " MiB at batch "
                  << mMaxBatch << ", cache " << (mStatic ? mFlavour.maxCacheLen : mMaxCacheLen) << " (" << mFlavour.kind << ")\n";
    }

    void setInput(std::string const& name, Shape const& shape, void* ptr)
    {
        if (!mContext->setInputShape(name.c_str(), toDims(shape)))
        {
            throw std::runtime_error("setInputShape failed for " + name);
        }
        mContext->setTensorAddress(name.c_str(), ptr);
    }

    Logger mLogger;
    JsonValue mSidecar;
    std::unique_ptr<nvinfer1::IRuntime> mRuntime;
    std::unique_ptr<nvinfer1::ICudaEngine> mEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mContext;
    cudaStream_t mStream{nullptr};
    std::vector<StateSlot> mStates;
    std::map<std::string, DeviceBuffer> mOutputs;
    DeviceBuffer mIds;
    DeviceBuffer mMask;
    DeviceBuffer mCachePosition;
    DeviceBuffer mPadding;
    sidecar_checks::CacheFlavour mFlavour;
    bool mStatic{false};
    bool mCudaGraphs{true};
    cudaGraphExec_t mDecodeGraphs[2]{nullptr, nullptr}; //!< per ping-pong parity (batch 1)
    int mCaptures{0};
    int mReplays{0};
    std::string mLogitsDtype{"float32"};
    size_t mIdsElementSize{8};
    int64_t mMaxBatch{1};
    int64_t mMaxSeq{1};
    int64_t mMaxCacheLen{1};
    int32_t mPrefillProfile{-1};
    int32_t mDecodeProfile{-1};
    int32_t mActiveProfile{-1};
    int mParity{0};
    int64_t mPast{0};
};

std::vector<int64_t> parseIds(std::string const& text)
{
    std::vector<int64_t> ids;
    std::string cleaned = text;
    std::replace(cleaned.begin(), cleaned.end(), ',', ' ');
    std::istringstream ss(cleaned);
    int64_t v;
    while (ss >> v)
    {
        ids.push_back(v);
    }
    return ids;
}

void usage()
{
    std::cerr << "usage: hybridtrt_runner MODEL.engine (--ids \"1 2 3\" | --ids-file FILE) [--max-new-tokens N] "
                 "[--plugins LIB] [--ignore-eos] [--no-cuda-graphs]\n";
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        usage();
        return 2;
    }
    std::string enginePath = argv[1];
    std::string plugins;
    std::vector<int64_t> prompt;
    int maxNewTokens = 16;
    bool ignoreEos = false;
    bool cudaGraphs = true;
    for (int i = 2; i < argc; ++i)
    {
        std::string const arg = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc)
            {
                throw std::runtime_error(arg + " needs a value");
            }
            return argv[++i];
        };
        try
        {
            if (arg == "--ids")
            {
                prompt = parseIds(next());
            }
            else if (arg == "--ids-file")
            {
                prompt = parseIds(readFile(next()));
            }
            else if (arg == "--max-new-tokens")
            {
                maxNewTokens = std::stoi(next());
            }
            else if (arg == "--plugins")
            {
                plugins = next();
            }
            else if (arg == "--ignore-eos")
            {
                ignoreEos = true;
            }
            else if (arg == "--no-cuda-graphs")
            {
                cudaGraphs = false;
            }
            else
            {
                usage();
                return 2;
            }
        }
        catch (std::exception const& e)
        {
            std::cerr << "error: " << e.what() << "\n";
            return 2;
        }
    }
    if (prompt.empty())
    {
        std::cerr << "error: no prompt ids (pass --ids or --ids-file)\n";
        return 2;
    }
    sidecar_checks::Launch const launch = sidecar_checks::launchFromEnvironment([](char const* name) { return std::getenv(name); });
    if (!launch.error.empty())
    {
        std::cerr << "error: " << launch.error << "\n";
        return 2;
    }
    std::unique_ptr<nccl_communicator::Communicator> communicator;
    if (launch.world > 1)
    {
        std::string const own = sidecar_checks::rankEnginePath(enginePath, launch.rank);
        char const* idFile = std::getenv("TRT_NCCL_ID_FILE");
        if (own.empty() || idFile == nullptr)
        {
            std::cerr << "error: launched as rank " << launch.rank << " of " << launch.world << ": "
                      << (own.empty() ? enginePath + " is not in a rank directory (OUT/rank0/ENGINE) of a tensor-parallel export"
                                      : "TRT_NCCL_ID_FILE must name a path every rank sees, absent before the launch")
                      << "\n";
            return 2;
        }
        enginePath = own;
    }
    try
    {
        if (launch.world > 1)
        {
            CHECK_CUDA(cudaSetDevice(launch.rank)); // one node: rank r on GPU r (CUDA_VISIBLE_DEVICES orders them)
            communicator = std::make_unique<nccl_communicator::Communicator>(launch.rank, launch.world, std::getenv("TRT_NCCL_ID_FILE"));
        }
        Runner runner(enginePath, plugins, cudaGraphs, launch, communicator ? communicator->get() : nullptr);
        using Clock = std::chrono::steady_clock;
        auto const t0 = Clock::now();
        int64_t token = runner.prefill(prompt);
        auto const t1 = Clock::now();
        std::vector<int64_t> generated{token};
        int64_t const eos = ignoreEos ? -1 : runner.eosTokenId();
        while (static_cast<int>(generated.size()) < maxNewTokens && token != eos)
        {
            token = runner.step({token});
            generated.push_back(token);
        }
        auto const t2 = Clock::now();
        if (launch.rank != 0)
        {
            return 0; // every rank computed the same tokens; rank 0 prints them
        }
        std::cout << "ids:";
        for (auto id : generated)
        {
            std::cout << " " << id;
        }
        double const prefillMs = std::chrono::duration<double, std::milli>(t1 - t0).count();
        double const decodeS = std::chrono::duration<double>(t2 - t1).count();
        std::cout << "\nprefill " << prefillMs << " ms (" << prompt.size() << " tokens)";
        if (generated.size() > 1 && decodeS > 0)
        {
            std::cout << " · decode " << (generated.size() - 1) / decodeS << " tokens/s";
        }
        std::cout << runner.graphSummary() << " · backend tensorrt-cpp\n";
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
