/*
 * The checks hybridtrt_runner makes on an engine's sidecar before it loads anything, as docs/deploying.md
 * promises (the Python runtime makes the same ones): the TensorRT version that built the engine, the
 * plugin library's sha256, and the KV-cache flavour (kv_cache / max_cache_len). No TensorRT and no CUDA here: sidecar_check.cpp runs them in the tests.
 */
#pragma once

#include "json_lite.h"

#include <array>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace sidecar_checks
{

//! SHA-256 (FIPS 180-4) of a byte stream, as lowercase hex.
class Sha256
{
public:
    void update(uint8_t const* data, size_t size)
    {
        for (size_t i = 0; i < size; ++i)
        {
            mBlock[mFill++] = data[i];
            if (mFill == 64)
            {
                compress();
                mFill = 0;
            }
        }
        mBits += static_cast<uint64_t>(size) * 8;
    }

    std::string hex()
    {
        uint64_t const bits = mBits;
        uint8_t const one = 0x80;
        update(&one, 1);
        uint8_t const zero = 0;
        while (mFill != 56)
        {
            update(&zero, 1);
        }
        uint8_t length[8];
        for (int i = 0; i < 8; ++i)
        {
            length[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
        }
        update(length, 8);
        std::string out;
        char buf[9];
        for (uint32_t h : mState)
        {
            std::snprintf(buf, sizeof(buf), "%08x", h);
            out += buf;
        }
        return out;
    }

private:
    static uint32_t rotr(uint32_t x, int n)
    {
        return (x >> n) | (x << (32 - n));
    }

    void compress()
    {
        static constexpr std::array<uint32_t, 64> kK = {0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b,
            0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
            0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc,
            0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
            0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1,
            0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
            0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814,
            0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
        uint32_t w[64];
        for (int i = 0; i < 16; ++i)
        {
            w[i] = (uint32_t(mBlock[4 * i]) << 24) | (uint32_t(mBlock[4 * i + 1]) << 16)
                | (uint32_t(mBlock[4 * i + 2]) << 8) | uint32_t(mBlock[4 * i + 3]);
        }
        for (int i = 16; i < 64; ++i)
        {
            uint32_t const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = mState[0], b = mState[1], c = mState[2], d = mState[3];
        uint32_t e = mState[4], f = mState[5], g = mState[6], h = mState[7];
        for (int i = 0; i < 64; ++i)
        {
            uint32_t const t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[i] + w[i];
            uint32_t const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        mState[0] += a;
        mState[1] += b;
        mState[2] += c;
        mState[3] += d;
        mState[4] += e;
        mState[5] += f;
        mState[6] += g;
        mState[7] += h;
    }

    std::array<uint32_t, 8> mState{
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint8_t mBlock[64]{};
    size_t mFill{0};
    uint64_t mBits{0};
};

//! sha256 of a file's bytes; empty string when it cannot be read.
inline std::string fileSha256(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
    {
        return {};
    }
    Sha256 sha;
    std::vector<char> buf(1 << 20);
    while (f.read(buf.data(), static_cast<std::streamsize>(buf.size())) || f.gcount() > 0)
    {
        sha.update(reinterpret_cast<uint8_t const*>(buf.data()), static_cast<size_t>(f.gcount()));
    }
    return sha.hex();
}

//! "MAJOR.MINOR" of a version string ("11.1.0.106" -> "11.1"); empty when it does not start that way.
inline std::string majorMinor(std::string const& version)
{
    size_t const dot = version.find('.');
    if (dot == std::string::npos || dot == 0)
    {
        return {};
    }
    size_t end = dot + 1;
    while (end < version.size() && version[end] >= '0' && version[end] <= '9')
    {
        ++end;
    }
    return end > dot + 1 ? version.substr(0, end) : std::string{};
}

//! The engine's TensorRT (sidecar "tensorrt") against the runtime's getInferLibVersion() (MAJOR*10000 +
//! MINOR*100 + PATCH): engines are specific to a TensorRT major.minor. Empty string when they agree.
inline std::string checkTensorRtVersion(json_lite::JsonValue const& sidecar, int32_t runtimeVersion)
{
    std::string const built = sidecar["tensorrt"].asString();
    std::string const here = std::to_string(runtimeVersion / 10000) + "." + std::to_string(runtimeVersion / 100 % 100)
        + "." + std::to_string(runtimeVersion % 100);
    if (majorMinor(built).empty() || majorMinor(built) != majorMinor(here))
    {
        return "the engine was built with TensorRT " + built + ", this is TensorRT " + here
            + ": rebuild the engine with this TensorRT (hybridtrt build)";
    }
    return {};
}

//! The plugin library to load: `override` if given, else the sidecar's path (empty: the engine needs none).
struct PluginCheck
{
    std::string path;
    std::string error;
};

//! The engine's plugin library, verified on disk against the sidecar's sha256 (also for an override path).
inline PluginCheck checkPluginLibrary(json_lite::JsonValue const& sidecar, std::string const& override)
{
    auto const& plugins = sidecar["plugins"];
    if (plugins["path"].isNull())
    {
        if (!override.empty())
        {
            return {"", "the engine holds no plugin layer (its sidecar names no plugin library); drop --plugins " + override};
        }
        return {};
    }
    std::string const path = override.empty() ? plugins["path"].asString() : override;
    std::string const digest = fileSha256(path);
    if (digest.empty())
    {
        return {path, "the engine was built with plugin library " + plugins["path"].asString() + ", which cannot be read at "
                + path + ": build the plugins again (hybridtrt plugins build) or pass --plugins PATH to that library"};
    }
    std::string const expected = plugins["sha256"].asString();
    if (digest != expected)
    {
        return {path, "plugin library " + path + " has sha256 " + digest.substr(0, 12) + "..., the engine was built with "
                + expected.substr(0, 12) + "...: rebuild the engine against this library (hybridtrt build), or point "
                "--plugins at the library it was built with"};
    }
    return {path, ""};
}

//! The engine's KV-cache flavour: "dynamic" (attention_mask input, KV grows) or "static" (cache_position /
//! padding_length inputs, KV of maxCacheLen positions written in place).
struct CacheFlavour
{
    std::string kind;
    int64_t maxCacheLen{0}; //!< static only
    std::string error;      //!< empty when the sidecar can be run
};

//! Same rules as hybridtrt.engine.sidecar.read_sidecar: a sidecar without "kv_cache" (written before the field existed)
//! is a dynamic engine's, unless its inputs hold cache_position (an old static engine: refused, rebuild it).
inline CacheFlavour cacheFlavour(json_lite::JsonValue const& sidecar)
{
    if (!sidecar.has("kv_cache"))
    {
        for (auto const& input : sidecar["inputs"].array)
        {
            if (input["name"].asString() == "cache_position")
            {
                return {"", 0, "the engine was built from a static-cache export by a hybridtrt whose sidecars did not "
                               "record kv_cache / max_cache_len: rebuild the engine with this hybridtrt (hybridtrt build)"};
            }
        }
        return {"dynamic", 0, ""};
    }
    std::string const kind = sidecar["kv_cache"].asString();
    if (kind == "dynamic")
    {
        return {kind, 0, ""};
    }
    if (kind == "static" && sidecar.has("max_cache_len") && sidecar["max_cache_len"].isNumber()
        && sidecar["max_cache_len"].asInt() >= 1)
    {
        return {kind, sidecar["max_cache_len"].asInt(), ""};
    }
    return {"", 0, "the sidecar has kv_cache '" + kind + "' without a usable max_cache_len: rebuild the engine with this hybridtrt"};
}

//! This process's place among the processes a launcher started: rank and world from the launcher's environment
//! (TensorRT's sampleDistCollective reads TRT_MY_RANK / TRT_WORLD_SIZE; Open MPI sets OMPI_COMM_WORLD_RANK/_SIZE,
//! MPICH and Intel MPI PMI_RANK/PMI_SIZE, SLURM's srun SLURM_PROCID/SLURM_NTASKS). One process alone: rank 0 of 1.
struct Launch
{
    int rank{0};
    int world{1};
    std::string error;
};

template <typename GetEnv>
Launch launchFromEnvironment(GetEnv getEnv)
{
    char const* const pairs[][2] = {{"TRT_MY_RANK", "TRT_WORLD_SIZE"}, {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
        {"PMI_RANK", "PMI_SIZE"}, {"SLURM_PROCID", "SLURM_NTASKS"}};
    for (auto const& pair : pairs)
    {
        char const* rank = getEnv(pair[0]);
        char const* world = getEnv(pair[1]);
        if (rank == nullptr || world == nullptr)
        {
            continue;
        }
        try
        {
            Launch launch{std::stoi(rank), std::stoi(world), ""};
            if (launch.world < 1 || launch.rank < 0 || launch.rank >= launch.world)
            {
                return {0, 1, std::string(pair[0]) + "=" + rank + " is not a rank of " + pair[1] + "=" + world};
            }
            return launch;
        }
        catch (std::exception const&)
        {
            return {0, 1, std::string(pair[0]) + "=" + rank + " / " + pair[1] + "=" + world + " are not integers"};
        }
    }
    return {};
}

//! Same rules as hybridtrt.exporter.manifest.check_rank and TrtModel: a rank's engine (sidecar "tensor_parallel":
//! {rank, world}) runs only as that rank of that world, and a one-device engine only alone. Empty when it may run.
inline std::string checkTensorParallel(json_lite::JsonValue const& sidecar, int rank, int world)
{
    if (!sidecar.has("tensor_parallel") || sidecar["tensor_parallel"].isNull())
    {
        if (world > 1)
        {
            return "the engine is a one-device engine, launched as rank " + std::to_string(rank) + " of " + std::to_string(world)
                + " processes: run it alone, or export with --tp N and build every rank (hybridtrt build OUT)";
        }
        return {};
    }
    int64_t const theirRank = sidecar["tensor_parallel"]["rank"].asInt();
    int64_t const theirWorld = sidecar["tensor_parallel"]["world"].asInt();
    std::string const what = "the engine is rank " + std::to_string(theirRank) + " of a " + std::to_string(theirWorld)
        + "-rank tensor-parallel model";
    if (world == 1)
    {
        return what + ": it runs only as one of " + std::to_string(theirWorld) + " processes, one per GPU: mpirun -np "
            + std::to_string(theirWorld) + " hybridtrt_runner OUT/rank0/ENGINE ... (each rank loads its own rank directory's)";
    }
    if (theirRank != rank || theirWorld != world)
    {
        return what + ", loaded as rank " + std::to_string(rank) + " of " + std::to_string(world)
            + ": load rank" + std::to_string(rank) + "'s engine in rank " + std::to_string(rank) + "'s process, with "
            + std::to_string(theirWorld) + " processes";
    }
    return {};
}

//! Rank `rank`'s engine beside a rank's engine: OUT/rank<k>/ENGINE -> OUT/rank<rank>/ENGINE (as
//! hybridtrt.runtime.tensor_parallel.tensor_parallel_spec finds them). Empty when `path` is not in a rank directory.
inline std::string rankEnginePath(std::string const& path, int rank)
{
    size_t const slash = path.rfind('/');
    if (slash == std::string::npos)
    {
        return {};
    }
    std::string const folder = path.substr(0, slash);
    size_t const start = folder.rfind('/') == std::string::npos ? 0 : folder.rfind('/') + 1;
    std::string const name = folder.substr(start);
    if (name.size() < 5 || name.compare(0, 4, "rank") != 0
        || name.find_first_not_of("0123456789", 4) != std::string::npos)
    {
        return {};
    }
    return folder.substr(0, start) + "rank" + std::to_string(rank) + path.substr(slash);
}

} // namespace sidecar_checks
