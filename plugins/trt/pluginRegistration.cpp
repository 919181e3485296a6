/*
 * How TensorRT finds the plugins of libhybridtrt_trt.so: through its exported entry points only.
 *
 *   getCreators      all four creators (hybridtrt::Mamba2ChunkScan v1, hybridtrt::Mamba2StateUpdate v1,
 *                    hybridtrt::MoeExperts v1, hybridtrt::MoeExpertsFp8 v1), always;
 *   setLoggerFinder  TensorRT hands over its logger.
 *
 * That is what IPluginRegistry::loadLibrary (our `hybridtrt build`, TrtModel, the C++ runner) and
 * `trtexec --dynamicPlugins` call: TensorRT dlopens the library, then registers what getCreators returns.
 * Nothing in this library touches the plugin registry, least of all while it is being loaded: a registry
 * call from a load-time constructor re-enters TensorRT in the middle of loadLibrary (a registry that holds
 * its lock across dlopen deadlocks; tests/plugins/test_trt_registration.py shows it with a fake libnvinfer).
 *
 * Loaders that only dlopen (polygraphy --plugins is ctypes.CDLL, trtexec --staticPlugins) register
 * nothing themselves: they load libhybridtrt_trt_autoreg.so instead (trt/autoRegister.cpp), a thin shim
 * beside this library that registers these same creators from its constructor.
 */
#include "mamba2ChunkScanPlugin.h"
#include "mamba2StateUpdatePlugin.h"
#include "moeExpertsPlugin.h"

#include <atomic>
#include <cstdio>

using namespace nvinfer1;

namespace hybridtrt
{
namespace plugin
{
namespace
{
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

Mamba2ChunkScanPluginCreator gChunkScanCreator;
Mamba2StateUpdatePluginCreator gStateUpdateCreator;
MoeExpertsPluginCreator gMoeExpertsCreator;
MoeExpertsFp8PluginCreator gMoeExpertsFp8Creator;
IPluginCreatorInterface* const gCreators[]
    = {&gChunkScanCreator, &gStateUpdateCreator, &gMoeExpertsCreator, &gMoeExpertsFp8Creator};
constexpr int32_t kNB_CREATORS = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
} // namespace

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    std::string const text = std::string("[hybridtrt] ") + message;
    if (logger != nullptr)
    {
        logger->log(severity, text.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "%s\n", text.c_str());
    }
}

} // namespace plugin
} // namespace hybridtrt

#define HYBRIDTRT_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" HYBRIDTRT_PLUGIN_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    hybridtrt::plugin::gLoggerFinder.store(finder);
}

extern "C" HYBRIDTRT_PLUGIN_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = hybridtrt::plugin::kNB_CREATORS;
    return hybridtrt::plugin::gCreators;
}
