/*
 * Host-only test of the load-time registration of libhybridtrt_trt.so (the polygraphy --plugins path):
 * this executable exports a fake getPluginRegistry, so when the dynamic loader initialises the plugin
 * library (before main) its constructor must find it and register both creators; getCreators must
 * then return none, so that IPluginRegistry::loadLibrary would not register them twice.
 */
#include "NvInferRuntime.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" IPluginCreatorInterface* const* hybridtrtGetAllCreators(int32_t& nbCreators);

namespace
{
struct Registered
{
    IPluginCreatorInterface* creator;
    std::string ns;
};

class FakeRegistry : public IPluginRegistry
{
public:
    std::vector<Registered> mCreators;

    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        mCreators.push_back({&creator, pluginNamespace});
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
        AsciiChar const* const ns) noexcept override
    {
        for (auto const& r : mCreators)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(r.creator);
            if (!std::strcmp(c->getPluginName(), name) && !std::strcmp(c->getPluginVersion(), version) && r.ns == ns)
            {
                return r.creator;
            }
        }
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override
    {
        return false;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
};

FakeRegistry& fake()
{
    static FakeRegistry registry;
    return registry;
}
} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    return &fake();
}

int main()
{
    int failures = 0;
    auto expect = [&failures](bool ok, char const* what) {
        if (!ok)
        {
            ++failures;
            std::printf("FAIL: %s\n", what);
        }
    };
    int32_t n = -1;
    hybridtrtGetAllCreators(n); // also keeps the library linked (--as-needed)
    expect(n == 2, "the library has two creators");
    expect(fake().mCreators.size() == 2, "both creators registered at load time");
    expect(fake().getCreator("Mamba2ChunkScan", "1", "hybridtrt") != nullptr, "hybridtrt::Mamba2ChunkScan v1");
    expect(fake().getCreator("Mamba2StateUpdate", "1", "hybridtrt") != nullptr, "hybridtrt::Mamba2StateUpdate v1");
    getCreators(n);
    expect(n == 0, "getCreators is empty after load-time registration (no double registration)");
    std::printf("registry self test: %d failures\n", failures);
    return failures;
}
