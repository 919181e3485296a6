"""``hybridtrt`` console script: a registry of subcommands, one module each.

Each module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. User errors
(`HybridTrtError`) print one readable message and exit with their code, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hybridtrt import __version__
from hybridtrt.errors import HybridTrtError

#: subcommand -> module (imported lazily so `hybridtrt --help` stays fast).
COMMANDS: dict[str, str] = {
    "demo": "hybridtrt.cli.demo",
    "export": "hybridtrt.cli.export",
    "validate": "hybridtrt.cli.validate",
    "compare": "hybridtrt.cli.compare",
    "build": "hybridtrt.cli.build",
    "generate": "hybridtrt.cli.generate",
    "inspect": "hybridtrt.cli.inspect",
    "preset": "hybridtrt.cli.preset",
    "plugins": "hybridtrt.cli.plugins",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, module in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridtrt", description="Hybrid Mamba-2 + Transformer models to ONNX and TensorRT, with proof.")
    parser.add_argument("--version", action="version", version=f"hybridtrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from rich.markup import escape

    from hybridtrt.cli.common import err_console

    try:
        return int(args._run(args) or 0)
    except HybridTrtError as e:
        err_console.print(f"[bold red]error[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
