"""``hybridtrt plugins build``: compile the CUDA kernels (and the TensorRT plugins when
``--tensorrt-root``/``TENSORRT_ROOT`` is given) with CMake."""

from __future__ import annotations

import argparse

HELP = "build the CUDA kernel library and TensorRT plugins (CMake); see plugins/README.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"], help="what to do")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of `python -m hybridtrt.plugins build`")


def run(args: argparse.Namespace) -> int:
    from hybridtrt.plugins.__main__ import main

    return main([args.action, *args.rest])
