/*
 * libhybridtrt_trt_autoreg.so — for loaders that only dlopen a plugin library and register nothing
 * themselves: polygraphy --plugins (ctypes.CDLL), trtexec --staticPlugins, a plain dlopen/ctypes.CDLL.
 *
 * When the dynamic loader initialises this shim, its constructor registers the creators of
 * libhybridtrt_trt.so (its dependency, found beside it through RPATH $ORIGIN, which exports them through
 * getCreators) with the global plugin registry of the libnvinfer already in the process. It never loads a
 * libnvinfer itself: with none in the process it says so on stderr and registers nothing. A creator that is
 * already registered (same name, version, namespace) is left alone, so every creator is registered once.
 *
 * Never give the shim to IPluginRegistry::loadLibrary or trtexec --dynamicPlugins: those load
 * libhybridtrt_trt.so. Loaded that way, this constructor would call the registry while TensorRT is still
 * loading the shim (tests/plugins/test_trt_registration.py shows the re-entrant calls with a fake registry).
 */
#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include <cstdio>
#include <dlfcn.h>

#define HYBRIDTRT_STRINGIFY_IMPL(x) #x
#define HYBRIDTRT_STRINGIFY(x) HYBRIDTRT_STRINGIFY_IMPL(x)

using namespace nvinfer1;

//! Exported by libhybridtrt_trt.so (trt/pluginRegistration.cpp).
extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace
{
using GetPluginRegistryFn = IPluginRegistry* (*) ();

//! getPluginRegistry of a libnvinfer already in the process, or nullptr (never loads one itself).
GetPluginRegistryFn findPluginRegistry()
{
    if (void* sym = dlsym(RTLD_DEFAULT, "getPluginRegistry"))
    {
        return reinterpret_cast<GetPluginRegistryFn>(sym);
    }
    // The tensorrt Python module loads libnvinfer RTLD_LOCAL, out of the default scope; RTLD_NOLOAD finds it by
    // soname without loading anything new.
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

void registerCreators()
{
    GetPluginRegistryFn getRegistry = findPluginRegistry();
    IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
    if (registry == nullptr)
    {
        std::fprintf(stderr,
            "[hybridtrt] libhybridtrt_trt_autoreg.so: no libnvinfer in this process, so no plugin was registered; "
            "import TensorRT before loading the shim, or load libhybridtrt_trt.so with "
            "IPluginRegistry::loadLibrary / trtexec --dynamicPlugins\n");
        return;
    }
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        char const* ns = creator->getPluginNamespace();
        if (registry->getCreator(creator->getPluginName(), creator->getPluginVersion(), ns) != nullptr)
        {
            continue; // already registered (e.g. loadLibrary ran first): once is enough
        }
        if (!registry->registerCreator(*creators[i], ns))
        {
            std::fprintf(stderr, "[hybridtrt] libhybridtrt_trt_autoreg.so: TensorRT refused to register %s::%s v%s\n",
                ns, creator->getPluginName(), creator->getPluginVersion());
        }
    }
}

//! Runs when the dynamic loader initialises the shim, after libhybridtrt_trt.so (a dependency) is initialised.
struct AutoRegister
{
    AutoRegister()
    {
        registerCreators();
    }
} const gAutoRegister;
} // namespace
