"""Parse ``ptxas -v`` reports: registers, shared memory, stack and spills per kernel and architecture.

The CUDA build passes ``-Xptxas=-v``; `hybridtrt.plugins.build.build_plugins` keeps those lines in
``<build>/ptxas.log``. A hot kernel that spills to local memory is a performance bug that CI catches.
Dynamic shared memory is not in the report: the kernels library returns it
(``hybridtrtMamba2ChunkScanSharedMemory``, `hybridtrt.plugins.kernels.KernelLibrary.shared_memory`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["HOT_KERNELS", "KernelResources", "demangle", "format_table", "hot_kernels", "parse_ptxas"]

#: Kernels on the inference path (substrings of their mangled names).
HOT_KERNELS: tuple[str, ...] = (
    "mamba2StateUpdateKernel",
    "chunkStateKernel",
    "chunkOutputKernel",
    "moeRouteCountKernel",
    "moeRouteScanKernel",
    "moeRoutePermuteKernel",
    "moeQuantizeInputKernel",
    "moeGemmKernel",
    "moeDecodeKernel",
    "moeCombineKernel",
)

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_STACK = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


@dataclass(frozen=True)
class KernelResources:
    """ptxas resource usage of one kernel for one architecture.

    Attributes:
        mangled: Mangled kernel name as ptxas prints it.
        arch: ``sm_89``, ``sm_90``, ...
        registers: Registers per thread.
        static_smem_bytes: Static shared memory (dynamic shared memory is not reported by ptxas).
        stack_bytes: Stack frame per thread.
        spill_stores: Bytes spilled to local memory (stores).
        spill_loads: Bytes reloaded from local memory.
    """

    mangled: str
    arch: str
    registers: int
    static_smem_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        """True when the kernel touches local memory for spills."""
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def name(self) -> str:
        """Readable name (``c++filt`` when available; else the mangled name)."""
        return demangle(self.mangled)

    @property
    def kernel(self) -> str:
        """The hot-kernel family this belongs to (an entry of `HOT_KERNELS`), or ``""``."""
        return next((k for k in HOT_KERNELS if k in self.mangled), "")


def parse_ptxas(text: str) -> list[KernelResources]:
    """Parse the ``ptxas info`` lines of a build log.

    Args:
        text: Output of nvcc with ``-Xptxas=-v`` (other lines are ignored).

    Returns:
        One `KernelResources` per (kernel, arch) entry, in report order (duplicates kept once).
    """
    out: dict[tuple[str, str], KernelResources] = {}
    name = arch = None
    stack = (0, 0, 0)
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            name, arch = m["name"], m["arch"]
            stack = (0, 0, 0)
        elif (m := _STACK.search(line)) and name is not None:
            stack = (int(m["stack"]), int(m["stores"]), int(m["loads"]))
        elif (m := _USED.search(line)) and name is not None and arch is not None:
            smem = _SMEM.search(line)
            out[(name, arch)] = KernelResources(
                mangled=name,
                arch=arch,
                registers=int(m["regs"]),
                static_smem_bytes=int(smem["smem"]) if smem else 0,
                stack_bytes=stack[0],
                spill_stores=stack[1],
                spill_loads=stack[2],
            )
            name = arch = None
    return list(out.values())


def hot_kernels(resources: Iterable[KernelResources]) -> list[KernelResources]:
    """The entries of the inference-path kernels (`HOT_KERNELS`)."""
    return [r for r in resources if r.kernel]


_DEMANGLED: dict[str, str] = {}


def demangle(mangled: str) -> str:
    """Demangle with ``c++filt`` (cached); returns the input unchanged when c++filt is absent."""
    if mangled not in _DEMANGLED:
        readable = mangled
        cxxfilt = shutil.which("c++filt")
        if cxxfilt:
            proc = subprocess.run([cxxfilt, mangled], capture_output=True, text=True, check=False)
            if proc.returncode == 0 and proc.stdout.strip():
                readable = proc.stdout.strip()
        readable = re.sub(r"hybridtrt::kernels::\(anonymous namespace\)::", "", readable)
        readable = re.sub(r"^void ", "", readable)
        readable = re.sub(r"\((\w+::)*\(?\w+( namespace\))?(::\w+)*\)$", "", readable)  # drop "(Params)"
        _DEMANGLED[mangled] = readable
    return _DEMANGLED[mangled]


def format_table(resources: Iterable[KernelResources]) -> str:
    """Plain-text table: kernel, arch, registers, static smem, stack, spill stores/loads."""
    rows = sorted(resources, key=lambda r: (r.kernel, r.name, r.arch))
    header = f"{'kernel':<58} {'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        spill = f"{r.spill_stores}/{r.spill_loads}"
        lines.append(
            f"{r.name[:58]:<58} {r.arch:<6} {r.registers:>4} {r.static_smem_bytes:>6} {r.stack_bytes:>5} {spill:>11}"
        )
    return "\n".join(lines)
