/*
 * A fake libnvinfer for the CPU tests: the plugin registry calls a plugin library meets, nothing else.
 * Built by tests/plugins/test_trt_registration.py as libnvinfer.so.11 (soname as TensorRT 11's) against the
 * stub headers (plugins/tests/trtStub) or, with TENSORRT_ROOT, TensorRT's own.
 *
 *   getPluginRegistry()               the process-wide registry
 *   IPluginRegistry::loadLibrary      dlopen + getCreators + registerCreator for each + setLoggerFinder, all
 *                                     with the registry lock held (the lock is held across dlopen, as a real
 *                                     registry may do). As TensorRT documents it (NvInferRuntimeCommon.h,
 *                                     11.1 and 10.15): "The call will fail and return nullptr if any of the
 *                                     plugins are already registered" — so a second load of the same library
 *                                     fails; the fake then registers none of its creators (the header does not
 *                                     say whether TensorRT registers the others; nothing here relies on it)
 *   registerCreator / getCreator / getAllCreators / deregisterCreator
 *
 * The lock does not deadlock the test process: a registry call from the thread that holds it (a plugin
 * library's load-time constructor calling back into the registry while loadLibrary dlopens it) is recorded
 * as a re-entrant call and refused, which is where a real deadlock would have hung. `fakeNvinferReport`
 * prints what happened for the harness (registryHarness.cpp).
 */
#include "NvInferRuntime.h"

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace nvinfer1;

namespace
{
class FakeLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::printf("log %d %s\n", static_cast<int>(severity), msg);
    }
};

class FakeLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        ++mCalls;
        return &mLogger;
    }
    FakeLogger mLogger;
    int mCalls{0};
};

struct Entry
{
    IPluginCreatorInterface* creator;
    std::string ns;
};

class FakeRegistry : public IPluginRegistry
{
public:
    std::vector<Entry> mEntries;
    std::vector<IPluginCreatorInterface*> mAll;
    std::vector<std::string> mReentrant; //!< registry calls made while this thread held the lock (in dlopen)
    int mDuplicates{0};
    int mLoads{0};       //!< loadLibrary calls that succeeded
    int mFailedLoads{0}; //!< loadLibrary calls refused because a creator was already registered
    int mLoggerFinderSet{0};
    FakeLoggerFinder mFinder;

    //! Takes the registry lock; false (and recorded) when this thread already holds it.
    bool lock(char const* call)
    {
        if (mOwner == std::this_thread::get_id())
        {
            mReentrant.emplace_back(call);
            return false;
        }
        mMutex.lock();
        mOwner = std::this_thread::get_id();
        return true;
    }
    void unlock()
    {
        mOwner = std::thread::id();
        mMutex.unlock();
    }

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

    PluginLibraryHandle loadLibrary(AsciiChar const* pluginPath) noexcept override
    {
        if (!lock("loadLibrary"))
        {
            return nullptr;
        }
        PluginLibraryHandle result = nullptr;
        void* handle = dlopen(pluginPath, RTLD_NOW | RTLD_LOCAL); // the lock is held across dlopen
        using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
        using SetLoggerFinder = void (*)(ILoggerFinder*);
        auto getCreators = handle ? reinterpret_cast<GetCreators>(dlsym(handle, "getCreators")) : nullptr;
        if (handle == nullptr)
        {
            std::printf("loadLibrary: dlopen failed: %s\n", dlerror());
        }
        else if (getCreators == nullptr)
        {
            std::printf("loadLibrary: %s exports no getCreators\n", pluginPath);
        }
        else
        {
            int32_t n = 0;
            IPluginCreatorInterface* const* creators = getCreators(n);
            bool ok = true;
            for (int32_t i = 0; i < n && ok; ++i) // any creator already registered: the whole load fails
            {
                auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
                if (findLocked(c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace()) != nullptr)
                {
                    ++mDuplicates;
                    ++mFailedLoads;
                    ok = false;
                }
            }
            for (int32_t i = 0; i < n && ok; ++i)
            {
                auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
                ok = addLocked(*creators[i], c->getPluginNamespace());
            }
            if (ok)
            {
                ++mLoads;
            }
            if (auto setFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder")))
            {
                setFinder(&mFinder);
                ++mLoggerFinderSet;
            }
            result = ok ? handle : nullptr;
        }
        unlock();
        return result;
    }

    void deregisterLibrary(PluginLibraryHandle) noexcept override {}

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        if (!lock("registerCreator"))
        {
            return false;
        }
        bool const ok = addLocked(creator, pluginNamespace);
        unlock();
        return ok;
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = static_cast<int32_t>(mAll.size());
        return mAll.data();
    }

    IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
        AsciiChar const* const ns) noexcept override
    {
        if (!lock("getCreator"))
        {
            return nullptr;
        }
        IPluginCreatorInterface* found = findLocked(name, version, ns);
        unlock();
        return found;
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
        return getAllCreators(numCreators);
    }

private:
    IPluginCreatorInterface* findLocked(char const* name, char const* version, char const* ns)
    {
        for (Entry const& e : mEntries)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(e.creator);
            if (!std::strcmp(c->getPluginName(), name) && !std::strcmp(c->getPluginVersion(), version) && e.ns == ns)
            {
                return e.creator;
            }
        }
        return nullptr;
    }

    //! Registers under the lock; a creator with the same name, version and namespace is refused.
    bool addLocked(IPluginCreatorInterface& creator, char const* ns)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(&creator);
        if (findLocked(c->getPluginName(), c->getPluginVersion(), ns) != nullptr)
        {
            ++mDuplicates;
            return false;
        }
        mEntries.push_back({&creator, ns});
        mAll.push_back(&creator);
        return true;
    }

    std::mutex mMutex;
    std::thread::id mOwner;
};

FakeRegistry& registry()
{
    static FakeRegistry r;
    return r;
}

char const* fieldType(PluginFieldType type)
{
    switch (type)
    {
    case PluginFieldType::kINT32: return "INT32";
    case PluginFieldType::kINT64: return "INT64";
    case PluginFieldType::kCHAR: return "CHAR";
    case PluginFieldType::kFLOAT32: return "FLOAT32";
    default: return "OTHER";
    }
}
} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    return &registry();
}

//! C entry points for Python tests (ctypes cannot call a virtual method): loadLibrary and getCreator.
extern "C" __attribute__((visibility("default"))) void* fakeNvinferLoadLibrary(char const* path) noexcept
{
    return registry().loadLibrary(path);
}

extern "C" __attribute__((visibility("default"))) int fakeNvinferHasCreator(
    char const* name, char const* version, char const* ns) noexcept
{
    return registry().getCreator(name, version, ns) != nullptr ? 1 : 0;
}

//! One line per fact, parsed by tests/plugins/test_trt_registration.py.
extern "C" __attribute__((visibility("default"))) void fakeNvinferReport()
{
    FakeRegistry& r = registry();
    std::printf("creators %zu\n", r.mEntries.size());
    for (Entry const& e : r.mEntries)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(e.creator);
        InterfaceInfo const info = c->getInterfaceInfo();
        std::string fields;
        PluginFieldCollection const* fc = c->getFieldNames();
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            fields += std::string(i ? "," : "") + fc->fields[i].name + ":" + fieldType(fc->fields[i].type);
        }
        std::printf("creator %s %s %s registered-as %s kind %s fields %s\n", c->getPluginName(),
            c->getPluginVersion(), c->getPluginNamespace(), e.ns.c_str(), info.kind, fields.empty() ? "-" : fields.c_str());
    }
    std::printf("duplicates %d\n", r.mDuplicates);
    std::printf("loads %d\n", r.mLoads);
    std::printf("failed-loads %d\n", r.mFailedLoads);
    std::printf("reentrant %zu\n", r.mReentrant.size());
    for (std::string const& call : r.mReentrant)
    {
        std::printf("reentrant-call %s\n", call.c_str());
    }
    std::printf("logger-finder %d\n", r.mLoggerFinderSet);
}
