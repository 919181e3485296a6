"""What an export will need, estimated from the checkpoint's headers and config before anything is traced, and
checked against what the machine has: refused up front with the figures, instead of dying in the middle.

- **disk** (`disk_bytes`): the weights in the export dtype (``weights.data``; the decode graph shares it), the
  graph files, and verification's temporary slices. `hybridtrt.exporter.target.OutputDir.check_space` compares it
  with the free space of the output directory's file system.
- **memory** (`memory_bytes`, a floor): tracing (`TRACE_BYTES` + `TRACE_BYTES_PER_LAYER` per decoder layer: the
  graph, not the weights, which are fake), streaming (the largest tensor, read and converted), verification (the
  whole model for ``full``, one window of decoder layers for ``layers``). The stages run one after another, so the
  largest counts. `check_memory` compares it with `hybridtrt.memory.available_memory` (the least of
  ``MemAvailable``, the cgroup's ``memory.max`` less its usage, ``RLIMIT_AS`` less the mapped address space, and
  ``HYBRIDTRT_MEMORY_LIMIT``: the same probe as every other command's).
"""

from __future__ import annotations

from hybridtrt.errors import ExportError
from hybridtrt.files import human_bytes
from hybridtrt.memory import available_memory

#: Memory tracing needs whatever the model (torch.export + the ONNX optimizer, weights fake).
TRACE_BYTES = 256 << 20
#: And per decoder layer (the traced graph grows with the layers).
TRACE_BYTES_PER_LAYER = 8 << 20
#: Disk per graph file (nodes, function bodies, initializers below the external-data threshold).
GRAPH_FILE_BYTES = 4 << 20




def disk_bytes(parameter_bytes: int, graphs: int, verify: bool, held_bytes: int = 0) -> int:
    """Bytes an export writes at most at once: weights + graph files + verification's temporary
    files (``held_bytes``: the states verification by layer windows holds on disk)."""
    from hybridtrt.exporter.verify import temporary_bytes

    return parameter_bytes + graphs * GRAPH_FILE_BYTES + (temporary_bytes(parameter_bytes, held_bytes) if verify else 0)


def memory_bytes(parameter_bytes: int, largest_tensor: int, num_layers: int, verify_mode: str | None) -> dict[str, int]:
    """The least memory each stage of an export needs (``verify_mode`` None: not verified)."""
    from hybridtrt.exporter.verify import FULL_GRAPH_MAX_BYTES, WINDOW_FRACTION

    stages = {"tracing": TRACE_BYTES + TRACE_BYTES_PER_LAYER * num_layers, "streaming weights": 2 * largest_tensor}
    if verify_mode is not None:
        full = verify_mode == "full" or (verify_mode == "auto" and parameter_bytes <= FULL_GRAPH_MAX_BYTES)
        if full:
            stages["verification (whole graph)"] = parameter_bytes
        else:
            stages["verification (decoder-layer windows)"] = 2 * max(int(parameter_bytes * WINDOW_FRACTION), largest_tensor)
    return stages



def check_memory(stages: dict[str, int]) -> None:
    """Refuse when the largest stage needs more memory than the tightest limit leaves.

    Raises:
        ExportError: Naming the need per stage, the limit and what is available, and the fix.
    """
    needed_stage = max(stages, key=stages.__getitem__)
    needed = stages[needed_stage]
    room = available_memory()
    if room.nbytes is None or needed <= room.nbytes:
        return
    available, what = room.nbytes, room.source
    shown = ", ".join(f"{k} {human_bytes(v)}" for k, v in stages.items())
    verify = "verification" in needed_stage
    raise ExportError(
        f"the export needs at least {human_bytes(needed)} of memory for {needed_stage} ({shown}), and {human_bytes(available)} "
        f"is available: {what}",
        fix=f"raise the limit to at least {human_bytes(needed - available)} more (ulimit -v, the container's memory limit) or "
        "export on a machine with more memory"
        + ("; or verify by windows of decoder layers (--verify layers), or skip verification (--no-verify)" if verify else ""),
    )


__all__ = ["check_memory", "disk_bytes", "memory_bytes"]
