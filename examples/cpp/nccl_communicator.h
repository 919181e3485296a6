/*
 * The NCCL communicator of one rank of a tensor-parallel model, what IExecutionContext::setCommunicator takes
 * (NvInferRuntime.h). libnccl.so.2 is opened at run time (dlopen), so the runner builds without NCCL's headers
 * and a one-device run never needs NCCL. The calls, from nccl.h (stable since NCCL 2.0; TensorRT's collectives need
 * NCCL >= 2.19, samples/sampleDistCollective/README.md):
 *
 *   ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);          // struct { char internal[128]; }
 *   ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
 *   ncclResult_t ncclCommDestroy(ncclComm_t comm);
 *   const char*  ncclGetErrorString(ncclResult_t result);
 *
 * The unique id goes from rank 0 to the others through a file, as TensorRT's sampleDistCollective does: rank 0
 * writes it (hex, then renamed into place so no rank reads half of it), the others wait for it. The file is named by
 * TRT_NCCL_ID_FILE (the sample's variable) and must not exist before the launch.
 */
#pragma once

#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

namespace nccl_communicator
{

struct UniqueId
{
    char internal[128];
};

class Communicator
{
public:
    Communicator(int rank, int world, std::string const& idFile, int timeoutSeconds = 300)
    {
        char const* path = std::getenv("HYBRIDTRT_NCCL");
        mLibrary = dlopen(path != nullptr ? path : "libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
        if (mLibrary == nullptr)
        {
            throw std::runtime_error(std::string("cannot open NCCL (") + dlerror()
                + "): install NCCL >= 2.19 (libnccl2) or set HYBRIDTRT_NCCL=/path/to/libnccl.so.2");
        }
        mGetUniqueId = reinterpret_cast<int (*)(UniqueId*)>(symbol("ncclGetUniqueId"));
        mInitRank = reinterpret_cast<int (*)(void**, int, UniqueId, int)>(symbol("ncclCommInitRank"));
        mDestroy = reinterpret_cast<int (*)(void*)>(symbol("ncclCommDestroy"));
        mErrorString = reinterpret_cast<char const* (*) (int)>(symbol("ncclGetErrorString"));
        UniqueId id{};
        if (rank == 0)
        {
            check(mGetUniqueId(&id), "ncclGetUniqueId");
            std::string const partial = idFile + ".partial";
            {
                std::ofstream out(partial);
                out << toHex(id);
                if (!out)
                {
                    throw std::runtime_error("cannot write the NCCL id to " + partial);
                }
            }
            if (std::rename(partial.c_str(), idFile.c_str()) != 0)
            {
                throw std::runtime_error("cannot rename " + partial + " to " + idFile);
            }
        }
        else
        {
            id = waitForId(idFile, timeoutSeconds);
        }
        check(mInitRank(&mComm, world, id, rank), "ncclCommInitRank(rank " + std::to_string(rank) + " of " + std::to_string(world) + ")");
    }

    Communicator(Communicator const&) = delete;
    Communicator& operator=(Communicator const&) = delete;

    ~Communicator()
    {
        if (mComm != nullptr)
        {
            mDestroy(mComm);
        }
        if (mLibrary != nullptr)
        {
            dlclose(mLibrary);
        }
    }

    //! The ncclComm_t, for IExecutionContext::setCommunicator.
    void* get() const
    {
        return mComm;
    }

private:
    void* symbol(char const* name)
    {
        void* found = dlsym(mLibrary, name);
        if (found == nullptr)
        {
            throw std::runtime_error(std::string("the NCCL library has no ") + name + ": install NCCL >= 2.19");
        }
        return found;
    }

    void check(int result, std::string const& call) const
    {
        if (result != 0)
        {
            char const* reason = mErrorString(result);
            throw std::runtime_error("NCCL " + call + " failed: " + (reason != nullptr ? reason : std::to_string(result))
                + " (NCCL_DEBUG=WARN says more)");
        }
    }

    static std::string toHex(UniqueId const& id)
    {
        static char const digits[] = "0123456789abcdef";
        std::string out;
        for (char c : id.internal)
        {
            auto const byte = static_cast<unsigned char>(c);
            out += digits[byte >> 4];
            out += digits[byte & 15];
        }
        return out;
    }

    static UniqueId waitForId(std::string const& idFile, int timeoutSeconds)
    {
        auto const deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeoutSeconds);
        while (std::chrono::steady_clock::now() < deadline)
        {
            std::ifstream in(idFile);
            std::string hex;
            if (in >> hex && hex.size() == 2 * sizeof(UniqueId::internal))
            {
                UniqueId id{};
                for (size_t i = 0; i < sizeof(id.internal); ++i)
                {
                    id.internal[i] = static_cast<char>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
                }
                return id;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        throw std::runtime_error("rank 0 did not write the NCCL id to " + idFile + " within " + std::to_string(timeoutSeconds)
            + " s (TRT_NCCL_ID_FILE must name one path every rank sees, absent before the launch)");
    }

    void* mLibrary{nullptr};
    void* mComm{nullptr};
    int (*mGetUniqueId)(UniqueId*){nullptr};
    int (*mInitRank)(void**, int, UniqueId, int){nullptr};
    int (*mDestroy)(void*){nullptr};
    char const* (*mErrorString)(int){nullptr};
};

} // namespace nccl_communicator
