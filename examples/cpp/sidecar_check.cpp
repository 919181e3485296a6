/*
 * sidecar_check — what hybridtrt_runner reads from and checks on an engine sidecar, without TensorRT or a GPU.
 *
 *   sidecar_check model.engine.json                       what the runner reads
 *   sidecar_check model.engine.json --runtime-version V [--plugins PATH]
 *                                                         the runner's checks against TensorRT V (getInferLibVersion
 *                                                         form, e.g. 110100) and the plugin library
 *   sidecar_check --sha256 FILE                           the runner's sha256 of a file
 *   sidecar_check ENGINE --launch                         the runner's tensor-parallel checks as the process the
 *                                                         launcher's environment says (TRT_MY_RANK/TRT_WORLD_SIZE,
 *                                                         OMPI_COMM_WORLD_*, PMI_*, SLURM_*) on ENGINE's sidecar
 *
 * Output, one fact per line (parsed by tests/engine/test_cpp_sidecar.py):
 *   profile <index> <name> batch <max> seq <max> past <max>
 *   state <past_name> <present_name> <bytes at max batch and max cache length>
 *   plugins <path or none>
 *   kv_cache dynamic | kv_cache static <max_cache_len>   |  error: <message> (exit code 1)
 *   check ok <plugin path or none>  |  error: <message> (exit code 1)
 *   launch <rank> <world> <this rank's engine path>  |  error: <message> (exit code 1)
 */

#include "json_lite.h"
#include "sidecar_checks.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace
{

int64_t elementSize(std::string const& precision)
{
    return precision == "fp32" ? 4 : 2;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc == 3 && std::string(argv[1]) == "--sha256")
    {
        std::string const digest = sidecar_checks::fileSha256(argv[2]);
        std::cout << (digest.empty() ? "error: cannot read " + std::string(argv[2]) : digest) << "\n";
        return digest.empty() ? 1 : 0;
    }
    if (argc < 2)
    {
        std::cerr << "usage: sidecar_check MODEL.engine.json [--runtime-version V [--plugins PATH]] | --sha256 FILE\n";
        return 2;
    }
    if (argc == 3 && std::string(argv[2]) == "--launch")
    {
        sidecar_checks::Launch const launch = sidecar_checks::launchFromEnvironment([](char const* name) { return std::getenv(name); });
        std::string error = launch.error;
        std::string engine = argv[1];
        if (error.empty() && launch.world > 1)
        {
            engine = sidecar_checks::rankEnginePath(engine, launch.rank);
            if (engine.empty())
            {
                error = std::string(argv[1]) + " is not in a rank directory (OUT/rank0/ENGINE) of a tensor-parallel export";
            }
        }
        if (error.empty())
        {
            std::ifstream f(engine + ".json");
            std::ostringstream ss;
            ss << f.rdbuf();
            error = f ? sidecar_checks::checkTensorParallel(json_lite::parse(ss.str()), launch.rank, launch.world)
                      : "cannot read " + engine + ".json";
        }
        if (!error.empty())
        {
            std::cout << "error: " << error << "\n";
            return 1;
        }
        std::cout << "launch " << launch.rank << " " << launch.world << " " << engine << "\n";
        return 0;
    }
    try
    {
        std::ifstream f(argv[1]);
        std::ostringstream ss;
        ss << f.rdbuf();
        json_lite::JsonValue const sidecar = json_lite::parse(ss.str());
        if (argc >= 4 && std::string(argv[2]) == "--runtime-version")
        {
            std::string const plugins = argc == 6 && std::string(argv[4]) == "--plugins" ? argv[5] : "";
            std::string error = sidecar_checks::checkTensorRtVersion(sidecar, std::stoi(argv[3]));
            sidecar_checks::PluginCheck const lib = sidecar_checks::checkPluginLibrary(sidecar, plugins);
            if (error.empty())
            {
                error = lib.error;
            }
            if (!error.empty())
            {
                std::cout << "error: " << error << "\n";
                return 1;
            }
            std::cout << "check ok " << (lib.path.empty() ? std::string("none") : lib.path) << "\n";
            return 0;
        }
        int64_t maxBatch = 1;
        int64_t maxCache = 1;
        auto const& profiles = sidecar["profiles"];
        for (size_t i = 0; i < profiles.size(); ++i)
        {
            auto const& dims = profiles.at(i)["dims"];
            int64_t const batch = dims["batch"].at(2).asInt();
            int64_t const seq = dims["seq"].at(2).asInt();
            int64_t const past = dims["past"].at(2).asInt();
            maxBatch = std::max(maxBatch, batch);
            maxCache = std::max(maxCache, past + seq);
            std::cout << "profile " << i << " " << profiles.at(i)["name"].asString() << " batch " << batch << " seq " << seq
                      << " past " << past << "\n";
        }
        for (auto const& s : sidecar["states"].array)
        {
            std::string const precision = sidecar[s["dtype"].asString() == "state" ? "state_dtype" : "dtype"].asString();
            int64_t bytes = elementSize(precision);
            for (auto const& d : s["shape"].array)
            {
                bytes *= d.isNumber() ? d.asInt() : (d.asString() == "batch" ? maxBatch : maxCache);
            }
            std::cout << "state " << s["past_name"].asString() << " " << s["present_name"].asString() << " " << bytes << "\n";
        }
        auto const& path = sidecar["plugins"]["path"];
        std::cout << "plugins " << (path.isNull() ? std::string("none") : path.asString()) << "\n";
        sidecar_checks::CacheFlavour const flavour = sidecar_checks::cacheFlavour(sidecar);
        if (!flavour.error.empty())
        {
            std::cout << "error: " << flavour.error << "\n";
            return 1;
        }
        std::cout << "kv_cache " << flavour.kind;
        if (flavour.kind == "static")
        {
            std::cout << " " << flavour.maxCacheLen;
        }
        std::cout << "\n";
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
