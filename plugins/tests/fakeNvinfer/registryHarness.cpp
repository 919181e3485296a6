/*
 * Loads the hybridtrt plugin libraries the ways users' tools do, into a process whose "libnvinfer" is the
 * fake of fakeNvinfer.cpp, and prints what the registry saw (fakeNvinferReport). Not linked against any
 * libnvinfer: the fake is dlopened like the tools load the real one.
 *
 *   registryHarness load-library FAKE LIB        IPluginRegistry::loadLibrary(LIB): our build, TrtModel, the
 *                                                C++ runner, trtexec --dynamicPlugins (libnvinfer global)
 *   registryHarness dlopen FAKE SHIM global      dlopen(SHIM) with libnvinfer linked in (trtexec --staticPlugins)
 *   registryHarness dlopen FAKE SHIM local       dlopen(SHIM) after libnvinfer was loaded RTLD_LOCAL (the
 *                                                tensorrt Python module), as polygraphy --plugins' ctypes.CDLL
 *   registryHarness both FAKE LIB SHIM           loadLibrary(LIB), then dlopen(SHIM): still one registration each
 *   registryHarness dlopen-alone SHIM            dlopen(SHIM) with no libnvinfer in the process
 *   registryHarness load-twice FAKE LIB          IPluginRegistry::loadLibrary(LIB) twice, as every build and every
 *                                                model did before: the second call fails (creators registered)
 *   registryHarness runner-rule FAKE LIB COPY OTHER  the C++ runner's PluginLibraries (examples/cpp/
 *                                                plugin_libraries.h): LIB twice, a byte-identical COPY, then OTHER
 *                                                (other bytes): one loadLibrary call, OTHER refused by name
 *
 * Built by tests/plugins/test_trt_registration.py. Exit code 0 unless the harness itself fails.
 */
#include "NvInferRuntime.h"
#include "plugin_libraries.h"

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <string>

using namespace nvinfer1;

namespace
{
using GetRegistry = IPluginRegistry* (*) ();
using Report = void (*)();

struct Fake
{
    GetRegistry getRegistry{nullptr};
    Report report{nullptr};
};

bool openFake(char const* path, int scope, Fake& fake)
{
    void* handle = dlopen(path, RTLD_NOW | scope);
    if (handle == nullptr)
    {
        std::printf("harness: cannot load the fake libnvinfer %s: %s\n", path, dlerror());
        return false;
    }
    fake.getRegistry = reinterpret_cast<GetRegistry>(dlsym(handle, "getPluginRegistry"));
    fake.report = reinterpret_cast<Report>(dlsym(handle, "fakeNvinferReport"));
    return fake.getRegistry != nullptr && fake.report != nullptr;
}

void loadLibrary(Fake const& fake, char const* lib)
{
    void* handle = fake.getRegistry()->loadLibrary(lib);
    std::printf("load-library %s\n", handle != nullptr ? "ok" : "failed");
}

void plainDlopen(char const* lib)
{
    void* handle = dlopen(lib, RTLD_NOW | RTLD_LOCAL); // ctypes.CDLL's mode
    std::printf("dlopen %s\n", handle != nullptr ? "ok" : dlerror());
}
} // namespace

int main(int argc, char** argv)
{
    std::setvbuf(stdout, nullptr, _IONBF, 0); // interleave with the libraries' stderr in order
    std::string const mode = argc > 1 ? argv[1] : "";
    Fake fake;
    if (mode == "load-library" && argc == 4 && openFake(argv[2], RTLD_GLOBAL, fake))
    {
        loadLibrary(fake, argv[3]);
    }
    else if (mode == "dlopen" && argc == 5 && openFake(argv[2], std::strcmp(argv[4], "local") ? RTLD_GLOBAL : RTLD_LOCAL, fake))
    {
        plainDlopen(argv[3]);
    }
    else if (mode == "both" && argc == 5 && openFake(argv[2], RTLD_GLOBAL, fake))
    {
        loadLibrary(fake, argv[3]);
        plainDlopen(argv[4]);
    }
    else if (mode == "load-twice" && argc == 4 && openFake(argv[2], RTLD_GLOBAL, fake))
    {
        loadLibrary(fake, argv[3]);
        loadLibrary(fake, argv[3]);
    }
    else if (mode == "runner-rule" && argc == 6 && openFake(argv[2], RTLD_GLOBAL, fake))
    {
        auto& libraries = plugin_libraries::PluginLibraries::instance();
        void* first = nullptr;
        for (int i = 3; i < 6; ++i)
        {
            for (int repeat = 0; repeat < (i == 3 ? 2 : 1); ++repeat)
            {
                plugin_libraries::Loaded const got = libraries.load(*fake.getRegistry(), argv[i]);
                first = first != nullptr ? first : got.handle;
                std::printf("runner-load %s %s\n", got.error.empty() ? (got.handle == first ? "same-handle" : "other-handle") : "refused",
                    got.error.empty() ? got.path.c_str() : got.error.c_str());
            }
        }
    }
    else if (mode == "dlopen-alone" && argc == 3)
    {
        plainDlopen(argv[2]);
        std::printf("registry none\n");
        return 0;
    }
    else
    {
        std::printf("usage: registryHarness (load-library FAKE LIB | dlopen FAKE SHIM global|local | both FAKE LIB SHIM "
                    "| dlopen-alone SHIM | load-twice FAKE LIB | runner-rule FAKE LIB COPY OTHER)\n");
        return 2;
    }
    fake.report();
    return 0;
}
