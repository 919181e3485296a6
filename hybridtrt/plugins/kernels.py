"""ctypes binding of ``libhybridtrt_kernels.so`` (the C ABI in ``plugins/kernels/include/hybridtrt/ssdKernels.h`` and
``moeKernels.h``).

Host-only queries (ABI version, workspace sizes, shared memory) work on any machine; the launchers
take torch CUDA tensors and enqueue on the current torch stream. The launchers themselves never
allocate; the convenience wrappers here allocate outputs and workspace with torch when not given.

Shapes (DESIGN.md §5):
    chunk_scan:   x [B,L,H,P], dt [B,L,H], A [H] fp32, B/C [B,L,G,N], D [H] fp32, initial_state [B,H,P,N]
                  -> y [B,L,H,P] float32, final_state [B,H,P,N] (state dtype)
    state_update: x [B,H,P], dt [B,H], A, B/C [B,G,N], D, state [B,H,P,N]
                  -> y [B,H,P] float32, new_state [B,H,P,N] (``new_state=state`` updates in place)
    moe_experts:  x [T,D], topk_indices [T,K] int64|int32, topk_weights [T,K] fp32, up_proj [E,I,D],
                  down_proj [E,D,I] (x's dtype)  ->  y [T,D] in x's dtype
    moe_experts_fp8: the same with float8_e4m3fn up/down_proj, up_weight_scale [E,1|I], up_input_scale [E],
                  down_weight_scale [E,1|D], down_input_scale [E] (fp32)  ->  y [T,D] in x's dtype

y of the SSD ops is float32 whatever x's dtype (C ABI version 3): it feeds a gated RMSNorm that normalises in fp32.
The MoE experts' y is in x's dtype (DESIGN.md §5, HF's rule). The MoE part of the ABI has its own version
(`MOE_ABI_VERSION`): a library without it still loads, and the MoE methods say how to rebuild.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridtrt.errors import InputError, PluginBuildError
from hybridtrt.plugins import library_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "ABI_VERSION",
    "DTYPE_CODES",
    "MAX_CHUNK",
    "MOE_ABI_VERSION",
    "MOE_DTYPE_CODES",
    "MOE_TACTICS",
    "MOE_WORKSPACE_SECTIONS",
    "STATUS_NAMES",
    "START_STATE_ITEMSIZE",
    "SUB_TILE",
    "KernelLibrary",
    "KernelStatusError",
    "chunk_length",
    "scan_workspace_bytes",
]

#: HYBRIDTRT_KERNELS_ABI_VERSION this binding is written for (3: y is float32; 4: fp16 start states fp32); a library of another version is
#: refused at load, since its launchers would read or write buffers of other sizes than the ones passed here.
ABI_VERSION = 4

#: C ABI dtype codes (HybridTrtDtype).
DTYPE_CODES: dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}

#: C ABI status codes (HybridTrtStatus).
STATUS_NAMES: dict[int, str] = {
    0: "SUCCESS",
    1: "INVALID_SHAPE",
    2: "UNSUPPORTED_HEAD_DIM",
    3: "UNSUPPORTED_D_STATE",
    4: "UNSUPPORTED_DTYPE",
    5: "NULL_POINTER",
    6: "MISALIGNED_POINTER",
    7: "WORKSPACE_TOO_SMALL",
    8: "CUDA_ERROR",
    9: "NOT_PREPARED",
    10: "INVALID_TACTIC",
}

#: HYBRIDTRT_MOE_KERNELS_ABI_VERSION this binding is written for (moeKernels.h).
MOE_ABI_VERSION = 1
#: Dtype codes of the MoE kernels beyond `DTYPE_CODES` (HybridTrtMoeDtype): the index dtypes, the FP8 weights.
MOE_DTYPE_CODES: dict[str, int] = {"int32": 3, "int64": 4, "float8_e4m3fn": 5}
#: HybridTrtMoeTactic: "auto" is `KernelLibrary.moe_tactic`'s rule (decode while T·K <= 16·E).
MOE_TACTICS: dict[str, int] = {"auto": 0, "prefill": 1, "decode": 2}
#: HybridTrtMoeWorkspaceSection, in order (`KernelLibrary.moe_workspace_layout`).
MOE_WORKSPACE_SECTIONS = (
    "header", "tile_counts", "expert_offsets", "work_expert", "work_row", "active_experts", "row_pair", "pair_row",
    "x_quant", "h", "out",
)  # fmt: skip

#: Tokens per sub-tile of the scan kernels (GEMM depth, rows of an output tile); chunks are multiples of it.
SUB_TILE = 64
#: Longest chunk of the scan kernels.
MAX_CHUNK = 256
#: Bytes per chunk start state in the scan's workspace, by activation dtype: fp32 for fp16 (a start state can pass
#: fp16's 65504 where the fp32 recurrence is fine, as y can), the activation dtype otherwise (bf16 has fp32's range).
START_STATE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 4, "bfloat16": 2}

_i64, _i32, _size, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_size_t, ctypes.c_void_p


class KernelStatusError(InputError):
    """A C ABI call returned a non-zero HybridTrtStatus."""

    stage = "kernels"

    def __init__(self, function: str, status: int, detail: str) -> None:
        self.status = status
        super().__init__(
            f"{function} returned {STATUS_NAMES.get(status, status)} ({status}): {detail}",
            fix="check the shapes and dtypes against the contract in plugins/README.md",
        )


def _dtype_code(dtype: Any) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise InputError(f"dtype {dtype} is not supported by the kernels", fix="use float32, float16 or bfloat16")
    return DTYPE_CODES[name]


def chunk_length(chunk_size: int) -> int:
    """Tokens per chunk the kernels use for an op's ``chunk_size``: rounded up to a multiple of 64, capped at 256.

    Mirrors ``hybridtrtMamba2ChunkScanChunkLength`` (tests compare the two); 0 when ``chunk_size < 1``.
    """
    if chunk_size < 1:
        return 0
    return min(-(-chunk_size // SUB_TILE) * SUB_TILE, MAX_CHUNK)


def scan_workspace_bytes(
    batch: int, seq_len: int, heads: int, head_dim: int, d_state: int, chunk_size: int, act_dtype: str = "float16"
) -> int:
    """The documented workspace formula of the scan: every chunk's start state, fp32 for fp16 activations.

    ``align256(B·H·⌈L/Q⌉·P·N·s)`` with ``Q = chunk_length(chunk_size)`` and
    ``s = START_STATE_ITEMSIZE[act_dtype]`` (4 for float32 and float16, 2 for bfloat16); mirrors the C code.
    Python integers: no 32- or 64-bit wrap.
    """
    chunks = -(-seq_len // chunk_length(chunk_size))
    return -(-(batch * heads * chunks * head_dim * d_state * START_STATE_ITEMSIZE[act_dtype]) // 256) * 256


class KernelLibrary:
    """The loaded kernels library.

    Args:
        path: Library file; None means `hybridtrt.plugins.library_path("kernels")`.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else library_path("kernels")
        lib = ctypes.CDLL(str(self.path))
        lib.hybridtrtKernelsAbiVersion.restype = _i32
        lib.hybridtrtKernelsAbiVersion.argtypes = []
        version = int(lib.hybridtrtKernelsAbiVersion())
        if version != ABI_VERSION:
            raise PluginBuildError(
                f"{self.path} has kernels C ABI version {version}, this hybridtrt needs {ABI_VERSION} "
                "(version 3 writes y in float32)",
                fix="rebuild the kernels from this checkout with `hybridtrt plugins build` "
                "(or point $HYBRIDTRT_PLUGIN_DIR at a build of it)",
            )
        lib.hybridtrtStatusString.restype = ctypes.c_char_p
        lib.hybridtrtStatusString.argtypes = [_i32]
        lib.hybridtrtMamba2ChunkScanChunkLength.restype = _i32
        lib.hybridtrtMamba2ChunkScanChunkLength.argtypes = [_i64]
        lib.hybridtrtMamba2ChunkScanPrepare.restype = _i32
        lib.hybridtrtMamba2ChunkScanPrepare.argtypes = [_i32, _i64]
        lib.hybridtrtMamba2ChunkScanSharedMemory.restype = _i32
        lib.hybridtrtMamba2ChunkScanSharedMemory.argtypes = [_i32, _i64, ctypes.POINTER(_size), ctypes.POINTER(_size)]
        lib.hybridtrtMamba2ChunkScanWorkspaceSize.restype = _i32
        lib.hybridtrtMamba2ChunkScanWorkspaceSize.argtypes = [_i64] * 7 + [_i32] * 3 + [ctypes.POINTER(_size)]
        lib.hybridtrtMamba2StateUpdateWorkspaceSize.restype = _i32
        lib.hybridtrtMamba2StateUpdateWorkspaceSize.argtypes = [_i64] * 5 + [_i32] * 3 + [ctypes.POINTER(_size)]
        lib.hybridtrtMamba2ChunkScan.restype = _i32
        lib.hybridtrtMamba2ChunkScan.argtypes = (
            [_ptr] * 9 + [_i64] * 7 + [_i32] * 3 + [_ptr, _size, _ptr]
        )
        lib.hybridtrtMamba2StateUpdate.restype = _i32
        lib.hybridtrtMamba2StateUpdate.argtypes = [_ptr] * 9 + [_i64] * 5 + [_i32] * 3 + [_ptr]
        self.has_moe = hasattr(lib, "hybridtrtMoeKernelsAbiVersion")
        if self.has_moe:
            lib.hybridtrtMoeKernelsAbiVersion.restype = _i32
            lib.hybridtrtMoeKernelsAbiVersion.argtypes = []
            lib.hybridtrtMoeExpertsTactic.restype = _i32
            lib.hybridtrtMoeExpertsTactic.argtypes = [_i64] * 3
            lib.hybridtrtMoeExpertsWorkspaceSize.restype = _i32
            lib.hybridtrtMoeExpertsWorkspaceSize.argtypes = [_i64] * 5 + [_i32] * 2 + [ctypes.POINTER(_size)]
            lib.hybridtrtMoeExpertsWorkspaceLayout.restype = _i32
            lib.hybridtrtMoeExpertsWorkspaceLayout.argtypes = [_i64] * 5 + [_i32] * 2 + [ctypes.POINTER(_size)]
            lib.hybridtrtMoeExperts.restype = _i32
            lib.hybridtrtMoeExperts.argtypes = [_ptr] * 6 + [_i64] * 5 + [_i32] * 3 + [_ptr, _size, _ptr]
            lib.hybridtrtMoeExpertsFp8.restype = _i32
            lib.hybridtrtMoeExpertsFp8.argtypes = [_ptr] * 10 + [_i64] * 7 + [_i32] * 3 + [_ptr, _size, _ptr]
        self._lib = lib

    # ---- host-only queries -------------------------------------------------------------------------

    def abi_version(self) -> int:
        """HYBRIDTRT_KERNELS_ABI_VERSION of the loaded library."""
        return int(self._lib.hybridtrtKernelsAbiVersion())

    def status_string(self, status: int) -> str:
        """Description of a status code."""
        return self._lib.hybridtrtStatusString(status).decode()

    def chunk_length(self, chunk_size: int) -> int:
        """Tokens per chunk the scan kernels use for an op's ``chunk_size`` (0 when < 1)."""
        return int(self._lib.hybridtrtMamba2ChunkScanChunkLength(chunk_size))

    def prepare(self, act_dtype: str | None = None, d_state: int | None = None) -> None:
        """Opt the scan kernels in to their shared memory on the current device (None = every dtype / d_state).

        Call it outside a CUDA-graph capture, before capturing scans.
        """
        status = self._lib.hybridtrtMamba2ChunkScanPrepare(
            DTYPE_CODES[act_dtype] if act_dtype else -1, d_state if d_state is not None else -1
        )
        self._check("hybridtrtMamba2ChunkScanPrepare", status)

    def _check(self, function: str, status: int) -> None:
        if status != 0:
            raise KernelStatusError(function, status, self.status_string(status))

    def shared_memory(self, act_dtype: str, d_state: int) -> tuple[int, int]:
        """Dynamic shared memory (bytes) of (chunkStateKernel, chunkOutputKernel)."""
        a, b = _size(), _size()
        status = self._lib.hybridtrtMamba2ChunkScanSharedMemory(DTYPE_CODES[act_dtype], d_state, a, b)
        self._check("hybridtrtMamba2ChunkScanSharedMemory", status)
        return a.value, b.value

    def chunk_scan_workspace_status(
        self,
        batch: int,
        seq_len: int,
        heads: int,
        head_dim: int,
        groups: int,
        d_state: int,
        chunk_size: int = 128,
        act_dtype: str = "float16",
        dt_dtype: str | None = None,
        state_dtype: str = "float32",
    ) -> tuple[int, int]:
        """Raw ``(status, bytes)`` of hybridtrtMamba2ChunkScanWorkspaceSize (dtype names as in `DTYPE_CODES`)."""
        out = _size()
        status = self._lib.hybridtrtMamba2ChunkScanWorkspaceSize(
            batch, seq_len, heads, head_dim, groups, d_state, chunk_size,
            DTYPE_CODES.get(act_dtype, 99), DTYPE_CODES.get(dt_dtype or act_dtype, 99),
            DTYPE_CODES.get(state_dtype, 99), out,
        )  # fmt: skip
        return int(status), out.value

    def chunk_scan_workspace_size(self, *args: Any, **kwargs: Any) -> int:
        """Workspace bytes of the scan; same arguments as `chunk_scan_workspace_status`; raises on error."""
        status, size = self.chunk_scan_workspace_status(*args, **kwargs)
        self._check("hybridtrtMamba2ChunkScanWorkspaceSize", status)
        return size

    def state_update_workspace_status(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        groups: int,
        d_state: int,
        act_dtype: str = "float16",
        dt_dtype: str | None = None,
        state_dtype: str = "float32",
    ) -> tuple[int, int]:
        """Raw ``(status, bytes)`` of hybridtrtMamba2StateUpdateWorkspaceSize."""
        out = _size()
        status = self._lib.hybridtrtMamba2StateUpdateWorkspaceSize(
            batch, heads, head_dim, groups, d_state,
            DTYPE_CODES.get(act_dtype, 99), DTYPE_CODES.get(dt_dtype or act_dtype, 99),
            DTYPE_CODES.get(state_dtype, 99), out,
        )  # fmt: skip
        return int(status), out.value

    # ---- launchers (torch CUDA tensors) --------------------------------------------------------------

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if not t.is_cuda or not t.is_contiguous():
            raise InputError(
                f"kernel arguments must be contiguous CUDA tensors (got device={t.device}, "
                f"contiguous={t.is_contiguous()}, shape={tuple(t.shape)})",
                fix="call .contiguous().cuda() on the argument",
            )
        return t.data_ptr()

    @staticmethod
    def _check_output(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """A preallocated output must have exactly the shape and dtype the kernel writes (it writes raw bytes)."""
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise InputError(
                f"{name} is {tuple(t.shape)} {t.dtype}, the kernel writes {shape} {dtype}",
                fix=f"pass {name}=None (allocated for you) or a contiguous {dtype} tensor of shape {shape}",
            )

    @staticmethod
    def _stream(stream: Any) -> int:
        import torch

        s = stream if stream is not None else torch.cuda.current_stream()
        return int(s.cuda_stream)

    def chunk_scan(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        *,
        chunk_size: int = 128,
        state_dtype: Any = None,
        y: torch.Tensor | None = None,
        final_state: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
        stream: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Enqueue hybridtrtMamba2ChunkScan.

        Args:
            x: ``[B, L, H, P]``; B and C ``[B, L, G, N]`` in x's dtype; dt ``[B, L, H]``.
            A: ``[H]`` fp32. D: ``[H]`` fp32 or None.
            initial_state: ``[B, H, P, N]`` or None (zero state; then ``state_dtype`` picks the output
                dtype, default fp32).
            chunk_size: The op's ``chunk_size`` attribute (see `chunk_length`).
            y, final_state, workspace: Preallocated outputs / uint8 scratch (allocated when None); ``y`` is
                ``[B, L, H, P]`` float32, ``final_state`` ``[B, H, P, N]`` in the state dtype.
            stream: torch.cuda.Stream; None means the current stream.

        Returns:
            ``(y, final_state)``: y ``[B, L, H, P]`` float32.
        """
        import torch

        batch, seq_len, heads, head_dim = x.shape
        groups, d_state = B.shape[2], B.shape[3]
        sdt = initial_state.dtype if initial_state is not None else (state_dtype or torch.float32)
        if y is None:
            y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if final_state is None:
            final_state = torch.empty(batch, heads, head_dim, d_state, dtype=sdt, device=x.device)
        self._check_output("y", y, tuple(x.shape), torch.float32)
        self._check_output("final_state", final_state, (batch, heads, head_dim, d_state), sdt)
        codes = (_dtype_code(x.dtype), _dtype_code(dt.dtype), _dtype_code(sdt))
        names = [k for c in codes for k, v in DTYPE_CODES.items() if v == c]
        size = self.chunk_scan_workspace_size(batch, seq_len, heads, head_dim, groups, d_state, chunk_size, *names)
        if workspace is None:
            workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=x.device)
        status = self._lib.hybridtrtMamba2ChunkScan(
            self._ptr(x), self._ptr(dt), self._ptr(A), self._ptr(B), self._ptr(C), self._ptr(D),
            self._ptr(initial_state), self._ptr(y), self._ptr(final_state),
            batch, seq_len, heads, head_dim, groups, d_state, chunk_size, *codes,
            self._ptr(workspace), workspace.numel(), self._stream(stream),
        )  # fmt: skip
        self._check("hybridtrtMamba2ChunkScan", status)
        return y, final_state

    def state_update(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        state: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
        new_state: torch.Tensor | None = None,
        stream: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Enqueue hybridtrtMamba2StateUpdate.

        Args:
            x: ``[B, H, P]``; dt ``[B, H]``; B and C ``[B, G, N]`` in x's dtype.
            A: ``[H]`` fp32. D: ``[H]`` fp32 or None.
            state: ``[B, H, P, N]``.
            y: Preallocated ``[B, H, P]`` float32 output (allocated when None).
            new_state: Output state; None allocates one, ``state`` itself updates in place.
            stream: torch.cuda.Stream; None means the current stream.

        Returns:
            ``(y, new_state)``: y ``[B, H, P]`` float32.
        """
        import torch

        batch, heads, head_dim = x.shape
        groups, d_state = B.shape[1], B.shape[2]
        if y is None:
            y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if new_state is None:
            new_state = torch.empty_like(state)
        self._check_output("y", y, tuple(x.shape), torch.float32)
        self._check_output("new_state", new_state, tuple(state.shape), state.dtype)
        status = self._lib.hybridtrtMamba2StateUpdate(
            self._ptr(x), self._ptr(dt), self._ptr(A), self._ptr(B), self._ptr(C), self._ptr(D),
            self._ptr(state), self._ptr(y), self._ptr(new_state),
            batch, heads, head_dim, groups, d_state,
            _dtype_code(x.dtype), _dtype_code(dt.dtype), _dtype_code(state.dtype), self._stream(stream),
        )  # fmt: skip
        self._check("hybridtrtMamba2StateUpdate", status)
        return y, new_state


    # ---- MoE experts (moeKernels.h) -------------------------------------------------------------------------------

    def _moe(self) -> ctypes.CDLL:
        """The library, once it is known to have the MoE kernels of this binding's `MOE_ABI_VERSION`."""
        version = int(self._lib.hybridtrtMoeKernelsAbiVersion()) if self.has_moe else None
        if version != MOE_ABI_VERSION:
            raise PluginBuildError(
                f"{self.path} has " + (f"MoE kernels C ABI version {version}" if version is not None else "no MoE kernels")
                + f", this hybridtrt needs version {MOE_ABI_VERSION}",
                fix="rebuild the kernels from this checkout with `hybridtrt plugins build` "
                "(or point $HYBRIDTRT_PLUGIN_DIR at a build of it)",
            )
        return self._lib

    def moe_abi_version(self) -> int:
        """HYBRIDTRT_MOE_KERNELS_ABI_VERSION of the loaded library."""
        return int(self._moe().hybridtrtMoeKernelsAbiVersion())

    def moe_tactic(self, tokens: int, top_k: int, experts: int) -> str:
        """The path the ``"auto"`` tactic takes for T tokens: ``"decode"`` while T·K <= 16·E, else ``"prefill"``."""
        code = int(self._moe().hybridtrtMoeExpertsTactic(tokens, top_k, experts))
        names = {v: k for k, v in MOE_TACTICS.items()}
        if code not in names:
            raise InputError(f"no MoE tactic for T={tokens}, K={top_k}, E={experts}", fix="pass T >= 0, K >= 1, E >= 1")
        return names[code]

    @staticmethod
    def _moe_codes(act_dtype: str, weight_dtype: str | None) -> tuple[int, int]:
        act = DTYPE_CODES.get(act_dtype, 99)
        weight = act if weight_dtype in (None, act_dtype) else {**DTYPE_CODES, **MOE_DTYPE_CODES}.get(weight_dtype, 99)
        return act, weight

    def moe_workspace_status(
        self, max_tokens: int, top_k: int, experts: int, hidden: int, inter: int, act_dtype: str = "bfloat16",
        weight_dtype: str | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """Raw ``(status, bytes)`` of hybridtrtMoeExpertsWorkspaceSize; ``weight_dtype`` None means x's dtype
        (MoeExperts), ``"float8_e4m3fn"`` MoeExpertsFp8."""
        out = _size()
        status = self._moe().hybridtrtMoeExpertsWorkspaceSize(
            max_tokens, top_k, experts, hidden, inter, *self._moe_codes(act_dtype, weight_dtype), out
        )
        return int(status), out.value

    def moe_workspace_size(self, *args: Any, **kwargs: Any) -> int:
        """Workspace bytes of the MoE experts for up to ``max_tokens`` tokens (arguments of
        `moe_workspace_status`); raises on error."""
        status, size = self.moe_workspace_status(*args, **kwargs)
        self._check("hybridtrtMoeExpertsWorkspaceSize", status)
        return size

    def moe_workspace_layout(
        self, tokens: int, top_k: int, experts: int, hidden: int, inter: int, act_dtype: str = "bfloat16",
        weight_dtype: str | None = None,
    ) -> dict[str, int]:  # fmt: skip
        """Byte offset of every workspace section (`MOE_WORKSPACE_SECTIONS`) of a call with ``tokens`` tokens, and
        ``"end"``: the bytes that call uses. For tests and debugging (reading the routing back)."""
        offsets = (_size * (len(MOE_WORKSPACE_SECTIONS) + 1))()
        status = self._moe().hybridtrtMoeExpertsWorkspaceLayout(
            tokens, top_k, experts, hidden, inter, *self._moe_codes(act_dtype, weight_dtype), offsets
        )
        self._check("hybridtrtMoeExpertsWorkspaceLayout", status)
        return dict(zip((*MOE_WORKSPACE_SECTIONS, "end"), (int(v) for v in offsets), strict=True))

    @staticmethod
    def _moe_shapes(x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor, up_proj: torch.Tensor,
                    down_proj: torch.Tensor) -> tuple[int, int, int, int, int]:  # fmt: skip
        """``(T, K, E, D, I)`` after checking the shapes and the index / routing-weight dtypes against the contract."""
        import torch

        tokens, hidden = x.shape
        experts, inter = up_proj.shape[0], up_proj.shape[1]
        top_k = topk_indices.shape[1]
        want = {
            "topk_indices": (tuple(topk_indices.shape), (tokens, top_k)),
            "topk_weights": (tuple(topk_weights.shape), (tokens, top_k)),
            "up_proj": (tuple(up_proj.shape), (experts, inter, hidden)),
            "down_proj": (tuple(down_proj.shape), (experts, hidden, inter)),
        }
        for name, (got, shape) in want.items():
            if got != shape:
                raise InputError(f"{name} is {got}, the MoE contract needs {shape} for x {tuple(x.shape)}",
                                 fix="pass the tensors of DESIGN.md §5 MoeExperts: up_proj [E,I,D], down_proj [E,D,I]")  # fmt: skip
        if topk_indices.dtype not in (torch.int64, torch.int32) or topk_weights.dtype != torch.float32:
            raise InputError(
                f"topk_indices is {topk_indices.dtype} and topk_weights {topk_weights.dtype}",
                fix="pass int64 (or int32) topk_indices and float32 topk_weights",
            )
        return tokens, top_k, experts, hidden, inter

    def _moe_outputs(
        self, x: torch.Tensor, shapes: tuple[int, int, int, int, int], weight_dtype: str | None, tactic: str,
        y: torch.Tensor | None, workspace: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(y, workspace)``: the preallocated ones checked (y must be ``[T, D]`` in x's dtype: the kernels write raw
        bytes), or allocated; the workspace sized for this T."""
        import torch

        tokens, top_k, experts, hidden, inter = shapes
        if tactic not in MOE_TACTICS:
            raise InputError(f"unknown MoE tactic {tactic!r}", fix=f"use one of {sorted(MOE_TACTICS)}")
        _dtype_code(x.dtype)
        if y is None:
            y = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
        self._check_output("y", y, (tokens, hidden), x.dtype)
        act = str(x.dtype).removeprefix("torch.")
        size = self.moe_workspace_size(tokens, top_k, experts, hidden, inter, act, weight_dtype)
        if workspace is None:
            workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=x.device)
        return y, workspace

    def moe_experts(
        self,
        x: torch.Tensor,
        topk_indices: torch.Tensor,
        topk_weights: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        *,
        tactic: str = "auto",
        y: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
        stream: Any = None,
    ) -> torch.Tensor:
        """Enqueue hybridtrtMoeExperts (MoeExperts, DESIGN.md §5).

        Args:
            x: ``[T, D]`` fp32 / fp16 / bf16. topk_indices ``[T, K]`` int64 or int32; topk_weights ``[T, K]`` fp32.
            up_proj: ``[E, I, D]``; down_proj ``[E, D, I]``, both in x's dtype.
            tactic: ``"auto"``, ``"prefill"`` (grouped GEMM) or ``"decode"`` (GEMV-like).
            y, workspace: Preallocated ``[T, D]`` output in x's dtype / uint8 scratch (allocated when None; the
                workspace 256-byte aligned, as torch allocations are).
            stream: torch.cuda.Stream; None means the current stream.

        Returns:
            ``y [T, D]`` in x's dtype.
        """
        shapes = self._moe_shapes(x, topk_indices, topk_weights, up_proj, down_proj)
        if up_proj.dtype != x.dtype or down_proj.dtype != x.dtype:
            raise InputError(f"x is {x.dtype} but the experts are {up_proj.dtype} / {down_proj.dtype}",
                             fix="cast the expert stacks to x's dtype (FP8 experts: moe_experts_fp8)")  # fmt: skip
        y, workspace = self._moe_outputs(x, shapes, None, tactic, y, workspace)
        status = self._moe().hybridtrtMoeExperts(
            self._ptr(x), self._ptr(topk_indices), self._ptr(topk_weights), self._ptr(up_proj), self._ptr(down_proj),
            self._ptr(y), *shapes, _dtype_code(x.dtype), MOE_DTYPE_CODES[str(topk_indices.dtype).removeprefix("torch.")],
            MOE_TACTICS[tactic], self._ptr(workspace), workspace.numel(), self._stream(stream),
        )  # fmt: skip
        self._check("hybridtrtMoeExperts", status)
        return y

    def moe_experts_fp8(
        self,
        x: torch.Tensor,
        topk_indices: torch.Tensor,
        topk_weights: torch.Tensor,
        up_proj: torch.Tensor,
        up_weight_scale: torch.Tensor,
        up_input_scale: torch.Tensor,
        down_proj: torch.Tensor,
        down_weight_scale: torch.Tensor,
        down_input_scale: torch.Tensor,
        *,
        tactic: str = "auto",
        y: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
        stream: Any = None,
    ) -> torch.Tensor:
        """Enqueue hybridtrtMoeExpertsFp8 (MoeExpertsFp8, DESIGN.md §5).

        Args:
            x, topk_indices, topk_weights: As `moe_experts`.
            up_proj: ``[E, I, D]`` float8_e4m3fn; up_weight_scale ``[E, 1]`` or ``[E, I]``; up_input_scale ``[E]``.
            down_proj: ``[E, D, I]`` float8_e4m3fn; down_weight_scale ``[E, 1]`` or ``[E, D]``; down_input_scale
                ``[E]``. Scales fp32.
            tactic, y, workspace, stream: As `moe_experts`.

        Returns:
            ``y [T, D]`` in x's dtype.
        """
        import torch

        shapes = self._moe_shapes(x, topk_indices, topk_weights, up_proj, down_proj)
        _, _, experts, hidden, inter = shapes
        scales = {"up_weight_scale": (up_weight_scale, inter), "up_input_scale": (up_input_scale, None),
                  "down_weight_scale": (down_weight_scale, hidden), "down_input_scale": (down_input_scale, None)}  # fmt: skip
        for name, (scale, channels) in scales.items():
            ok = [(experts,)] if channels is None else [(experts, 1), (experts, channels)]
            if tuple(scale.shape) not in ok or scale.dtype != torch.float32:
                raise InputError(f"{name} is {tuple(scale.shape)} {scale.dtype}, the contract needs one of {ok} float32",
                                 fix="pass the scales of DESIGN.md §5 MoeExpertsFp8 as float32")  # fmt: skip
        if up_proj.dtype != torch.float8_e4m3fn or down_proj.dtype != torch.float8_e4m3fn:
            raise InputError(f"the FP8 experts are {up_proj.dtype} / {down_proj.dtype}",
                             fix="pass float8_e4m3fn up_proj / down_proj (experts in x's dtype: moe_experts)")  # fmt: skip
        y, workspace = self._moe_outputs(x, shapes, "float8_e4m3fn", tactic, y, workspace)
        status = self._moe().hybridtrtMoeExpertsFp8(
            self._ptr(x), self._ptr(topk_indices), self._ptr(topk_weights), self._ptr(up_proj),
            self._ptr(up_weight_scale), self._ptr(up_input_scale), self._ptr(down_proj), self._ptr(down_weight_scale),
            self._ptr(down_input_scale), self._ptr(y), *shapes, up_weight_scale.shape[1], down_weight_scale.shape[1],
            _dtype_code(x.dtype), MOE_DTYPE_CODES[str(topk_indices.dtype).removeprefix("torch.")],
            MOE_TACTICS[tactic], self._ptr(workspace), workspace.numel(), self._stream(stream),
        )  # fmt: skip
        self._check("hybridtrtMoeExpertsFp8", status)
        return y
