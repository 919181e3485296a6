/*
 * C ABI of the CPU emulation's test hooks (cudaEmulation.h), compiled into the emulated kernels library only.
 * tests/plugins/test_kernels_emulated.py drives them with ctypes.
 */
#include "cudaEmulation.h"

#include <cstdint>
#include <string>

namespace emu = hybridtrt::emulation;

#define HYBRIDTRT_EMULATION_API extern "C" __attribute__((visibility("default")))

//! Forgets every opt-in, launch, error, block filter and plant; targets compute capability `sm` (89, 90, ...); with
//! `validateOnly` launches are validated and logged but not run (pointers are never dereferenced).
HYBRIDTRT_EMULATION_API void hybridtrtEmulationReset(int32_t sm, int32_t validateOnly)
{
    emu::State& s = emu::state();
    s = emu::State{};
    s.sm = sm;
    s.validateOnly = validateOnly != 0;
}

//! Pretends the stream is (1) or is not (0) being captured into a CUDA graph.
HYBRIDTRT_EMULATION_API void hybridtrtEmulationSetCapturing(int32_t capturing)
{
    emu::state().capturing = capturing != 0;
}

//! Switches the current device (opt-ins are per device, as cudaFuncSetAttribute's).
HYBRIDTRT_EMULATION_API void hybridtrtEmulationSetDevice(int32_t device)
{
    emu::state().device = device;
}

//! Launch number `count of filters so far` (0 after a reset) runs only the blocks in [x0, x1) x [y0, y1) x [z0, z1)
//! of its grid (validated with the full grid). With virtual (MAP_NORESERVE) tensors, a real-scale launch then touches
//! only the memory of the blocks it runs.
HYBRIDTRT_EMULATION_API void hybridtrtEmulationAddBlockFilter(
    int64_t x0, int64_t x1, int64_t y0, int64_t y1, int64_t z0, int64_t z1)
{
    emu::state().filters.push_back({x0, x1, y0, y1, z0, z1});
}

//! Plants faults the tests must catch (emu::Plants): 32-bit global offsets, fp16 chunk start states. Reset clears.
HYBRIDTRT_EMULATION_API void hybridtrtEmulationPlant(int32_t int32Offsets, int32_t halfStartStates)
{
    emu::state().plants.int32Offsets = int32Offsets != 0;
    emu::state().plants.halfStartStates = halfStartStates != 0;
}

//! Plants one fault of the MoE expert kernels (emu::Plants::moeFault; 0 = none). Reset clears it.
HYBRIDTRT_EMULATION_API void hybridtrtEmulationPlantMoe(int32_t fault)
{
    emu::state().plants.moeFault = fault;
}

HYBRIDTRT_EMULATION_API int64_t hybridtrtEmulationLaunchCount(void)
{
    return static_cast<int64_t>(emu::state().launches.size());
}

//! Launch `index`: out = {grid.x, grid.y, grid.z, block.x, block.y, block.z, dynamic shared bytes, valid}.
HYBRIDTRT_EMULATION_API int32_t hybridtrtEmulationLaunch(int64_t index, int64_t* out)
{
    auto const& launches = emu::state().launches;
    if (index < 0 || index >= static_cast<int64_t>(launches.size()) || out == nullptr)
    {
        return 1;
    }
    emu::LaunchRecord const& r = launches[static_cast<size_t>(index)];
    int64_t const values[8] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z,
        static_cast<int64_t>(r.sharedBytes), r.ok ? 1 : 0};
    for (int i = 0; i < 8; ++i)
    {
        out[i] = values[i];
    }
    return 0;
}

//! Refused launches and attribute calls made during a capture, since the last reset.
HYBRIDTRT_EMULATION_API int64_t hybridtrtEmulationViolations(void)
{
    return emu::state().violations;
}

HYBRIDTRT_EMULATION_API char const* hybridtrtEmulationLastError(void)
{
    return emu::state().lastError.c_str();
}

//! The launch checks alone (for the validator's own tests): empty string when the launch would be accepted.
HYBRIDTRT_EMULATION_API char const* hybridtrtEmulationCheckLaunch(
    int64_t gridX, int64_t gridY, int64_t gridZ, int64_t blockX, int64_t blockY, int64_t blockZ, size_t sharedBytes)
{
    static std::string result;
    auto const u = [](int64_t v) { return static_cast<uint32_t>(v); };
    result = emu::checkLaunch(
        nullptr, dim3(u(gridX), u(gridY), u(gridZ)), dim3(u(blockX), u(blockY), u(blockZ)), sharedBytes);
    return result.c_str();
}
