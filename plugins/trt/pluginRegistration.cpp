/*
 * How TensorRT finds the plugins of this library. Two ways to load it, both supported:
 *
 *  1. IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, registry.load_library): TensorRT dlopens
 *     the library and registers what getCreators returns; setLoggerFinder hands over its logger.
 *  2. A plain dlopen (polygraphy --plugins is ctypes.CDLL, trtexec --staticPlugins): nobody calls
 *     getCreators, so a load-time constructor registers the creators with the global plugin registry
 *     when libnvinfer is already in the process (always true when this library was linked against
 *     it, i.e. built with a TENSORRT_ROOT that has lib/). It finds getPluginRegistry with dlsym, so a
 *     headers-only build needs no libnvinfer at link time.
 *
 * loadLibrary fails when any of its creators is already registered, so getCreators returns an empty
 * list once the constructor has registered them: either way every creator is registered exactly once.
 */
#include "NvInferVersion.h"
#include "mamba2ChunkScanPlugin.h"
#include "mamba2StateUpdatePlugin.h"

#include <atomic>
#include <cstdio>
#include <dlfcn.h>

#define HYBRIDTRT_STRINGIFY_IMPL(x) #x
#define HYBRIDTRT_STRINGIFY(x) HYBRIDTRT_STRINGIFY_IMPL(x)

using namespace nvinfer1;

namespace hybridtrt
{
namespace plugin
{
namespace
{
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
std::atomic<bool> gRegisteredAtLoad{false};

Mamba2ChunkScanPluginCreator gChunkScanCreator;
Mamba2StateUpdatePluginCreator gStateUpdateCreator;
IPluginCreatorInterface* const gCreators[] = {&gChunkScanCreator, &gStateUpdateCreator};
constexpr int32_t kNB_CREATORS = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));

using GetPluginRegistryFn = IPluginRegistry* (*) ();

//! getPluginRegistry of a libnvinfer already in the process, or nullptr (never loads one itself).
GetPluginRegistryFn findPluginRegistry()
{
    if (void* sym = dlsym(RTLD_DEFAULT, "getPluginRegistry"))
    {
        return reinterpret_cast<GetPluginRegistryFn>(sym);
    }
    // A libnvinfer loaded RTLD_LOCAL (as this library's dependency, or by the tensorrt Python module)
    // is not in the default scope; RTLD_NOLOAD finds it by soname without loading anything new.
    char const* const names[] = {"libnvinfer.so." HYBRIDTRT_STRINGIFY(NV_TENSORRT_MAJOR), "libnvinfer.so"};
    for (char const* name : names)
    {
        if (void* handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD))
        {
            void* sym = dlsym(handle, "getPluginRegistry");
            dlclose(handle); // drops only the reference RTLD_NOLOAD added
            if (sym != nullptr)
            {
                return reinterpret_cast<GetPluginRegistryFn>(sym);
            }
        }
    }
    return nullptr;
}

void registerCreatorsAtLoad()
{
    GetPluginRegistryFn getRegistry = findPluginRegistry();
    IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
    if (registry == nullptr)
    {
        return; // no TensorRT in the process yet: IPluginRegistry::loadLibrary will call getCreators
    }
    bool all = true;
    for (IPluginCreatorInterface* creator : gCreators)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creator);
        if (registry->getCreator(c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace()) == nullptr)
        {
            all = registry->registerCreator(*creator, c->getPluginNamespace()) && all;
        }
    }
    gRegisteredAtLoad.store(all);
}

//! Runs at dlopen, after the creators above (dynamic initialisation is ordered within a translation unit).
struct LoadTimeRegistration
{
    LoadTimeRegistration()
    {
        registerCreatorsAtLoad();
    }
} const gLoadTimeRegistration;
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
    // Empty when the load-time constructor already registered them (loadLibrary refuses duplicates).
    nbCreators = hybridtrt::plugin::gRegisteredAtLoad.load() ? 0 : hybridtrt::plugin::kNB_CREATORS;
    return hybridtrt::plugin::gCreators;
}

//! All creators of the library, whether or not they were registered at load time (tests, tools).
extern "C" HYBRIDTRT_PLUGIN_EXPORT IPluginCreatorInterface* const* hybridtrtGetAllCreators(int32_t& nbCreators)
{
    nbCreators = hybridtrt::plugin::kNB_CREATORS;
    return hybridtrt::plugin::gCreators;
}
