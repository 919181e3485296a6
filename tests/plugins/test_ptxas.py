"""The ptxas -v parser on a fixed report (independent of the compiler on this machine)."""

from __future__ import annotations

from hybridtrt.plugins.ptxas import format_table, hot_kernels, parse_ptxas

REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN9hybridtrt7kernels17chunkOutputKernelI6__halfLi128EEEvNS0_10ScanParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN9hybridtrt7kernels17chunkOutputKernelI6__halfLi128EEEvNS0_10ScanParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 480 bytes cmem[0]
ptxas info    : Compiling entry function '_Z10someKernelPf' for 'sm_89'
ptxas info    : Function properties for _Z10someKernelPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, 1024 bytes smem, 360 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_smem_and_spills() -> None:
    entries = parse_ptxas(REPORT)
    assert len(entries) == 2
    hot, other = entries
    assert (hot.arch, hot.registers, hot.static_smem_bytes, hot.spills) == ("sm_90", 56, 0, False)
    assert hot.kernel == "chunkOutputKernel"
    assert (other.arch, other.registers, other.static_smem_bytes) == ("sm_89", 255, 1024)
    assert (other.stack_bytes, other.spill_stores, other.spill_loads, other.spills) == (24, 16, 8, True)
    assert hot_kernels(entries) == [hot]


def test_format_table_lists_every_entry() -> None:
    table = format_table(parse_ptxas(REPORT))
    assert "sm_90" in table and "sm_89" in table and "16/8" in table
