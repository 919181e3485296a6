"""Configure and build ``plugins/`` with CMake; keep the ptxas resource report beside the libraries.

``python -m hybridtrt.plugins build`` and ``hybridtrt plugins build`` both end in `build_plugins`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hybridtrt.errors import HybridTrtError, MissingDependencyError, PluginBuildError
from hybridtrt.plugins import LIBRARY_NAMES, default_build_dir

__all__ = ["BuildResult", "build_plugins", "find_nvcc", "main", "source_dir"]

#: Default GPU architectures (DESIGN.md §9: sm_89 and sm_90).
DEFAULT_CUDA_ARCHS = "89;90"


@dataclass(frozen=True)
class BuildResult:
    """What a build produced.

    Attributes:
        build_dir: CMake build directory.
        kernels_library: ``libhybridtrt_kernels.so``.
        trt_library: ``libhybridtrt_trt.so``, or None when built without TensorRT.
        trt_autoreg_library: ``libhybridtrt_trt_autoreg.so`` (for loaders that only dlopen), or None.
        ptxas_log: ptxas ``-v`` report of the last compilation (per kernel and arch: registers, shared
            memory, spills); parse it with `hybridtrt.plugins.ptxas.parse_ptxas`.
        build_log: Full configure + build output.
        seconds: Wall time of configure + build.
        cuda_archs: The ``CMAKE_CUDA_ARCHITECTURES`` used.
        tensorrt_root: The TensorRT root used, or None.
    """

    build_dir: Path
    kernels_library: Path
    trt_library: Path | None
    ptxas_log: Path
    build_log: Path
    seconds: float
    cuda_archs: str
    tensorrt_root: Path | None
    trt_autoreg_library: Path | None = None


def source_dir() -> Path:
    """``plugins/`` of the repository checkout (holds ``CMakeLists.txt``)."""
    return Path(__file__).resolve().parents[2] / "plugins"


def find_nvcc() -> Path | None:
    """nvcc from ``$CUDACXX``, ``PATH``, ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``; None if absent."""
    env = os.environ.get("CUDACXX")
    if env and Path(env).is_file():
        return Path(env)
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    return None


def _run(cmd: list[str], log: list[str], step: str, log_path: Path) -> None:
    log.append("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    log.append(proc.stdout)
    log_path.write_text("\n".join(log))
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise PluginBuildError(
            f"cmake {step} failed (exit {proc.returncode}):\n{tail}",
            fix=f"read the full log in {log_path}; a stale cache is fixed by deleting {log_path.parent}",
        )


def build_plugins(
    build_dir: str | os.PathLike[str] | None = None,
    tensorrt_root: str | os.PathLike[str] | None = None,
    cuda_archs: str | Sequence[str] | None = None,
    jobs: int | None = None,
) -> BuildResult:
    """Configure and build the plugin libraries with CMake.

    Args:
        build_dir: CMake build directory; None means ``plugins/build`` of the checkout.
        tensorrt_root: TensorRT root (with ``include/NvInferRuntime.h``; ``lib/libnvinfer.so`` optional).
            None means ``$TENSORRT_ROOT`` if set, else kernels only.
        cuda_archs: ``CMAKE_CUDA_ARCHITECTURES`` as ``"89;90"`` or ``["89", "90"]``; None means
            ``"89;90"``.
        jobs: Parallel build jobs; None means the CPU count.

    Returns:
        The `BuildResult` with the library paths and the ptxas report.

    Raises:
        MissingDependencyError: cmake or nvcc is not installed.
        PluginBuildError: configure or build failed, or TENSORRT_ROOT lacks the headers.
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise MissingDependencyError(
            "cmake not found on PATH", fix="install CMake >= 3.24 (`apt-get install cmake` or `pip install cmake`)"
        )
    nvcc = find_nvcc()
    if nvcc is None:
        raise MissingDependencyError(
            "nvcc (the CUDA compiler) not found on PATH, $CUDACXX, $CUDA_HOME/bin or /usr/local/cuda/bin",
            fix="install the CUDA toolkit (12.4 or newer) and put its bin/ on PATH",
        )
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"no CMakeLists.txt in {src}", fix="run from a full hybridtrt checkout")
    out = Path(build_dir) if build_dir is not None else default_build_dir()
    out.mkdir(parents=True, exist_ok=True)
    if tensorrt_root is None and os.environ.get("TENSORRT_ROOT"):
        tensorrt_root = os.environ["TENSORRT_ROOT"]
    trt = Path(tensorrt_root).resolve() if tensorrt_root is not None else None
    if trt is not None and not (trt / "include" / "NvInferRuntime.h").is_file():
        raise PluginBuildError(
            f"TENSORRT_ROOT={trt} has no include/NvInferRuntime.h",
            fix="point --tensorrt-root at a TensorRT install or a checkout of NVIDIA/TensorRT (its include/)",
        )
    if cuda_archs is None:
        archs = DEFAULT_CUDA_ARCHS
    elif isinstance(cuda_archs, str):
        archs = cuda_archs.replace(",", ";")
    else:
        archs = ";".join(str(a) for a in cuda_archs)

    configure = [
        cmake, "-S", str(src), "-B", str(out),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        f"-DTENSORRT_ROOT={trt if trt is not None else ''}",
    ]  # fmt: skip
    build = [cmake, "--build", str(out), "-j", str(jobs or os.cpu_count() or 2)]
    log: list[str] = []
    log_path = out / "build.log"
    start = time.perf_counter()
    _run(configure, log, "configure", log_path)
    _run(build, log, "build", log_path)
    seconds = time.perf_counter() - start

    ptxas_log = out / "ptxas.log"
    ptxas_lines = [
        line for chunk in log for line in chunk.splitlines() if line.startswith("ptxas") or "bytes stack frame" in line
    ]
    if ptxas_lines:  # an incremental build that compiled nothing keeps the previous report
        ptxas_log.write_text("\n".join(ptxas_lines) + "\n")
    kernels_lib = out / LIBRARY_NAMES["kernels"]
    if not kernels_lib.is_file():
        raise PluginBuildError(f"the build finished but {kernels_lib} is missing", fix=f"read {log_path}")
    trt_lib = out / LIBRARY_NAMES["trt"]
    autoreg = out / LIBRARY_NAMES["trt_autoreg"]
    return BuildResult(
        build_dir=out,
        kernels_library=kernels_lib,
        trt_library=trt_lib if trt is not None and trt_lib.is_file() else None,
        ptxas_log=ptxas_log,
        build_log=log_path,
        seconds=seconds,
        cuda_archs=archs,
        tensorrt_root=trt,
        trt_autoreg_library=autoreg if trt is not None and autoreg.is_file() else None,
    )


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``build`` flags, shared by ``python -m hybridtrt.plugins`` and ``hybridtrt plugins``."""
    parser.add_argument("--build-dir", default=None, help="CMake build directory (default: plugins/build)")
    parser.add_argument(
        "--tensorrt-root", default=None, help="TensorRT root with include/ (default: $TENSORRT_ROOT; else kernels only)"
    )
    parser.add_argument("--cuda-archs", default=None, help='CMAKE_CUDA_ARCHITECTURES (default: "89;90")')
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel build jobs (default: CPU count)")


def run_build(args: argparse.Namespace) -> int:
    """Runs `build_plugins` from parsed flags and prints the result and the ptxas summary."""
    from hybridtrt.plugins.ptxas import format_table, hot_kernels, parse_ptxas

    result = build_plugins(
        build_dir=args.build_dir, tensorrt_root=args.tensorrt_root, cuda_archs=args.cuda_archs, jobs=args.jobs
    )
    print(f"built in {result.seconds:.1f} s for CUDA archs {result.cuda_archs}")
    print(f"  kernels: {result.kernels_library}")
    print(f"  trt:     {result.trt_library if result.trt_library else '(not built: no TENSORRT_ROOT)'}"
          + ("  (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins)" if result.trt_library else ""))
    if result.trt_autoreg_library:
        print(f"  autoreg: {result.trt_autoreg_library}  (polygraphy --plugins, trtexec --staticPlugins)")
    if result.ptxas_log.is_file():
        print(format_table(hot_kernels(parse_ptxas(result.ptxas_log.read_text()))))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hybridtrt.plugins build [--tensorrt-root DIR] [--build-dir DIR] [--cuda-archs 89;90]``."""
    parser = argparse.ArgumentParser(prog="python -m hybridtrt.plugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="configure and build plugins/ with CMake")
    add_build_arguments(build_parser)
    args = parser.parse_args(argv)
    try:
        return run_build(args)
    except HybridTrtError as err:
        print(err, file=sys.stderr)
        return err.exit_code
