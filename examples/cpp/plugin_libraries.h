/*
 * plugin_libraries.h — plugin libraries loaded once per process (the rule hybridtrt.engine.plugin_registry applies
 * on the Python side).
 *
 * IPluginRegistry::loadLibrary "will fail and return nullptr if any of the plugins are already registered"
 * (NvInferRuntimeCommon.h, TensorRT 10.15 and 11.1), so a process that creates a second Runner, or loads the
 * library after something else did, must not call it again. PluginLibraries keeps one handle per file:
 *   - the same path again: the first handle, loadLibrary not called;
 *   - a byte-identical copy at another path (same sha256): the first handle too;
 *   - a file with other bytes while one is loaded: refused, naming both paths (it registers the same creators);
 *   - loadLibrary returning null: refused.
 * Needs only the IPluginRegistry declaration (NvInferRuntime.h): tested against the fake libnvinfer by
 * plugins/tests/fakeNvinfer/registryHarness.cpp (mode runner-rule).
 */
#pragma once

#include "sidecar_checks.h"

#include <NvInferRuntime.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <string>

namespace plugin_libraries
{

struct Loaded
{
    void* handle{nullptr};
    std::string path;  //!< the file loaded first (for a reused handle: the original)
    std::string error; //!< empty on success
};

class PluginLibraries
{
public:
    //! The process-wide instance.
    static PluginLibraries& instance()
    {
        static PluginLibraries libraries;
        return libraries;
    }

    //! Loads `path` into `registry` unless this process already loaded it (or a byte-identical copy).
    Loaded load(nvinfer1::IPluginRegistry& registry, std::string const& file)
    {
        std::lock_guard<std::mutex> guard(mMutex);
        std::error_code ec;
        std::filesystem::path const canonical = std::filesystem::weakly_canonical(file, ec);
        std::string const path = ec ? file : canonical.string();
        std::string const digest = sidecar_checks::fileSha256(path);
        if (digest.empty())
        {
            return {nullptr, path, "cannot read plugin library " + path};
        }
        auto const known = mByPath.find(path);
        if (known != mByPath.end())
        {
            if (known->second.sha256 != digest)
            {
                return {nullptr, path, "plugin library " + path
                        + " changed on disk since this process loaded it: restart the process to load the new one"};
            }
            return {known->second.handle, known->second.path, ""};
        }
        if (!mByPath.empty())
        {
            Entry const first = mByPath.begin()->second;
            if (first.sha256 != digest)
            {
                return {nullptr, path, "plugin library " + path + " would register the creators that " + first.path
                        + " already registered in this process (different files): use one plugin library per process"};
            }
            mByPath[path] = first; // a byte-identical copy: the same creators, the same code
            return {first.handle, first.path, ""};
        }
        void* const handle = registry.loadLibrary(path.c_str());
        if (handle == nullptr)
        {
            return {nullptr, path, "TensorRT could not load plugin library " + path
                    + " (rebuilt against another TensorRT, or its creators already registered by another loader)"};
        }
        mByPath[path] = Entry{handle, path, digest};
        return {handle, path, ""};
    }

private:
    struct Entry
    {
        void* handle{nullptr};
        std::string path;
        std::string sha256;
    };

    std::mutex mMutex;
    std::map<std::string, Entry> mByPath;
};

} // namespace plugin_libraries
